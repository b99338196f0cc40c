"""Multi-process start-up: join JAX's distributed runtime before any JAX computation.

Call `initialize()` first thing in every process (before `jax.devices()` or any array op); the
trainer then sees all processes' devices in `jax.devices()` and each process feeds its own share
of the batch. One process is a no-op, so the same entry point runs on a laptop and on a cluster.

Where the process group comes from, first match wins (checked against jax 0.10.2's
`jax/_src/distributed.py` and `jax/_src/clusters/`):

1. "explicit": the arguments, each falling back to `CFM_COORDINATOR` (host:port),
   `CFM_NUM_PROCESSES` and `CFM_PROCESS_ID`. All three or none: a partial set is an error.
2. "slurm": `SLURM_NTASKS` > 1. When JAX's own SLURM detection applies (SLURM_JOB_ID,
   SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID set, i.e. inside `srun`)
   and `CFM_COORDINATOR_PORT` is unset, `jax.distributed.initialize()` runs with no arguments
   and JAX picks everything: coordinator = first node of SLURM_STEP_NODELIST, port
   JAX_COORDINATOR_PORT or 61440 + SLURM_JOB_ID % 4096. Otherwise (e.g. only
   SLURM_JOB_NODELIST, or a port in `CFM_COORDINATOR_PORT`) this module computes the same
   three values itself and passes them. Note JAX's SLURM default on GPUs: each task sees only
   GPU number SLURM_LOCALID (launch one task per GPU), unless JAX_LOCAL_DEVICE_IDS is set.
3. "tpu": a Cloud TPU VM. `jax.distributed.initialize()` with no arguments: JAX reads the pod's
   workers from the TPU metadata / environment (a single-host slice forms a group of one).
4. Otherwise a single process: nothing is initialised. `CFM_NUM_PROCESSES=1` forces this
   and skips cluster detection (e.g. a SLURM batch script with --ntasks > 1 that runs python
   directly, not through `srun`, where the other tasks would never start and JAX would wait
   for them until its 300 s initialisation timeout).

CPU processes: cross-process collectives on CPU need an implementation; this sets
`jax_cpu_collectives_implementation="gloo"` (already jax 0.10.2's default; set explicitly so a
different JAX default cannot silently break CPU runs) unless the environment variable
JAX_CPU_COLLECTIVES_IMPLEMENTATION chose one. Each CPU process exposes as many devices as
`--xla_force_host_platform_device_count` in XLA_FLAGS says (XLA reads it when the backend
starts), or `local_device_count` when given (the `jax_num_cpu_devices` option).
"""

from __future__ import annotations

import os
import re

import jax

try:  # private (no public equivalent in jax 0.10.2), so a later jax may not have it
    from jax._src import cloud_tpu_init
except ImportError:
    cloud_tpu_init = None

_ENV_COORDINATOR = "CFM_COORDINATOR"
_ENV_NUM_PROCESSES = "CFM_NUM_PROCESSES"
_ENV_PROCESS_ID = "CFM_PROCESS_ID"
_ENV_PORT = "CFM_COORDINATOR_PORT"

# host:port, host a name, an IPv4 address or a bracketed IPv6 address.
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
# JAX's SLURM auto-detection needs all of these (jax/_src/clusters/slurm_cluster.py).
_JAX_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                   "SLURM_LOCALID")


class DistributedConfigError(ValueError):
    """The multi-process settings (arguments or environment) are inconsistent."""


def is_main() -> bool:
    """True on process 0, the one that writes logs, plots and prints."""
    return jax.process_index() == 0


def _check_address(address: str, source: str) -> str:
    """`address` if it is host:port with a port in 1..65535; a clear error otherwise."""
    m = _ADDRESS.match(address.strip())
    if not m or not 0 < int(m.group(2)) < 65536:
        raise DistributedConfigError(
            f"{source}: coordinator address must be host:port (e.g. 10.0.0.1:1234, port "
            f"1-65535), got {address!r}")
    return address.strip()


