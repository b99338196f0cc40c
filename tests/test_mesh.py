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


@pytest.mark.parametrize("zero3_axis", ["fsdp", ""])
def test_zero3_axis_decides_whether_biases_are_sharded(zero3_axis):
    """On an fsdp=8 mesh the default (`sharding.zero3_axis=fsdp`) spreads a parameter the rules
    leave without `fsdp` (an MLP or qkv bias, the weight-norm scale of the DINO head) over fsdp
    on its longest divisible axis, its teacher copy and Adam moments with it;
    `zero3_axis=''` leaves it replicated. Parameters with an `embed` axis (weights, norms) are
    sharded by the rules either way."""
    from jax.sharding import PartitionSpec as P

    from cfm import setup
    from tests.conftest import load_config

    c = load_config("dino_vit.py", "test")
    c.mesh.data, c.mesh.fsdp, c.sharding.min_shard_size = 1, 8, 0
    c.sharding.zero3_axis = zero3_axis
    s = setup.setup(c, jax.devices()[:8])  # shapes and shardings only, nothing allocated
    sh = s.shardings
    fc1_bias = lambda tree: tree["backbone"]["block_0"]["mlp"]["fc1"]["bias"]  # noqa: E731
    left_whole = {  # tensor=1: 'tensor' alone splits nothing
        "fc1 bias": (fc1_bias(sh.params), P(("fsdp", "tensor")), P("tensor")),
        "teacher fc1 bias": (fc1_bias(sh.teacher), P(("fsdp", "tensor")), P("tensor")),
        "Adam mu fc1 bias": (fc1_bias(sh.opt_state.adam.mu), P(("fsdp", "tensor")),
                             P("tensor")),
        "Adam nu fc1 bias": (fc1_bias(sh.opt_state.adam.nu), P(("fsdp", "tensor")),
                             P("tensor")),
        "qkv bias": (sh.params["backbone"]["block_0"]["attn"]["qkv_bias"],
                     P(None, "tensor", "fsdp"), P(None, "tensor", None)),
        "head scale": (sh.params["dino_head"]["last_layer"]["scale"], P(("fsdp", "tensor")),
                       P("tensor")),
    }
    for name, (got, sharded, replicated) in left_whole.items():
        if zero3_axis:
            assert got.spec == sharded and not got.is_fully_replicated, (name, got.spec)
        else:
            assert got.spec == replicated and got.is_fully_replicated, (name, got.spec)
    backbone = sh.params["backbone"]
    for got, spec in ((backbone["norm"]["scale"], P("fsdp")),
                      (backbone["block_0"]["mlp"]["fc1"]["kernel"], P("fsdp", "tensor"))):
        assert got.spec == spec and not got.is_fully_replicated
