"""Stop cleanly on SIGTERM and SIGINT (Ctrl-C), at any moment, in every long cfm command.

Two ways, one module:

- `PreemptionWatcher` (cfm.train's loop): the signal only sets a flag that the loop reads after
  each step; the loop saves, prints one line and exits 0. One process: SIGTERM (what `kill`,
  SLURM's `--signal`, Kubernetes and GCE spot VMs send before they stop a job) and SIGINT set
  the flag. Several processes: they must all stop at the same step, so cfm uses JAX's
  preemption sync point (through orbax's `reached_preemption`), which `jax.distributed` arms on
  every process: it catches SIGTERM and TPU maintenance notices and makes every process agree on
  the step to stop at; SIGINT is passed on to it as SIGTERM.
- `stop_on_signals(prog, kept)` (cfm.finetune, cfm.embed, cfm.export, data_prep.tile_wsi,
  data_prep.prepare_omics, and cfm.train before its loop): the signal raises `Stopped` in the
  main thread, so `with` blocks and `finally` clauses unwind (the staging folder of
  `cfm.atomic.atomic_folder` is removed, worker processes are ended); then one line on stderr
  says what was kept, and the process leaves with `os._exit(128 + signal)` (143 for SIGTERM, 130
  for SIGINT) after flushing its output. `os._exit` skips interpreter teardown, which must not
  run while XLA threads may still compile: `sys.exit` from a signal handler ended about half of
  the interrupted cfm.finetune runs in a segfault (exit 139).

This module imports only the standard library (the data_prep commands use it without JAX).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator, NoReturn

SIGNALS = (signal.SIGTERM, signal.SIGINT)
RETRY_S = 0.05  # a signal that came during an import, or whose Stopped a gc callback or
# __del__ swallowed, is sent again after this (seconds)


class Stopped(BaseException):
    """SIGTERM or SIGINT, raised in the main thread. A BaseException (like KeyboardInterrupt), so
    `except Exception` clauses let it pass on its way to `stop_on_signals`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        """SIGTERM or SIGINT."""
        return signal.Signals(self.signum).name

    @property
    def status(self) -> int:
        """The exit status a shell reports for the signal: 143 (SIGTERM) or 130 (SIGINT)."""
        return 128 + self.signum


def exit_now(status: int) -> NoReturn:
    """Flush stdout, stderr and logging, then leave with `os._exit(status)`: no interpreter
    teardown, which destroys the JAX client even while XLA threads still use it."""
    with contextlib.suppress(Exception):
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def ignore_sigint() -> None:
    """An initializer for worker processes: Ctrl-C reaches the whole process group, and only
    the parent should act on it (it ends its workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _in_main_thread() -> bool:
    # Python installs signal handlers only from the main thread (tests call train() elsewhere)
    return threading.current_thread() is threading.main_thread()


_noted: list[int] = []  # signals seen by note_signals' handlers, the first first


def _note(signum: int, frame: Any) -> None:
    _noted.append(signum)


def note_signals() -> None:
    """At a command's start, before its heavy imports (JAX takes seconds to load): SIGTERM and
    SIGINT are only noted, instead of their defaults (killed without a word; KeyboardInterrupt,
    whose traceback and interpreter teardown mid-import can end in a segfault). The first
    `stop_on_signals` block acts on a noted signal as it starts. Between and after the blocks a
    signal is noted and ignored: the command is finishing (leave it with `exit_now`)."""
    if _in_main_thread():
        for s in SIGNALS:
            signal.signal(s, _note)


def _forward_as_sigterm(signum: int, frame: Any) -> None:
    """Several processes: SIGINT becomes SIGTERM, which JAX's preemption sync point handles."""
    os.kill(os.getpid(), signal.SIGTERM)


def folder_kept(path: str) -> Callable[[], str]:
    """For `stop_on_signals`: what a stop leaves at `path`, a folder that a job writes whole
    (`cfm.atomic.atomic_folder` or a rename). Compares the folder at stop time with the folder
    now: a new folder there means the job had finished."""
    path = os.path.abspath(path)

    def identity() -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    before = identity()

    def kept() -> str:
        now = identity()
        if now is not None and now != before:
            return f"after finishing: {path} is complete"
        return (f"before finishing: nothing written to {path}"
                + (" (it holds what it held before)" if before is not None else ""))

    return kept


def _importing(frame: Any) -> bool:
    """Whether `frame` runs inside an import (importlib's bootstrap is on the stack). cfm
    imports JAX lazily, inside the blocks; a Stopped raised while jaxlib's native module
    initialises ended cfm.finetune in a segfault (exit 139) in about 1 run in 10 when SIGTERM
    came at that moment."""
    while frame is not None:
        name = frame.f_code.co_filename
        if "importlib._bootstrap" in name or name.endswith(
                ("importlib/_bootstrap.py", "importlib/_bootstrap_external.py")):
            return True
        frame = frame.f_back
    return False


