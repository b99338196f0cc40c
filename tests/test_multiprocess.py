"""Real multi-process training: 2 CPU processes x 2 devices equal 1 process x 4 devices.

Each run is a separate Python process (JAX's distributed runtime can be joined once per process
and must be joined before the backend starts), with a coordinator on 127.0.0.1 and gloo CPU
collectives. Also checks `cfm.parallel.distributed`'s argument and environment errors in-process
(those fail before anything is initialised).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cfm.parallel import distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # for the three runs together (about 50 s on 2 CPU cores)

# Trains the tiny preset for 5 steps into argv[2] after joining the process group in argv[1],
# with the config overrides in argv[3].
_WORKER = """\
import json, sys
from cfm.parallel import distributed
distributed.initialize(**json.loads(sys.argv[1]))
distributed.initialize(**json.loads(sys.argv[1]))  # a second call is harmless
from cfm import train
from tests.test_train import _tiny
overrides = {"total_steps": 5, "log_every": 1, "checkpoint_every": 5, "mesh.data": -1}
train.train(_tiny(**{**overrides, **json.loads(sys.argv[3])}), sys.argv[2])
"""

_TERMS = ("loss", "dino", "ibot", "koleo")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(script: pathlib.Path, init: dict, workdir: pathlib.Path, n_devices: int,
           log: pathlib.Path, overrides: dict | None = None, **extra_env: str
           ) -> tuple[subprocess.Popen, pathlib.Path]:
    """A worker process with `n_devices` forced CPU devices, joining the process group given
    by `init` (initialize's arguments) or `extra_env`; stdout+stderr go to `log`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CFM_", "SLURM_"))}
    env.update(extra_env)
    # Optimisation level 0 only shortens XLA's CPU compile (~40%); all runs use it alike.
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices} "
                         "--xla_backend_optimization_level=0",
               JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(
                   os.pathsep))
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(init), str(workdir),
                             json.dumps(overrides or {})],
                            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    return proc, log


def _wait_all(procs: list[tuple[subprocess.Popen, pathlib.Path]]) -> None:
    """Wait for every worker (TIMEOUT_S in all); on a failure or timeout kill the rest and fail
    with each worker's exit code and output."""
    deadline = time.monotonic() + TIMEOUT_S
    timed_out = False
    try:
        for proc, _ in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            if proc.returncode != 0:
                break  # a failed worker: the others may hang waiting for it
    except subprocess.TimeoutExpired:
        timed_out = True
    if any(p.poll() is None or p.returncode != 0 for p, _ in procs):
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        why = f"timed out after {TIMEOUT_S} s" if timed_out else "failed"
        report = "\n".join(f"--- worker {i}: exit {p.returncode}\n{log.read_text()[-4000:]}"
                           for i, (p, log) in enumerate(procs))
        pytest.fail(f"training run {why} (unfinished workers killed, exit -9):\n{report}")


