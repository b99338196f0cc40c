"""The omics side of pretraining: the omics transformer (padding and order do not matter), the
masked-gene-modelling step (loss falls; sharded meshes give the 1-device step), resume, export,
load_pretrained and cfm.embed --omics, and config errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax.linen as nn

from cfm import config_check, export, init_from, pretrained, setup, train
from cfm.data import omics_pipeline
from cfm.models import omics
from cfm.ssl import mgm
from tests.conftest import load_config


def _cfg(**overrides):
    c = load_config("omics_mgm.py", "test")
    c.mesh.data = 1
    for key, value in overrides.items():
        node = c
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return mgm.prepare_config(c)  # checks, and fills vocab_size/n_bins from the data


def _batch(n_tokens=12, b=3, seed=0):
    rng = np.random.default_rng(seed)
    return {"gene_ids": jnp.asarray(rng.permutation(np.arange(2, 2 + n_tokens))[None]
                                    .repeat(b, 0), jnp.int32),
            "modality": jnp.asarray(rng.integers(0, 3, (b, n_tokens)), jnp.int32),
            "values": jnp.asarray(rng.normal(size=(b, n_tokens)), jnp.float32),
            "classes": jnp.asarray(rng.integers(0, 2, (b, n_tokens)), jnp.int32)}


@pytest.mark.parametrize("encoding, gene_values", [("continuous", False), ("binned", False),
                                                   ("continuous", True)])
def test_padding_and_token_order_do_not_change_the_sample_embedding(encoding, gene_values):
    model = omics.OmicsTransformer("omics_test", vocab_size=20, n_bins=5,
                                   value_encoding=encoding, gene_values=gene_values)
    b = _batch()
    keys = ("gene_ids", "modality", "values", "classes")
    params = model.init(jax.random.key(0), *(b[k] for k in keys),
                        value_mask=jnp.zeros(b["gene_ids"].shape, bool))["params"]
    apply = jax.jit(model.apply)  # one trace per input shape: much faster on 2 cores
    cls = apply({"params": params}, *(b[k] for k in keys))["cls"]
    padded = {k: jnp.pad(v, ((0, 0), (0, 5))) for k, v in b.items()}  # gene id 0 = padding
    padded["values"] = padded["values"].at[:, -5:].set(99.0)  # padding values are ignored
    cls_pad = apply({"params": params}, *(padded[k] for k in keys))["cls"]
    np.testing.assert_allclose(cls, cls_pad, rtol=1e-5, atol=1e-6)
    perm = np.random.default_rng(1).permutation(12)
    cls_perm = apply({"params": params}, *(b[k][:, perm] for k in keys))["cls"]
    np.testing.assert_allclose(cls, cls_perm, rtol=1e-5, atol=1e-6)
    hidden = jnp.ones(b["gene_ids"].shape, bool)  # every value masked: values cannot matter
    a = apply({"params": params}, *(b[k] for k in keys), value_mask=hidden)["cls"]
    b2 = dict(b, values=b["values"] + 3.0, classes=1 - b["classes"])
    c = apply({"params": params}, *(b2[k] for k in keys), value_mask=hidden)["cls"]
    np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6)
    assert not np.allclose(cls, a)
    doubled = dict(b, values=2 * b["values"])
    scaled = apply({"params": params}, *(doubled[k] for k in keys))["cls"]
    if encoding == "continuous":  # the magnitude of a value matters, not only its sign
        assert np.abs(np.asarray(scaled) - np.asarray(cls)).max() > 1e-3


def test_pad_sample_subsets_and_pads():
    arrays = {"gene_ids": np.arange(2, 12, dtype=np.int32), "modality": np.zeros(10, np.uint8),
              "values": np.arange(10, dtype=np.float32), "classes": np.zeros(10, np.uint8)}
    out = omics_pipeline.pad_sample(arrays, 4, np.random.default_rng(0))
    assert out["gene_ids"].shape == (4,) and np.all(np.diff(out["gene_ids"]) > 0)
    np.testing.assert_array_equal(out["values"], out["gene_ids"] - 2)  # rows stay together
    out = omics_pipeline.pad_sample(arrays, 16, None)
    assert list(out["gene_ids"][10:]) == [0] * 6 and out["values"].dtype == np.float32
    with pytest.raises(ValueError, match="max_tokens"):
        omics_pipeline.pad_sample(arrays, 4, None)
    out = omics_pipeline.pad_sample(arrays, 16, np.random.default_rng(0), shuffle=True)
    assert sorted(out["gene_ids"][:10]) == list(range(2, 12))  # all kept, in random order
    assert list(out["gene_ids"][:10]) != list(range(2, 12))
    np.testing.assert_array_equal(out["values"][:10], out["gene_ids"][:10] - 2)


def test_batches_are_a_function_of_step_and_hosts_split_them():
    c = _cfg()
    it = omics_pipeline.make_train_iterator(c)
    b0, b1 = next(it), next(it)
    again = next(omics_pipeline.make_train_iterator(c, start_step=1))
    for k in b1:
        np.testing.assert_array_equal(b1[k], again[k])
    halves = [next(omics_pipeline.make_train_iterator(c, process_index=p, process_count=2))
              for p in (0, 1)]
    for k in b0:
        np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), b0[k])


def _run_steps(c, devices, n_steps=2):
    s = setup.setup(c, devices)
    assert s.objective is mgm.OBJECTIVE
    state = setup.create_state(s)
    it = s.objective.batches(s.config, 0, 0, 1)
    batches = [next(it) for _ in range(n_steps)]
    outs = []
    with jax.set_mesh(s.mesh):
        for b in batches:
            state, out = s.step(state, setup.global_batch(s, b))
            outs.append(jax.device_get(out))
    return jax.device_get(state), outs


def test_sharded_meshes_match_one_device():
    extras = {"model.gene_values": True, "mgm.sample_readout": True,  # as the tcga preset
              "model.attend_tokens": 32}
    s1, o1 = _run_steps(_cfg(**extras), jax.devices()[:1])
    for shape in ((2, 2, 2),):
        c = _cfg(**extras, **{"mesh.data": shape[0], "mesh.fsdp": shape[1],
                              "mesh.tensor": shape[2]})
        s2, o2 = _run_steps(c, jax.devices()[:8])
        for a, b in zip(o1, o2):
            for k in ("loss", "expression", "mutation", "cnv", "grad_norm", "masked_tokens"):
                np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-6, err_msg=(shape, k))
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5),
                     s1.params, s2.params)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 40-step test run (loss falls), resumed from step 20 to 40."""
    workdir = tmp_path_factory.mktemp("mgm")
    train.train(_cfg(total_steps=20, **{"mesh.data": -1}), str(workdir))
    train.train(_cfg(total_steps=40, **{"mesh.data": -1}), str(workdir))
    return workdir