def _to_int(value: int | str, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedConfigError(f"{name} must be an integer, got {value!r}") from None


def _explicit(coordinator: str | None, num_processes: int | None, process_id: int | None
              ) -> tuple[str, int, int] | None:
    """(coordinator, num_processes, process_id) from arguments, falling back to CFM_* variables;
    None when none of the three is given anywhere."""
    given = {
        "coordinator": (coordinator, "argument coordinator") if coordinator is not None
        else (os.environ.get(_ENV_COORDINATOR), _ENV_COORDINATOR),
        "num_processes": (num_processes, "argument num_processes") if num_processes is not None
        else (os.environ.get(_ENV_NUM_PROCESSES), _ENV_NUM_PROCESSES),
        "process_id": (process_id, "argument process_id") if process_id is not None
        else (os.environ.get(_ENV_PROCESS_ID), _ENV_PROCESS_ID),
    }
    present = {k: v for k, v in given.items() if v[0] not in (None, "")}
    if not present:
        return None
    n = _to_int(present["num_processes"][0], present["num_processes"][1]) \
        if "num_processes" in present else None
    if n is not None and n < 1:
        raise DistributedConfigError(f"{present['num_processes'][1]} must be >= 1, got {n}")
    if n == 1:  # one process asked for explicitly: nothing to join (a coordinator is unused)
        pid = _to_int(present["process_id"][0], present["process_id"][1]) \
            if "process_id" in present else 0
        if pid != 0:
            raise DistributedConfigError(f"process id {pid} is outside [0, 1) for 1 process")
        return None
    missing = [k for k in given if k not in present]
    if missing:
        raise DistributedConfigError(
            "multi-process start-up needs coordinator, num_processes and process_id together "
            f"(arguments or {_ENV_COORDINATOR}, {_ENV_NUM_PROCESSES}, {_ENV_PROCESS_ID}); "
            f"got {', '.join(f'{k} from {v[1]}' for k, v in present.items())} but not "
            f"{', '.join(missing)}")
    address = _check_address(str(present["coordinator"][0]), present["coordinator"][1])
    pid = _to_int(present["process_id"][0], present["process_id"][1])
    if not 0 <= pid < n:
        raise DistributedConfigError(
            f"process id {pid} ({present['process_id'][1]}) is outside [0, {n}) for {n} "
            "processes")
    return address, n, pid


def first_slurm_host(nodelist: str) -> str:
    """The first host name of a SLURM node list: 'node[001-004,9],gpu2' -> 'node001'."""
    nodelist = nodelist.strip()
    cut = next((i for i, ch in enumerate(nodelist) if ch in ",["), len(nodelist))
    if cut == len(nodelist) or nodelist[cut] == ",":
        return nodelist[:cut]
    rest = nodelist[cut + 1:]
    end = next((i for i, ch in enumerate(rest) if ch in ",-]"), len(rest))
    return nodelist[:cut] + rest[:end]


def _slurm() -> tuple[str, int, int] | None:
    """(coordinator, num_processes, process_id) for a SLURM job step with > 1 task, else None.

    The port is CFM_COORDINATOR_PORT, else JAX_COORDINATOR_PORT, else JAX's own default
    61440 + SLURM_JOB_ID % 4096 (so this path and JAX's agree), else 61440."""
    n = _to_int(os.environ.get("SLURM_NTASKS", "1"), "SLURM_NTASKS")
    if n <= 1:
        return None
    if "SLURM_PROCID" not in os.environ:
        raise DistributedConfigError(f"SLURM_NTASKS={n} but SLURM_PROCID is not set")
    pid = _to_int(os.environ["SLURM_PROCID"], "SLURM_PROCID")
    if not 0 <= pid < n:
        raise DistributedConfigError(f"SLURM_PROCID={pid} is outside [0, {n})")
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if not nodes:
        raise DistributedConfigError(
            f"SLURM_NTASKS={n} but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set")
    port = os.environ.get(_ENV_PORT) or os.environ.get("JAX_COORDINATOR_PORT")
    if not port:
        job = os.environ.get("SLURM_JOB_ID", "")
        port = str(61440 + int(job) % 4096) if job.isdigit() else "61440"
    source = _ENV_PORT if os.environ.get(_ENV_PORT) else "SLURM node list and port"
    return _check_address(f"{first_slurm_host(nodes)}:{port}", source), n, pid


def _on_cloud_tpu_vm() -> bool:
    """Whether JAX found a Cloud TPU VM at import (libtpu and TPU chips present)."""
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _prepare_cpu(local_device_count: int | None) -> None:
    """CPU collectives (gloo) and the per-process CPU device count, before the backend starts."""
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if local_device_count is not None:
        if local_device_count < 1:
            raise DistributedConfigError(f"local_device_count must be >= 1, got "
                                         f"{local_device_count}")
        if jax.config.jax_num_cpu_devices != int(local_device_count):  # else: a repeat call
            jax.config.update("jax_num_cpu_devices", int(local_device_count))


def _check_same(num_processes: int | None, process_id: int | None) -> None:
    """A second call must not ask for a different process group than the one joined."""
    if num_processes is not None and int(num_processes) != jax.process_count():
        raise DistributedConfigError(
            f"already initialised with {jax.process_count()} processes, asked for "
            f"{num_processes}")
    if process_id is not None and int(process_id) != jax.process_index():
        raise DistributedConfigError(
            f"already initialised as process {jax.process_index()}, asked for {process_id}")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_count: int | None = None) -> None:
    """Join the multi-process JAX runtime described by the arguments or the environment.

    Args:
      coordinator: host:port of process 0's coordinator service (all processes pass the same).
      num_processes: total number of processes.
      process_id: this process's index in [0, num_processes).
      local_device_count: CPU only, devices this process exposes (default: XLA_FLAGS'
        --xla_force_host_platform_device_count, else 1). Ignored by GPU and TPU backends.

    Idempotent: a second call after a successful one does nothing (it checks that any
    num_processes/process_id passed agree). Must run before anything that starts a JAX backend.
    Prints one line on process 0 with the number of processes and devices that joined.
    Raises DistributedConfigError for a partial set of CFM_* variables, a process id outside
    [0, num_processes) or a malformed coordinator address.
    """
    if jax.distributed.is_initialized():
        _check_same(num_processes, process_id)
        return
    group = _explicit(coordinator, num_processes, process_id)
    how = "explicit"
    if group is None and coordinator is None and num_processes is None and process_id is None:
        if any(os.environ.get(k) for k in (_ENV_COORDINATOR, _ENV_NUM_PROCESSES,
                                            _ENV_PROCESS_ID)):
            pass  # CFM_* said "one process": no cluster detection either
        elif (group := _slurm()) is not None:
            how = "slurm"
        elif _on_cloud_tpu_vm():
            how = "tpu"
    if group is None and how != "tpu":
        if local_device_count is not None:
            _prepare_cpu(local_device_count)
        return  # a single process: nothing to join

    _prepare_cpu(local_device_count)
    try:
        if how == "tpu":
            jax.distributed.initialize()
        elif (how == "slurm" and all(k in os.environ for k in _JAX_SLURM_VARS)
              and not os.environ.get(_ENV_PORT)):
            how = "slurm (jax auto-detection)"
            jax.distributed.initialize()
        else:
            address, n, pid = group
            jax.distributed.initialize(coordinator_address=address, num_processes=n,
                                       process_id=pid)
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise RuntimeError(
                "cfm.parallel.distributed.initialize() must run before any JAX computation or "
                "jax.devices() call in this process") from e
        raise
    if is_main():
        where = f", coordinator {group[0]}" if group is not None else ""
        print(f"cfm.distributed: {jax.process_count()} processes joined ({how}{where}), "
              f"{jax.device_count()} {jax.devices()[0].platform} devices, "
              f"{jax.local_device_count()} per process", flush=True)
