"""Self-supervised objectives: losses, regularisers, teacher centering, masking. Know nothing of files or models."""