def test_loss_falls_resumes_and_checkpoints(run):
    hist = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == list(range(5, 45, 5))
    # The objective on 4 fixed batches and masks: the trained network beats its initialisation
    # (single logged batches of 8 samples are too noisy to compare).
    c = _cfg()
    models = mgm.OBJECTIVE.build_models(c)
    trained = init_from.read_checkpoint_params(str(run))[1]
    initial = nn.meta.unbox(mgm.OBJECTIVE.init_params(c, models, jax.random.key(c.seed)))
    it = omics_pipeline.make_train_iterator(c)
    batches = [next(it) for _ in range(4)]
    objective = jax.jit(lambda p, b, r: mgm.objective(c, models.backbone, models.mgm_head, p,
                                                      b, r)[0])
    loss = lambda p: np.mean([objective(p, b, jax.random.key(i))  # noqa: E731
                              for i, b in enumerate(batches)])
    assert loss(trained) < loss(initial) - 0.1, (loss(trained), loss(initial))
    assert "samples_per_s" in hist[-1] and "momentum" not in hist[-1]
    assert sorted(int(s.name) for s in (run / "checkpoints").iterdir()) == [20, 30, 40]


def test_export_load_pretrained_and_embed(run, tmp_path):
    from cfm import embed

    out = tmp_path / "export"
    info = export.export(str(run), str(out), "safetensors")
    assert info["architecture"]["family"] == "omics" and info["provenance"]["step"] == 40
    module, params = pretrained.load_pretrained(str(out))
    _, from_workdir = pretrained.load_pretrained(str(run))
    jax.tree.map(np.testing.assert_array_equal, params, from_workdir)
    b = _batch(n_tokens=20)
    cls = module.apply({"params": params}, b["gene_ids"], b["modality"], b["values"],
                       b["classes"])["cls"]
    assert cls.shape == (3, omics.spec("omics_test").width) and np.all(np.isfinite(cls))
    with pytest.raises(export.ExportError, match="timm"):
        export.export(str(run), str(tmp_path / "timm"), "timm")
    # cfm.embed --omics needs a prepared folder: refusing a ViT-less check is enough here
    assert embed.main(["--model", str(out), "--omics", str(tmp_path / "missing"),
                       "--out", str(tmp_path / "emb")]) == 2


