"""A pretrained omics encoder in the fusion tasks (cfm.finetune.omics_encoder, encoder_tune,
fusion_probe) and a new ICB cohort named by config (tabular_data.read_icb_cohort).

The encoder is a tiny random `omics_test` model written as a safetensors export with its own
vocab.tsv / stats.json: loading, gene mapping and the frozen / tuned paths do not depend on
what it learned.
"""

import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from cfm import pretrained
from cfm.finetune import FinetuneError, omics_encoder, response, tabular_data
from cfm.finetune.encoder_tune import EncoderFusion, tune_spec
from cfm.finetune.fusion_data import prepare_features
from cfm.finetune.fusion_train import Trainer, pad_bucket
from cfm.finetune.losses import targets
from cfm.models.backbone import architecture
from cfm.models.fusion import FusionModel
from cfm.models.omics import OmicsTransformer
from tests.conftest import SHARED_DATA, load_config

N_BINS = 5


def write_encoder(folder, symbols, attend_tokens=0):
    """A random omics_test export whose vocabulary is `symbols` (ids 2..)."""
    os.makedirs(folder)
    model_cfg = {"variant": "omics_test", "vocab_size": len(symbols) + 2, "n_bins": N_BINS,
                 "gene_values": True, "attend_tokens": attend_tokens}
    module = OmicsTransformer("omics_test", vocab_size=len(symbols) + 2, n_bins=N_BINS,
                              gene_values=True, attend_tokens=attend_tokens)
    z = np.zeros((1, 4), np.int32)
    params = jax.jit(module.init)(jax.random.key(0), z + 2, z, z.astype(np.float32), z,
                                  z.astype(bool))
    params = jax.tree.map(np.asarray, nn.meta.unbox(params["params"]))
    save_file(pretrained.flatten(params), os.path.join(folder, pretrained.WEIGHTS_FILE))
    info = {"architecture": architecture(model_cfg), "export": {"format": "safetensors"},
            "preprocessing": {}, "provenance": {"step": 7}}
    with open(os.path.join(folder, pretrained.CONFIG_FILE), "w") as f:
        json.dump(info, f)
    with open(os.path.join(folder, "vocab.tsv"), "w") as f:
        f.write("id\tsymbol\tensembl\n0\t<pad>\t\n1\t<cls>\t\n")
        f.writelines(f"{i + 2}\t{s}\t\n" for i, s in enumerate(symbols))
    ids = list(range(2, len(symbols) + 2))
    stats = {"expression": {"transform": "none", "clip": 3.0, "genes": ids,
                            "mean": [0.0] * len(ids), "std": [1.0] * len(ids)},
             "bin_edges": [-1.0, -0.3, 0.3, 1.0], "n_bins": N_BINS}
    with open(os.path.join(folder, "stats.json"), "w") as f:
        json.dump(stats, f)
    return params


@pytest.fixture(scope="module")
def hugo():
    if not SHARED_DATA.is_dir():
        pytest.skip("shared data absent")
    return tabular_data.load_icb(str(SHARED_DATA), ["Hugo"], ["age", "sex_male"])


@pytest.fixture(scope="module")
def encoder(hugo, tmp_path_factory):
    """(export folder, its params): 36 of Hugo's genes + 12 unknown symbols, windows of 16."""
    folder = str(tmp_path_factory.mktemp("enc") / "enc")
    genes = hugo.feature_names[:36] + [f"NOT_A_GENE_{i}" for i in range(12)]
    return folder, write_encoder(folder, genes, attend_tokens=16)


def test_gene_mapping_coverage_and_normalisation(hugo, encoder):
    enc = omics_encoder.load_encoder(encoder[0])
    m = omics_encoder.map_features(hugo, enc, min_coverage=0.5)
    assert m["report"]["coverage"] == pytest.approx(36 / 48)
    assert m["report"]["mapped_features"] == 36
    assert [enc.genes[g - 2][0] for g in m["gene_ids"]] == [hugo.feature_names[c]
                                                            for c in m["columns"]]
    samples, mode = omics_encoder.patient_tokens(hugo, m, enc, "auto")
    assert mode == "cohort"  # ICB expression is not on the encoder's scale
    x = hugo.omics[:, m["columns"]].astype(np.float64)
    ref = np.clip((x - x.mean(0)) / x.std(0), -3.0, 3.0)
    order = np.argsort(m["gene_ids"])
    np.testing.assert_allclose(samples[4]["values"], ref[4, order], atol=1e-5)
    np.testing.assert_array_equal(samples[4]["classes"],
                                  np.searchsorted([-1.0, -0.3, 0.3, 1.0], ref[4, order], "right"))
    with pytest.raises(FinetuneError, match="coverage 75.0%.*min_coverage=0.9"):
        omics_encoder.map_features(hugo, enc, min_coverage=0.9)
    with pytest.raises(FinetuneError, match="not on the encoder's scale"):
        omics_encoder.patient_tokens(hugo, m, enc, "model")


