"""cfm.init_from (`--config.init_from=PATH`): a new run's student and teacher filled from a
cfm.train checkpoint (student <- student, teacher <- teacher, heads included) or a cfm.export
folder (both <- the exported backbone, position embeddings resampled for another image size),
the optimiser state, step, centers and RNG left fresh and the shardings kept, whichever mesh
saved the source; mismatched registers or heads re-initialised and reported; bad paths named."""

import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from cfm import checkpoint, export, init_from, pretrained, setup
from cfm.models import vit
from tests.test_train import _tiny
from tests.conftest import damage_checkpoint

STEPS = (1, 3)
SOURCE = {"model.num_registers": 2, "sharding.min_shard_size": 0}
MESHES = {"fsdp8": {"mesh.fsdp": 8}, "one": {}}


def _state(**overrides):
    """A fresh (state, config) on the mesh `overrides` give (1 device by default)."""
    c = _tiny(**{**SOURCE, **overrides})
    s = setup.setup(c, devices=jax.devices()[:c.mesh.data * c.mesh.fsdp * c.mesh.tensor])
    return setup.create_state(s), s.config


def _noisy(tree, seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jax.device_put(
        np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(x.dtype), x.sharding), tree)


def _make_workdir(path, mesh: str):
    """A workdir whose checkpoints (steps 1 and 3) hold recognisable student, teacher, Adam
    moments and centers. Returns (fresh state, its config, {step: (student, teacher)} as numpy);
    the fresh state serves as a target too (apply_init_from leaves its input intact)."""
    state, c = _state(**MESHES[mesh])
    mngr = checkpoint.manager(str(path), c)
    saved = {}
    for s in STEPS:
        st = state.replace(step=jnp.asarray(s, jnp.int32), params=_noisy(state.params, s),
                           teacher=_noisy(state.teacher, 10 + s),
                           opt_state=_noisy(state.opt_state, 20 + s),
                           centers=jax.tree.map(lambda x: x + 1.0, state.centers))
        checkpoint.save(mngr, s, st, c, force=True)
        saved[s] = jax.device_get((st.params, st.teacher))
    mngr.wait_until_finished()
    mngr.close()
    return state, c, saved


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{mesh name: (workdir, {step: (student, teacher)}, fresh state, config)} for a source
    saved on 8 FSDP devices and one saved on one device."""
    root = tmp_path_factory.mktemp("init_from")
    out = {}
    for m in MESHES:
        state, c, saved = _make_workdir(root / m, m)
        out[m] = (root / m, saved, state, c)
    return out


def _leaves_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _same_shardings(new, old):
    assert jax.tree.structure(new) == jax.tree.structure(old)
    for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
        assert x.sharding == y.sharding and x.dtype == y.dtype and x.shape == y.shape


# ============================================================================ checkpoints =====
@pytest.mark.parametrize("src,dst,step", [("fsdp8", "one", None), ("one", "fsdp8", 1)])
def test_checkpoint_loads_student_teacher_and_heads(sources, tmp_path, capsys, src, dst, step):
    workdir, saved, _, _ = sources[src]
    _, _, state, c = sources[dst]
    c = c.copy_and_resolve_references()
    fresh = jax.device_get(state)
    assert init_from.maybe_init_from(state, c, str(tmp_path / "run")) is state  # no init_from
    c.unlock()
    c.init_from, c.init_from_step = str(workdir), -1 if step is None else step
    new = init_from.maybe_init_from(state, c, str(tmp_path / "run"))
    student, teacher = saved[step or STEPS[-1]]
    _leaves_equal(new.params, student)  # backbone and heads
    _leaves_equal(new.teacher, teacher)
    assert not np.array_equal(student["backbone"]["norm"]["scale"],
                              teacher["backbone"]["norm"]["scale"])
    _leaves_equal(new.opt_state, fresh.opt_state)  # a new run: fresh Adam moments, step 0
    _leaves_equal(new.centers, fresh.centers)
    assert int(new.step) == 0
    assert np.array_equal(jax.random.key_data(new.rng), jax.random.key_data(fresh.rng))
    _same_shardings(new, state)
    text = (tmp_path / "run" / init_from.REPORT_FILE).read_text()
    assert text in capsys.readouterr().out
    assert "re-initialised 0 | unused source keys 0" in text
    assert "backbone.block_{0..1}: attn.proj_bias, attn.proj_kernel" in text, text
    # the report wraps at 100 columns, where the path's length puts it: compare words
    words = " ".join(text.split())
    assert f"checkpoints/{step or STEPS[-1]} (step {step or STEPS[-1]}" in words, text


def _per_block(backbone: dict) -> dict:
    return pretrained.flatten(pretrained.unstack_blocks(jax.device_get(backbone), 2))


def test_scan_target_other_registers_and_heads_from_a_step_folder(sources):
    """PATH may name a step folder. A scan_layers target gets the per-block source stacked; 4
    registers for the source's 2 -> reg_tokens fresh; 128 prototypes for 64 -> the whole DINO
    head fresh; a separate iBOT head the source never had -> fresh."""
    workdir, saved, _, _ = sources["fsdp8"]
    state, c = _state(**{"model.scan_layers": True, "mesh.fsdp": 2, "model.num_registers": 4,
                         "head.n_prototypes": 128, "ibot.separate_head": True})
    fresh = jax.device_get(state)
    new, report = init_from.apply_init_from(state, c, str(workdir / "checkpoints" / "1"))
    for tree, src in zip(("params", "teacher"), saved[1]):
        got, want = _per_block(getattr(new, tree)["backbone"]), pretrained.flatten(src["backbone"])
        np.testing.assert_array_equal(got.pop("reg_tokens"),
                                      getattr(fresh, tree)["backbone"]["reg_tokens"])
        want.pop("reg_tokens")
        jax.tree.map(np.testing.assert_array_equal, got, want)
        for head in ("dino_head", "ibot_head"):
            _leaves_equal(getattr(new, tree)[head], getattr(fresh, tree)[head])
    _same_shardings(new, state)
    reinit = dict(report.reinitialised)
    assert reinit["backbone.reg_tokens"] == "source (1, 2, 32), target (1, 4, 32)"
    assert "last_layer.kernel source (16, 64), target (16, 128)" in reinit["dino_head.mlp_0.bias"]
    assert reinit["ibot_head.last_layer.kernel"] == "not in the source"
    assert len(reinit) == 1 + 2 * len(pretrained.flatten(fresh.params["dino_head"]))
    assert dict(report.unused)["backbone.reg_tokens"] == "shape (1, 2, 32) does not fit (1, 4, 32)"
    assert not report.resampled and len(report.loaded) == 7 + 2 * 14  # all but reg_tokens
    text = report.format()
    assert "backbone: reg_tokens  -- source (1, 2, 32), target (1, 4, 32)" in text, text


# ============================================================================ exports =========
@pytest.fixture(scope="module")
def wide(sources):
    """A target whose pos_embed is stored for 48 px (a 6x6 grid; the sources have 4x4)."""
    return _state(**{"model.img_size": 48, "crops.global_size": 48, "mesh.fsdp": 4})


@pytest.mark.parametrize("fmt", ["safetensors", "orbax"])
def test_export_with_larger_crops_resamples_pos_embed(sources, wide, tmp_path, fmt):
    workdir, saved, _, _ = sources["fsdp8"]
    export.export(str(workdir), str(tmp_path / "model"), fmt)
    state, c = wide
    fresh = jax.device_get(state)
    new, report = init_from.apply_init_from(state, c, str(tmp_path / "model"))
    src = pretrained.flatten(saved[STEPS[-1]][1]["backbone"])  # the exported teacher
    pos = src.pop("pos_embed")
    want = np.concatenate([pos[:, :1], np.asarray(vit.resample_pos_embed(pos[:, 1:], 6))], 1)
    for tree in (new.params, new.teacher):  # both from the exported backbone
        got = pretrained.flatten(jax.device_get(tree["backbone"]))
        assert got.pop("pos_embed").shape == (1, 37, 32)
        np.testing.assert_array_equal(jax.device_get(tree["backbone"]["pos_embed"]), want)
        jax.tree.map(np.testing.assert_array_equal, got, src)
        _leaves_equal(tree["dino_head"], fresh.params["dino_head"])  # an export has no heads
    _same_shardings(new, state)
    assert [n for n, _ in report.resampled] == ["backbone.pos_embed"]
    assert "patch grid 4x4 -> 6x6" in report.resampled[0][1]
    assert {d for _, d in report.reinitialised} == {"an export holds no heads"}
    assert not report.unused


# ============================================================================ variants ========
def _abstract_state(c):
    """A stand-in for the trainer's state where only parameter shapes are read."""
    return types.SimpleNamespace(params=setup.setup(c, devices=jax.devices()[:1])
                                 .abstract_state.params)


