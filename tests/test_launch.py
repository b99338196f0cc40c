"""Launchers: the TPU and SLURM dry runs print exactly the expected commands (one slice / one
node and two slices / two nodes), bad input stops with exit status 2 before any command runs,
and the local launcher's 2-process DINOv2 run is SIGKILLed mid-run (its whole process group),
started again, resumes from its checkpoint and finishes."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from launch import common, local, slurm, tpu

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = ["python", "-m", "cfm.train", "--config", "configs/dino_vit.py:vit_l16"]
MD = "http://metadata.google.internal/computeMetadata/v1/instance/attributes"
INSTALL = ("'--command=mkdir -p ~/cfm && tar -xzf ~/cfm.tar.gz -C ~/cfm && (test -x "
           "~/cfm-venv/bin/python || python3 -m venv ~/cfm-venv) && ~/cfm-venv/bin/pip install "
           "-q -e \"$HOME/cfm[tpu,gcs]\"'")
START = ("'--command=rm -f ~/cfm-run.rc; setsid nohup bash ~/cfm-run.sh > ~/cfm-run.log 2>&1 "
         "< /dev/null & echo $! > ~/cfm-run.pid'")
STATUS = ("'--command=if [ -f ~/cfm-run.rc ]; then cat ~/cfm-run.rc; elif [ -f ~/cfm-run.pid ] "
          "&& kill -0 $(cat ~/cfm-run.pid) 2>/dev/null; then echo running; else echo none; fi'")
STOP = ("'--command=test -f ~/cfm-run.pid && kill -TERM -- -$(cat ~/cfm-run.pid) 2>/dev/null; "
        "sleep 30; kill -KILL -- -$(cat ~/cfm-run.pid) 2>/dev/null; true'")


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # config paths in job commands are relative to the checkout


def _dry(capsys, main, argv) -> list[str]:
    """The dry run's stdout lines without its '# ' comment lines; exit status 0 asserted."""
    assert main(argv) == 0, capsys.readouterr().err
    return [x for x in capsys.readouterr().out.splitlines() if not x.startswith("# ")]


def _worker_script(stage: str, hosts: int, job: str) -> list[str]:
    return [
        f"cat > {stage}/cfm-run.sh <<'EOF'", "#!/bin/bash",
        f"W=$(curl -sf -H Metadata-Flavor:Google {MD}/agent-worker-number)",
        f"S=$(curl -sf -H Metadata-Flavor:Google {MD}/tpu-env | sed -n "
        "\"s/^MEGASCALE_SLICE_ID: '\\([0-9]*\\)'.*/\\1/p\")",
        f"export CFM_SHARD_INDEX=$(( ${{S:-0}} * {hosts} + ${{W:-0}} ))", 'cd "$HOME/cfm"',
        f'"$HOME/cfm-venv/bin/python" -m {job}', 'echo $? > "$HOME/cfm-run.rc"', "EOF"]


def test_tpu_dry_run_one_slice(capsys):
    """v5p:2x2x4 = 16 chips, 4 hosts: a spot TPU VM v5p-32, job on all workers."""
    out = _dry(capsys, tpu.main, [
        "run", "--name", "cfm-l16", "--zone", "us-east5-a", "--topology", "v5p:2x2x4", "--spot",
        "--dry-run", "--", *TRAIN, "--workdir", "gs://bkt/l16"])
    g = "gcloud compute tpus tpu-vm"
    where = "cfm-l16 --zone=us-east5-a"
    describe = f"{g} describe {where} '--format=value(state)'"
    assert out == [
        "mkdir -p /tmp/cfm-launch-cfm-l16",
        "git archive --format=tar.gz --output=/tmp/cfm-launch-cfm-l16/cfm.tar.gz HEAD",
        *_worker_script("/tmp/cfm-launch-cfm-l16", 4, "cfm.train --config "
                        "configs/dino_vit.py:vit_l16 --workdir gs://bkt/l16"),
        describe,
        f"{g} ssh {where} --worker=all {STATUS}",
        f"{g} create {where} --accelerator-type=v5p-32 --version=v2-alpha-tpuv5 --spot",
        describe,
        f"{g} scp /tmp/cfm-launch-cfm-l16/cfm.tar.gz /tmp/cfm-launch-cfm-l16/cfm-run.sh "
        "cfm-l16: --zone=us-east5-a --worker=all",
        f"{g} ssh {where} --worker=all {INSTALL}",
        f"{g} ssh {where} --worker=all {START}",
        f"{g} ssh {where} --worker=0 '--command=tail -n +1 -F ~/cfm-run.log'",
        f"{g} ssh {where} --worker=all {STATUS}",
        f"{g} ssh {where} --worker=all {STOP}",
    ]
    assert _dry(capsys, tpu.main, ["delete", "--name", "cfm-l16", "--zone", "us-east5-a",
                                   "--dry-run"]) == [f"{g} delete {where} --quiet"]


