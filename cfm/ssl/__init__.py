"""Self-supervised objectives: losses, regularisers, teacher centering, masking.

They know nothing of files or models."""
