"""cfm.aot: the real step (DINOv2 and masked gene modelling) compiled for 8 forced CPU devices
reports sane figures, its abstract state is create_state's, bad input exits with status 2 and a
message, and (where libtpu is installed) a TPU v5e slice compiles without TPUs."""

import importlib.util
import json

import jax
import pytest

from cfm import aot, setup
from tests.conftest import ROOT, load_config

CONFIG = f"{ROOT}/configs/dino_vit.py:test"
MGM_CONFIG = f"{ROOT}/configs/omics_mgm.py:test"
HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _run(tmp_path, *args, config=CONFIG):
    out = tmp_path / "aot.json"
    rc = aot.main(["cfm.aot", "--config", config, *args, "--json", str(out)])
    return rc, (json.loads(out.read_text()) if rc == 0 else None)


def test_cpu_fsdp_figures_are_sane(tmp_path, capsys):
    rc, r = _run(tmp_path, "--topology", "cpu:8", "--config.mesh.data=1",
                 "--config.mesh.fsdp=8", "--config.sharding.min_shard_size=1")
    assert rc == 0
    assert r["n_chips"] == 8 and r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    m = r["memory_bytes"]
    assert m["argument"] > 0 and m["temp"] > 0 and m["total"] > 0
    assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"] + m[
        "generated_code"]
    assert r["xla_flops_per_chip"] > 0 and r["model_flops_per_step"] > 0
    assert r["objective"] == "dinov2"
    assert 0 < r["model_flops_backbone"] < r["model_flops_per_step"]
    assert r["fits"] is True
    s = r["state_bytes"]  # FSDP spreads params, teacher and Adam moments over the 8 devices
    assert s["total_over_chips"] <= s["per_chip"] < s["total"]
    assert "fits" in capsys.readouterr().out


def test_cpu_mgm_compiles_and_reports_memory(tmp_path, capsys):
    """`python -m cfm.aot --config configs/omics_mgm.py:test --topology cpu:8`: the masked gene
    modelling step compiles (vocab_size/n_bins filled from the data by the objective) and its
    memory figures are reported."""
    rc, r = _run(tmp_path, "--topology", "cpu:8", config=MGM_CONFIG)
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert r["objective"] == "mgm" and r["n_chips"] == 8
    assert r["variant"] == load_config("omics_mgm.py", "test").model.variant
    m = r["memory_bytes"]
    assert m["argument"] > 0 and m["temp"] > 0 and m["total"] > 0
    assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"] + m[
        "generated_code"]
    assert r["state_bytes"]["per_chip"] > 0 and r["need_bytes"] > 0
    assert r["xla_flops_per_chip"] > 0
    assert 0 < r["model_flops_backbone"] < r["model_flops_per_step"]
    assert r["fits"] is True
    assert "per-chip memory" in out.out and "fits" in out.out


def test_abstract_state_is_create_states():
    c = load_config(arg="test")
    c.mesh.data, c.mesh.fsdp, c.sharding.min_shard_size = 1, 8, 1
    s = setup.setup(c, jax.devices()[:8])
    state, shardings = setup.create_state(s), s.shardings
    abstract, abs_shardings, _, _ = setup.state_spec(s.config, s.objective, s.models, s.mesh,
                                                     s.rules)
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(state)):
        assert (a.shape, a.dtype) == (x.shape, x.dtype)
    assert jax.tree.leaves(abs_shardings) == jax.tree.leaves(shardings)
    assert [x.sharding for x in jax.tree.leaves(state)] == jax.tree.leaves(shardings)
    # what cfm.aot lowers with: the same shapes, dtypes and shardings
    lowered = setup.abstract_state(s)
    assert jax.tree.structure(lowered) == jax.tree.structure(state)
    for a, x in zip(jax.tree.leaves(lowered), jax.tree.leaves(state)):
        assert (a.shape, a.dtype, a.sharding) == (x.shape, x.dtype, x.sharding)
    batch = setup.abstract_batch(s)
    assert {k: (v.shape, str(v.dtype)) for k, v in batch.items()} == {
        k: (shape, dtype) for k, (shape, dtype) in s.batch_spec.items()}


@pytest.mark.parametrize("args, message", [
    (["--topology", "v9:2x2"], "unknown topology"),
    (["--topology", "v5e:4x4x4"], "unknown topology"),
    (["--topology", "tpu"], "v5p:4x4x4"),
    (["--topology", "cpu:16"], "fresh process"),
    (["--topology", "cpu:8", "--config.mesh.data=3"], "config.mesh does not fit"),
    (["--topology", "cpu:8", "--config.mesh.data=1", "--config.mesh.fsdp=4"],
     "needs 4 devices, 8 are present"),
    (["--topology", "cpu:8", "--config.batch_size=12"], "must divide by data*fsdp=8"),
    (["--topology", "cpu:8", "--config.modle.variant=vit_s16"], "bad command line"),
    ([], "--topology is required"),
])
def test_bad_input_exits_2_with_a_message(args, message, capsys):
    rc = aot.main(["cfm.aot", "--config", CONFIG, *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert "Traceback" not in err


@pytest.mark.skipif(HAVE_LIBTPU, reason="libtpu is installed here")
def test_missing_libtpu_says_what_to_install(capsys):
    assert aot.main(["cfm.aot", "--config", CONFIG, "--topology", "v5e:2x2"]) == 2
    assert 'pip install -e ".[tpu]"' in capsys.readouterr().err


@pytest.mark.skipif(not HAVE_LIBTPU, reason='libtpu not importable (pip install -e ".[tpu]")')
def test_tpu_v5e_slice_compiles_without_tpus(tmp_path, capsys):
    rc, r = _run(tmp_path, "--topology", "v5e:2x2", "--config.mesh.data=1",
                 "--config.mesh.fsdp=4")
    assert rc == 0, capsys.readouterr().err
    assert r["device_kind"] == "TPU v5 lite" and r["n_chips"] == 4
    assert r["attention"] == "dot_product_attention"
    assert 0 < r["memory_bytes"]["total"] < r["hbm_bytes"] == 16 * 2 ** 30 and r["fits"]
    assert r["xla_flops_per_chip"] > 0 and r["est_step_s"] > 0 and 0 < r["est_mfu"] < 1
    assert aot.main(["cfm.aot", "--config", CONFIG, "--topology", "v5e:3x3"]) == 2
    assert "libtpu refused" in capsys.readouterr().err
