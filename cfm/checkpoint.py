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
- Damage: a step whose files do not read raises `CheckpointError` naming the step folder, what
  failed (in plain words: the innermost error's first line, or the metadata file that is
  missing) and the other steps available; it is the one error type for a missing, damaged or
  mismatched checkpoint or export (a RuntimeError and a ValueError, so either catches it).
- Damage at a trainer's start (`restore`): the newest step that does not read is named with the
  newest that does (older ones are tried in turn); with `config.damaged_checkpoints=
  "set_aside"` each damaged step folder is moved (never deleted) to
  `workdir/checkpoints_set_aside/<step>-damaged-<UTC time>/` and training continues from the
  newest good step, so later saves at those step numbers succeed and a restart after a kill
  resumes from the newest save. An explicit `resume_step=N` moves the steps after N aside
  (`<step>-after-resume_step-N-<time>`) so that the resumed run can save them again.
- Reads run under event loops that drop the callbacks tensorstore delivers after orbax has
  closed the loop (a failed read leaves others in flight), so an error path prints its one
  message and no "Event loop is closed" tracebacks.
- Paths may be local or `gs://` (orbax and tensorstore read and write GCS directly).

Also here: the numpy parameter-tree helpers that checkpoints and exports share (`map_dict`,
`flatten`, `unflatten`, `unstack_blocks`, `check_params`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import re
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

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


SET_ASIDE_DIR = "checkpoints_set_aside"  # beside checkpoints/: orbax no longer lists them


def reason(err: BaseException, step_dir: str | None = None) -> str:
    """Why a checkpoint did not read, in plain words on one line: a missing `state/_METADATA`
    or `state/manifest.ocdbt` (orbax's own errors then are about pytree types or zarr), else
    the first line of the innermost error of the chain (tensorstore's, e.g. 'OUT_OF_RANGE:
    Error reading "teacher...kernel" ...'), without the object reprs orbax wraps around it."""
    if step_dir is not None and "://" not in step_dir and os.path.isdir(step_dir):
        state_dir = os.path.join(step_dir, "state")
        ocdbt = os.path.isdir(state_dir) and any(n.startswith("ocdbt.process_")
                                                 for n in os.listdir(state_dir))
        need = ("state/_METADATA",) + (("state/manifest.ocdbt",) if ocdbt else ())
        missing = [f for f in need if not os.path.exists(os.path.join(step_dir, f))]
        if missing:
            return f"{' and '.join(missing)} missing"
    chain = [err]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    line = type(err).__name__
    for inner in chain:  # the innermost error that says something (not a bare "0" or key)
        text = re.split(r"See full TensorStore details| \[tensorstore_spec=", str(inner))[0]
        text = re.sub(r"<[^<>]*\bat 0x[0-9a-f]+>|<bound method [^>]*>?", "...", text)
        first = next((x.strip() for x in text.splitlines() if x.strip()), "")
        if len(first) >= 12:
            line = first
    return line if len(line) <= 240 else line[:237] + "..."


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
                           f"({reason(err, step_dir)}){hint}")


class _QuietLoop(asyncio.SelectorEventLoop):
    """An event loop that drops callbacks scheduled from other threads once it is closed.

    orbax runs each read in a fresh loop and closes it as soon as one array fails; tensorstore
    then completes the other reads on its own threads and calls `call_soon_threadsafe` on the
    closed loop, which prints an "Event loop is closed" traceback per read. Nothing waits for
    those results any more, so dropping them is all there is to do."""

    def call_soon_threadsafe(self, callback, *args, context=None):  # type: ignore[override]
        try:
            return super().call_soon_threadsafe(callback, *args, context=context)
        except RuntimeError:
            if self.is_closed():
                return None
            raise


class _QuietPolicy(asyncio.DefaultEventLoopPolicy):
    _loop_factory = _QuietLoop


@contextlib.contextmanager
def quiet_reads() -> Iterator[None]:
    """Within it, new asyncio loops (orbax makes one per read) are `_QuietLoop`s."""
    old = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_QuietPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(old)


