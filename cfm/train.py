r"""The cfm trainer: one loop for every pretraining objective (`config.objective`: DINOv2 on
tiles, masked gene modelling on omics; `cfm.objectives`), one checkpoint format.

    python -m cfm.train --config configs/dino_vit.py:demo --workdir /tmp/cfm_demo/run \
        [--config.key=value ...]
    python -m cfm.train --config configs/omics_mgm.py:demo --workdir /tmp/cfm_omics_demo

Reads top to bottom: config, mesh, models and the jitted step (`cfm.setup`, shared with cfm.aot,
the benchmarks and the tests) -> state (fresh, init_from, or the latest checkpoint) -> data (the
objective's batches from the restored step on) -> loop (log, checkpoint, preemption) -> loss
curve. The step is a pure function of (state, batch), jitted with explicit shardings on the mesh
and donated state buffers.
"""

from __future__ import annotations

import sys

from cfm import preemption

if __name__ == "__main__":  # before the imports below load JAX (seconds): a signal
    preemption.note_signals()  # meanwhile is noted, then acted on (cfm.preemption)

import jax
import ml_collections
import numpy as np
from absl import flags
from etils import epath

from cfm import (checkpoint, config_check, config_loader, errors, init_from, metrics,
                 schedules, setup)
from cfm.data import sources
from cfm.evals import build as evals_build
from cfm.parallel import distributed


