"""Device mesh from config and the logical-axis rules that map parameter names onto it.

Mesh axes are `data` (pure data parallel), `fsdp` (data parallel with sharded parameters and
optimiser state) and `tensor` (attention heads and MLP hidden units split). Where parameters,
activations and batches go is decided by the logical-axis rules of `cfm.parallel.sharding`
(by default the batch is split over `data` and `fsdp` together). This module is the one place
that builds meshes.

Multi-slice TPU jobs (and GPU clusters, where a host is the slow-network unit) set
`mesh.slices=S`: the `data` axis is then S slices x (data / S) devices, slices talk over the
data-centre network (DCN) and only for the data-parallel gradient reduction, while `fsdp` and
`tensor` stay inside a slice on the fast interconnect (ICI), as in MaxText's hybrid meshes.
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
    """A Mesh with axes (data, fsdp, tensor), laid out along the physical topology; with
    `mesh_cfg.slices > 1`, a hybrid mesh whose `data` axis spans the slices (see module doc)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = axis_sizes(mesh_cfg, len(devices))
    slices = int(mesh_cfg.get("slices", 1))
    if slices > 1:
        return Mesh(hybrid_device_array(shape, slices, devices), AXES)
    if slices < 1:
        raise ValueError(f"mesh.slices must be >= 1, got {slices}")
    try:
        arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # CPU and odd device counts have no topology to follow
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, AXES)


def hybrid_device_array(shape: Sequence[int], slices: int, devices: Sequence) -> np.ndarray:
    """Devices arranged as `shape` (data, fsdp, tensor) with `data` split into `slices` blocks,
    each block holding the devices of one slice (TPU `slice_index`; where all devices report
    the same slice, as GPUs and CPUs do, each process is a slice)."""
    data, fsdp, tensor = shape
    if data % slices:
        raise ValueError(f"mesh.data={data} must be a multiple of mesh.slices={slices}: data "
                         "parallelism is what runs across slices")
    granule = "slice_index"  # TPU slices; GPUs and CPUs report one slice (or none): processes
    if len({getattr(d, "slice_index", 0) for d in devices}) == 1:
        granule = "process_index"
    groups: dict[int, list] = {}
    for d in devices:
        groups.setdefault(getattr(d, granule), []).append(d)
    if len(groups) != slices:
        unit = "slice" if granule == "slice_index" else "process"
        raise ValueError(f"mesh.slices={slices} but the devices come from {len(groups)} {unit}"
                         f"{'' if len(groups) == 1 else ('s' if unit == 'slice' else 'es')}")
    ici = (data // slices, fsdp, tensor)
    try:
        arr = jax.experimental.mesh_utils.create_hybrid_device_mesh(
            ici, (slices, 1, 1), devices, process_is_granule=granule == "process_index")
    except Exception:  # no physical topology (CPU): slice blocks in device order
        arr = np.concatenate([np.asarray(groups[k]).reshape(ici) for k in sorted(groups)])
    return arr


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
