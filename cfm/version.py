"""The installed cfm package's version, as provenance records (export config.json, the
manifest of `data_prep.prepare_omics`) write it."""

from __future__ import annotations

from importlib import metadata


def cfm_version() -> str:
    """The installed distribution's version of cfm; "unknown" when cfm runs uninstalled."""
    try:
        return metadata.version("cfm")
    except metadata.PackageNotFoundError:
        return "unknown"
