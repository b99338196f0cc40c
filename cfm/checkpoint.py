"""Orbax checkpoints of the whole train state (student, teacher, optimiser, centers, RNG, step)
plus the config as JSON. A run started on a workdir that holds checkpoints resumes from the
latest one; the data pipeline restarts at the restored step, so no batch is replayed or skipped.
(Issue 5 adds preemption handling, elastic restore and export.)
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import orbax.checkpoint as ocp


def manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1, max_to_keep=config.keep_checkpoints,
        enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                 options=options, item_names=("state", "config"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any,
         config: ml_collections.ConfigDict, force: bool = False) -> None:
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config.to_dict())), force=force)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any) -> tuple[Any, int] | None:
    """(state, step) from the latest checkpoint, placed with `abstract_state`'s shardings; None
    if the workdir has none."""
    step = mngr.latest_step()
    if step is None:
        return None
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"], step
