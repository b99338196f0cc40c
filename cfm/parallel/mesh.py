"""Device mesh from config and the logical-axis rules that map parameter names onto it.

Mesh axes are `data` (pure data parallel), `fsdp` (data parallel with sharded parameters and
optimiser state) and `tensor` (attention heads and MLP hidden units split). The batch is split
over `data` and `fsdp` together; `cfm.parallel.sharding` holds the rules that place parameters
and activations. This module is the one place that builds meshes.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.experimental.mesh_utils
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")

def axis_sizes(mesh_cfg: ml_collections.ConfigDict, n_devices: int) -> tuple[int, int, int]:
    """Resolve `mesh.{data,fsdp,tensor}` (one may be -1 = the rest) against the device count."""
    sizes = [int(mesh_cfg[a]) for a in AXES]
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive or -1, got {dict(zip(AXES, sizes))}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(f"mesh {dict(zip(AXES, sizes))}: {n_devices} devices do not divide "
                             f"by {known}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"{n_devices} are present")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor), laid out along the physical topology."""
    devices = list(devices if devices is not None else jax.devices())
    shape = axis_sizes(mesh_cfg, len(devices))
    try:
        arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # CPU and odd device counts have no topology to follow
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, AXES)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading axis split over data and fsdp, the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
