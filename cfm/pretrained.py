"""Pretrained backbones for JAX fine-tuning: `cfm.load_pretrained(path) -> (model, params)`.

`path` is either a `python -m cfm.export` folder (format orbax or safetensors; its config.json
gives the architecture) or a `cfm.train` workdir (the backbone its latest checkpoint releases:
the teacher of a DINOv2 run, the network of a masked gene modelling run, as the objective's
`export_tree` says). This module holds the loading (`load`, `load_pretrained`), the reading of
export folders (`read_export`) and the choice of which backbone a checkpoint releases
(`read_checkpoint`); every read of a training checkpoint goes through `cfm.checkpoint`, which
reads on the host as numpy arrays, whatever mesh the run was trained on, and only the released
backbone from disk. No pickle anywhere. The numpy tree helpers, `CheckpointError` and the
backbone factory (`architecture`, `abstract_params`, `build_backbone`) are re-exported here.

    import cfm
    model, params = cfm.load_pretrained("/models/cfm-vit-l16")
    feats = model.apply({"params": params}, images)["cls"]  # images: [B, H, W, 3], normalised
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import numpy as np
from safetensors.numpy import load_file

from cfm import checkpoint, objectives
from cfm.checkpoint import (CheckpointError, check_params, flatten, map_dict, unflatten,
                            unstack_blocks)
from cfm.config_check import ConfigError
from cfm.models.backbone import abstract_params, architecture, build_backbone

__all__ = [  # the tree helpers and the backbone factory are re-exported for callers
    "CONFIG_FILE", "ORBAX_DIR", "WEIGHTS_FILE", "CheckpointError", "Pretrained",
    "abstract_params", "architecture", "build_backbone", "check_params", "flatten", "load",
    "load_pretrained", "map_dict", "read_align_heads", "read_checkpoint", "read_export",
    "unflatten",
    "unstack_blocks"]

CONFIG_FILE = "config.json"
ORBAX_DIR = "params"  # an orbax export's PyTree checkpoint folder
WEIGHTS_FILE = "model.safetensors"  # a safetensors or timm export's weights


class Pretrained(NamedTuple):
    module: Any  # cfm.models.vit.ViT or cfm.models.omics.OmicsTransformer
    params: dict  # numpy arrays, the module's "params" collection (per-block layout, no scan)
    info: dict  # the export's config.json (built from the training config for a workdir)
    step: int  # training step of the checkpoint


# ============================================================================ checkpoints =====
def read_checkpoint(workdir: str, step: int | None = None) -> tuple[dict, dict, int]:
    """(training config as a dict, backbone params as numpy in the per-block layout, step) from
    the latest (or `step`) checkpoint of a cfm.train workdir: the backbone of the state field
    the run's objective releases (`Objective.export_tree`: the teacher for DINOv2, the only
    network for masked gene modelling).

    Only that backbone is read (`cfm.checkpoint.read_trees`, an orbax partial restore into
    numpy arrays), so this runs on a CPU-only host whatever mesh the run used.
    """
    ckpt = checkpoint.read_config(workdir, step)
    try:
        net = objectives.get(ckpt.config).export_tree
    except ConfigError as e:  # a config.objective this version does not know
        raise CheckpointError(f"checkpoint {ckpt.step_dir}: {e}") from None
    trees = checkpoint.read_trees(ckpt, (net,), backbone_only=True)
    if net not in trees:
        raise CheckpointError(f"checkpoint {ckpt.step_dir} holds no {net} backbone")
    return ckpt.config, trees[net], ckpt.step


# ============================================================================ exports =========
def read_export(path: str) -> tuple[dict, dict]:
    """(config.json, params as numpy) of a cfm.export folder in orbax or safetensors format."""
    cfg_path = os.path.join(path, CONFIG_FILE)
    try:
        with open(cfg_path, encoding="utf-8") as f:
            info = json.load(f)
        fmt, arch = info["export"]["format"], info["architecture"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path} is not a cfm.export config.json ({e})") from None
    if fmt == "timm":
        raise CheckpointError(f"{path} is a timm (PyTorch) export; for JAX export the run with "
                              "--format orbax or --format safetensors")
    try:
        if fmt == "safetensors":
            params = unflatten(load_file(os.path.join(path, WEIGHTS_FILE)))
        elif fmt == "orbax":
            params = checkpoint.read_arrays(os.path.join(os.path.abspath(path), ORBAX_DIR))
        else:
            raise CheckpointError(f"{cfg_path}: unknown export format {fmt!r}")
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"export {path} is damaged: its weights do not read "
                              f"({type(e).__name__}: {str(e)[:300]})") from None
    check_params(params, arch, f"export {path}")
    return info, params


def read_align_heads(path: str) -> dict:
    """{"heads": {slide, omics (Dense kernel/bias), t_prime, bias, ...}, "omics": the omics
    encoder} of a slide encoder's export (cfm.export of an `align` run), as numpy."""
    file = os.path.join(path, "align_heads.safetensors")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path} has no align_heads.safetensors: not the export of a "
                              "slide-omics alignment run")
    return unflatten(load_file(file))


def load(path: str, step: int | None = None, dtype: Any = None,
         param_dtype: Any = np.float32, **overrides: Any) -> Pretrained:
    """Module, params, config.json-style info and step from an export folder or a training
    workdir (`step` picks a checkpoint of a workdir; default the latest). Params are cast to
    `param_dtype` (float32 by default, as cfm trains; None keeps the stored dtype)."""
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        if step is not None:
            raise CheckpointError(f"{path} is an export (one step); --step applies to workdirs")
        info, params = read_export(path)
        step = int(info["provenance"]["step"])
    elif os.path.isdir(os.path.join(path, "checkpoints")):
        config, params, step = read_checkpoint(path, step)
        prep = ({"data_path": config["data"].get("path", "")} if "augment" not in config else
                {"mean": list(config["augment"]["mean"]), "std": list(config["augment"]["std"])})
        info = {"architecture": architecture(config["model"]), "preprocessing": prep,
                "provenance": {"training_config": config, "step": step}}
    else:
        raise FileNotFoundError(f"{os.path.abspath(path)} is neither a cfm.export folder (no "
                                f"{CONFIG_FILE}) nor a cfm.train workdir (no checkpoints/ folder)")
    if param_dtype is not None:
        params = map_dict(lambda x: np.asarray(x, param_dtype), params)
    return Pretrained(build_backbone(info["architecture"], dtype, **overrides), params, info, step)


def load_pretrained(path: str, step: int | None = None, dtype: Any = None,
                    param_dtype: Any = np.float32, **overrides: Any) -> tuple[Any, dict]:
    """(flax module, params) for JAX fine-tuning from a cfm.export folder (orbax or
    safetensors format) or a cfm.train workdir (the released backbone of its latest
    checkpoint, or of `step`: the teacher of a DINOv2 run). `dtype`: compute dtype (default
    float32); `param_dtype`: dtype of the returned params (default float32); `overrides`: other
    module fields, e.g. drop_path_rate=0.1.
    `model.apply({"params": params}, images)["cls"]` is the final-norm CLS embedding. For an
    omics run or export the module is a `cfm.models.omics.OmicsTransformer`, applied to
    (gene_ids, modality, values, classes) [B, L] arrays (`cfm.embed.embed_omics`)."""
    p = load(path, step, dtype, param_dtype, **overrides)
    return p.module, p.params
