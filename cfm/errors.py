"""One error path for every cfm command line.

A user error (a bad flag, config, path or input) is one line on stderr that names what to fix,
exit status 2, and nothing created; it is found before any model is built. Any other exception
is a bug in cfm: the command prints the traceback and one line asking for a report, exit
status 1.

    def main(argv=None) -> int:
        return errors.run_cli("cfm.export", lambda: _main(argv),
                              {ExportError: "", CheckpointError: "bad checkpoint"})

`run_cli` does the mapping (each command passes the exception types that mean bad input);
`check_workdir` refuses an output folder that cannot be written, without creating it. This
module imports only the standard library, so `cfm.aot` can use it before JAX is configured.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import traceback
from typing import Callable, Mapping

ISSUE_TRACKER = "the cfm issue tracker"  # where bug reports go; named in the bug message
USER_ERROR, BUG, SYSTEM = 2, 1, 1  # exit statuses


class UserError(ValueError):
    """Bad input the user can fix; the message says what (a command exits 2 with it)."""


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (its lines joined; the type's name if it is empty)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


def user_error(prog: str, message: str) -> int:
    """Print `prog: message` (on one line) to stderr; the exit status of a user error. The
    command is ending: library log records after this line (orbax reports reads it abandoned
    from its own threads) are dropped, so the line stays the last word."""
    print(f"{prog}: {one_line(UserError(message))}", file=sys.stderr, flush=True)
    logging.disable(logging.CRITICAL)
    return USER_ERROR


def run_cli(prog: str, fn: Callable[[], int | None],
            user_errors: Mapping[type[BaseException], str] | None = None) -> int:
    """Run a command's body `fn` and return its exit status: `fn`'s (None -> 0); 2 with one
    line on stderr for a UserError or an instance of a key of `user_errors` (the first that
    matches; its value, e.g. "bad config", leads the line when not empty); 1 with one line for
    an OSError that is no user error (a full disk, a failing device: nothing for cfm to fix);
    1 with the traceback and a line saying it is a bug in cfm for any other exception.
    SystemExit and KeyboardInterrupt (a signal handler's exit, --help) pass through."""
    labels = dict(user_errors or {})
    labels.setdefault(UserError, "")  # after the caller's, which may be its subclasses
    try:
        status = fn()
    except tuple(labels) as e:
        label = next(v for k, v in labels.items() if isinstance(e, k))
        return user_error(prog, f"{label}: {e}" if label else str(e) or type(e).__name__)
    except OSError as e:  # the machine, not the input or cfm: one line, nothing half-written
        print(f"{prog}: could not read or write a file: {one_line(e)}", file=sys.stderr,
              flush=True)
        return SYSTEM
    except Exception:  # noqa: BLE001 - anything else is a bug: say so and where to report it
        traceback.print_exc()
        print(f"{prog}: this is a bug in cfm, not a problem with your input; please report it "
              f"on {ISSUE_TRACKER} with the command you ran and the traceback above",
              file=sys.stderr, flush=True)
        return BUG
    return 0 if status is None else int(status)


def _probe(folder: str) -> OSError | None:
    """Whether a folder can be made in `folder`: make one and remove it (os.access says yes to
    root everywhere, also under /proc and on read-only mounts). The error, or None."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".cfm-probe-", dir=folder))
    except OSError as e:
        return e
    return None


def check_workdir(path: str, flag: str = "--workdir") -> None:
    """UserError naming `flag` unless `path` is a folder this process can write, or one it can
    create: not an existing file, not below a file, under a parent it may write (not /proc,
    /sys or a read-only mount). Creates nothing (a probe folder is made and removed in the
    nearest existing folder). URLs (gs://...) are left to the storage layer."""
    if not path:
        raise UserError(f"{flag} is empty; give a folder")
    if "://" in path:
        return
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(full) and not os.path.isdir(full):
        raise UserError(f"{flag} {full} is a file, not a folder; choose a folder")
    existing = full
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {full} cannot be created: {existing} is a file")
    error = _probe(existing)
    if error is not None:
        what = "is not writable" if existing == full else f"cannot be created in {existing}"
        raise UserError(f"{flag} {full} {what} ({error.strerror or error}); choose a folder "
                        "you can write")