def test_tpu_dry_run_two_slices(capsys):
    """2 x v5e:4x4 (2 x 16 chips, 4 hosts each): one queued resource with 2 nodes; the job is
    tile_wsi, sharded over all 8 workers by their slice and worker number."""
    out = _dry(capsys, tpu.main, [
        "run", "--name", "cfm-2s", "--zone", "us-east5-b", "--topology", "v5e:4x4",
        "--num-slices", "2", "--spot", "--project", "proj", "--runtime-version", "v2-x",
        "--dry-run", "--", "python", "-m", "data_prep.tile_wsi", "--slides", "/mnt/wsi",
        "--out", "/mnt/tiles", "--num-shards", "{num_shards}", "--shard-index={shard_index}"])
    g = "gcloud compute tpus queued-resources"
    where = "cfm-2s --zone=us-east5-b --project=proj"
    describe = f"{g} describe {where} '--format=value(state.state)'"
    assert out == [
        "mkdir -p /tmp/cfm-launch-cfm-2s",
        "git archive --format=tar.gz --output=/tmp/cfm-launch-cfm-2s/cfm.tar.gz HEAD",
        *_worker_script("/tmp/cfm-launch-cfm-2s", 4, "data_prep.tile_wsi --slides /mnt/wsi "
                        '--out /mnt/tiles --num-shards "8" --shard-index="$CFM_SHARD_INDEX"'),
        describe,
        f"{g} ssh {where} --node=all --worker=all {STATUS}",
        f"{g} create {where} --accelerator-type=v5litepod-16 --runtime-version=v2-x "
        "--node-count=2 --node-prefix=cfm-2s --spot",
        describe,
        f"{g} scp /tmp/cfm-launch-cfm-2s/cfm.tar.gz /tmp/cfm-launch-cfm-2s/cfm-run.sh cfm-2s: "
        "--zone=us-east5-b --project=proj --node=all --worker=all",
        f"{g} ssh {where} --node=all --worker=all {INSTALL}",
        f"{g} ssh {where} --node=all --worker=all {START}",
        f"{g} ssh {where} --node=0 --worker=0 '--command=tail -n +1 -F ~/cfm-run.log'",
        f"{g} ssh {where} --node=all --worker=all {STATUS}",
        f"{g} ssh {where} --node=all --worker=all {STOP}",
    ]
    assert _dry(capsys, tpu.main, ["delete", "--name", "cfm-2s", "--zone", "us-east5-b",
                                   "--project", "proj", "--num-slices", "2", "--dry-run"]) == [
        f"{g} delete {where} --quiet --force"]


def _sbatch(head: list[str], setup: list[str], srun: str) -> list[str]:
    return [
        "mkdir -p slurm-logs", "cat > slurm-logs/cfm.sbatch <<'EOF'", "#!/bin/bash", *head,
        "#SBATCH --open-mode=append", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300",
        "cd /shared/cfm", *setup,
        "stop() {  # $1: requeue after the step saved and exited",
        '  echo "launch.slurm: $2: sending SIGTERM to the step (cfm.train saves, exits 0)"',
        '  kill -TERM "$STEP" 2>/dev/null; wait "$STEP"',
        '  if [ "$1" = requeue ]; then scontrol requeue "$SLURM_JOB_ID"; fi', "  exit 0", "}",
        "trap 'stop requeue \"time limit near\"' USR1", "trap 'stop no \"SIGTERM\"' TERM",
        f"srun --kill-on-bad-exit=1 {srun} &", "STEP=$!", 'wait "$STEP"', "STATUS=$?",
        'if [ "$STATUS" -ne 0 ] && [ "${SLURM_RESTART_COUNT:-0}" -lt 10 ]; then',
        '  echo "launch.slurm: step failed with status $STATUS; requeueing"',
        '  scontrol requeue "$SLURM_JOB_ID"', "fi", 'exit "$STATUS"', "EOF",
        "sbatch slurm-logs/cfm.sbatch"]