@pytest.mark.parametrize("key, value, message", [
    ("model.variant", "omics_huge", "model.variant"),
    ("mgm.mask_ratio", 1.5, "mgm.mask_ratio"),
    ("model.vocab_size", 7, "the data has 66"),
    ("data.source", "prepared", "data.path"),
    ("mgm.expression_loss", "l1", "mgm.expression_loss"),
    ("model.attend_tokens", -1, "model.attend_tokens"),
    ("model.attend_tokens", 8, "needs mgm.sample_readout"),
])
def test_bad_configs_name_the_key(key, value, message):
    with pytest.raises(config_check.ConfigError, match=message):
        _cfg(**{key: value})


def test_sample_readout_reads_expression_from_the_cls():
    head = omics.MGMHead(n_bins=5, vocab_size=20, sample_readout=True)
    x, genes = jnp.ones((2, 6, 32)), jnp.arange(2, 14, dtype=jnp.int32).reshape(2, 6)
    cls = jax.random.normal(jax.random.key(0), (2, 32))
    params = head.init(jax.random.key(1), x, cls, genes)["params"]
    a = head.apply({"params": params}, x, cls, genes)
    b = head.apply({"params": params}, x, cls * 2.0, genes)
    assert not np.allclose(a["expression"], b["expression"])  # the CLS term
    for k in ("mutation", "cnv"):  # per-token outputs only
        np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(config_check.ConfigError, match="mgm.sample_readout"):
        _cfg(**{"mgm.sample_readout": True, "mgm.expression_loss": "classification"})


def test_prepared_folder_without_manifest_is_named(tmp_path):
    with pytest.raises(config_check.ConfigError, match="manifest.json"):
        _cfg(**{"data.source": "prepared", "data.path": str(tmp_path)})


def test_attend_tokens_window_and_views():
    """A windowed model: tokens past the window do not change the CLS through attention, only
    through the sketch; window_views cover every token exactly once."""
    from cfm.omics_embed import sample_embeddings, window_views

    keys = ("gene_ids", "modality", "values", "classes")
    b = _batch(n_tokens=12)
    full = omics.OmicsTransformer("omics_test", vocab_size=20, n_bins=5, gene_values=True)
    win = omics.OmicsTransformer("omics_test", vocab_size=20, n_bins=5, gene_values=True,
                                 attend_tokens=5)
    params = full.init(jax.random.key(0), *(b[k] for k in keys),
                       value_mask=jnp.zeros(b["gene_ids"].shape, bool))["params"]
    out_w = win.apply({"params": params}, *(b[k] for k in keys))
    assert out_w["tokens"].shape == (3, 12, 32)
    moved = dict(b, modality=b["modality"].at[:, 8].set((b["modality"][:, 8] + 1) % 3))
    same = win.apply({"params": params}, *(moved[k] for k in keys))  # past the window
    np.testing.assert_allclose(same["cls"], out_w["cls"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(same["tokens"][:, :8], out_w["tokens"][:, :8], atol=1e-6)
    assert not np.allclose(full.apply({"params": params}, *(moved[k] for k in keys))["cls"],
                           full.apply({"params": params}, *(b[k] for k in keys))["cls"])
    samples = [{k: np.asarray(b[k][i]) for k in keys} for i in range(3)]
    samples[1] = {k: v[:4] for k, v in samples[1].items()}
    views, masks, owner, index = window_views(samples, 5)
    assert owner == [0, 0, 0, 1, 2, 2, 2] and masks is None
    for i, s in enumerate(samples):
        got = np.sort(np.concatenate([ix for o, ix in zip(owner, index) if o == i]))
        np.testing.assert_array_equal(got, np.arange(len(s["gene_ids"])))
    for v, ix, o in zip(views, index, owner):
        np.testing.assert_array_equal(v["gene_ids"][:len(ix)], samples[o]["gene_ids"][ix])
    emb = sample_embeddings(win, params, samples, batch=4, bucket=4)
    assert emb.shape == (3, 32) and np.all(np.isfinite(emb))
