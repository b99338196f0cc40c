"""Slide–omics alignment: the chunked sigmoid loss equals the whole-matrix one (values and
gradients, 1, 2 and 8 devices), pair records, bad pairs, the objective's step on a sharded mesh
equals 1 device, frozen omics, exact resume, export and load, retrieval recall."""

import csv
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

import cfm
from cfm import setup, train
from cfm.data import paired_pipeline
from cfm.data.paired_records import decode_pair, encode_pair
from cfm.evals.align import recall_at_k
from cfm.ssl import align, sigmoid_loss
from data_prep import paired, paired_synthetic
from tests.conftest import load_config


def _reference_loss(x, y, t_prime, bias):
    """SigLIP's loss written out in numpy (Zhai et al. 2023, Algorithm 1)."""
    logits = np.exp(t_prime) * x @ y.T + bias
    z = 2 * np.eye(len(x)) - 1
    return np.sum(np.logaddexp(0, -z * logits)) / len(x)


@pytest.mark.parametrize("n", [1, 2, 8])
def test_chunked_sigmoid_loss_equals_whole_matrix(n):
    rng = np.random.default_rng(n)
    x, y = (rng.normal(size=(16, 8)).astype(np.float32) for _ in range(2))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    args = (x, y, jnp.float32(np.log(5.0)), jnp.float32(-3.0))
    whole = jax.value_and_grad(sigmoid_loss.sigmoid_loss, argnums=(0, 1, 2, 3))(*args)
    np.testing.assert_allclose(whole[0], _reference_loss(x, y, np.log(5.0), -3.0), rtol=1e-5)
    mesh = Mesh(np.array(jax.devices()[:n]).reshape(n, 1), ("data", "fsdp"))
    fn = lambda *a: sigmoid_loss.chunked_sigmoid_loss(*a, mesh, ("data", "fsdp"))  # noqa
    with jax.set_mesh(mesh):
        chunked = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(*args)
    np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-5)
    for a, b in zip(chunked[1], whole[1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_recall_at_k_against_a_direct_count():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 4))
    y = x + rng.normal(scale=0.7, size=x.shape)
    r = recall_at_k(x, y, ks=(1, 5))
    sim = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (
        y / np.linalg.norm(y, axis=1, keepdims=True)).T
    top5 = np.argsort(-sim, axis=1)[:, :5]
    assert r["s2o@5"] == np.mean([i in top5[i] for i in range(20)])
    assert r["s2o@1"] == np.mean(sim.argmax(1) == np.arange(20))
    assert r["o2s@1"] == np.mean(sim.argmax(0) == np.arange(20))
    assert r["chance@5"] == 0.25


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "p"
    paired_synthetic.generate(str(out), patients=32, grid=5, n_genes=24, dim=16)
    return out


def test_pair_records_round_trip_and_the_program_follows_composition(pairs):
    omics = {"gene_ids": np.arange(2, 6), "modality": np.zeros(4), "values": np.ones(4),
             "classes": np.zeros(4)}
    meta, arr = decode_pair(encode_pair({"pair": 3}, np.ones((2, 5)), np.zeros((2, 2)), omics))
    assert meta == {"pair": 3} and arr["bag"].shape == (2, 5)
    with pytest.raises(ValueError, match="empty"):
        encode_pair({"pair": 1}, np.zeros((0, 5)), np.zeros((0, 2)), omics)
    metas, arrays = paired_pipeline.read_split(str(pairs), "train", 32, 24)
    assert not any("patient" in k or "slide" in k for m in metas for k in m)
    # EPCAM (gene 0) follows the tumour fraction (synthetic_tme.GENES: +2.5 on the log scale)
    frac = np.array([m["frac"][0] for m in metas])
    assert np.corrcoef(frac, arrays["values"][:, 0])[0, 1] > 0.5
    rows = list(csv.DictReader(open(pairs / "private" / "pairs.csv")))
    assert len(rows) == 32 and rows[0]["patient_id"].startswith("pt")