def _history(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[pathlib.Path, list[str]]:
    """Runs 2 processes x 2 devices (`multi`) and 1 process x 4 devices (`single`) side by side
    for 5 steps; returns their folder and the three workers' logs."""
    tmp_path = tmp_path_factory.mktemp("two_runs")
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    multi, single = tmp_path / "multi", tmp_path / "single"
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [  # process 0 from arguments, process 1 from the CFM_* environment variables
        _start(script, {"coordinator": coordinator, "num_processes": 2, "process_id": 0},
               multi, 2, tmp_path / "worker0.log", {"mesh.slices": 2}),
        _start(script, {}, multi, 2, tmp_path / "worker1.log", {"mesh.slices": 2},
               CFM_COORDINATOR=coordinator,
               CFM_NUM_PROCESSES="2", CFM_PROCESS_ID="1")]
    procs.append(_start(script, {}, single, 4, tmp_path / "single.log"))  # runs alongside
    _wait_all(procs)

    return tmp_path, [log.read_text() for _, log in procs]


def test_two_processes_match_one_process(two_runs):
    """2 processes x 2 CPU devices train exactly as 1 process x 4 devices (batch 8, 5 steps).
    The 2-process run uses a hybrid mesh with each process as one slice (`mesh.slices=2`, as
    a two-slice TPU job lays out its data axis)."""
    tmp_path, logs = two_runs
    multi, single = tmp_path / "multi", tmp_path / "single"
    assert "cfm.distributed: 2 processes joined" in logs[0], logs[0]
    assert "over 2 slices" in logs[0], logs[0]
    assert "step 5/5" in logs[0] and "step " not in logs[1], logs[1]  # only process 0 logs
    assert "cfm.distributed" not in logs[2], logs[2]  # one process: nothing joined
    a, b = _history(multi), _history(single)
    assert [h["step"] for h in a] == [1, 2, 3, 4, 5], a  # written once, by process 0 alone
    assert [h["step"] for h in b] == [1, 2, 3, 4, 5], b
    for ha, hb in zip(a, b):
        for k in _TERMS:
            np.testing.assert_allclose(ha[k], hb[k], rtol=1e-5, err_msg=f"step {ha['step']} {k}")
    assert sorted(os.listdir(multi / "checkpoints")) == ["5"]


def test_elastic_restore_onto_other_meshes(two_runs):
    """The checkpoint that 2 processes x 2 devices saved restores on 1 process x 2 devices and
    on 1 process x 8 devices, and both continue exactly as the 1 x 4 run continues."""
    tmp_path, _ = two_runs
    runs = {"ref": (tmp_path / "single", 4), "on2": (tmp_path / "on2", 2),
            "on8": (tmp_path / "on8", 8)}
    for name in ("on2", "on8"):
        shutil.copytree(tmp_path / "multi", runs[name][0])
    script = tmp_path / "worker.py"
    procs = [_start(script, {}, w, n, tmp_path / f"{name}.log", {"total_steps": 7})
             for name, (w, n) in runs.items()]
    _wait_all(procs)
    for (name, _), (_, log) in zip(runs.items(), procs):
        assert "resumed from step 5" in log.read_text(), (name, log.read_text())
    hist = {name: _history(w)[-2:] for name, (w, _) in runs.items()}
    for name in ("on2", "on8"):
        assert [h["step"] for h in hist[name]] == [6, 7], hist[name]
        for ha, hb in zip(hist[name], hist["ref"]):
            for k in _TERMS:
                np.testing.assert_allclose(ha[k], hb[k], rtol=1e-5, err_msg=f"{name} {k}")


# ---- argument and environment checks (no process group is joined) ---------------------------
@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("CFM_", "SLURM_")):
            monkeypatch.delenv(k)
    return monkeypatch


@pytest.mark.parametrize("kwargs,message", [
    ({"coordinator": "127.0.0.1:1234", "num_processes": 2, "process_id": 2}, "outside [0, 2)"),
    ({"coordinator": "127.0.0.1:1234", "num_processes": 2, "process_id": -1}, "outside [0, 2)"),
    ({"coordinator": "127.0.0.1", "num_processes": 2, "process_id": 0}, "host:port"),
    ({"coordinator": "127.0.0.1:99999", "num_processes": 2, "process_id": 0}, "host:port"),
    ({"coordinator": "127.0.0.1:1234", "num_processes": 2}, "not process_id"),
    ({"num_processes": 2, "process_id": 0}, "not coordinator"),
])
def test_bad_arguments_are_clear(clean_env, kwargs, message):
    with pytest.raises(distributed.DistributedConfigError, match=message.replace("[", r"\[")
                       .replace(")", r"\)").replace("(", r"\(")):
        distributed.initialize(**kwargs)


@pytest.mark.parametrize("env,message", [
    ({"CFM_COORDINATOR": "127.0.0.1:1234", "CFM_NUM_PROCESSES": "2"}, "not process_id"),
    ({"CFM_NUM_PROCESSES": "4", "CFM_PROCESS_ID": "4", "CFM_COORDINATOR": "h:1"}, "outside"),
    ({"CFM_COORDINATOR": "h:x", "CFM_NUM_PROCESSES": "2", "CFM_PROCESS_ID": "0"}, "host:port"),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, "NODELIST"),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "3", "SLURM_JOB_NODELIST": "n1"}, "outside"),
])
def test_bad_environment_is_clear(clean_env, env, message):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(distributed.DistributedConfigError, match=message):
        distributed.initialize()


def test_single_process_is_a_no_op(clean_env):
    distributed.initialize()  # nothing in the environment
    distributed.initialize(num_processes=1, process_id=0)
    distributed.initialize(coordinator="127.0.0.1:1234", num_processes=1, process_id=0)
    for k, v in {"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n1",
                 "CFM_NUM_PROCESSES": "1"}.items():  # CFM_NUM_PROCESSES=1 overrides SLURM
        clean_env.setenv(k, v)
    distributed.initialize()
    assert not jax.distributed.is_initialized() and distributed.is_main()


@pytest.mark.parametrize("nodelist,host", [
    ("node001", "node001"), ("node001,gpu2", "node001"), ("node[001-015],gpu2", "node001"),
    ("node[007,009-015]", "node007"), ("gpu[3]", "gpu3"),
])
def test_first_slurm_host(nodelist, host):
    assert distributed.first_slurm_host(nodelist) == host
