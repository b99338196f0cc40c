"""What the launchers' command lines share: `[launcher flags] -- <job command>` split and parsed,
and the lower bounds of their count flags. Bad input raises `common.LaunchError` (exit 2)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from launch import common


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
          job_optional: bool = False) -> tuple[argparse.Namespace, list[str] | None]:
    """(launcher flags parsed by `parser`, job command) from `argv` (default: sys.argv[1:]),
    split at the first `--`. With `job_optional` and no `--`, the job is None; otherwise a
    missing or empty job is a LaunchError. argparse exits (status 2) for bad flags, and
    (status 0) after printing the help for `-h`/`--help` before any `--`, job or not."""
    argv = sys.argv[1:] if argv is None else list(argv)
    own = argv[:argv.index("--")] if "--" in argv else argv
    if "-h" in own or "--help" in own:
        parser.parse_args(own)  # prints the help and exits 0
    job = None
    if "--" in argv or not job_optional:
        argv, job = common.split_job(argv)
    return parser.parse_args(argv), job


def require_at_least(args: argparse.Namespace, minimum: int, *names: str) -> None:
    """LaunchError `--NAME must be >= MINIMUM, got V` for the first of `names` (argparse dests)
    whose value is below `minimum`."""
    for name in names:
        if getattr(args, name) < minimum:
            raise common.LaunchError(f"--{name.replace('_', '-')} must be >= {minimum}, got "
                                     f"{getattr(args, name)}")