# ================================================================================ train =======
def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run (or resume) pretraining in `workdir`; returns the last logged metrics."""
    # ---- config, mesh, models, step (nothing allocated yet) ---------------------------------
    try:  # the tile folder or shards: a look (file list, one item), before anything is built
        sources.check_source(config.data)
    except (OSError, ValueError) as e:
        raise config_check.ConfigError(str(e)) from None
    s = setup.setup(config)  # ConfigError for a config (or omics data) that cannot work
    config, mesh = s.config, s.mesh  # the objective's prepared config is the one checkpointed
    init_from.check_path(config, workdir)  # a new run's config.init_from: missing -> error now
    evaluators = evals_build.build_evaluators(config, s)  # config.evals: data read and checked
    total_steps = config.total_steps if config.total_steps > 0 else schedules.schedule_steps(
        config)
    is_main = jax.process_index() == 0
    if is_main:  # the workdir only now, after every check of the config and the data
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # local or gs://
        print(f"cfm.train: {config.model.variant}, batch {config.batch_size}, {total_steps} steps,"
              f" mesh {dict(mesh.shape)}"
              + (f" over {config.mesh.slices} slices" if config.mesh.slices > 1 else "")
              + f" on {jax.device_count()} {jax.devices()[0].platform} device(s)", flush=True)

    # ---- state (fresh, or the latest checkpoint in workdir) --------------------------------
    state = setup.create_state(s)
    ckpt = checkpoint.manager(workdir, config)
    resume_step = config.resume_step if config.resume_step >= 0 else None
    try:  # damaged newest steps: named (exit 2), or moved aside with damaged_checkpoints
        restored = checkpoint.restore(
            ckpt, state, resume_step, on_damage=config.damaged_checkpoints,
            log=lambda line: print(f"cfm.train: {line}", flush=True) if is_main else None)
    except checkpoint.CheckpointError as e:
        ckpt.close()
        raise errors.UserError(str(e)) from None
    start = 0
    if restored is not None:
        state, start = restored
        if is_main:
            print(f"cfm.train: resumed from step {start} in {ckpt.directory}", flush=True)
            if config.init_from:
                print(f"cfm.train: config.init_from={config.init_from} ignored: resuming this "
                      "workdir's own checkpoint", flush=True)
    else:  # a new run: weights from config.init_from, if set (cfm/init_from.py)
        try:
            state = init_from.maybe_init_from(state, config, workdir, is_main)
        except init_from.InitFromError:
            ckpt.close()
            raise
    n_params = sum(x.size for x in jax.tree.leaves(state.params["backbone"]))
    if is_main:
        print(f"cfm.train: backbone {n_params / 1e6:.2f} M parameters", flush=True)
    if start >= total_steps:
        ckpt.close()
        if is_main:
            print(f"cfm.train: nothing to do, the checkpoint is at step {start} >= total_steps "
                  f"{total_steps} (raise --config.total_steps to train on)", flush=True)
        return {}

    # ---- data: the objective's batches from the restored step on ----------------------------
    batches = s.objective.batches(config, start, jax.process_index(), jax.process_count())
    local = next(batches)

    # ---- loop ------------------------------------------------------------------------------
    writer = metrics.MetricWriter(workdir, total_steps, config.batch_size, enabled=is_main,
                                  unit=s.objective.unit, start_step=start)
    if evaluators and start == 0:  # the series starts at the initial weights
        _evaluate(writer, evaluators, state, 0, every_one=True)
    # SIGTERM, SIGINT or a preemption notice from here on: finish the step, save, exit 0 (before
    # the loop, main's preemption.stop_on_signals stops at once: nothing new to save)
    watcher = preemption.PreemptionWatcher(multi_process=jax.process_count() > 1)
    last: dict = {}
    stop = False
    with jax.set_mesh(mesh), watcher:  # the watcher restores the old handlers on exit
        for step in range(start, total_steps):
            state, out = s.step(state, setup.global_batch(s, local))
            done = step + 1
            if step == start:
                jax.block_until_ready(out)
                writer.start_clock(done)  # throughput excludes compilation
            if done % config.log_every == 0 or done == total_steps:
                last = writer.write(done, jax.device_get(out))
                if not np.isfinite(last["loss"]):
                    raise FloatingPointError(f"loss is {last['loss']} at step {done}")
            if any(e.due(done, done == total_steps) for e in evaluators):  # before the save
                _evaluate(writer, evaluators, state, done, every_one=done == total_steps)
            stop = watcher.should_stop(done, ckpt)
            if done % config.checkpoint_every == 0 or done == total_steps or stop:
                checkpoint.save(ckpt, done, state, config, force=done == total_steps or stop)
            if stop:
                ckpt.wait_until_finished()
                if is_main:
                    print(f"cfm.train: stopped by {watcher.signal_name} after step {done}; "
                          f"checkpoint {done} saved, run the same command to resume", flush=True)
                break
            if done < total_steps:
                local = next(batches)
        ckpt.wait_until_finished()  # a signal now is only noted: the last save completes
        ckpt.close()
        writer.close()
        if is_main and not stop:
            print(f"cfm.train: done at step {total_steps}; workdir {workdir}", flush=True)
    return last


def _evaluate(writer: metrics.MetricWriter, evaluators: list, state: setup.TrainState,
              step: int, every_one: bool) -> None:
    """Run the evaluators due after `step` (all with `every_one`) on every process (their
    forward is sharded like the step); process 0's writer logs them and any collapse warning.
    The clock restarts after them, so throughput counts training only."""
    values, warnings = evals_build.run_due(evaluators, state, step, final=every_one)
    writer.write_eval(step, values)
    if jax.process_index() == 0:
        for line in warnings:
            print(f"cfm.train: warning at step {step}: {line}", flush=True)
    writer.start_clock(step)


def _main(argv: list[str]) -> None:
    def define(fv: flags.FlagValues) -> None:
        flags.DEFINE_string("workdir", None, "where checkpoints, events and plots go (local or "
                            "gs://); created only once the config and the data are checked",
                            flag_values=fv)

    flags_def = config_loader.parse_command_line(
        argv, define, doc=__doc__, required=("config", "workdir"),
        example="python -m cfm.train --config configs/dino_vit.py:demo --workdir /tmp/cfm_demo/run")
    errors.check_workdir(flags_def.workdir)  # a file, /proc, read-only: refused, nothing made
    # before anything starts a JAX backend: CFM_*, SLURM or TPU-pod processes join; a single
    # process: no-op
    distributed.initialize()
    # SIGTERM / SIGINT before the loop: stop at once, one line, exit 143 / 130; in the loop
    # train's PreemptionWatcher saves and exits 0 (cfm.preemption)
    with preemption.stop_on_signals("cfm.train", lambda: _stopped_early(flags_def.workdir),
                                    multi_process=jax.process_count() > 1):
        train(flags_def.config, flags_def.workdir)


def _stopped_early(workdir: str) -> str:
    """What a stop before the loop keeps, for `preemption.stop_on_signals`'s line."""
    try:
        newest = checkpoint.checkpoint_steps(workdir)[1][-1]
    except FileNotFoundError:  # no checkpoint yet
        return "before the first step: nothing to save, no checkpoint written"
    return (f"before step {newest + 1}: nothing new to save; checkpoint {newest} kept, run the "
            "same command to resume")


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 when done (or stopped by a signal with its checkpoint saved); 2 with
    one line on stderr for bad input (nothing created); 1 with the traceback for a bug."""
    return errors.run_cli("cfm.train", lambda: _main(sys.argv if argv is None else argv), {
        config_loader.CommandLineError: "bad command line",
        distributed.DistributedConfigError: "bad multi-process setup",
        config_check.ConfigError: "bad config"})


if __name__ == "__main__":
    sys.exit(main())
