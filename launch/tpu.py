"""Run a cfm job on a Cloud TPU slice (or several), and keep it running through preemptions.

    python -m launch.tpu run --name NAME --zone ZONE --topology v5p:4x4x4 [--num-slices S] \
        [--spot | --preemptible] [--queued] [--project P] [--runtime-version V] \
        [--extras tpu,gcs] [--max-restarts 20] [--poll-s 60] [--dry-run] -- \
        python -m cfm.train --config configs/dino_vit.py:vit_l16 --workdir gs://BUCKET/run
    python -m launch.tpu delete --name NAME --zone ZONE [--num-slices S] [--queued] [--dry-run]

`run` does, with gcloud (each command printed as it runs; --dry-run prints them and runs none):
1. packs the checked-out commit (`git archive HEAD`: commit first) and writes the worker script;
2. reuses the TPU VM / queued resource NAME if it is READY / ACTIVE, else creates it (a queued
   resource when --queued or --num-slices > 1: Multislice needs one; `--node-count S
   --node-prefix NAME` for S slices) and polls `describe` until it is up;
3. copies both to every worker of every slice, installs cfm into ~/cfm-venv
   (`pip install -e ~/cfm[EXTRAS]`) and starts the job on all workers at once, detached, with
   the same command line (so the same `gs://` workdir), logging to ~/cfm-run.log;
4. streams process 0's log (worker 0 of slice 0) and every --poll-s seconds reads each worker's
   exit status; all 0: done. A worker that exited non-zero: the job is stopped on all workers
   and started again; the slice gone (spot/preemptible VM preempted, queued resource SUSPENDED
   or FAILED, ssh failing): it is deleted, created again, and the job started again. cfm.train
   resumes from the workdir's latest checkpoint by itself. At most --max-restarts restarts.
`delete` tears the TPU VM / queued resource (with its nodes) down.

JAX finds the pod's workers (and, in a queued Multislice resource, the MEGASCALE_* slice
settings) from the TPU metadata: cfm.parallel.distributed calls jax.distributed.initialize()
with no arguments, so nothing is passed to the job. `{shard_index}` / `{num_shards}` in the job
become slice_id x hosts_per_slice + worker number (from the metadata) / hosts in all, e.g. for
`data_prep.tile_wsi --num-shards {num_shards} --shard-index {shard_index}`.

Topology -> gcloud (Cloud TPU docs, "TPU versions" and "System architecture" pages): names are
cfm.aot's `<generation>:<chips per dimension>`. v4 and v5p accelerator types count TensorCores,
2 per chip: v4:2x2x2 (8 chips) -> v4-16, v5p:4x4x4 (64 chips) -> v5p-128. v5e and v6e count
chips: v5e:16x16 -> v5litepod-256, v6e:4x4 -> v6e-16. Hosts per slice: 4 chips per host, except
that v5e and v6e slices of up to 8 chips are one host. Default runtime versions (--runtime-version
overrides): v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e
v2-alpha-tpuv6e. One JAX device per chip (v4 and v5p megacore).

Bad input exits with status 2 before anything is created: an unknown topology, a multi-host or
multi-slice job whose --workdir is not on gs://, a global batch size that does not divide over
the chips of all slices, a Multislice cfm.train job without --config.mesh.slices=S, --preemptible
with a queued resource (use --spot).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from typing import NamedTuple, Sequence

from cfm import cli_help
from cfm.parallel import topology as topology_lib
from launch import cli, common

PROG = "launch.tpu"
RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
           "v6e": "v2-alpha-tpuv6e"}
METADATA = "http://metadata.google.internal/computeMetadata/v1/instance/attributes"
UP = {"READY", "ACTIVE"}  # tpu-vm and queued-resource states in which the job can run
# States that never come back up by themselves (a spot/preemptible VM or queued resource that was
# preempted, a failed request): delete and create again. Any other state (CREATING,
# WAITING_FOR_RESOURCES, PROVISIONING, ...) is on its way up: wait.
LOST = {"PREEMPTED", "TERMINATED", "STOPPED", "FAILED", "SUSPENDING", "SUSPENDED"}


class Slice(NamedTuple):
    accelerator_type: str  # gcloud --accelerator-type
    chips: int
    hosts: int  # TPU VM workers per slice


def slice_for(topology: str) -> tuple[str, Slice]:
    """(generation, Slice) for a cfm.aot topology name; LaunchError if it is not a TPU one."""
    try:
        topo = topology_lib.parse_topology(topology)
    except topology_lib.TopologyError as e:
        raise common.LaunchError(str(e)) from None
    if topo.platform != "tpu":
        raise common.LaunchError(f"--topology={topology!r} is not a TPU topology")
    gen, chips = topo.generation, topo.n_chips
    if gen in ("v4", "v5p"):
        acc = f"{gen}-{2 * chips}"
    else:
        acc = f"{'v5litepod' if gen == 'v5e' else gen}-{chips}"
    hosts = 1 if (gen in ("v5e", "v6e") and chips <= 8) else max(1, chips // 4)
    return gen, Slice(acc, chips, hosts)


class Tpu:
    """The gcloud command lines for one TPU VM or queued resource."""

    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.queued = args.queued or args.num_slices > 1
        self.where = [f"--zone={args.zone}"] + ([f"--project={args.project}"]
                                                if args.project else [])
        self.kind = ["gcloud", "compute", "tpus", "queued-resources" if self.queued
                     else "tpu-vm"]

    def create(self, acc: str, runtime: str) -> list[str]:
        a = self.a
        if self.queued:
            nodes = ([f"--node-count={a.num_slices}", f"--node-prefix={a.name}"]
                     if a.num_slices > 1 else [f"--node-id={a.name}"])
            return [*self.kind, "create", a.name, *self.where, f"--accelerator-type={acc}",
                    f"--runtime-version={runtime}", *nodes, *(["--spot"] if a.spot else [])]
        return [*self.kind, "create", a.name, *self.where, f"--accelerator-type={acc}",
                f"--version={runtime}", *(["--spot"] if a.spot else []),
                *(["--preemptible"] if a.preemptible else [])]

    def describe(self) -> list[str]:
        field = "state.state" if self.queued else "state"
        return [*self.kind, "describe", self.a.name, *self.where, f"--format=value({field})"]

    def delete(self) -> list[str]:
        return [*self.kind, "delete", self.a.name, *self.where, "--quiet",
                *(["--force"] if self.queued else [])]

    def _all(self, worker: str) -> list[str]:
        return ([f"--node={'all' if worker == 'all' else '0'}"] if self.queued else []) + [
            f"--worker={worker}"]

    def scp(self, files: list[str]) -> list[str]:
        return [*self.kind, "scp", *files, f"{self.a.name}:", *self.where, *self._all("all")]

    def ssh(self, command: str, worker: str = "all") -> list[str]:
        return [*self.kind, "ssh", self.a.name, *self.where, *self._all(worker),
                f"--command={command}"]


def worker_script(job: list[str], hosts: int, n_slices: int) -> str:
    """The script every worker runs: its shard index from the TPU metadata, then the job."""
    line = common.shell_join(common.with_python(job, "{python}"), {
        "{python}": "$HOME/cfm-venv/bin/python", "{shard_index}": "$CFM_SHARD_INDEX",
        "{num_shards}": str(hosts * n_slices)})
    return "\n".join([
        "#!/bin/bash",
        "# written by launch.tpu: one worker's share of the job",
        f"W=$(curl -sf -H Metadata-Flavor:Google {METADATA}/agent-worker-number)",
        f"S=$(curl -sf -H Metadata-Flavor:Google {METADATA}/tpu-env"
        " | sed -n \"s/^MEGASCALE_SLICE_ID: '\\([0-9]*\\)'.*/\\1/p\")",
        f"export CFM_SHARD_INDEX=$(( ${{S:-0}} * {hosts} + ${{W:-0}} ))",
        "cd \"$HOME/cfm\"",
        line,
        "echo $? > \"$HOME/cfm-run.rc\"",
        ""])


INSTALL = ("mkdir -p ~/cfm && tar -xzf ~/cfm.tar.gz -C ~/cfm && "
           "(test -x ~/cfm-venv/bin/python || python3 -m venv ~/cfm-venv) && "
           "~/cfm-venv/bin/pip install -q -e \"$HOME/cfm[{extras}]\"")
START = ("rm -f ~/cfm-run.rc; setsid nohup bash ~/cfm-run.sh > ~/cfm-run.log 2>&1 "
         "< /dev/null & echo $! > ~/cfm-run.pid")
STATUS = ("if [ -f ~/cfm-run.rc ]; then cat ~/cfm-run.rc; elif [ -f ~/cfm-run.pid ] && "
          "kill -0 $(cat ~/cfm-run.pid) 2>/dev/null; then echo running; else echo none; fi")
STOP = ("test -f ~/cfm-run.pid && kill -TERM -- -$(cat ~/cfm-run.pid) 2>/dev/null; sleep 30; "
        "kill -KILL -- -$(cat ~/cfm-run.pid) 2>/dev/null; true")
TAIL = "tail -n +1 -F ~/cfm-run.log"


def validate(args: argparse.Namespace, job: list[str] | None) -> tuple[str, Slice]:
    """(generation, Slice) of a `run`; LaunchError for any bad input (see the module doc)."""
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,60}[a-z0-9])?", args.name):
        raise common.LaunchError(f"--name={args.name!r}: use lowercase letters, digits and "
                                 "hyphens, starting with a letter (a GCE resource name)")
    cli.require_at_least(args, 1, "num_slices")
    gen, sl = slice_for(args.topology)
    if args.preemptible and (args.queued or args.num_slices > 1):
        raise common.LaunchError("--preemptible is for TPU VMs; a queued resource takes --spot")
    if args.spot and args.preemptible:
        raise common.LaunchError("choose one of --spot and --preemptible")
    if job is None:
        return gen, sl
    workdir = common.job_flag(job, "--workdir")
    hosts = sl.hosts * args.num_slices
    if hosts > 1 and workdir is not None and not workdir.startswith("gs://"):
        raise common.LaunchError(
            f"--workdir {workdir}: a job on {hosts} TPU hosts needs shared storage every worker "
            "reads and writes (checkpoints, resume); use a gs:// path, e.g. gs://BUCKET/run")
    where = f"{args.num_slices} x {args.topology} ({sl.chips * args.num_slices} chips)"
    config = common.check_batch(job, sl.chips * args.num_slices, where)
    if config is not None and args.num_slices > 1:
        slices = common.config_int(config, "mesh.slices")
        if slices != args.num_slices:
            raise common.LaunchError(
                f"config.mesh.slices is {slices} for a {args.num_slices}-slice job: add "
                f"--config.mesh.slices={args.num_slices} (the data axis then spans the slices "
                "over DCN while fsdp and tensor stay inside each slice)")
    return gen, sl


def _parser() -> argparse.ArgumentParser:
    p = cli_help.parser(PROG, __doc__, f"python -m {PROG} run --name cfm-l16 "
                        "--zone us-east5-a --topology v5p:4x4x4 --spot --dry-run -- python -m "
                        "cfm.train --config configs/dino_vit.py:vit_l16 --workdir gs://BUCKET/l16")
    p.add_argument("action", choices=["run", "delete"], help="start and watch a job, or tear "
                   "the slices down")
    p.add_argument("--name", required=True, help="TPU VM / queued resource name")
    p.add_argument("--zone", required=True, help="Cloud zone of the slices")
    p.add_argument("--project", help="default: gcloud's configured project")
    p.add_argument("--topology", help="one slice, e.g. v5p:4x4x4, v5e:16x16 (run only; "
                   "no default: run needs it)")
    p.add_argument("--num-slices", type=int, default=1, help="Multislice: S slices")
    p.add_argument("--queued", action="store_true",
                   help="a queued resource also for one slice (always for several)")
    p.add_argument("--spot", action="store_true", help="Spot VMs (preemptible, cheaper)")
    p.add_argument("--preemptible", action="store_true", help="preemptible TPU VM")
    p.add_argument("--runtime-version", help="TPU software version (default: per generation)")
    p.add_argument("--extras", default="tpu,gcs", help="cfm extras to install on the workers")
    p.add_argument("--max-restarts", type=int, default=20,
                   help="start the job again at most this many times")
    p.add_argument("--poll-s", type=float, default=60.0, help="seconds between status checks")
    p.add_argument("--stage-dir", help="local folder for the code archive and worker script "
                   "(default /tmp/cfm-launch-NAME)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    return p


def _state(tpu: Tpu) -> str | None:
    """The TPU VM's / queued resource's state (READY, ACTIVE, PREEMPTED, ...); None if absent."""
    out = subprocess.run(tpu.describe(), text=True, capture_output=True)
    return out.stdout.strip() if out.returncode == 0 else None


def _status(tpu: Tpu, hosts: int) -> str:
    """The job on all workers: 'done' (all exited 0), 'running', 'failed' (one exited
    non-zero, or its process is gone without an exit status) or 'gone' (slice unusable)."""
    out = subprocess.run(tpu.ssh(STATUS), text=True, capture_output=True)
    words = [w for w in out.stdout.split() if w in ("running", "none") or w.isdigit()]
    if out.returncode != 0 or len(words) < hosts:
        return "running" if _state(tpu) in UP else "gone"  # ssh hiccup vs lost slice
    if any(w not in ("running", "0") for w in words):
        return "failed"
    return "done" if all(w == "0" for w in words) else "running"


def run(args: argparse.Namespace, job: list[str]) -> int:
    gen, sl = validate(args, job)
    tpu, dry = Tpu(args), args.dry_run
    hosts = sl.hosts * args.num_slices
    runtime = args.runtime_version or RUNTIME[gen]
    stage = args.stage_dir or f"/tmp/cfm-launch-{args.name}"
    tarball, script = os.path.join(stage, "cfm.tar.gz"), os.path.join(stage, "cfm-run.sh")
    text = worker_script(job, sl.hosts, args.num_slices)
    common.run(["mkdir", "-p", stage], dry)
    common.run(["git", "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"], dry)
    if dry:
        print(f"cat > {script} <<'EOF'\n{text}EOF")
        print("# NAME READY/ACTIVE with the job running: attach; READY/ACTIVE: reuse (copy, "
              "install, start); else (absent, preempted): delete if present, create, poll")
        for cmd in (tpu.describe(), tpu.ssh(STATUS), tpu.create(sl.accelerator_type, runtime),
                    tpu.describe(), tpu.scp([tarball, script]),
                    tpu.ssh(INSTALL.format(extras=args.extras)), tpu.ssh(START)):
            common.run(cmd, dry)
        print(f"# stream process 0's log; every {args.poll_s:g} s read each worker's status")
        common.run(tpu.ssh(TAIL, worker="0"), dry)
        common.run(tpu.ssh(STATUS), dry)
        print("# a worker failed: stop the job everywhere, start it again")
        common.run(tpu.ssh(STOP), dry)
        print(f"# the slice is gone: {common.show(tpu.delete())}, then create as above")
        return 0
    with open(script, "w") as f:
        f.write(text)

    def start(state: str | None) -> None:
        """Bring the slice up from `state` (absent or lost: create it; on its way up: wait),
        copy and install cfm, start the job."""
        while state not in UP:
            if state is None or state in LOST:
                if state is not None:
                    common.run(tpu.delete(), dry, check=False)
                common.run(tpu.create(sl.accelerator_type, runtime), dry, check=False)
            time.sleep(min(args.poll_s, 30))
            state = _state(tpu)
        common.run(tpu.scp([tarball, script]), dry)
        common.run(tpu.ssh(INSTALL.format(extras=args.extras)), dry)
        common.run(tpu.ssh(START), dry)

    state = _state(tpu)
    if state in UP and _status(tpu, hosts) == "running":
        print(f"{PROG}: {args.name} is {state} and the job is running on it: attaching",
              flush=True)
    else:
        start(state)
    restarts = 0
    while True:
        tail = subprocess.Popen(tpu.ssh(TAIL, worker="0"))
        try:
            while (status := _status(tpu, hosts)) == "running":
                time.sleep(args.poll_s)
        finally:
            tail.terminate()
            tail.wait()
        if status == "done":
            print(f"{PROG}: job finished on all {hosts} workers; tear down with "
                  f"`python -m {PROG} delete --name {args.name} --zone {args.zone}`", flush=True)
            return 0
        if restarts >= args.max_restarts:
            print(f"{PROG}: job {status} and --max-restarts={args.max_restarts} used up",
                  file=sys.stderr, flush=True)
            return 1
        restarts += 1
        print(f"{PROG}: job {status}; restart {restarts}/{args.max_restarts}", flush=True)
        if status == "failed":
            common.run(tpu.ssh(STOP), dry, check=False)
            common.run(tpu.ssh(START), dry)
        else:
            start(_state(tpu))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, job = cli.parse(_parser(), argv, job_optional=True)
        if args.action == "delete":
            common.run(Tpu(args).delete(), args.dry_run)
            return 0
        if args.topology is None or job is None:
            raise common.LaunchError("run needs --topology and a job command after `--`")
        return run(args, job)
    except common.LaunchError as e:
        return common.fail(PROG, e)
    except subprocess.CalledProcessError as e:
        print(f"{PROG}: command failed with exit status {e.returncode}: {common.show(e.cmd)}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
