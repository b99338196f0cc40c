"""Training checkpoints: the one module that reads and writes them with orbax.

A cfm.train workdir keeps its checkpoints in `workdir/checkpoints/<step>/`, each with the items
`state` (the whole train state: student, teacher, optimiser, centering buffers, RNG, step),
`config` (the run's prepared config as JSON) and `data` (the data stream's position).

Writing (the trainer):
- `manager` / `save`: asynchronous saves; the train loop waits only for the device-to-host
  copy, orbax writes the files in background threads into a temporary folder and renames it (on
  GCS: writes a commit marker) only once every process has finished, so a run killed mid-save
  leaves no checkpoint that a later start could load.
- Retention: the last `keep_checkpoints`, plus every step that is a multiple of `keep_every`
  (0: none), for later evaluation of intermediate models.
- The data stream's position is the step: `cfm.data.pipeline` derives every batch from
  (seed, step), so restoring the step restores the stream exactly with no iterator state to
  replay. The item `data` records that position (records consumed, global batch, seed) for
  people reading the checkpoint; nothing reads it back.

Reading:
- `restore`: the whole train state, placed in the shardings of the current mesh whatever mesh
  and process count saved it (orbax/tensorstore read each device's slice of the saved arrays).
- `checkpoint_steps`, `read_config`, `read_trees`: the complete steps of a workdir, the stored
  config of one step, and chosen sub-trees of its state (the teacher backbone for an export,
  student and teacher for init_from) as host numpy arrays in the per-block layout, checked
  against the stored architecture, on any host whatever mesh the run used. `read_arrays` is the
  partial restore underneath (also used for an orbax export's `params` folder).
- Damage: a step whose files do not read raises `CheckpointError` naming the step folder and
  the other steps available; it is the one error type for a missing, damaged or mismatched
  checkpoint or export (a RuntimeError and a ValueError, so either catches it).
- Paths may be local or `gs://` (orbax and tensorstore read and write GCS directly).

Also here: the numpy parameter-tree helpers that checkpoints and exports share (`map_dict`,
`flatten`, `unflatten`, `unstack_blocks`, `check_params`).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Sequence

import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from cfm.models.backbone import ArchitectureError, abstract_params, architecture


class CheckpointError(RuntimeError, ValueError):
    """A missing step, an unreadable (damaged) checkpoint or export, or one whose parameters do
    not match its recorded architecture; the message names it and the alternatives."""


# ============================================================================ trees ===========
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


def unstack_blocks(params: dict, depth: int) -> dict:
    """`nn.scan` layout (`blocks`, leaves with a leading depth axis) -> block_0 ... block_{d-1}."""
    if "blocks" not in params:
        return params
    out = {k: v for k, v in params.items() if k != "blocks"}
    for i in range(depth):
        out[f"block_{i}"] = map_dict(lambda x: np.asarray(x[i]), params["blocks"])
    return out


def check_finite(tree: dict, where: str) -> None:
    """CheckpointError naming the first leaf of `tree` that holds NaN or inf."""
    for k, v in flatten(tree).items():
        if not np.all(np.isfinite(np.asarray(v, np.float32))):
            raise CheckpointError(f"{where}: {k} holds NaN or inf values")


def check_params(params: dict, arch: dict, where: str) -> None:
    """Raise CheckpointError unless `params` has exactly the parameter names and shapes of
    `arch` (per-block layout) and only finite values, or `arch` is not a cfm architecture."""
    try:
        want = flatten(abstract_params(arch))
    except ArchitectureError as e:
        raise CheckpointError(f"{where}: {e}") from None
    got = flatten(params)
    if sorted(want) != sorted(got):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise CheckpointError(f"{where}: parameters do not match the architecture "
                              f"(missing {missing[:5]}, unexpected {extra[:5]})")
    for k, v in got.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise CheckpointError(f"{where}: {k} has shape {tuple(v.shape)}, the architecture "
                                  f"needs {tuple(want[k].shape)}")
    check_finite(params, where)


# ============================================================================ layout ==========
def checkpoint_dir(workdir: str) -> str:
    """`workdir/checkpoints`, absolute for local paths, untouched for URLs (gs://...)."""
    path = os.path.join(workdir, "checkpoints")
    return path if "://" in path else os.path.abspath(path)


def checkpoint_steps(workdir: str) -> tuple[str, list[int]]:
    """(checkpoints folder, its complete steps, ascending); FileNotFoundError naming the folder
    when there is none or it holds no complete checkpoint."""
    ckpt_dir = checkpoint_dir(workdir)
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{os.path.abspath(workdir)} has no checkpoints/ folder; pass "
                                "the --workdir of a cfm.train run (or a cfm.export folder)")
    with ocp.CheckpointManager(ckpt_dir, item_names=("state", "config")) as mngr:
        steps = sorted(mngr.all_steps())
    if not steps:
        raise FileNotFoundError(f"{ckpt_dir} holds no complete checkpoint")
    return ckpt_dir, steps


def damaged(step_dir: str, step: int, steps: Sequence[int], what: str, err: Exception,
            resume_flag: str | None = None) -> CheckpointError:
    """The error for a step whose files do not read: it names the step folder, what failed and
    the other steps (with `resume_flag`, the option that starts from the newest older one)."""
    others = [s for s in steps if s != step]
    if resume_flag is not None:
        older = [s for s in others if s < step]
        hint = (f"; start from an older one with {resume_flag}={older[-1]} (available: {older})"
                if older else "; no older checkpoint")
    else:
        hint = f"; other steps: {others}" if others else "; no other checkpoint"
    return CheckpointError(f"checkpoint {step_dir} is damaged or incomplete: {what} "
                           f"({type(err).__name__}: {str(err)[:300]}){hint}")


