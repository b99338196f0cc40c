"""Write (and submit) a SLURM batch script for a cfm job on a GPU cluster, requeued on preemption.

    python -m launch.slurm --nodes 4 --gpus-per-node 8 [--per gpu|node] [--partition P] \
        [--account A] [--time 24:00:00] [--job-name cfm] [--cpus-per-task C] \
        [--setup 'source .venv/bin/activate'] [--signal-s 300] [--max-restarts 10] \
        [--array N] [--log-dir slurm-logs] [--script PATH] [--dry-run] -- \
        python -m cfm.train --config configs/dino_vit.py:vit_l16 --workdir /shared/runs/l16

The script (written to --script, default LOG_DIR/JOB_NAME.sbatch, then `sbatch SCRIPT`; with
--dry-run both are printed and nothing is written or submitted):
- `--per gpu` (default): one task per GPU (--ntasks-per-node = GPUs); JAX gives each task the
  GPU numbered SLURM_LOCALID. `--per node`: one task per node that drives all its GPUs
  (JAX_LOCAL_DEVICE_IDS=0,...,G-1 is exported).
- the processes join through cfm.parallel.distributed from SLURM's variables (SLURM_NTASKS,
  SLURM_PROCID, SLURM_STEP_NODELIST): the coordinator is the first node of the step, port
  61440 + SLURM_JOB_ID % 4096 (JAX's own rule; CFM_COORDINATOR_PORT overrides it).
- requeue: `#SBATCH --requeue` lets SLURM requeue the job after a preemption or node failure;
  `--signal=B:USR1@S` makes SLURM signal the batch shell S seconds before the time limit, and
  the shell then sends SIGTERM to the job step (cfm.train finishes its step, saves and exits 0)
  and requeues the job with `scontrol requeue`. SIGTERM to the shell (preemption, scancel) is
  passed on the same way. A step that fails (a node died, a crash) is requeued while
  SLURM_RESTART_COUNT < --max-restarts. The requeued job runs the same command, and cfm.train
  resumes from the workdir's latest checkpoint (the workdir must be on storage all nodes share).
- `--array N`: an array job of N tasks, `{shard_index}` -> $SLURM_ARRAY_TASK_ID and
  `{num_shards}` -> N in the job, e.g. `python -m data_prep.tile_wsi ... --num-shards
  {num_shards} --shard-index {shard_index}`.

Bad input (counts, --per gpu without GPUs, a global batch that does not divide over the GPUs)
exits with status 2 before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Sequence

from cfm import cli_help
from launch import cli, common

PROG = "launch.slurm"


def _parser() -> argparse.ArgumentParser:
    p = cli_help.parser(PROG, __doc__, f"python -m {PROG} --nodes 2 --gpus-per-node 8 "
                        "--dry-run -- python -m cfm.train --config configs/dino_vit.py:vit_l16 "
                        "--workdir /shared/runs/l16")
    p.add_argument("--nodes", type=int, default=1, help="nodes of the job")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs of each node")
    p.add_argument("--per", choices=["gpu", "node"], default="gpu",
                   help="one process per GPU or per node")
    p.add_argument("--job-name", default="cfm", help="SLURM job name")
    p.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    p.add_argument("--account", help="SLURM account (default: yours)")
    p.add_argument("--time", default="24:00:00", help="time limit per (re)start")
    p.add_argument("--cpus-per-task", type=int, help="CPUs of each task (default: SLURM's)")
    p.add_argument("--setup", action="append", default=[],
                   help="shell line run before the job (repeatable), e.g. module load, venv "
                   "(default: none)")
    p.add_argument("--signal-s", type=int, default=300,
                   help="seconds before the time limit to save and requeue")
    p.add_argument("--max-restarts", type=int, default=10,
                   help="requeue a failed step while SLURM_RESTART_COUNT is below this")
    p.add_argument("--array", type=int, help="N array tasks ({shard_index}, {num_shards}) "
                   "(default: no array)")
    p.add_argument("--chdir", default=os.getcwd(),
                   help="the cfm checkout on the cluster (default: the current folder)")
    p.add_argument("--log-dir", default="slurm-logs", help="folder of the jobs' output")
    p.add_argument("--script", help="where to write the batch script "
                   "(default: LOG_DIR/JOB_NAME.sbatch)")
    p.add_argument("--dry-run", action="store_true", help="print script and sbatch, do neither")
    return p


def validate(args: argparse.Namespace, job: list[str]) -> None:
    cli.require_at_least(args, 1, "nodes", "signal_s")
    cli.require_at_least(args, 0, "gpus_per_node", "max_restarts")
    if args.array is not None and args.array < 1:
        raise common.LaunchError(f"--array must be >= 1, got {args.array}")
    if args.per == "gpu" and args.gpus_per_node == 0 and args.array is None:
        if args.nodes > 1 or common.job_module(job) == "cfm.train":
            raise common.LaunchError("--per gpu needs --gpus-per-node >= 1 (or use --per node "
                                     "for CPU-only nodes)")
    if args.gpus_per_node:
        n = args.nodes * args.gpus_per_node
        common.check_batch(job, n, f"{args.nodes} nodes x {args.gpus_per_node} GPUs")


def script(args: argparse.Namespace, job: list[str]) -> str:
    """The batch script's text."""
    g = args.gpus_per_node
    tasks = g if (args.per == "gpu" and g) else 1
    out = "%x-%A_%a.out" if args.array else "%x-%j.out"
    lines = ["#!/bin/bash", f"#SBATCH --job-name={args.job_name}", f"#SBATCH --nodes={args.nodes}",
             f"#SBATCH --ntasks-per-node={tasks}"]
    lines += [f"#SBATCH --gpus-per-node={g}"] if g else []
    lines += [f"#SBATCH --cpus-per-task={args.cpus_per_task}"] if args.cpus_per_task else []
    lines += [f"#SBATCH --partition={args.partition}"] if args.partition else []
    lines += [f"#SBATCH --account={args.account}"] if args.account else []
    lines += [f"#SBATCH --time={args.time}", f"#SBATCH --output={args.log_dir}/{out}",
              "#SBATCH --open-mode=append", "#SBATCH --requeue",
              f"#SBATCH --signal=B:USR1@{args.signal_s}"]
    lines += [f"#SBATCH --array=0-{args.array - 1}"] if args.array else []
    lines += ["# written by launch.slurm; cfm.train resumes from its workdir when requeued",
              f"cd {common.shell_join([args.chdir])}", *args.setup]
    if args.per == "node" and g > 1:
        lines.append(f"export JAX_LOCAL_DEVICE_IDS={','.join(map(str, range(g)))}")
    n_shards = str(args.array) if args.array else str(args.nodes * tasks)
    shard = "$SLURM_ARRAY_TASK_ID" if args.array else "$SLURM_PROCID"
    cmd = common.shell_join(job, {"{shard_index}": shard, "{num_shards}": n_shards})
    if not args.array and "{shard_index}" in " ".join(job):  # per-task: expand inside srun
        cmd = f"bash -c {common.shell_join([cmd])}"
    lines += [
        'stop() {  # $1: requeue after the step saved and exited',
        '  echo "launch.slurm: $2: sending SIGTERM to the step (cfm.train saves, exits 0)"',
        '  kill -TERM "$STEP" 2>/dev/null; wait "$STEP"',
        '  if [ "$1" = requeue ]; then scontrol requeue "$SLURM_JOB_ID"; fi',
        '  exit 0',
        '}',
        "trap 'stop requeue \"time limit near\"' USR1",
        "trap 'stop no \"SIGTERM\"' TERM",
        f"srun --kill-on-bad-exit=1 {cmd} &",
        "STEP=$!",
        'wait "$STEP"',
        "STATUS=$?",
        f'if [ "$STATUS" -ne 0 ] && [ "${{SLURM_RESTART_COUNT:-0}}" -lt {args.max_restarts} ]; '
        "then",
        '  echo "launch.slurm: step failed with status $STATUS; requeueing"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$STATUS"', ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, job = cli.parse(_parser(), argv)
        validate(args, job)
    except common.LaunchError as e:
        return common.fail(PROG, e)
    text = script(args, job)
    path = args.script or os.path.join(args.log_dir, f"{args.job_name}.sbatch")
    if args.dry_run:
        print(f"mkdir -p {common.shell_join([args.log_dir])}")
        print(f"cat > {common.shell_join([path])} <<'EOF'\n{text}EOF")
    else:
        os.makedirs(args.log_dir, exist_ok=True)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".sbatch-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        print(f"{PROG}: wrote {path}", file=sys.stderr)
    try:
        return common.run(["sbatch", path], args.dry_run, check=False).returncode
    except FileNotFoundError:
        print(f"{PROG}: sbatch not found (not on a SLURM login node?); the script is {path}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
