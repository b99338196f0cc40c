"""Write a whole folder or nothing: stage it next to its destination, then rename it into place.

Every job that writes a folder of results (`cfm.finetune` workdirs, `cfm.export` folders,
`data_prep.prepare_omics` outputs) goes through `atomic_folder`, so a failed, interrupted or
killed run leaves either the complete new folder or the old one, never a half-written mix.
Checks of what the destination may already hold (refuse, or replace with `--overwrite`) stay
with each job, which knows what its users expect; this module only stages and swaps.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import tempfile
import threading
from typing import Iterator


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGTERM and SIGINT wait until the block ends (a signal between moving the old folder
    aside and renaming the new one in would leave the destination missing); main thread only.

    Held by swapping their Python handlers for one that notes them, then raising the noted
    signals again after the block. Blocking them with pthread_sigmask held nothing once other
    threads ran (JAX's): the kernel gives the signal to a thread that does not block it, and
    Python runs the handler in the main thread at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = {}
    for s in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(s) is not None:  # None: a handler set outside Python, left alone
            previous[s] = signal.signal(s, lambda signum, frame: noted.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(noted):  # each signal once, in the order they came
            signal.raise_signal(s)


def fsync_dir(path: str) -> None:
    """Flush a folder's entries (new names, renames) to disk, where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask_modes(folder: str) -> None:
    """Give a folder made by mkdtemp (mode 0700) and everything in it the modes a plain
    mkdir/open would have given under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


@contextlib.contextmanager
def atomic_folder(dest: str) -> Iterator[str]:
    """Yield a fresh, empty temporary folder beside `dest`; when the block ends without an
    exception it becomes `dest` (an existing `dest` is moved aside first and deleted only once
    the new folder is in place; it is put back if that rename fails). On an exception, or a
    signal that unwinds the block, the temporary folder is removed and `dest` is untouched."""
    dest = os.path.abspath(dest)
    parent, base = os.path.dirname(dest), os.path.basename(dest)
    os.makedirs(parent, exist_ok=True)
    # Named before it is made, with this process's id, so no other process can pick the name:
    # a Stopped (SIGTERM) that lands right after the mkdir still finds `tmp` for the clean-up.
    # With tempfile.mkdtemp it could land between the mkdir and the name reaching this frame
    # and leave the folder behind (seen once in tests/test_signals.py, on a loaded machine).
    tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}-{secrets.token_hex(6)}")
    old, swapped = None, False
    try:
        os.mkdir(tmp, 0o700)
        yield tmp
        umask_modes(tmp)
        fsync_dir(tmp)
        # The swap: old folder aside, new one in, as one step. A signal that came meanwhile is
        # raised as the block ends, so the clean-up of the old folder is in `finally`.
        with _signals_held():
            if os.path.isdir(dest) and not os.path.islink(dest) and not os.listdir(dest):
                os.rmdir(dest)
            elif os.path.lexists(dest):
                old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
                os.replace(dest, os.path.join(old, "x"))
            try:
                os.replace(tmp, dest)
                swapped = True
            except BaseException:
                if old is not None:  # put the old folder back
                    os.replace(os.path.join(old, "x"), dest)
                    shutil.rmtree(old, ignore_errors=True)
                raise
        fsync_dir(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
        if swapped and old is not None:  # the new folder is in: the old one can go
            shutil.rmtree(old, ignore_errors=True)