def test_slurm_dry_run_one_node(capsys):
    """1 node x 8 GPUs, one process per node driving all 8."""
    out = _dry(capsys, slurm.main, [
        "--gpus-per-node", "8", "--per", "node", "--chdir", "/shared/cfm", "--time", "4:00:00",
        "--dry-run", "--", *TRAIN, "--workdir", "/shared/runs/l16"])
    assert out == _sbatch(
        ["#SBATCH --job-name=cfm", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
         "#SBATCH --gpus-per-node=8", "#SBATCH --time=4:00:00",
         "#SBATCH --output=slurm-logs/%x-%j.out"],
        ["export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"],
        "python -m cfm.train --config configs/dino_vit.py:vit_l16 --workdir /shared/runs/l16")


def test_slurm_dry_run_two_nodes_and_array(capsys):
    """2 nodes x 8 GPUs, one process per GPU, each node a slice of the hybrid mesh; and a
    4-task array job of tile_wsi shards."""
    out = _dry(capsys, slurm.main, [
        "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--account", "lab",
        "--cpus-per-task", "12", "--chdir", "/shared/cfm", "--setup", "module load cuda",
        "--setup", "source .venv/bin/activate", "--dry-run", "--", *TRAIN, "--workdir",
        "/shared/runs/l16", "--config.mesh.slices=2"])
    assert out == _sbatch(
        ["#SBATCH --job-name=cfm", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8",
         "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=12", "#SBATCH --partition=gpu",
         "#SBATCH --account=lab", "#SBATCH --time=24:00:00",
         "#SBATCH --output=slurm-logs/%x-%j.out"],
        ["module load cuda", "source .venv/bin/activate"],
        "python -m cfm.train --config configs/dino_vit.py:vit_l16 --workdir /shared/runs/l16 "
        "--config.mesh.slices=2")
    out = _dry(capsys, slurm.main, [
        "--array", "4", "--chdir", "/shared/cfm", "--dry-run", "--", "python", "-m",
        "data_prep.tile_wsi", "--slides", "/shared/wsi", "--out", "/shared/tiles",
        "--num-shards", "{num_shards}", "--shard-index", "{shard_index}"])
    assert out.index("#SBATCH --array=0-3") == out.index("#SBATCH --signal=B:USR1@300") + 1
    out.remove("#SBATCH --array=0-3")
    assert out == _sbatch(
        ["#SBATCH --job-name=cfm", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
         "#SBATCH --time=24:00:00", "#SBATCH --output=slurm-logs/%x-%A_%a.out"],
        [], 'python -m data_prep.tile_wsi --slides /shared/wsi --out /shared/tiles '
        '--num-shards "4" --shard-index "$SLURM_ARRAY_TASK_ID"')


