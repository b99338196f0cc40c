"""Orbax checkpoints of the whole train state (student, teacher, optimiser, centering buffers,
RNG, step), the position of the data stream and the config.

- Saves are asynchronous: the train loop waits only for the device-to-host copy; orbax writes
  the files in background threads into a temporary folder and renames it (on GCS: writes a
  commit marker) only once every process has finished, so a run killed mid-save leaves no
  checkpoint that a later start could load.
- Retention: the last `keep_checkpoints`, plus every step that is a multiple of
  `keep_every` (0: none), for later evaluation of intermediate models.
- The data stream's position is the step: `cfm.data.pipeline` derives every batch from
  (seed, step), so restoring the step restores the stream exactly with no iterator state to
  replay. The item `data` records that position (records consumed, global batch, seed) for
  people reading the checkpoint; nothing reads it back.
- Elastic restore: the state is restored into the shardings of the current mesh, whatever mesh
  and process count saved it (orbax/tensorstore read each device's slice of the saved arrays).
- Paths may be local or `gs://` (orbax and tensorstore write to GCS directly).
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored; the message names it and the alternatives."""


def checkpoint_dir(workdir: str) -> str:
    """`workdir/checkpoints`, absolute for local paths, untouched for URLs (gs://...)."""
    path = os.path.join(workdir, "checkpoints")
    return path if "://" in path else os.path.abspath(path)


def manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
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
    where = os.path.join(str(mngr.directory), str(step))
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:  # orbax/tensorstore raise many types for damaged or missing files
        older = [s for s in steps if s < step]
        hint = (f"; start from an older one with --config.resume_step={older[-1]} "
                f"(available: {older})" if older else "")
        raise CheckpointError(f"checkpoint {where} is damaged or incomplete "
                              f"({type(e).__name__}: {str(e)[:300]}){hint}") from e
    return restored["state"], step