def set_aside(ckpt_dir: str, step: int, why: str) -> str:
    """Move step folder `ckpt_dir/<step>` (nothing deleted) to
    `<ckpt_dir>/../checkpoints_set_aside/<step>-<why>-<UTC time>/`, out of orbax's listing;
    returns the new path. Call it on one process only."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    root = epath.Path(ckpt_dir).parent / SET_ASIDE_DIR
    root.mkdir(parents=True, exist_ok=True)
    dest, n = root / f"{step}-{why}-{stamp}", 1
    while dest.exists():  # the same step set aside twice within a second
        dest, n = root / f"{step}-{why}-{stamp}-{n}", n + 1
    epath.Path(ckpt_dir, str(step)).rename(dest)
    return str(dest)


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


def _read_state(mngr: ocp.CheckpointManager, abstract_state: Any, step: int
                ) -> tuple[Any, BaseException | None]:
    """(state, None) when step `step` reads on every process, else (None, the error)."""
    state, err = None, None
    try:
        with quiet_reads():
            state = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))["state"]
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for bad files
        err = e
    ok = err is None
    if jax.process_count() > 1:  # every process reads its own slices: all must have read
        ok = bool(np.all(multihost_utils.process_allgather(np.int32(ok))))
        if not ok and err is None:
            err = CheckpointError("another process could not read its part")
    return (state, None) if ok else (None, err)


def _move_aside(mngr: ocp.CheckpointManager, steps: Sequence[int], why: str) -> str:
    """Move `steps` to the set-aside folder (process 0; the others wait), make `mngr` list the
    steps anew and return that folder."""
    ckpt_dir = str(mngr.directory)
    if jax.process_index() == 0:
        for step in steps:
            set_aside(ckpt_dir, step, why)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("cfm.checkpoint.set_aside")
    mngr.reload()
    return os.path.join(os.path.dirname(ckpt_dir.rstrip("/")), SET_ASIDE_DIR)


def _steps(steps: Sequence[int]) -> str:
    """'step 6' or 'steps 8, 6'."""
    return ("step " if len(steps) == 1 else "steps ") + ", ".join(str(s) for s in steps)


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, step: int | None = None,
            on_damage: str = "stop", log: Callable[[str], None] | None = None
            ) -> tuple[Any, int] | None:
    """(state, step) from checkpoint `step` (default: the newest that reads), placed with
    `abstract_state`'s shardings; None if there is none (a new run).

    Default: when the newest steps do not read, older ones are tried until one does, and a
    CheckpointError names the damaged steps, what failed and the newest good step; with
    `on_damage="set_aside"` the damaged step folders are moved to `checkpoints_set_aside/`
    instead (nothing deleted; start from step 0 if no step reads) and that good step is
    returned. An explicit `step` must exist and read (CheckpointError naming the steps that
    exist); the steps after it are moved aside so the resumed run can save them again. `log`
    receives a line for every move."""
    say = log or (lambda line: None)
    steps = sorted(mngr.all_steps())
    if not steps:
        if step is not None:
            raise CheckpointError(f"config.resume_step={step}: {mngr.directory} holds no "
                                  "checkpoint")
        return None
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"config.resume_step={step}: no such checkpoint in "
                                  f"{mngr.directory}; it holds steps {steps}")
        state, err = _read_state(mngr, abstract_state, step)
        if err is not None:
            raise damaged(os.path.join(str(mngr.directory), str(step)), step, steps,
                          "the state does not read", err, "--config.resume_step")
        newer = [s for s in steps if s > step]
        if newer:
            where = _move_aside(mngr, newer, f"after-resume_step-{step}")
            say(f"config.resume_step={step}: {_steps(newer)} moved to {where}/ (nothing "
                f"deleted) so that this run saves them again; restart it without "
                f"--config.resume_step, or it goes back to step {step} again")
        return state, step

    bad: list[tuple[int, str]] = []
    good, state = None, None
    for s in reversed(steps):
        state, err = _read_state(mngr, abstract_state, s)
        if err is None:
            good = s
            break
        bad.append((s, reason(err, os.path.join(str(mngr.directory), str(s)))))
    if not bad:
        return state, good
    names = [s for s, _ in bad]
    what = bad[0][1] if len(bad) == 1 else "; ".join(f"step {s}: {r}" for s, r in bad)
    older = [s for s in steps if good is not None and s < good]
    good_text = ("no step reads" if good is None else f"the newest good step is {good}"
                 + (f" (older, not read now: {older})" if older else ""))
    verb = "does" if len(bad) == 1 else "do"
    if on_damage != "set_aside":
        then = "start from step 0" if good is None else f"continue from step {good}"
        raise CheckpointError(
            f"damaged checkpoint in {mngr.directory}: {_steps(names)} {verb} not read "
            f"({what}); {good_text}. To {then}, run again with "
            f"--config.damaged_checkpoints=set_aside (moves {_steps(names)} to "
            f"{os.path.join(os.path.dirname(str(mngr.directory).rstrip('/')), SET_ASIDE_DIR)}"
            "/, deletes nothing)")
    where = _move_aside(mngr, names, "damaged")
    say(f"damaged checkpoint: {_steps(names)} {verb} not read ({what}); moved to {where}/ "
        f"(nothing deleted); {good_text}"
        + ("; starting from step 0" if good is None else f"; continuing from step {good}"))
    return None if good is None else (state, good)


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
        with quiet_reads(), ocp.CheckpointManager(ckpt_dir,
                                                  item_names=("state", "config")) as mngr:
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
    # the handler's metadata: the tree alone (the checkpointer's also looks for a step-level
    # _CHECKPOINT_METADATA inside `folder` and warns that a step's state/ has none)
    with quiet_reads(), ocp.PyTreeCheckpointer() as ckptr, contextlib.closing(
            ocp.PyTreeCheckpointHandler()) as handler:
        meta = handler.metadata(epath.Path(folder)).tree
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
                depth = ckpt.arch.get("depth", 0)  # a slide encoder has no blocks
                trees[n] = (unstack_blocks(tree, depth) if backbone_only else
                            dict(tree, backbone=unstack_blocks(tree["backbone"], depth)))
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
