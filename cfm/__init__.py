"""cfm: multimodal cancer foundation models in JAX."""
