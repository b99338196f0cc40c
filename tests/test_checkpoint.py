"""Checkpoints as a preempted pod job meets them: kill -9 (also mid-save) and restart ends
bit-for-bit where a straight run ends; SIGTERM saves and exits 0; half-written and damaged
checkpoints are never loaded silently; retention keeps the last K plus every M-th."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cfm import checkpoint, config_check, setup, train
from tests.conftest import ROOT, damage_checkpoint, load_config
from tests.test_train import _tiny

TIMEOUT_S = 300


def _cli(workdir, log, *args, devices=2):
    """`python -m cfm.train` on the test preset, as a user starts it, on `devices` CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
               "--xla_backend_optimization_level=0")  # faster compiles; all runs alike
    cmd = [sys.executable, "-m", "cfm.train", "--config", f"{ROOT}/configs/dino_vit.py:test",
           "--workdir", str(workdir), "--config.log_every=1", *args]
    out = open(log, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    return proc


def _wait(proc, log):
    try:
        rc = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"cfm.train did not finish in {TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
    return rc


def _history(workdir):
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _wait_for_step(proc, workdir, log, step):
    t0 = time.time()
    while time.time() - t0 < TIMEOUT_S:
        hist = _history(workdir)
        if hist and hist[-1]["step"] >= step:
            return hist[-1]["step"]
        if proc.poll() is not None:
            pytest.fail(f"cfm.train exited ({proc.returncode}) early:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"step {step} not reached in {TIMEOUT_S} s")


def _final_state(workdir, step):
    state = setup.create_state(setup.setup(_tiny(), devices=jax.devices()[:1]))
    mngr = ocp.CheckpointManager(str(workdir / "checkpoints"), item_names=("state",))
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(state)))
    mngr.close()
    return jax.device_get(restored["state"])