# ---- bad input: exit 2, a message naming the input, no command run --------------------------
@pytest.mark.parametrize("main,argv,message", [
    (tpu.main, ["run", "--topology", "v7:4x4"], "unknown topology"),
    (tpu.main, ["run", "--topology", "v5p:2x2x4"], "--workdir /tmp/run: a job on 4 TPU hosts"),
    (tpu.main, ["run", "--topology", "v5e:2x2", "--", *TRAIN, "--workdir", "/tmp/run",
                "--config.batch_size=6"], "batch size 6 (config.batch_size) does not divide "
                                          "over the 4 devices"),
    (tpu.main, ["run", "--topology", "v5e:4x4", "--num-slices", "2", "--", *TRAIN,
                "--workdir", "gs://b/r"], "--config.mesh.slices=2"),
    (tpu.main, ["run", "--topology", "v5e:4x4", "--num-slices", "2", "--preemptible"],
     "--preemptible is for TPU VMs"),
    (slurm.main, ["--nodes", "2", "--gpus-per-node", "8", "--", *TRAIN, "--workdir", "/r",
                  "--config.batch_size", "100"], "batch size 100"),
    (slurm.main, ["--nodes", "2"], "--per gpu needs --gpus-per-node"),
    (local.main, ["--num-processes", "3", "--devices-per-process", "2", "--", "python", "-m",
                  "cfm.train", "--config", "configs/dino_vit.py:test", "--workdir", "/tmp/r"],
     "batch size 8 (config.batch_size) does not divide over the 6 devices of 3 processes"),
    # the job's own --config.key overrides are applied before the check (8 divides over 4)
    (local.main, ["--num-processes", "2", "--devices-per-process", "2", "--", "python", "-m",
                  "cfm.train", "--config", "configs/dino_vit.py:test", "--workdir", "/tmp/r",
                  "--config.batch_size=6"],
     "batch size 6 (config.batch_size) does not divide over the 4 devices of 2 processes"),
    (local.main, ["--num-processes", "2", "--", "python", "-m", "cfm.train", "--config",
                  "configs/dino_vit.py:test", "--workdir", "/tmp/r", "--config.batch_sise=8"],
     "cannot build the config"),
    (local.main, ["--num-processes", "0", "--", "python", "-c", "pass"],
     "--num-processes must be >= 1"),
    (local.main, ["--num-processes", "2"], "no job command"),
    (local.main, ["--num-processes", "2", "--", "no-such-program"],
     "job command 'no-such-program' not found"),
    (local.main, ["--num-processes", "2", "--", "python", "-m", "cfm.train", "--config",
                  "configs/nope.py:test"], "no config file 'configs/nope.py'"),
    (local.main, ["--num-processes", "2", "--", "python", "-m", "cfm.train", "--config",
                  "configs/dino_vit.py:vit_x"], "unknown preset 'vit_x'"),
])
def test_bad_input_exits_2_before_anything_runs(main, argv, message, capsys, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError(f"a command ran: {a}")

    monkeypatch.setattr(subprocess, "run", forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    if main is tpu.main:
        argv = argv[:1] + ["--name", "n", "--zone", "z"] + argv[1:]
        if "--" not in argv:
            argv += ["--", *TRAIN, "--workdir", "/tmp/run"]
    elif main is slurm.main and "--" not in argv:
        argv += ["--", *TRAIN, "--workdir", "/r"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_job_config_is_the_one_the_job_runs_with():
    """load_job_config applies the job's --config.key=value and --config.key value overrides
    (as cfm.train parses them); config_int reads dotted keys; check_batch sees the override."""
    job = ["python", "-m", "cfm.train", "--config", "configs/dino_vit.py:test", "--workdir",
           "/w", "--config.batch_size=12", "--config.mesh.slices", "3"]
    config = common.load_job_config(job)
    assert common.config_int(config, "batch_size") == 12
    assert common.config_int(config, "mesh.slices") == 3
    assert common.config_int(config, "mesh.nope") is None
    assert common.config_int(config, "nope.batch_size") is None
    assert common.config_int(common.load_job_config(job[:7]), "batch_size") == 8
    assert common.load_job_config(["python", "-c", "pass"]) is None
    assert common.check_batch(job, 6, "6 devices") is not None  # 12 divides over 6
    with pytest.raises(common.LaunchError, match=r"batch size 12 \(config.batch_size\) does not "
                                                 "divide over the 8 devices of here"):
        common.check_batch(job, 8, "here")
    with pytest.raises(common.LaunchError, match="batch_size"):
        common.load_job_config(job[:7] + ["--config.batch_size=big"])


# ---- the local launcher ------------------------------------------------------------------
def _launch(argv: list[str], **popen) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}  # faster compiles
    return subprocess.Popen([sys.executable, "-m", "launch.local", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def test_local_dry_run(capsys, monkeypatch):
    """Each process's variables; XLA flags already set are kept, the device count replaced."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                       "--xla_backend_optimization_level=0")
    out = _dry(capsys, local.main, [
        "--num-processes", "2", "--devices-per-process", "4", "--port", "12355", "--dry-run",
        "--", "python", "-m", "cfm.train", "--config", "configs/dino_vit.py:test",
        "--workdir", "/tmp/w"])
    assert out == [
        f"env CFM_COORDINATOR=127.0.0.1:12355 CFM_NUM_PROCESSES=2 CFM_PROCESS_ID={i} "
        "JAX_PLATFORMS=cpu 'XLA_FLAGS=--xla_backend_optimization_level=0 "
        "--xla_force_host_platform_device_count=4' "
        f"PYTHONUNBUFFERED=1 {sys.executable} -m cfm.train --config configs/dino_vit.py:test "
        "--workdir /tmp/w" for i in (0, 1)]


def test_local_restarts_a_failed_process(tmp_path):
    """Process 1 fails on the first start (exit 3); the launcher stops process 0, starts both
    again, and both see the environment cfm.parallel.distributed reads. Without restarts
    left, the failing status comes back."""
    job = ["--", "python", "-c",
           "import os, pathlib, sys; p = pathlib.Path(sys.argv[1]) / os.environ['CFM_PROCESS_ID'];"
           " print('env', os.environ['CFM_COORDINATOR'], os.environ['CFM_NUM_PROCESSES'],"
           " os.environ['CFM_PROCESS_ID'], os.environ['XLA_FLAGS'], sys.argv[2]);"
           " first = not p.exists(); p.touch();"
           " sys.exit(3 if first and p.name == '1' else 0)", str(tmp_path), "{shard_index}"]
    out, _ = _launch(["--num-processes", "2", "--devices-per-process", "3", "--max-restarts",
                      "1", "--grace-s", "2", *job]).communicate(timeout=120)
    assert "process 1 failed with exit status 3; restarting (1/1)" in out, out
    assert "attempt 2" in out and out.count("[1] env") == 2, out
    for i in (0, 1):
        assert re.search(rf"\[{i}\] env 127\.0\.0\.1:\d+ 2 {i} --xla_backend_optimization_level=0"
                         rf" --xla_force_host_platform_device_count=3 {i}", out), out
    for p in tmp_path.iterdir():
        p.unlink()
    proc = _launch(["--num-processes", "2", "--grace-s", "2", *job])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3 and "no restarts left" in out, out


def test_local_kill_and_resume(tmp_path):
    """2 processes x 2 CPU devices train the tiny DINOv2 preset; once checkpoint 2 is on disk
    the launcher and both processes are SIGKILLed together (mid-run); the same command again
    resumes from the checkpoint and finishes at total_steps."""
    workdir = tmp_path / "run"
    argv = ["--num-processes", "2", "--devices-per-process", "2", "--", "python", "-m",
            "cfm.train", "--config", "configs/dino_vit.py:test", "--workdir", str(workdir),
            "--config.total_steps=10", "--config.checkpoint_every=2", "--config.log_every=1",
            "--config.crops.n_local=0"]  # no local crops: a third less compile time
    proc = _launch(argv, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300  # a guard against a hang, not a timing assertion
    while proc.poll() is None and not ((workdir / "checkpoints" / "2").is_dir()
                                       and any("[0] step  2/10" in x for x in lines)):
        assert time.monotonic() < deadline, "".join(lines)
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher's whole process group
    proc.wait()
    reader.join(timeout=10)
    first = "".join(lines)
    assert proc.returncode == -signal.SIGKILL, first
    assert "done at step" not in first, first  # killed in the middle of the run
    assert "[0] step  2/10" in first, first

    proc = _launch(argv)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    m = re.search(r"\[0\] cfm\.train: resumed from step (\d+)", out)
    assert m and int(m.group(1)) in (2, 4, 6, 8), out
    assert "[0] cfm.train: done at step 10" in out, out
    steps = [int(s) for s in re.findall(r"\[0\] step\s+(\d+)/10", out)]
    assert steps == list(range(int(m.group(1)) + 1, 11)), out


# ---- the TPU launcher's restart loop, against a fake gcloud -------------------------------
FAKE_GCLOUD = r"""#!/bin/bash
# Answers like gcloud for one TPU: state in $FAKE/state, worker statuses popped from
# $FAKE/statuses (one per poll: running, 0, 1 or gone = preempted); every call logged.
echo "$*" >> "$FAKE/calls"
case "$*" in
  *" describe "*) test -f "$FAKE/state" || exit 1; cat "$FAKE/state" ;;
  *" create "*) echo READY > "$FAKE/state" ;;
  *" delete "*) rm -f "$FAKE/state" ;;
  *"--command=tail"*) exec sleep 60 ;;
  *"--command=if [ -f ~/cfm-run.rc ]"*)
    s=$(head -n 1 "$FAKE/statuses"); sed -i 1d "$FAKE/statuses"
    if [ "$s" = gone ]; then echo PREEMPTED > "$FAKE/state"; exit 255; fi
    echo "$s"; echo "$s" ;;
