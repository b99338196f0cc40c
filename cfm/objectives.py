"""The one place that maps `config.objective` to its implementation (`cfm.ssl.objective`).

    objective = objectives.get(config)   # a ConfigDict or a checkpoint's config dict

Adding an objective is one line here (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from typing import Any, Mapping

from cfm.config_check import ConfigError
from cfm.ssl import align, dinov2, mgm
from cfm.ssl.objective import Objective

OBJECTIVES: dict[str, Objective] = {
    "dinov2": dinov2.OBJECTIVE,  # configs/dino_vit.py: ViT on tiles, DINO + iBOT + KoLeo
    "mgm": mgm.OBJECTIVE,  # configs/omics_mgm.py: omics transformer, masked gene modelling
    "align": align.OBJECTIVE,  # configs/align.py: slide encoder aligned with omics (SigLIP)
}
DEFAULT = "dinov2"  # configs (and checkpoints) from before `config.objective` existed


def get(config: Mapping[str, Any]) -> Objective:
    """The objective `config.objective` names; ConfigError naming the choices otherwise."""
    name = config.get("objective", DEFAULT)
    if name not in OBJECTIVES:
        raise ConfigError(f"config.objective={name!r}: choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]