# ============================================================================ training ========
def manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """The trainer's CheckpointManager for `workdir` (asynchronous, with config's retention)."""
    keep_every = int(config.get("keep_every", 0))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1, max_to_keep=config.keep_checkpoints,
        keep_period=keep_every if keep_every > 0 else None, enable_async_checkpointing=True)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 item_names=("state", "config", "data"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any,
         config: ml_collections.ConfigDict, force: bool = False) -> None:
    """Start an asynchronous save of `state` at `step` (returns once the arrays are copied off
    the devices); `force` saves even if the manager's policy would skip the step."""
    data = {"step": int(step), "records_consumed": int(step) * int(config.batch_size),
            "global_batch": int(config.batch_size), "seed": int(config.seed)}
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config.to_dict()),
        data=ocp.args.JsonSave(data)), force=force)


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, step: int | None = None
            ) -> tuple[Any, int] | None:
    """(state, step) from checkpoint `step` (default: the latest complete one), placed with
    `abstract_state`'s shardings; None if there is no checkpoint. A missing step or damaged
    files raise CheckpointError naming the checkpoint and the steps that exist."""
    steps = sorted(mngr.all_steps())
    if not steps:
        if step is not None:
            raise CheckpointError(f"config.resume_step={step}: {mngr.directory} holds no "
                                  "checkpoint")
        return None
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"config.resume_step={step}: no such checkpoint in "
                              f"{mngr.directory}; it holds steps {steps}")
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:  # orbax/tensorstore raise many types for damaged or missing files
        raise damaged(os.path.join(str(mngr.directory), str(step)), step, steps,
                      "the state does not read", e, "--config.resume_step") from e
    return restored["state"], step


# ============================================================================ host reads ======
class StepConfig(NamedTuple):
    config: dict  # the training config the step stored
    arch: dict  # cfm.models.backbone.architecture(config["model"])
    step_dir: str  # the step's folder
    step: int
    steps: list[int]  # every complete step of the workdir


def read_config(workdir: str, step: int | None = None) -> StepConfig:
    """The stored config (and architecture) of the latest (or `step`) checkpoint of a cfm.train
    workdir; FileNotFoundError without checkpoints, CheckpointError for a missing step or a
    config that does not read."""
    ckpt_dir, steps = checkpoint_steps(workdir)
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise CheckpointError(f"step {step} is not among the checkpoints in {ckpt_dir}: "
                              f"available steps {steps}")
    step_dir = os.path.join(ckpt_dir, str(step))
    try:
        with ocp.CheckpointManager(ckpt_dir, item_names=("state", "config")) as mngr:
            config = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        config = dict(config["config"])
        arch = architecture(config["model"])
    except Exception as e:  # noqa: BLE001 - orbax raises many types for a damaged folder
        raise damaged(step_dir, step, steps, "its config does not read", e) from None
    return StepConfig(config, arch, step_dir, step, steps)


def _select(tree: dict, paths: Sequence[tuple[str, ...]]) -> dict:
    """The sub-trees of `tree` at `paths` (key tuples), in the same nesting; empty or absent
    ones left out."""
    out: dict = {}
    for path in paths:
        node: Any = tree
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node:
            *parents, last = path
            dest = out
            for key in parents:
                dest = dest.setdefault(key, {})
            dest[last] = node
    return out


def read_arrays(folder: str, paths: Sequence[tuple[str, ...]] | None = None) -> dict:
    """The orbax PyTree checkpoint at `folder` (a step's `state`, an orbax export's `params`)
    as nested dicts of host numpy arrays in their stored dtypes; `paths` (key tuples) reads only
    those sub-trees from disk (absent or empty ones are left out). Errors pass through."""
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(folder).item_metadata.tree
        if paths is not None:
            meta = _select(meta, paths)
        return ckptr.restore(folder, args=ocp.args.PyTreeRestore(
            item=map_dict(lambda m: np.zeros((), m.dtype), meta),
            restore_args=map_dict(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), meta),
            partial_restore=paths is not None))


def read_trees(ckpt: StepConfig, names: Sequence[str], backbone_only: bool = False
               ) -> dict[str, dict]:
    """{name: tree} for the state fields `names` ("params", "teacher") of the checkpoint
    `read_config` described, as host numpy arrays; fields the run has not (an empty teacher)
    are left out. `backbone_only`: each tree is just its "backbone" (only that is read from
    disk). Every backbone comes in the per-block layout and matches `ckpt.arch`; every value is
    finite (CheckpointError otherwise)."""
    paths = [(n, "backbone") if backbone_only else (n,) for n in names]
    try:
        state = read_arrays(os.path.join(ckpt.step_dir, "state"), paths)
        trees = {}
        for n in names:
            if n in state:
                tree = state[n]["backbone"] if backbone_only else state[n]
                trees[n] = (unstack_blocks(tree, ckpt.arch["depth"]) if backbone_only else
                            dict(tree, backbone=unstack_blocks(tree["backbone"],
                                                               ckpt.arch["depth"])))
    except Exception as e:  # noqa: BLE001
        what = " and ".join(f"the {n}{' backbone' if backbone_only else ''}" for n in names)
        verb = "does" if len(names) == 1 else "do"
        raise damaged(ckpt.step_dir, ckpt.step, ckpt.steps, f"{what} {verb} not read",
                      e) from None
    where = f"checkpoint {ckpt.step_dir}"
    for tree in trees.values():
        check_params(tree if backbone_only else tree["backbone"], ckpt.arch, where)
        if not backbone_only:  # the heads too
            check_finite(tree, where)
    return trees