def test_kill_9_mid_run_then_restart_is_bit_exact(tmp_path):
    """20 steps straight vs 20 steps with a kill -9 right after step 15 is logged (while its
    asynchronous save is starting or in flight): same losses from the resumed step on, and
    bit-identical student, teacher, optimiser state and centers at step 20."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ("--config.total_steps=20", "--config.checkpoint_every=5")
    a = _cli(straight, tmp_path / "straight.log", *args)
    b = _cli(killed, tmp_path / "killed.log", *args)
    _wait_for_step(b, killed, tmp_path / "killed.log", 15)
    b.send_signal(signal.SIGKILL)
    b.wait()
    assert _wait(a, tmp_path / "straight.log") == 0
    kept = sorted(int(d) for d in os.listdir(killed / "checkpoints") if d.isdigit())
    assert kept and kept[-1] in (5, 10, 15), kept  # a save still in flight is not complete

    r = _cli(killed, tmp_path / "resumed.log", *args)
    assert _wait(r, tmp_path / "resumed.log") == 0, (tmp_path / "resumed.log").read_text()
    log = (tmp_path / "resumed.log").read_text()
    resumed_at = int(log.split("resumed from step ")[1].split()[0])
    assert resumed_at == kept[-1], log  # the last complete checkpoint, never a partial one
    ref = {h["step"]: h for h in _history(straight)}
    after = [h for h in _history(killed) if h["step"] > resumed_at]
    assert [h["step"] for h in after][-1] == 20
    for h in after:
        for k in ("loss", "dino", "ibot", "koleo", "grad_norm"):
            assert h[k] == ref[h["step"]][k], (h["step"], k)  # same batches, same arithmetic
    s_ref, s_res = _final_state(straight, 20), _final_state(killed, 20)
    for name in ("params", "teacher", "opt_state", "centers", "step"):
        jax.tree.map(np.testing.assert_array_equal, getattr(s_ref, name), getattr(s_res, name))


def test_sigterm_finishes_the_step_saves_and_exits_0(tmp_path):
    w, log = tmp_path / "w", tmp_path / "run.log"
    proc = _cli(w, log, "--config.total_steps=1000", "--config.checkpoint_every=1000")
    _wait_for_step(proc, w, log, 3)
    proc.send_signal(signal.SIGTERM)
    assert _wait(proc, log) == 0, log.read_text()
    text = log.read_text()
    assert "stopped by SIGTERM after step" in text, text
    stopped = int(text.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert sorted(os.listdir(w / "checkpoints")) == [str(stopped)]
    assert "Traceback" not in text
    # the same command, asked for two more steps, resumes there
    proc = _cli(w, tmp_path / "again.log", f"--config.total_steps={stopped + 2}")
    assert _wait(proc, tmp_path / "again.log") == 0
    assert f"resumed from step {stopped}" in (tmp_path / "again.log").read_text()
    assert _history(w)[-1]["step"] == stopped + 2


@pytest.fixture(scope="module")
def run_10(tmp_path_factory):
    """A 10-step in-process run checkpointed every 2 steps, keeping 2 plus every 4th."""
    w = tmp_path_factory.mktemp("run10")
    train.train(_tiny(total_steps=10, log_every=5, checkpoint_every=2, keep_checkpoints=2,
                      keep_every=4, **{"mesh.data": -1}), str(w))
    return w


def test_retention_keeps_last_k_and_every_mth(run_10):
    assert sorted(int(s) for s in os.listdir(run_10 / "checkpoints") if s.isdigit()) == \
        [4, 8, 10] or sorted(int(s) for s in os.listdir(run_10 / "checkpoints")
                             if s.isdigit()) == [4, 6, 8, 10]
    data = json.loads((run_10 / "checkpoints" / "10" / "data" / "metadata").read_text())
    assert data == {"step": 10, "records_consumed": 80, "global_batch": 8, "seed": 0}


def test_half_written_checkpoint_is_ignored(run_10, tmp_path, capsys):
    """A save killed before orbax's final rename leaves a `*.orbax-checkpoint-tmp-*` folder;
    the next start resumes from the last complete checkpoint instead."""
    w = tmp_path / "w"
    shutil.copytree(run_10, w)
    shutil.copytree(w / "checkpoints" / "10", w / "checkpoints" / "12.orbax-checkpoint-tmp-99")
    train.train(_tiny(total_steps=11, log_every=1, **{"mesh.data": -1}), str(w))
    assert "resumed from step 10" in capsys.readouterr().out


def test_damaged_checkpoint_is_named_and_resume_step_picks_an_older_one(run_10, tmp_path,
                                                                         capsys):
    w = tmp_path / "w"
    shutil.copytree(run_10, w)
    damage_checkpoint(w / "checkpoints" / "10")
    with pytest.raises(Exception) as err:
        train.train(_tiny(total_steps=11, **{"mesh.data": -1}), str(w))
    msg = str(err.value)
    assert "step 10 does not read" in msg and "newest good step is 8" in msg, msg
    with pytest.raises(Exception, match=r"resume_step=7: no such checkpoint.*\[4, 8, 10\]|"
                                        r"resume_step=7: no such checkpoint.*\[4, 6, 8, 10\]"):
        train.train(_tiny(total_steps=11, resume_step=7, **{"mesh.data": -1}), str(w))
    train.train(_tiny(total_steps=9, log_every=1, resume_step=8, **{"mesh.data": -1}), str(w))
    assert "resumed from step 8" in capsys.readouterr().out


def test_checkpoint_dir_keeps_urls():
    assert checkpoint.checkpoint_dir("gs://bucket/run") == "gs://bucket/run/checkpoints"
    assert checkpoint.checkpoint_dir("rel").startswith("/")


def test_finished_run_started_again_does_nothing(run_10, capsys):
    """Exact resume itself is the kill -9 test above; here: a run already at total_steps."""
    capsys.readouterr()
    assert train.train(_tiny(total_steps=10, **{"mesh.data": -1}), str(run_10)) == {}
    assert "nothing to do" in capsys.readouterr().out


# ---- damaged checkpoints at start-up (issue 15, item 3), as a user meets them ----------------
def _files(folder):
    """{relative path: size} of every file under `folder`."""
    return {os.path.relpath(os.path.join(r, n), folder): os.path.getsize(os.path.join(r, n))
            for r, _, names in os.walk(folder) for n in names}


def _one_line_error(proc, log):
    """(exit status, the log) of a run that must stop with one clean line."""
    rc, text = _wait(proc, log), log.read_text()
    for bad in ("Traceback", "bad config", "bound method", "Event loop is closed"):
        assert bad not in text, text
    return rc, text


@pytest.fixture(scope="module")
def cli_run_6(tmp_path_factory):
    """A `python -m cfm.train` run of 6 steps with checkpoints 2, 4, 6 (copied by each test)."""
    w = tmp_path_factory.mktemp("cli6") / "w"
    proc = _cli(w, w.parent / "run.log", "--config.total_steps=6", "--config.checkpoint_every=2")
    assert _wait(proc, w.parent / "run.log") == 0, (w.parent / "run.log").read_text()
    assert sorted(os.listdir(w / "checkpoints")) == ["2", "4", "6"]
    return w


def test_truncated_checkpoint_named_then_set_aside_and_a_kill_loses_nothing(cli_run_6, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(cli_run_6, w)
    damage_checkpoint(w / "checkpoints" / "6")
    damaged_files = _files(w / "checkpoints" / "6")
    steps = ("--config.total_steps=10", "--config.checkpoint_every=2")
    # default: exit 2, one line naming the damaged step and the good ones, nothing moved
    rc, text = _one_line_error(_cli(w, tmp_path / "stop.log", *steps), tmp_path / "stop.log")
    assert rc == 2, text
    line = text.strip().splitlines()[-1]
    assert line.startswith("cfm.train: damaged checkpoint") and "step 6 does not read" in line
    assert "newest good step is 4" in line and "[2]" in line, line
    assert "--config.damaged_checkpoints=set_aside" in line, line
    assert sorted(os.listdir(w / "checkpoints")) == ["2", "4", "6"]
    assert not (w / checkpoint.SET_ASIDE_DIR).exists()

    # set_aside: continues from step 4, step 6 moved aside untouched, saved again; kill -9
    log = tmp_path / "aside.log"
    proc = _cli(w, log, *steps, "--config.damaged_checkpoints=set_aside")
    _wait_for_step(proc, w, log, 9)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    text = log.read_text()
    assert "step 6 does not read" in text and "resumed from step 4" in text, text
    (aside,) = os.listdir(w / checkpoint.SET_ASIDE_DIR)
    assert aside.startswith("6-damaged-"), aside
    assert _files(w / checkpoint.SET_ASIDE_DIR / aside) == damaged_files  # moved, untouched
    kept = sorted(int(d) for d in os.listdir(w / "checkpoints") if d.isdigit())
    assert 6 in kept and kept[-1] in (6, 8), kept  # step 6 saved again at its number
    _final_state(w, 6)  # the new step 6 reads

    # a later start without flags resumes from the newest save: nothing lost
    log = tmp_path / "again.log"
    assert _wait(_cli(w, log, *steps), log) == 0, log.read_text()
    assert f"resumed from step {kept[-1]}" in log.read_text(), log.read_text()
    assert _history(w)[-1]["step"] == 10


def test_deleted_metadata_file_is_named_and_set_aside_continues(cli_run_6, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(cli_run_6, w)
    os.remove(w / "checkpoints" / "6" / "state" / "_METADATA")
    log = tmp_path / "stop.log"
    rc, text = _one_line_error(_cli(w, log, "--config.total_steps=6"), log)
    assert rc == 2, text
    assert "step 6 does not read (state/_METADATA missing)" in text, text
    assert "newest good step is 4" in text, text
    log = tmp_path / "aside.log"
    proc = _cli(w, log, "--config.total_steps=6", "--config.damaged_checkpoints=set_aside")
    assert _wait(proc, log) == 0, log.read_text()
    assert "resumed from step 4" in log.read_text()
    assert sorted(os.listdir(w / "checkpoints")) == ["2", "4", "6"]  # 6 saved anew
    (aside,) = os.listdir(w / checkpoint.SET_ASIDE_DIR)
    assert not (w / checkpoint.SET_ASIDE_DIR / aside / "state" / "_METADATA").exists()


def test_resume_step_with_newer_steps_moves_them_aside(cli_run_6, tmp_path):
    """resume_step=2 with steps 4 and 6 present: they are moved aside (not deleted), the run
    saves 4, 6, 8 again without StepAlreadyExistsError, and a start without flags goes on
    from 8."""
    w = tmp_path / "w"
    shutil.copytree(cli_run_6, w)
    log = tmp_path / "resume.log"
    proc = _cli(w, log, "--config.total_steps=8", "--config.checkpoint_every=2",
                "--config.resume_step=2")
    assert _wait(proc, log) == 0, log.read_text()
    assert "steps 4, 6 moved to" in log.read_text(), log.read_text()
    assert sorted(d.split("-")[0] for d in os.listdir(w / checkpoint.SET_ASIDE_DIR)) == \
        ["4", "6"]
    assert sorted(os.listdir(w / "checkpoints")) == ["4", "6", "8"]
    log = tmp_path / "again.log"
    assert _wait(_cli(w, log, "--config.total_steps=8"), log) == 0
    assert "nothing to do, the checkpoint is at step 8" in log.read_text(), log.read_text()


def test_export_of_a_damaged_checkpoint_is_one_line(cli_run_6, tmp_path):
    """Only the arrays of the process's OCDBT files truncated: the export fails while other
    reads are in flight, which printed "Event loop is closed" tracebacks."""
    w = tmp_path / "w"
    shutil.copytree(cli_run_6, w)
    for root, _, names in os.walk(w / "checkpoints" / "6" / "state"):
        if "ocdbt.process_" in root and root.endswith("/d"):
            for name in names:
                open(os.path.join(root, name), "wb").close()
    out = subprocess.run([sys.executable, "-m", "cfm.export", "--workdir", str(w), "--out",
                          str(tmp_path / "e"), "--format", "orbax"], cwd=ROOT,
                         capture_output=True, text=True, timeout=TIMEOUT_S,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 2, out.stderr
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "checkpoints/6 is damaged" in lines[0], out.stderr
    assert "does not read (OUT_OF_RANGE" in lines[0] and "bound method" not in lines[0]
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("name, validate", [("dino_vit.py", config_check.validate_dino),
                                            ("omics_mgm.py", config_check.validate_mgm)])
def test_damaged_checkpoints_takes_stop_or_set_aside(name, validate):
    c = load_config(name)
    validate(c)  # the default, "stop"
    c.damaged_checkpoints = "set_aside"
    validate(c)
    c.damaged_checkpoints = "delete"
    with pytest.raises(config_check.ConfigError, match=r"config.damaged_checkpoints='delete'"):
        validate(c)