def _write_export(folder, variant: str, depth_seed: int = 0) -> dict:
    """A safetensors export of random `variant` weights (architecture of the test preset)."""
    c = _tiny(**{"model.variant": variant})
    arch = pretrained.architecture(c.model.to_dict())
    rng = np.random.default_rng(depth_seed)
    params = {k: rng.standard_normal(v.shape).astype(np.float32)
              for k, v in pretrained.flatten(pretrained.abstract_params(arch)).items()}
    os.makedirs(folder)
    save_file(params, os.path.join(folder, pretrained.WEIGHTS_FILE))
    info = {"architecture": arch, "provenance": {"step": 7},
            "export": {"format": "safetensors", "dtype": "float32"}}
    (folder / pretrained.CONFIG_FILE).write_text(json.dumps(info))
    return params


def test_deeper_scan_target_reinitialises_extra_blocks(sources, tmp_path, monkeypatch):
    """A 3-block target from a 2-block source: blocks 0-1 loaded into the stacked (scan) leaves,
    block 2 stays fresh; a 2-block target from the 3-block export leaves block 2 unused."""
    monkeypatch.setitem(vit.VARIANTS, "vit_test3", (32, 3, 2, 64, 8))
    src = _write_export(tmp_path / "two", "vit_test")
    state, c = _state(**{"model.variant": "vit_test3", "model.scan_layers": True,
                         "model.num_registers": 0, "mesh.fsdp": 2})
    fresh = jax.device_get(state)
    new, report = init_from.apply_init_from(state, c, str(tmp_path / "two"))
    got = jax.device_get(new.teacher["backbone"]["blocks"]["mlp"]["fc1"]["kernel"])
    np.testing.assert_array_equal(got[:2], np.stack([src[f"block_{i}.mlp.fc1.kernel"]
                                                     for i in range(2)]))
    np.testing.assert_array_equal(got[2], fresh.teacher["backbone"]["blocks"]["mlp"]["fc1"][
        "kernel"][2])
    _same_shardings(new, state)
    assert "backbone.block_{2}: " in report.format()
    assert {n for n, d in report.reinitialised if d == "not in the source"} >= {
        "backbone.block_2.attn.qkv_kernel"}
    _write_export(tmp_path / "three", "vit_test3")
    _, _, state, c = sources["one"]
    _, report = init_from.apply_init_from(state, c, str(tmp_path / "three"))
    assert ("backbone.block_2.attn.qkv_kernel", "not in the target") in report.unused
    assert dict(report.reinitialised)["backbone.reg_tokens"] == "not in the source"