def test_frozen_pipeline_reports_coverage_and_probe(encoder, tmp_path):
    c = load_config("finetune/icb_response.py", "test")
    c.data.path = str(SHARED_DATA)
    c.omics.encoder = encoder[0]
    c.explain.enabled = False
    c.baselines.names = "logreg"
    c.cv.k = 2
    c.omics.encoder_feature = "mean"  # the mean of the token outputs, read view by view
    os.makedirs(tmp_path / "w")
    r = response.run_pipeline(c, str(tmp_path / "w"), "t")
    assert r["encoder"]["coverage"] == 0.75 and r["encoder"]["normalisation"] == "cohort"
    assert r["encoder"]["feature"] == "mean"
    models = r["units"]["pooled"]["models"]
    assert {"cfm_fusion", "cfm_probe", "logreg"} <= set(models)
    assert 0.0 <= models["cfm_probe"]["auc"]["value"] <= 1.0


def test_last_k_tuning_keeps_the_frozen_blocks(hugo, encoder):
    folder, pre = encoder
    c = load_config("finetune/icb_response.py", "test")
    c.omics.encoder = folder
    c.omics.encoder_tune = "last_k"
    c.omics.encoder_last_k = 1
    c.modalities = "omics"
    c.train.lr = 1e-2
    data = hugo.subset(np.flatnonzero(np.isfinite(hugo.label)))
    enc = omics_encoder.encode(data, c, lambda m: None)
    enc["tuning"] = omics_encoder.tuning_arrays(enc["samples"], 16)
    train = np.arange(len(data))
    feats = prepare_features(data, train, c, 0, enc)
    assert "omics" not in feats and feats["enc_gene_ids"].shape[:2] == (len(data), 3)
    assert enc["cls"].shape == (len(data), 32) and np.all(np.isfinite(enc["cls"]))
    spec = tune_spec(c, enc["encoder"].depth)
    assert spec == (2, 0.75, 1)
    model = EncoderFusion(backbone=enc["encoder"].module, fusion=FusionModel(dim=8, heads=2,
                                                                            depth=0))
    tr = Trainer(model, "binary", c, targets(data, "binary", None), feats,
                 pad_bucket(len(data)), backbone=enc["encoder"].params, tune=spec)
    params, _ = tr.fit(train, data.label.astype(int), 0)
    got = jax.tree.map(np.asarray, params["backbone"])
    for name in ("block_0", "gene_embed", "value_in", "cls_token"):  # below the last block
        jax.tree.map(np.testing.assert_array_equal, got[name], pre[name])
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), got["block_1"],
                                         pre["block_1"]))
    assert max(moved) > 1e-4  # the last block trained


def test_new_cohort_by_config(shared_data, tmp_path):
    icb = tmp_path / "icb"
    icb.mkdir()
    for kind in ("expression", "clinical"):
        shutil.copy(shared_data / "icb" / f"Hugo_{kind}.csv.gz",
                    icb / f"MyClinic_{kind}.csv.gz")
    new = tabular_data.load_icb(str(tmp_path), ["MyClinic"], ["age", "sex_male"])
    ref = tabular_data.load_icb(str(shared_data), ["Hugo"], ["age", "sex_male"])
    np.testing.assert_array_equal(new.omics, ref.omics)
    np.testing.assert_array_equal(new.label, ref.label)
    assert set(new.cohort) == {"MyClinic"} and tabular_data.icb_cohorts(str(tmp_path)) == [
        "MyClinic"]
    with pytest.raises(FinetuneError, match=r"unknown ICB cohort 'Other'.*\['MyClinic'\]"):
        tabular_data.load_icb(str(tmp_path), ["Other"], ["age"])


def test_member_spread_is_each_members_auc(hugo):
    from sklearn.metrics import roc_auc_score
    from cfm.finetune.fusion_report import member_spread
    data = hugo.subset(np.flatnonzero(np.isfinite(hugo.label)))
    rows = np.arange(len(data))
    m = np.random.default_rng(0).normal(size=(len(data), 3))
    s = member_spread(data, rows, {int(r): m[r] for r in rows}, "binary")
    ref = [roc_auc_score(data.label, m[:, j]) for j in range(3)]
    np.testing.assert_allclose(s["values"], ref, atol=1e-4)
    assert s["sd"] == pytest.approx(np.std(ref, ddof=1))
    assert member_spread(data, rows, {int(r): m[r, :1] for r in rows}, "binary") is None
