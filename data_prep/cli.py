"""What the data_prep command lines share: parsing argv and the checks argparse cannot make."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None,
               usage_error: Callable[[argparse.Namespace], str | None],
               prog: str) -> tuple[argparse.Namespace | None, int]:
    """(args, 0) for a usable command line, else (None, exit status): argparse's own (0 after
    --help, 2 for a malformed line), or 2 after printing `prog: <problem>` to stderr for the
    problem `usage_error(args)` names."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return None, int(exit_.code or 0)
    problem = usage_error(args)
    if problem:
        print(f"{prog}: {problem}", file=sys.stderr)
        return None, 2
    return args, 0