def test_bad_pairs_error_or_are_counted(tmp_path, capsys):
    from data_prep import prepare_omics
    from tests.test_prepare_omics import multiomics

    emb = tmp_path / "emb"
    emb.mkdir()
    np.save(emb / "embeddings-00000-of-00001.npy", np.ones((3, 4), np.float32))
    (emb / "index.csv").write_text("file,row,slide_id,x,y\n"
                                   "embeddings-00000-of-00001.npy,0,sA,0,0\n"
                                   "embeddings-00000-of-00001.npy,1,sA,64,0\n"
                                   "embeddings-00000-of-00001.npy,2,sB,0,0\n")
    table = tmp_path / "omics.csv"
    multiomics(6).to_csv(table, index=False)  # patients S000 ... S005
    om = tmp_path / "om"
    assert prepare_omics.main(["--input", str(table), "--out", str(om),
                              "--expression-transform", "signed_log1p"]) == 0
    slides = tmp_path / "slides.csv"
    slides.write_text("slide_id,patient_id\nsA,S000\nsB,S001\nsC,S002\nsD,NOPE\n")
    args = ["--embeddings", str(emb), "--omics", str(om), "--slides", str(slides)]
    capsys.readouterr()
    # the first bad row stops the run, named, on one line (sC has no tiles: an empty bag)
    assert paired.main(args + ["--out", str(tmp_path / "p1")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "line 4" in err and "no tiles" in err and "--skip-bad" in err
    assert not (tmp_path / "p1").exists()
    # --skip-bad: skipped and counted (no omics for sD; S003-S005 have omics but no slide)
    m = paired.join(str(emb), str(om), str(slides), str(tmp_path / "p2"), skip_bad=True)
    assert m["skipped"] == {"empty_bag": 1, "no_omics": 1, "no_slide": 3}
    assert sum(v["pairs"] for v in m["splits"].values()) == 2
    # a pairs folder is not an omics folder
    with pytest.raises((paired.PairError, ValueError)):
        paired.join(str(emb), str(tmp_path / "p2"), str(slides), str(tmp_path / "p3"))


def _cfg(path, **over):
    c = load_config("align.py", "test")
    c.data.path = str(path)
    for k, v in over.items():
        node = c
        *parents, last = k.split(".")
        for p in parents:
            node = node[p]
        node[last] = v
    return c


# The resume test's run: the sharded test's 8-device init and step are the same programs, so the
# resume test's three runs find them in the session's compilation cache (tests/conftest.py).
# Frozen omics (a pretrained MGM encoder kept fixed): one 1-device reference then checks both the
# sharded step and the freezing, and compiles in half the time (no omics backward pass). The
# omics backward on a mesh is checked by tests/test_align_multiprocess.py (1 x 4 == 2 x 2).
RUN = {"mesh.data": -1, "total_steps": 8, "evals.retrieval.every": 0,
       "align.freeze_omics": True}


@pytest.fixture(scope="module")
def first_step(pairs):
    """(setup, initial params as numpy, first batch, its dropout key's data, metrics) of the
    trainer's first step on 8 devices (the chunked loss round 8 devices)."""
    s = setup.setup(_cfg(pairs, **RUN), jax.devices())
    state = setup.create_state(s)
    params = jax.device_get(state.params)
    rng = np.asarray(jax.random.key_data(jax.random.fold_in(state.rng, state.step)))
    batch = next(s.objective.batches(s.config, 0, 0, 1))
    with jax.set_mesh(s.mesh):
        _, out = s.step(state, setup.global_batch(s, batch))
    return s, params, batch, rng, jax.device_get(out)


def test_sharded_step_equals_one_device_and_frozen_omics_stay(first_step):
    """The trainer's first step on 8 devices (chunked loss) == the objective's loss and
    gradient on one device without a mesh (whole-matrix loss), same dropout key; frozen omics
    get no gradient and are put back after the optimiser step."""
    s, params, batch, rng, out8 = first_step
    fn = lambda p: align.loss(s.config, s.models, p, SimpleNamespace(params=params),  # noqa
                              batch, {}, jax.random.wrap_key_data(rng))
    (_, aux), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
    m = aux["metrics"]
    for k in ("loss", "sigmoid", "recon_mse"):
        np.testing.assert_allclose(out8[k], m[k], rtol=1e-4, atol=1e-5, err_msg=k)
    np.testing.assert_allclose(out8["grad_norm"], optax.tree.norm(grads), rtol=1e-4)
    assert all(not np.any(g) for g in jax.tree.leaves(grads["omics"]))
    assert any(np.any(g) for g in jax.tree.leaves(grads["backbone"]))
    # after the optimiser step (AdamW's weight decay moves every parameter) the omics go back
    moved = s.abstract_state.replace(params=jax.tree.map(lambda x: x + 1.0, params))
    back, _ = align.after_update(s.config, moved, aux, {})
    jax.tree.map(np.testing.assert_array_equal, back.params["omics"], params["omics"])
    np.testing.assert_array_equal(back.params["heads"]["bias"], params["heads"]["bias"] + 1)


def test_resume_is_exact_and_the_run_exports(pairs, tmp_path, first_step):
    c = lambda steps: _cfg(pairs, **dict(RUN, total_steps=steps))  # noqa: E731
    train.train(c(8), str(tmp_path / "straight"))
    train.train(c(4), str(tmp_path / "resumed"))
    train.train(c(8), str(tmp_path / "resumed"))
    read = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text(
        ).splitlines() if '"loss"' in x]  # noqa: E731
    a, b = read("straight"), read("resumed")
    assert [h["step"] for h in a] == [h["step"] for h in b] == [2, 4, 6, 8]
    for x, y in zip(a, b):
        np.testing.assert_allclose(x["loss"], y["loss"], rtol=1e-6)
    _exports_and_loads_back(str(tmp_path / "straight"), tmp_path, first_step[1]["omics"])


def _exports_and_loads_back(workdir, tmp_path, omics_init):
    """cfm.export writes the slide family (encoder + both projections + the omics encoder) and
    cfm.load_pretrained / read_export / read_align_heads read it back."""
    from cfm import checkpoint, export, pretrained

    ckpt = checkpoint.read_config(workdir)
    want = checkpoint.read_trees(ckpt, ("params",))["params"]
    # frozen: 8 steps of AdamW (weight decay included) left the omics encoder as initialised
    jax.tree.map(np.testing.assert_array_equal, want["omics"], omics_init)
    out = str(tmp_path / "export")
    info = export.export(workdir, out, "safetensors")
    assert info["architecture"]["family"] == "slide"
    _, params = pretrained.read_export(out)
    jax.tree.map(np.testing.assert_array_equal, params, want["backbone"])
    extra = pretrained.read_align_heads(out)
    jax.tree.map(np.testing.assert_array_equal, extra["heads"], want["heads"])
    jax.tree.map(np.testing.assert_array_equal, extra["omics"], want["omics"])
    with pytest.raises(export.ExportError, match="timm"):
        export.export(workdir, str(tmp_path / "timm"), "timm")
    model, params = cfm.load_pretrained(out)
    assert model.width == info["architecture"]["width"]
    jax.tree.map(np.testing.assert_array_equal, params, want["backbone"])


def test_config_errors_name_the_key(tmp_path):
    from cfm.config_check import ConfigError

    with pytest.raises(ConfigError, match="data.path"):
        align.prepare_config(_cfg(tmp_path))