def test_match_rules_without_arrays():
    t = {"backbone.patch_embed.kernel": (8, 8, 3, 32), "backbone.pos_embed": (1, 17, 32),
         "backbone.block_0.mlp.w12.kernel": (32, 96), "dino_head.mlp_0.kernel": (32, 8)}
    s = {"backbone.patch_embed.kernel": (8, 8, 3, 32), "backbone.pos_embed": (1, 10, 32),
         "backbone.block_0.mlp.fc1.kernel": (32, 64), "ibot_head.mlp_0.kernel": (32, 8)}
    plan, unused = init_from.match(t, s)
    assert {k: a for k, (a, _) in plan.items()} == {
        "backbone.patch_embed.kernel": "load", "backbone.pos_embed": "resample",
        "backbone.block_0.mlp.w12.kernel": "reinit", "dino_head.mlp_0.kernel": "reinit"}
    assert dict(unused) == {"backbone.block_0.mlp.fc1.kernel": "not in the target",
                            "ibot_head.mlp_0.kernel": "not in the target"}
    assert init_from._collapse([(f"backbone.block_{i}.x", "") for i in (0, 1, 2, 5)]) == [
        "backbone.block_{0..2,5}: x"]


# ============================================================================ errors ==========
def test_bad_sources_raise_naming_the_path(sources, tmp_path, monkeypatch):
    workdir, _, _, c = sources["one"]

    def fails(path, *needles, step=None, state=None):
        with pytest.raises(init_from.InitFromError) as e:
            init_from.apply_init_from(state, c, str(path), step)
        assert isinstance(e.value, ValueError)
        for needle in (f"config.init_from={path}",) + needles:
            assert needle in str(e.value), str(e.value)

    fails(tmp_path / "nope", "does not exist")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", "neither a cfm.train workdir")
    (tmp_path / "nockpt" / "checkpoints").mkdir(parents=True)
    fails(tmp_path / "nockpt", "no complete checkpoint")
    fails(workdir, "available steps [1, 3]", step=2)
    broken = tmp_path / "broken"
    shutil.copytree(workdir, broken)
    damage_checkpoint(broken / "checkpoints" / "3")
    fails(broken, str(broken / "checkpoints" / "3"), "damaged")
    (broken / "checkpoints" / "1" / "config" / "metadata").write_text("{not json")
    fails(broken / "checkpoints" / "1", "damaged")
    _write_export(tmp_path / "demo", "vit_demo")  # width 96 into width 32
    fails(tmp_path / "demo", "shares no parameter", state=_abstract_state(c))
    fails(tmp_path / "demo", "one step", step=3)
    monkeypatch.setitem(vit.VARIANTS, "vit_test4", (32, 2, 2, 64, 4))  # patch 4 into patch 8
    _write_export(tmp_path / "p4", "vit_test4")
    fails(tmp_path / "p4", "patch embedding", "model.variant=vit_test4",
          state=_abstract_state(c))
