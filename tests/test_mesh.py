"""Meshes from config: axis sizes, -1, and hybrid (multi-slice) layouts."""

from dataclasses import dataclass

import jax
import ml_collections
import numpy as np
import pytest

from cfm.parallel import mesh as mesh_lib


def _cfg(data=-1, fsdp=1, tensor=1, slices=1):
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, slices=slices))


@dataclass(frozen=True)
class _FakeTpu:  # what mesh_utils reads off a TPU device of a multi-slice job
    id: int
    slice_index: int
    process_index: int = 0


def test_minus_one_takes_the_rest():
    assert mesh_lib.axis_sizes(_cfg(fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert mesh_lib.axis_sizes(_cfg(data=1, fsdp=-1), 8) == (1, 8, 1)
    assert dict(mesh_lib.make_mesh(_cfg(fsdp=4)).shape) == {"data": 2, "fsdp": 4, "tensor": 1}


@pytest.mark.parametrize("cfg,message", [
    (_cfg(data=3), "needs 3 devices"),
    (_cfg(data=-1, fsdp=-1), "at most one"),
    (_cfg(fsdp=3), "do not divide"),
    (_cfg(data=0), "positive"),
])
def test_bad_sizes_are_named(cfg, message):
    with pytest.raises(ValueError, match=message):
        mesh_lib.make_mesh(cfg)


def test_hybrid_mesh_puts_each_slice_in_one_block_of_data():
    """2 slices x 8 chips, fsdp=4 inside each slice: every (slice-sized) block of the data
    axis holds one slice's chips, so fsdp and tensor collectives never cross DCN."""
    devices = [_FakeTpu(i, i // 8) for i in range(16)]
    arr = mesh_lib.hybrid_device_array((4, 4, 1), 2, devices)
    assert arr.shape == (4, 4, 1)
    for block, slice_index in ((arr[:2], 0), (arr[2:], 1)):
        assert {d.slice_index for d in block.ravel()} == {slice_index}
    assert sorted(d.id for d in arr.ravel()) == list(range(16))


def test_hybrid_mesh_errors():
    devices = [_FakeTpu(i, i // 8) for i in range(16)]
    with pytest.raises(ValueError, match="multiple of mesh.slices"):
        mesh_lib.hybrid_device_array((3, 1, 1), 2, devices[:3])
    with pytest.raises(ValueError, match="come from 2 slices"):
        mesh_lib.hybrid_device_array((16, 1, 1), 4, devices)
    # CPU devices have no slice_index: processes are the slices, and here there is one
    with pytest.raises(ValueError, match="come from 1 process$"):
        mesh_lib.make_mesh(_cfg(slices=2))


def test_single_slice_is_the_plain_mesh():
    m = mesh_lib.make_mesh(_cfg(fsdp=2, slices=1))
    np.testing.assert_array_equal(
        np.vectorize(lambda d: d.id)(m.devices),
        np.vectorize(lambda d: d.id)(mesh_lib.make_mesh(_cfg(fsdp=2)).devices))
    assert len(jax.devices()) == 8