esac
exit 0
"""


def test_tpu_run_restarts_after_failure_and_preemption(tmp_path):
    """Real mode against a fake gcloud (2 hosts): the job runs; a worker fails (status 1) ->
    stop and start again; the slice is preempted -> delete, create, install, start; then all
    workers report 0 and the launcher exits 0."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "gcloud").write_text(FAKE_GCLOUD)
    (fake / "gcloud").chmod(0o755)
    (tmp_path / "statuses").write_text("running\n1\nrunning\ngone\nrunning\n0\n")
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "FAKE": str(tmp_path)}
    command = [sys.executable, "-m", "launch.tpu", "run", "--name", "t", "--zone", "z",
               "--topology", "v4:2x2x2", "--poll-s", "0.01", "--stage-dir",
               str(tmp_path / "stage"), "--", *TRAIN, "--workdir", "gs://b/r"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "job failed; restart 1/20" in proc.stdout and "job gone; restart 2/20" in proc.stdout
    assert _verbs(tmp_path) == [
        "describe", "create", "describe", "scp", "mkdir", "rm",  # up, install, start
        "if", "if",  # status: running, then a worker failed
        "test", "rm", "if",  # stop on all workers, start; running
        "if", "describe",  # ssh fails: the slice is PREEMPTED
        "describe", "delete", "create", "describe", "scp", "mkdir", "rm",  # recreate, start
        "if", "if"]  # running, done
    assert (tmp_path / "stage" / "cfm.tar.gz").stat().st_size > 0
    assert "cfm.train --config configs/dino_vit.py:vit_l16" in (
        tmp_path / "stage" / "cfm-run.sh").read_text()

    # Started again while the slice is READY and the job runs on it: attach, start nothing.
    (tmp_path / "calls").unlink()
    (tmp_path / "statuses").write_text("running\nrunning\n0\n")
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "the job is running on it: attaching" in proc.stdout
    assert _verbs(tmp_path) == ["describe", "if", "if", "if"]


def _verbs(tmp_path) -> list[str]:
    """Each logged gcloud call as its verb (describe, create, ...) or, for ssh, the first word
    of its remote command; the concurrently streamed `tail` is left out."""
    verbs = []
    for call in (tmp_path / "calls").read_text().splitlines():
        words = call.split()
        if "--command=tail" not in call:
            cmd = next((w.split("=")[1] for w in words if w.startswith("--command=")), None)
            verbs.append(words[3] if cmd is None else cmd.split()[0])
    return verbs


# ---- the SLURM batch script's signal handling, with fake srun / scontrol / sbatch ----------
_JOB = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (print('job: "
        "SIGTERM, saved', flush=True), sys.exit(0))); print('job: started', flush=True); "
        "time.sleep(int(sys.argv[1])); sys.exit(int(sys.argv[2]))")


@pytest.fixture
def fake_slurm(tmp_path):
    """A PATH with srun (runs the command), scontrol and sbatch (log their arguments) and
    python (this interpreter); returns (env, calls file)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    calls = tmp_path / "calls"
    (bin_ / "srun").write_text('#!/bin/bash\nshift\nexec "$@"\n')
    for name in ("scontrol", "sbatch"):
        (bin_ / name).write_text(f'#!/bin/bash\necho "{name} $*" >> "{calls}"\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    (bin_ / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}",
           "SLURM_JOB_ID": "77"}
    return env, calls


def _script(tmp_path, env, sleep_s: int, status: int) -> pathlib.Path:
    path = tmp_path / "job.sbatch"
    subprocess.run([sys.executable, "-m", "launch.slurm", "--chdir", str(tmp_path),
                    "--log-dir", str(tmp_path / "logs"), "--script", str(path), "--per", "node",
                    "--", "python", "-c", _JOB, str(sleep_s), str(status)],
                   cwd=ROOT, env=env, check=True, timeout=60)
    return path


def test_slurm_script_saves_and_requeues_near_the_time_limit(tmp_path, fake_slurm):
    """USR1 (SLURM's --signal=B:USR1@S) -> SIGTERM to the step, which saves and exits 0 ->
    `scontrol requeue`; the script exits 0."""
    env, calls = fake_slurm
    path = _script(tmp_path, env, 30, 0)
    assert calls.read_text() == f"sbatch {path}\n"  # submitted
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        proc = subprocess.Popen(["bash", str(path)], env=env, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60  # a guard against a hang, not a timing assertion
    while "job: started" not in out.read_text():
        assert time.monotonic() < deadline and proc.poll() is None, out.read_text()
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == 0, out.read_text()
    assert "job: SIGTERM, saved" in out.read_text(), out.read_text()
    assert calls.read_text().splitlines()[1:] == ["scontrol requeue 77"]


@pytest.mark.parametrize("restart_count,requeued", [("0", True), ("10", False)])
def test_slurm_script_requeues_a_failed_step(tmp_path, fake_slurm, restart_count, requeued):
    env, calls = fake_slurm
    path = _script(tmp_path, env, 0, 3)
    proc = subprocess.run(["bash", str(path)], env={**env, "SLURM_RESTART_COUNT": restart_count},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert ("scontrol requeue 77" in calls.read_text()) == requeued
