"""The trainer end to end on a tiny ViT: loss falls over 30 steps, outputs land in the workdir,
a (data=2) mesh gives the 1-device step, every objective option runs, bad configs stop early."""

import functools
import json
import os

import jax
import numpy as np
import pytest

from cfm import config_check, setup, train
from cfm.parallel import sharding
from tests.conftest import ROOT, load_config


def _tiny(**overrides):
    c = load_config(arg="test")
    c.mesh.data = 1
    for key, value in overrides.items():
        node = c
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return c


def _run_steps(c, devices, n_steps):
    s = setup.setup(c, devices)
    state = setup.create_state(s)
    it = s.objective.batches(s.config, 0, 0, 1)
    batches = [next(it) for _ in range(n_steps)]
    outs = []
    with jax.set_mesh(s.mesh):
        for b in batches:
            state, out = s.step(state, setup.global_batch(s, b))
            outs.append(jax.device_get(out))
    return jax.device_get(state), outs


def test_trains_30_steps_loss_falls_and_writes_outputs(tmp_path):
    c = _tiny(total_steps=30, log_every=5, checkpoint_every=10, **{"mesh.data": -1})
    last = train.train(c, str(tmp_path))
    hist = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in hist]
    assert [h["step"] for h in hist] == [5, 10, 15, 20, 25, 30]
    assert all(np.isfinite(losses)) and last["loss"] == losses[-1]
    assert losses[-1] < losses[0] - 0.5, losses
    for term in ("dino", "ibot", "koleo"):  # each term falls, not just their sum
        assert hist[-1][term] < hist[0][term], (term, hist)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "20", "30"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in ("dino", "ibot", "koleo", "lr", "momentum", "teacher_temp", "images_per_s"):
        assert key in hist[-1]


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "softmax"])
def test_data_parallel_mesh_matches_single_device(centering):
    c = _tiny(**{"ssl.centering": centering})
    s1, o1 = _run_steps(c, jax.devices()[:1], 2)
    c2 = _tiny(**{"mesh.data": 2, "ssl.centering": centering})
    s2, o2 = _run_steps(c2, jax.devices()[:2], 2)
    for a, b in zip(o1, o2):
        for k in ("loss", "dino", "ibot", "koleo", "grad_norm"):
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-6, err_msg=k)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
                 s1.params, s2.params)
    np.testing.assert_allclose(s1.centers["dino"], s2.centers["dino"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("overrides", [
    {"ssl.centering": "softmax", "ssl.regulariser": "kde"},
    {"ibot.separate_head": True, "model.ffn": "swiglu", "model.num_registers": 2},
    {"model.scan_layers": True, "model.remat": True, "model.dtype": "bfloat16"},
])
def test_objective_options_run(overrides):
    c = _tiny(**overrides)
    _, outs = _run_steps(c, jax.devices()[:1], 2)
    for out in outs:
        assert all(np.isfinite(v) for v in out.values()), out


# The misspelt key, a value of the wrong type and an unknown variant are cases of
# tests/test_cli_errors.py (one line, exit 2, nothing created); these need the 8 test devices.
BAD_CONFIGS = [
    (["--config.crops.local_size=20"], "crops.local_size"),
    (["--config.ssl.centering=median"], "ssl.centering"),
    (["--config.batch_size=7"], "batch_size"),  # 8 test devices
    (["--config.mesh.data=3"], "config.mesh"),
    (["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
      "--config.batch_size=6"], "data*fsdp=4"),
]


@pytest.fixture(scope="module")
def bad_config_runs(tmp_path_factory):
    """{case index: (completed process, workdir)}: every BAD_CONFIGS case as a user runs it, in
    a fresh process, two at a time (most of each is the jax import)."""
    import concurrent.futures
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    tmp = tmp_path_factory.mktemp("bad_config")

    def run(i):
        w = tmp / str(i) / "w"
        cmd = [sys.executable, "-m", "cfm.train", "--config",
               f"{ROOT}/configs/dino_vit.py:test", "--workdir", str(w)] + BAD_CONFIGS[i][0]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120), w

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(enumerate(pool.map(run, range(len(BAD_CONFIGS)))))


@pytest.mark.parametrize("case", range(len(BAD_CONFIGS)),
                         ids=[" ".join(a).replace("--config.", "") for a, _ in BAD_CONFIGS])
def test_bad_config_stops_before_work(bad_config_runs, case):
    """As a user runs it: a fresh process, exit status 2, the key named, nothing written."""
    proc, w = bad_config_runs[case]
    message = BAD_CONFIGS[case][1]
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not (w / "checkpoints").exists()


@functools.lru_cache(maxsize=1)
def _one_device_two_steps():
    """The reference for every mesh below, computed once."""
    return _run_steps(_tiny(), jax.devices()[:1], 2)


# The default rules with the batch split over `data` only (fsdp devices then hold whole rows
# of their data group's batch, and gather parameters all the same).
DATA_ONLY_BATCH = tuple((name, ("data",) if name == "act_batch" else axes)
                        for name, axes in sharding.DEFAULT_RULES)


@pytest.mark.parametrize("mesh_shape", [
    {"mesh.data": 8},
    {"mesh.fsdp": 8},
    {"mesh.fsdp": 2, "mesh.tensor": 2},
    {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
    {"mesh.data": 2, "mesh.fsdp": 4, "sharding.rules": DATA_ONLY_BATCH},
])
def test_fsdp_and_tensor_meshes_match_single_device(mesh_shape):
    """Two DINOv2 steps with parameters, teacher and Adam moments sharded (FSDP) and heads/MLP/
    prototypes split (tensor) give the 1-device losses, centering and parameters."""
    s1, o1 = _one_device_two_steps()
    c8 = _tiny(**{"mesh.data": 1, **mesh_shape, "sharding.min_shard_size": 0})
    n = c8.mesh.data * c8.mesh.fsdp * c8.mesh.tensor
    s = setup.setup(c8, jax.devices()[:n])
    state = setup.create_state(s)
    kernel = s.shardings.params["backbone"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    shard = state.opt_state.adam.mu["backbone"]["block_0"]["mlp"]["fc1"]["kernel"]
    rows, cols = kernel.shard_shape((32, 64))
    assert shard.addressable_shards[0].data.shape == (rows, cols)
    if c8.mesh.fsdp * c8.mesh.tensor > 1:
        assert rows * cols < 32 * 64  # really sharded
    s8, o8 = _run_steps(c8, jax.devices()[:n], 2)
    for a, b in zip(o1, o8):
        for k in ("loss", "dino", "ibot", "koleo", "grad_norm"):
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-6, err_msg=k)
    max_lr = max(o["lr"] for o in o1)
    jax.tree.map(lambda x, y: _assert_close_but_adam_sign_flips(x, y, max_lr), s1.params,
                 s8.params)
    jax.tree.map(lambda x, y: _assert_close_but_adam_sign_flips(x, y, max_lr), s1.teacher,
                 s8.teacher)


def test_batch_layout_follows_the_rules():
    """`act_batch` -> ("data",) on a data=2 x fsdp=4 mesh: global batches are split over `data`
    only (the 4 fsdp devices of a data row hold the same half), and the batch size must divide
    by data alone; the default rules split over data x fsdp."""
    c = _tiny(**{"mesh.data": 2, "mesh.fsdp": 4, "batch_size": 6,
                 "sharding.rules": DATA_ONLY_BATCH})
    s = setup.setup(c, jax.devices()[:8])  # 6 rows: divides by data=2, not by data*fsdp=8
    assert sharding.batch_axes(s.rules) == ("data",)
    assert sharding.batch_shards(s.mesh, s.rules) == 2
    local = next(s.objective.batches(s.config, 0, 0, 1))
    assert {k: v.shape for k, v in local.items()} == {k: shape for k, (shape, _) in
                                                      s.batch_spec.items()}
    batch = setup.global_batch(s, local)
    devices = s.mesh.devices  # [data, fsdp, tensor]
    for k, x in batch.items():
        assert x.shape == local[k].shape
        rows = {sh.device: sh.index[0] for sh in x.addressable_shards}
        for i in range(2):
            for j in range(4):
                assert rows[devices[i, j, 0]] == slice(3 * i, 3 * (i + 1)), (k, i, j)
        for sh in x.addressable_shards:
            np.testing.assert_array_equal(sh.data, local[k][sh.index])
    setup.check_batch(s.config, s.mesh, s.rules)
    with pytest.raises(config_check.ConfigError, match=r"batch_size=3: must divide by data=2"):
        setup.setup(_tiny(**{"mesh.data": 2, "mesh.fsdp": 4, "batch_size": 3,
                             "sharding.rules": DATA_ONLY_BATCH}), jax.devices()[:8])
    default = _tiny(**{"mesh.data": 2, "mesh.fsdp": 4, "batch_size": 6})
    with pytest.raises(config_check.ConfigError, match=r"batch_size=6: must divide by "
                                                       r"data\*fsdp=8"):
        setup.setup(default, jax.devices()[:8])
    default.batch_size = 8
    s8 = setup.setup(default, jax.devices()[:8])
    x = setup.global_batch(s8, next(s8.objective.batches(s8.config, 0, 0, 1)))["masks"]
    assert sorted(sh.index[0].start for sh in x.addressable_shards) == list(range(8))


def _assert_close_but_adam_sign_flips(x, y, max_lr: float, n_steps: int = 2) -> None:
    """Parameters after a few Adam steps agree tightly, except that Adam's first updates are
    ~lr * sign(g): where a gradient entry cancels to float noise, another reduction order
    (another mesh) may flip its sign and move that weight by up to 2 lr per step. Allow that for
    at most 0.5% of a tensor's entries (at least one); a wrong shard moves whole rows."""
    x, y = np.asarray(x), np.asarray(y)
    bad = ~np.isclose(x, y, rtol=1e-4, atol=1e-6)
    assert bad.sum() <= max(1, int(0.005 * x.size)), (bad.sum(), x.size)
    assert np.all(np.abs(x - y)[bad] <= 2 * n_steps * max_lr + 1e-6), np.abs(x - y).max()
