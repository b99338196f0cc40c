"""What the three launchers share: the job command, its config's batch size, shell quoting, and
running (or, with --dry-run, printing) the commands.

A launcher's command line is `python -m launch.<where> [launcher flags] -- <job command>`; the
job command is any `python -m ...` command, e.g. `python -m cfm.train --config
configs/dino_vit.py:vit_l16 --workdir gs://bucket/run` or `python -m data_prep.tile_wsi ...
--num-shards {num_shards} --shard-index {shard_index}`. Two placeholders in it are replaced per
worker: `{shard_index}` (the worker's index: process id, TPU worker across slices, or SLURM
array task) and `{num_shards}` (how many there are).

Bad input (an unknown topology, a workdir that is not shared storage, a cfm.train batch size that
does not divide over the devices, a config file that cannot be read) raises `LaunchError`; each
launcher prints it to stderr and exits with status 2 before it creates or starts anything.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from typing import Sequence

import ml_collections

from cfm import config_loader

PLACEHOLDERS = ("{shard_index}", "{num_shards}")


class LaunchError(Exception):
    """Bad launcher input: printed to stderr, exit status 2, nothing created."""


def split_job(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(launcher arguments, job command) split at the first `--`; the job must be non-empty."""
    argv = list(argv)
    if "--" not in argv:
        raise LaunchError("no job command: put it after `--`, e.g. `-- python -m cfm.train "
                          "--config configs/dino_vit.py:test --workdir DIR`")
    cut = argv.index("--")
    job = argv[cut + 1:]
    if not job:
        raise LaunchError("empty job command after `--`")
    return argv[:cut], job


def with_python(job: Sequence[str], python: str) -> list[str]:
    """The job with a leading `python`/`python3` replaced by `python` (the interpreter that has
    cfm installed where the job runs)."""
    job = list(job)
    if job and job[0] in ("python", "python3"):
        job[0] = python
    return job


def fill(job: Sequence[str], shard_index: str, num_shards: str) -> list[str]:
    """The job with `{shard_index}` and `{num_shards}` replaced by the given strings."""
    return [a.replace("{shard_index}", shard_index).replace("{num_shards}", num_shards)
            for a in job]


def shell_join(args: Sequence[str], shell_vars: dict[str, str] | None = None) -> str:
    """Quote `args` for a POSIX shell; each placeholder key of `shell_vars` (e.g.
    '{shard_index}') becomes the double-quoted shell expression it maps to (e.g.
    '$SLURM_ARRAY_TASK_ID'), so the shell expands that and nothing else."""
    if not shell_vars:
        return shlex.join(args)
    pattern = re.compile("|".join(re.escape(k) for k in shell_vars))
    out = []
    for arg in args:
        parts, keys = pattern.split(arg), pattern.findall(arg)
        text = shlex.quote(parts[0]) if parts[0] else ""
        for key, part in zip(keys, parts[1:]):
            text += f'"{shell_vars[key]}"' + (shlex.quote(part) if part else "")
        out.append(text or "''")
    return " ".join(out)


# ---- the job's config ----------------------------------------------------------------------
def _flag_value(job: Sequence[str], flag: str) -> str | None:
    """The value of `flag` in `--flag=V` or `--flag V` form (the last one wins), else None."""
    value = None
    for i, arg in enumerate(job):
        if arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
        elif arg == flag and i + 1 < len(job):
            value = job[i + 1]
    return value


def job_flag(job: Sequence[str], flag: str) -> str | None:
    """The value of `--flag` in the job command (e.g. '--workdir'), else None."""
    return _flag_value(job, flag)


def _config_overrides(job: Sequence[str]) -> list[str]:
    """The job's `--config.key=value` / `--config.key value` arguments, as `--config.key=value`."""
    out = []
    for i, arg in enumerate(job):
        if arg.startswith("--config.") and "=" in arg:
            out.append(arg)
        elif arg.startswith("--config.") and i + 1 < len(job):
            out.append(f"{arg}={job[i + 1]}")
    return out


def load_job_config(job: Sequence[str]) -> ml_collections.ConfigDict | None:
    """The ConfigDict the job will run with: its `--config FILE:ARG` (the file imported by path,
    relative to the current directory) with the job's `--config.key=value` overrides applied,
    exactly as cfm.train parses them (`cfm.config_loader`); None when the job has no --config."""
    spec = _flag_value(job, "--config")
    if spec is None:
        return None
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
        raise LaunchError(f"--config {spec}: no config file {path!r} (paths are relative to "
                          f"{os.getcwd()}; run the launcher from the cfm checkout)")
    try:
        return config_loader.load_config(spec, _config_overrides(job))
    except config_loader.CommandLineError as e:
        raise LaunchError(f"--config {spec}: cannot build the config: {e}") from None


def config_int(config: ml_collections.ConfigDict, key: str) -> int | None:
    """config.<key> (dotted) as an integer; None when the config has no such key."""
    node = config
    for part in key.split("."):
        if node is None or part not in node:
            return None
        node = node[part]
    return int(node)


def job_module(job: Sequence[str]) -> str | None:
    """The module a `python -m MODULE ...` job runs, else None."""
    job = list(job)
    return job[job.index("-m") + 1] if "-m" in job[:-1] else None


def check_batch(job: Sequence[str], n_devices: int, where: str):
    """For a cfm.train job, raise LaunchError when its global batch size does not divide over
    `n_devices` (every device gets the same share of every global batch). Returns the job's
    config, or None for other jobs."""
    if job_module(job) != "cfm.train":
        return None
    config = load_job_config(job)
    if config is None:
        return None
    batch = config_int(config, "batch_size")
    if batch is not None and batch % n_devices:
        raise LaunchError(
            f"batch size {batch} (config.batch_size) does not divide over the {n_devices} "
            f"devices of {where}; choose a multiple of {n_devices}, e.g. "
            f"--config.batch_size={max(n_devices, batch // n_devices * n_devices)}")
    return config


# ---- running ----------------------------------------------------------------------------
def show(cmd: Sequence[str] | str) -> str:
    """One command as a shell line (a string is printed as it is)."""
    return cmd if isinstance(cmd, str) else shlex.join(cmd)


def run(cmd: Sequence[str], dry_run: bool, check: bool = True,
        capture: bool = False) -> subprocess.CompletedProcess:
    """Print `cmd` (prefixed with '+ ', to stderr when running for real); run it unless
    `dry_run`, in which case a successful empty result comes back."""
    if dry_run:
        print(show(cmd), flush=True)
        return subprocess.CompletedProcess(list(cmd), 0, "", "")
    print(f"+ {show(cmd)}", file=sys.stderr, flush=True)
    return subprocess.run(list(cmd), check=check, text=True,
                          stdout=subprocess.PIPE if capture else None)


def fail(prog: str, error: Exception) -> int:
    """Print a launcher error and return exit status 2."""
    print(f"{prog}: {error}", file=sys.stderr, flush=True)
    return 2