class _Interrupt:
    """The handlers of one `stop_on_signals` block."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal (what the user or scheduler sent)
        self.in_flight = False  # a Stopped is on its way up: later signals are only noted

    def on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        if self.in_flight:
            return  # a second Ctrl-C must not cut the clean-up short
        if _importing(frame):  # raising now can crash a native module half-way through its init
            self.retry_later()
            return
        self.in_flight = True
        for child in multiprocessing.active_children():  # e.g. tile_wsi's workers: stop now
            child.terminate()
        raise Stopped(self.signum)

    def on_unraisable(self, unraisable: Any, previous: Callable[[Any], None]) -> None:
        """A Stopped raised while Python ran a gc callback or a __del__ is printed and dropped
        ("Exception ignored in ..."): send the signal again to the main thread, a moment later,
        when that callback has returned."""
        if not isinstance(unraisable.exc_value, Stopped):
            previous(unraisable)
            return
        self.in_flight = False
        self.retry_later()

    def retry_later(self) -> None:
        """Send the first signal to the main thread again in `RETRY_S` seconds."""
        timer = threading.Timer(RETRY_S, signal.pthread_kill,
                                (threading.main_thread().ident, self.signum))
        timer.daemon = True
        timer.start()


@contextlib.contextmanager
def stop_on_signals(prog: str, kept: Callable[[], str],
                    multi_process: bool = False) -> Iterator[None]:
    """Within the block SIGTERM and SIGINT raise `Stopped` in the main thread; the block's
    `with` and `finally` clauses unwind; then `prog: stopped by SIGTERM <kept()>` goes to
    stderr and the process leaves with `exit_now(128 + signal)` (a signal that was noted but
    whose Stopped never got here ends the block the same way). A block that ends normally or
    with another exception restores the previous handlers. For a command's main thread:
    elsewhere it does nothing.

    `multi_process`: SIGTERM stays with JAX's preemption sync point (cfm.train's loop stops at
    the step all processes agree on) and SIGINT is passed on as SIGTERM."""
    if not _in_main_thread():
        yield
        return
    interrupt = _Interrupt()
    handlers = ({signal.SIGINT: _forward_as_sigterm} if multi_process
                else dict.fromkeys(SIGNALS, interrupt.on_signal))
    previous = {s: signal.signal(s, h) for s, h in handlers.items()}
    previous_hook = sys.unraisablehook
    sys.unraisablehook = lambda u: interrupt.on_unraisable(u, previous_hook)
    stopped: Stopped | None = None
    try:
        if _noted:  # a signal during start-up (note_signals): stop before the block's work
            raise Stopped(_noted[0])
        yield
    except Stopped as e:
        stopped = e
    except BaseException:
        if interrupt.signum is None:
            raise
        # a library swallowed the Stopped (a bare `except:`) and then failed: the signal's doing
        stopped = Stopped(interrupt.signum)
    finally:
        interrupt.in_flight = True  # from here a signal is only noted
        if stopped is None:
            for s, h in previous.items():
                signal.signal(s, h)
            sys.unraisablehook = previous_hook
    if stopped is None and interrupt.signum is not None:  # noted, but never raised up to here
        stopped = Stopped(interrupt.signum)
    if stopped is not None:
        print(f"{prog}: stopped by {stopped.name} {kept()}", file=sys.stderr)
        exit_now(stopped.status)


class PreemptionWatcher:
    """`should_stop(step, mngr)` after each step; `close()` (or leaving a `with` block)
    restores the old signal handlers. `signum`/`signal_name`: the signal seen, if any.
    `multi_process`: pass `jax.process_count() > 1`."""

    def __init__(self, multi_process: bool) -> None:
        self.signum: int | None = None
        self.signal_name: str | None = None
        self._single = not multi_process
        self._previous: dict[int, Any] = {}
        if _in_main_thread():
            handlers = (dict.fromkeys(SIGNALS, self._on_signal) if self._single
                        else {signal.SIGINT: _forward_as_sigterm})
            self._previous = {s: signal.signal(s, h) for s, h in handlers.items()}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum, self.signal_name = signum, signal.Signals(signum).name

    def should_stop(self, step: int, mngr: Any) -> bool:
        """True once a signal (one process) or the agreed preemption step (several) is seen."""
        if self._single:
            return self.signal_name is not None
        if mngr.reached_preemption(step):
            self.signal_name = self.signal_name or "preemption notice"
            return True
        return False

    def close(self) -> None:
        """Put back the handlers that were there before."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def __enter__(self) -> "PreemptionWatcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
