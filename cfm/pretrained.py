"""Pretrained ViT backbones for JAX fine-tuning: `cfm.load_pretrained(path) -> (model, params)`.

`path` is either a `python -m cfm.export` folder (format orbax or safetensors; its config.json
gives the architecture) or a `cfm.train` workdir (the teacher backbone of its latest checkpoint,
the model DINOv2 releases). Checkpoints are read on the host as numpy arrays, whatever mesh the
run was trained on, and only the teacher backbone is read from disk. No pickle anywhere.

    import cfm
    model, params = cfm.load_pretrained("/models/cfm-vit-l16")
    feats = model.apply({"params": params}, images)["cls"]  # images: [B, H, W, 3], normalised
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import numpy as np

from cfm.models.backbone import abstract_params, architecture, build_backbone

CONFIG_FILE = "config.json"
ORBAX_DIR = "params"  # an orbax export's PyTree checkpoint folder
WEIGHTS_FILE = "model.safetensors"  # a safetensors or timm export's weights


class CheckpointError(ValueError):
    """A missing step, an unreadable (damaged) checkpoint or export, or one whose parameters do
    not match its recorded architecture."""


class Pretrained(NamedTuple):
    module: Any  # cfm.models.vit.ViT
    params: dict  # numpy arrays, the ViT's "params" collection (per-block layout, no scan)
    info: dict  # the export's config.json (built from the training config for a workdir)
    step: int  # training step of the checkpoint


# ============================================================================ trees ===========
def unstack_blocks(params: dict, depth: int) -> dict:
    """`nn.scan` layout (`blocks`, leaves with a leading depth axis) -> block_0 ... block_{d-1}."""
    if "blocks" not in params:
        return params
    out = {k: v for k, v in params.items() if k != "blocks"}
    for i in range(depth):
        out[f"block_{i}"] = map_dict(lambda x: np.asarray(x[i]), params["blocks"])
    return out


def check_params(params: dict, arch: dict, where: str) -> None:
    """Raise CheckpointError unless `params` has exactly the parameter names and shapes of
    `arch` (per-block layout) and only finite values."""
    want = flatten(abstract_params(arch))
    got = flatten(params)
    if sorted(want) != sorted(got):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise CheckpointError(f"{where}: parameters do not match the architecture "
                              f"(missing {missing[:5]}, unexpected {extra[:5]})")
    for k, v in got.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise CheckpointError(f"{where}: {k} has shape {tuple(v.shape)}, the architecture "
                                  f"needs {tuple(want[k].shape)}")
        if not np.all(np.isfinite(np.asarray(v, np.float32))):
            raise CheckpointError(f"{where}: {k} holds NaN or inf values")


def map_dict(fn: Any, tree: dict) -> dict:
    """`fn` on every leaf of a nested dict (orbax metadata trees are not jax pytrees)."""
    return {k: map_dict(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a.b": x} (cfm parameter names contain no dots)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    """{"a.b": x} -> {"a": {"b": x}}."""
    out: dict = {}
    for key, v in flat.items():
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return out


# ============================================================================ checkpoints =====
def checkpoint_steps(workdir: str) -> tuple[str, list[int]]:
    """(absolute checkpoints folder, its complete steps, ascending); FileNotFoundError naming
    the folder when there is none or it holds no complete checkpoint."""
    import orbax.checkpoint as ocp

    from cfm import checkpoint

    ckpt_dir = checkpoint.checkpoint_dir(workdir)
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{os.path.abspath(workdir)} has no checkpoints/ folder; pass "
                                "the --workdir of a cfm.train run (or a cfm.export folder)")
    mngr = ocp.CheckpointManager(ckpt_dir, item_names=("state", "config"))
    steps = sorted(mngr.all_steps())
    mngr.close()
    if not steps:
        raise FileNotFoundError(f"{ckpt_dir} holds no complete checkpoint")
    return ckpt_dir, steps


def read_checkpoint_config(workdir: str, step: int | None = None) -> tuple[dict, dict, str, int]:
    """(training config as a dict, architecture, the step's folder, step) of the latest (or
    `step`) checkpoint of a cfm.train workdir; CheckpointError for a missing step or a config
    that does not read."""
    import orbax.checkpoint as ocp

    ckpt_dir, steps = checkpoint_steps(workdir)
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise CheckpointError(f"step {step} is not among the checkpoints in {ckpt_dir}: "
                              f"available steps {steps}")
    step_dir = os.path.join(ckpt_dir, str(step))
    try:
        mngr = ocp.CheckpointManager(ckpt_dir, item_names=("state", "config"))
        config = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        mngr.close()
        config = dict(config["config"])
        arch = architecture(config["model"])
    except Exception as e:  # noqa: BLE001 - orbax raises many types for a damaged folder
        raise CheckpointError(f"checkpoint {step_dir} is damaged: its config does not read "
                              f"({type(e).__name__}: {e})") from None
    return config, arch, step_dir, step


def read_checkpoint(workdir: str, step: int | None = None) -> tuple[dict, dict, int]:
    """(training config as a dict, backbone params as numpy in the per-block layout, step) from
    the latest (or `step`) checkpoint of a cfm.train workdir: the teacher's for DINOv2 runs, the
    (only) network's for masked gene modelling.

    Only that backbone is read (orbax partial restore into numpy arrays, the target built from
    the stored config), so this runs on a CPU-only host whatever mesh the run used.
    """
    import orbax.checkpoint as ocp

    config, arch, step_dir, step = read_checkpoint_config(workdir, step)
    scan = bool(config["model"].get("scan_layers", False))
    target = abstract_params(arch, scan_layers=scan)
    net = "params" if config.get("objective") == "mgm" else "teacher"
    item = {net: {"backbone": map_dict(lambda s: np.zeros((), s.dtype), target)}}  # tree
    restore_args = {net: {"backbone": map_dict(
        lambda s: ocp.RestoreArgs(restore_type=np.ndarray), target)}}
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            state = ckptr.restore(os.path.join(step_dir, "state"), args=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True))
        params = unstack_blocks(state[net]["backbone"], arch["depth"])
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {step_dir} is damaged: the {net} backbone does not "
                              f"read ({type(e).__name__}: {str(e)[:300]})") from None
    check_params(params, arch, f"checkpoint {step_dir}")
    return config, params, step


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
            from safetensors.numpy import load_file

            params = unflatten(load_file(os.path.join(path, WEIGHTS_FILE)))
        elif fmt == "orbax":
            import orbax.checkpoint as ocp

            with ocp.PyTreeCheckpointer() as ckptr:
                folder = os.path.join(os.path.abspath(path), ORBAX_DIR)
                meta = ckptr.metadata(folder).item_metadata.tree
                params = ckptr.restore(folder, args=ocp.args.PyTreeRestore(restore_args=map_dict(
                    lambda m: ocp.RestoreArgs(restore_type=np.ndarray), meta)))
        else:
            raise CheckpointError(f"{cfg_path}: unknown export format {fmt!r}")
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"export {path} is damaged: its weights do not read "
                              f"({type(e).__name__}: {str(e)[:300]})") from None
    check_params(params, arch, f"export {path}")
    return info, params


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
    safetensors format) or a cfm.train workdir (teacher backbone of its latest checkpoint, or
    of `step`). `dtype`: compute dtype (default float32); `param_dtype`: dtype of the returned
    params (default float32); `overrides`: other ViT fields, e.g. drop_path_rate=0.1.
    `model.apply({"params": params}, images)["cls"]` is the final-norm CLS embedding. For an
    omics run or export the module is a `cfm.models.omics.OmicsTransformer`, applied to
    (gene_ids, modality, values, classes) [B, L] arrays (`cfm.embed.embed_omics`)."""
    p = load(path, step, dtype, param_dtype, **overrides)
    return p.module, p.params
