"""cfm: multimodal cancer foundation models in JAX.

`cfm.load_pretrained(path)` (see `cfm.pretrained`) is imported on first use, so `import cfm`
stays cheap."""


def __getattr__(name: str):
    if name == "load_pretrained":
        from cfm.pretrained import load_pretrained  # lazy: keeps `import cfm` free of jax

        return load_pretrained
    raise AttributeError(f"module 'cfm' has no attribute {name!r}")
