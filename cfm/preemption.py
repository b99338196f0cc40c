"""Stop cleanly when the machine is about to go: finish the step, save, wait, exit 0.

One process: SIGTERM (what `kill`, SLURM's `--signal`, Kubernetes and GCE spot VMs send before
they stop a job) sets a flag that the train loop reads after each step. Several processes: they
must all stop at the same step, so cfm uses JAX's preemption sync point (through orbax's
`reached_preemption`), which `jax.distributed` arms on every process: it catches SIGTERM and
TPU maintenance notices and makes every process agree on the step to stop at.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax


class PreemptionWatcher:
    """`should_stop(step, mngr)` after each step; `close()` (or leaving a `with` block)
    restores the old signal handler."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: Any = None
        self._single = jax.process_count() == 1
        # Python may only install handlers from the main thread (tests call train() elsewhere).
        if self._single and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def should_stop(self, step: int, mngr: Any) -> bool:
        if self._single:
            return self.signal_name is not None
        if mngr.reached_preemption(step):
            self.signal_name = self.signal_name or "preemption notice"
            return True
        return False

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def __enter__(self) -> "PreemptionWatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
