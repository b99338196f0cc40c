"""TPU slices as `cfm.aot` names them: the chip catalogue (HBM, peak FLOP/s, bandwidth), the
`<generation>:<dims>` topology names, and the compile-only devices libtpu gives for a slice
without any TPU attached (`cpu:N` gives N forced host CPU devices instead).

JAX reads XLA_FLAGS and JAX_PLATFORMS when it is first imported, so this module imports jax only
inside `topology_devices`, after `prepare_environment` has set them.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from typing import NamedTuple

GiB = 2 ** 30


class Chip(NamedTuple):
    libtpu_name: str  # generation as libtpu's topology names spell it
    ndim: int  # torus dimensions of a slice's topology name
    hbm_bytes: float  # HBM per chip, bytes
    peak_flops: float  # peak bf16 FLOP/s per chip
    hbm_bw: float  # HBM bandwidth per chip, bytes/s


# Per-chip figures from the Google Cloud TPU documentation, "System architecture" pages
# https://cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e (HBM capacity, HBM bandwidth, peak
# bf16 compute). v5e is also called v5litepod.
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 3, 32 * GiB, 275e12, 1228e9),
    "v5e": Chip("v5e", 2, 16 * GiB, 197e12, 819e9),
    "v5p": Chip("v5", 3, 95 * GiB, 459e12, 2765e9),
    "v6e": Chip("v6e", 2, 32 * GiB, 918e12, 1640e9),
}
ALIASES = {"v5litepod": "v5e", "v5": "v5p", "v6": "v6e"}
EXAMPLES = "v4:2x2x1, v4:4x4x4, v5e:4x4, v5e:16x16, v5p:2x2x4, v5p:4x4x4, v6e:8x8, cpu:8"


class TopologyError(ValueError):
    """A topology name libtpu cannot give devices for, or a missing libtpu: exit status 2."""


class Topology(NamedTuple):
    name: str  # as given
    platform: str  # "tpu" or "cpu"
    generation: str  # key of CHIPS, or "cpu"
    libtpu_name: str  # e.g. "v5:4x4x4"; "" for cpu
    n_chips: int


def parse_topology(name: str) -> Topology:
    """`v5p:4x4x4` / `v5e:16x16` / `cpu:8` -> Topology; TopologyError for anything else."""
    gen, sep, dims = name.strip().partition(":")
    gen = ALIASES.get(gen.lower(), gen.lower())
    bad = TopologyError(f"--topology={name!r}: unknown topology; use <generation>:<dims> with "
                        f"generation one of {', '.join(CHIPS)} or cpu, e.g. {EXAMPLES}")
    if not sep:
        raise bad
    if gen == "cpu":
        if not dims.isdigit() or int(dims) < 1:
            raise bad
        return Topology(name, "cpu", "cpu", "", int(dims))
    parts = dims.lower().split("x")
    if gen not in CHIPS or not all(p.isdigit() and int(p) > 0 for p in parts) or len(
            parts) != CHIPS[gen].ndim:
        raise bad
    return Topology(name, "tpu", gen, f"{CHIPS[gen].libtpu_name}:{dims.lower()}",
                    math.prod(int(p) for p in parts))


def prepare_environment(topo: Topology) -> None:
    """Set what JAX and libtpu read at start-up (JAX's settings only if JAX is not imported)."""
    # libtpu (read when it loads): no GCE metadata queries, and no /tmp/libtpu_lockfile, since
    # compiling touches no chip; several compiles (benchmarks/scaling.py) may run at once.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if "jax" in sys.modules:
        return
    # Compile-only TPU devices need no TPU backend: keep the runtime on CPU, so an installed
    # libtpu does not look for chips.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if topo.platform == "cpu":
        flag = f"--xla_force_host_platform_device_count={topo.n_chips}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def topology_devices(topo: Topology) -> list:
    """The devices to compile for: compile-only TPU devices, or the first N CPU devices."""
    # after prepare_environment (module docstring)
    import jax
    from jax.experimental import topologies

    if topo.platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < topo.n_chips:
            raise TopologyError(f"--topology={topo.name}: this process has {len(devices)} "
                                "CPU devices (JAX started before XLA_FLAGS could be set); run "
                                "cfm.aot in a fresh process")
        return devices[:topo.n_chips]
    if importlib.util.find_spec("libtpu") is None:
        raise TopologyError(f"--topology={topo.name} needs libtpu, which is not installed: "
                            'pip install -e ".[tpu]" (jax[tpu] of the same version as jax)')
    # v4 and v5p chips have two TensorCores; "megacore" makes each chip one JAX device.
    kwargs = {"chip_config_name": "megacore"} if CHIPS[topo.generation].ndim == 3 else {}
    try:
        desc = topologies.get_topology_desc(topology_name=topo.libtpu_name, platform="tpu",
                                            **kwargs)
    except Exception as e:  # noqa: BLE001 - libtpu raises JaxRuntimeError for bad shapes
        raise TopologyError(f"--topology={topo.name}: libtpu refused {topo.libtpu_name!r} "
                            f"({str(e).splitlines()[0]}); valid examples: {EXAMPLES}") from None
    if len(desc.devices) != topo.n_chips:
        raise TopologyError(f"--topology={topo.name}: libtpu gave {len(desc.devices)} "
                            f"devices for {topo.n_chips} chips")
    return list(desc.devices)
