"""cfm.atomic.atomic_folder: the destination is whole or untouched, and no temporary folder is
left behind, also when a signal's exception lands right after the folder is made."""

import os
import signal
import threading
import time

import pytest

from cfm import atomic


class _Signal(BaseException):
    """Stands in for cfm.preemption.Stopped (a BaseException raised by a SIGTERM handler)."""


def _leftovers(parent):
    return [n for n in os.listdir(parent) if n.startswith(".dest.")]


def test_success_replaces_and_failure_leaves_the_old_folder(tmp_path):
    dest = tmp_path / "dest"
    with atomic.atomic_folder(str(dest)) as tmp:
        (tmp_path / os.path.basename(tmp) / "a.txt").write_text("one")
    assert (dest / "a.txt").read_text() == "one" and not _leftovers(tmp_path)
    with pytest.raises(_Signal):
        with atomic.atomic_folder(str(dest)) as tmp:
            (tmp_path / os.path.basename(tmp) / "b.txt").write_text("two")
            raise _Signal()
    assert sorted(os.listdir(dest)) == ["a.txt"] and not _leftovers(tmp_path)
    with atomic.atomic_folder(str(dest)) as tmp:
        (tmp_path / os.path.basename(tmp) / "c.txt").write_text("three")
    assert sorted(os.listdir(dest)) == ["c.txt"] and not _leftovers(tmp_path)


def test_a_signal_right_after_the_mkdir_leaves_nothing(tmp_path, monkeypatch):
    # The handler runs as soon as mkdir returns (CPython checks for signals after a call): the
    # folder exists but the block has not started. With tempfile.mkdtemp that left it behind.
    mkdir = os.mkdir

    def mkdir_then_signal(path, *args, **kwargs):
        mkdir(path, *args, **kwargs)
        if os.path.basename(path).startswith(".dest.tmp-"):
            raise _Signal()

    monkeypatch.setattr(os, "mkdir", mkdir_then_signal)
    with pytest.raises(_Signal):
        with atomic.atomic_folder(str(tmp_path / "dest")):
            pass  # never reached
    assert not _leftovers(tmp_path) and not (tmp_path / "dest").exists()


def test_a_signal_during_the_swap_waits_until_the_new_folder_is_in(tmp_path, monkeypatch):
    # The worst moment: the old folder moved aside, the new one not yet in. A second thread
    # runs, as JAX's do, so the kernel may hand the signal to it (pthread_sigmask in the main
    # thread alone held nothing); the handler must still run only after the swap.
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "old.txt").write_text("old")

    def handler(signum, frame):
        raise _Signal()

    previous = signal.signal(signal.SIGTERM, handler)
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait)
    helper.start()
    replace = os.replace

    def replace_then_signal(src, dst):
        replace(src, dst)
        if os.path.basename(dst) == "x":  # dest was just moved aside
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # delivered by now, to whichever thread

    monkeypatch.setattr(os, "replace", replace_then_signal)
    try:
        with pytest.raises(_Signal):
            with atomic.atomic_folder(str(dest)) as tmp:
                (tmp_path / os.path.basename(tmp) / "new.txt").write_text("new")
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop.set()
        helper.join()
    assert sorted(os.listdir(dest)) == ["new.txt"] and not _leftovers(tmp_path)
