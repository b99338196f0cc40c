"""Multi-host on one machine: N real processes x M CPU devices, joined like a pod's hosts.

    python -m launch.local --num-processes 2 --devices-per-process 2 [--max-restarts 3] \
        [--port P] [--log-dir DIR] [--dry-run] -- \
        python -m cfm.train --config configs/dino_vit.py:test --workdir /tmp/cfm_local

Each process i gets what `cfm.parallel.distributed` reads: CFM_COORDINATOR=127.0.0.1:PORT (a free
port, new at every start), CFM_NUM_PROCESSES=N, CFM_PROCESS_ID=i, plus JAX_PLATFORMS=cpu and
XLA_FLAGS=--xla_force_host_platform_device_count=M (other XLA flags in the environment are kept);
cross-process collectives on CPU go through gloo. CFM_* and SLURM_* variables of the launcher's
own environment are not passed on. `{shard_index}` / `{num_shards}` in the job become i / N.

Every line a process prints is echoed prefixed with `[i] ` (and appended to DIR/process_i.log
with --log-dir). When a process exits with a non-zero status or is killed, the others get
SIGTERM (cfm.train saves and exits 0 on it), then SIGKILL after --grace-s seconds, and the whole
group starts again, up to --max-restarts times; cfm.train resumes from the workdir's latest
checkpoint. SIGTERM or Ctrl-C to the launcher is passed on as SIGTERM and nothing restarts. The
processes die with the launcher (Linux parent-death signal) if it is killed outright.

Exit status: 0 when every process exited 0; the failing process's status (128 + signal for a
signal) when restarts ran out; 2 for bad input (checked before anything starts: counts, and the
job's global batch size against N x M devices).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

from cfm import cli_help
from launch import cli, common

PROG = "launch.local"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict[str, str], port: int, n: int, i: int, m: int) -> dict[str, str]:
    """The variables process i of n (m CPU devices each) sets on top of `base`."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", base.get("XLA_FLAGS", ""))
    return {"CFM_COORDINATOR": f"127.0.0.1:{port}", "CFM_NUM_PROCESSES": str(n),
            "CFM_PROCESS_ID": str(i), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{flags.strip()} --xla_force_host_platform_device_count={m}".strip(),
            "PYTHONUNBUFFERED": "1"}


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: children may outlive a SIGKILLed launcher


def _pump(proc: subprocess.Popen, i: int, log_dir: str | None, lock: threading.Lock) -> None:
    log = open(os.path.join(log_dir, f"process_{i}.log"), "a") if log_dir else None
    for line in proc.stdout:
        with lock:
            sys.stdout.write(f"[{i}] {line}")
            sys.stdout.flush()
        if log:
            log.write(line)
            log.flush()
    if log:
        log.close()


class Group:
    """The N processes of one attempt."""

    def __init__(self, job: list[str], args: argparse.Namespace, stop: threading.Event):
        self.stop = stop
        port = args.port or free_port()
        n, m = args.num_processes, args.devices_per_process
        base = {k: v for k, v in os.environ.items() if not k.startswith(("CFM_", "SLURM_"))}
        self.procs: list[subprocess.Popen] = []
        self.threads: list[threading.Thread] = []
        lock = threading.Lock()
        for i in range(n):
            env = {**base, **process_env(os.environ, port, n, i, m)}
            cmd = common.fill(common.with_python(job, sys.executable), str(i), str(n))
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1,
                                    preexec_fn=_die_with_parent if sys.platform == "linux"
                                    else None)
            self.procs.append(proc)
            t = threading.Thread(target=_pump, args=(proc, i, args.log_dir, lock), daemon=True)
            t.start()
            self.threads.append(t)

    def wait(self, grace_s: float) -> tuple[int, int | None]:
        """Wait until all exit 0 (-> (0, None)) or one fails (-> (status, process index)); on a
        failure or a stop request the rest get SIGTERM, then SIGKILL after grace_s."""
        failed: tuple[int, int | None] = (0, None)
        while True:
            codes = [p.poll() for p in self.procs]
            bad = [(c, i) for i, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed = (bad[0][0], bad[0][1])
                break
            if all(c == 0 for c in codes) or self.stop.is_set():
                break
            time.sleep(0.2)
        self.terminate(grace_s)
        for t in self.threads:
            t.join(timeout=5)
        return failed

    def terminate(self, grace_s: float) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _parser() -> argparse.ArgumentParser:
    p = cli_help.parser(PROG, __doc__, f"python -m {PROG} --num-processes 2 "
                        "--devices-per-process 2 -- python -m cfm.train "
                        "--config configs/dino_vit.py:test --workdir /tmp/cfm_local")
    p.add_argument("--num-processes", type=int, required=True, help="N processes")
    p.add_argument("--devices-per-process", type=int, default=1, help="M CPU devices each")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="start the group again this many times after a failure")
    p.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    p.add_argument("--grace-s", type=float, default=10.0,
                   help="seconds between SIGTERM and SIGKILL for the remaining processes")
    p.add_argument("--log-dir", help="also append process i's output to DIR/process_i.log "
                   "(default: none)")
    p.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, job = cli.parse(_parser(), argv)
        cli.require_at_least(args, 1, "num_processes", "devices_per_process")
        cli.require_at_least(args, 0, "max_restarts")
        if not 0 <= args.port < 65536:
            raise common.LaunchError(f"--port must be in 0..65535, got {args.port}")
        n, m = args.num_processes, args.devices_per_process
        program = common.with_python(job, sys.executable)[0]
        if shutil.which(program) is None:
            raise common.LaunchError(f"job command {program!r} not found")
        common.check_batch(job, n * m, f"{n} processes x {m} devices")
    except common.LaunchError as e:
        return common.fail(PROG, e)
    if args.dry_run:
        port = args.port or free_port()
        for i in range(n):
            env = process_env(os.environ, port, n, i, m)
            cmd = common.fill(common.with_python(job, sys.executable), str(i), str(n))
            print(common.show(["env", *(f"{k}={v}" for k, v in env.items()), *cmd]))
        return 0
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)

    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame):
        received.append(signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    attempt = 0
    while True:
        print(f"{PROG}: starting {n} processes x {m} CPU devices (attempt {attempt + 1})",
              flush=True)
        status, who = Group(job, args, stop).wait(args.grace_s)
        if who is None:
            if received:
                print(f"{PROG}: stopped by signal {received[0]}", flush=True)
            return 0
        code = 128 - status if status < 0 else status
        if stop.is_set() or attempt >= args.max_restarts:
            print(f"{PROG}: process {who} failed with exit status {code}; "
                  f"{'stopped' if stop.is_set() else 'no restarts left'}", file=sys.stderr,
                  flush=True)
            return code
        attempt += 1
        print(f"{PROG}: process {who} failed with exit status {code}; restarting "
              f"({attempt}/{args.max_restarts})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
