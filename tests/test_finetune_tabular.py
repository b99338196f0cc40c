"""cfm.finetune response/survival on tabular data: losses against numpy and lifelines, the
fusion model with missing modalities, integrated-gradient completeness, bad inputs (exit 2,
nothing written) and a tiny end-to-end run on one ICB cohort."""

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from cfm.explain import attributions
from cfm.finetune import losses
from cfm.finetune.__main__ import main
from cfm.models.fusion import FusionModel, group_edges
from tests.conftest import ROOT, load_config


def _cox_numpy(risk, time, event):
    """Breslow negative log partial likelihood (sum), the textbook loop."""
    nll = 0.0
    for i in range(len(time)):
        if event[i]:
            nll -= risk[i] - np.log(np.sum(np.exp(risk[time >= time[i]])))
    return nll


def test_cox_loss_matches_numpy_with_ties_and_padding():
    rng = np.random.default_rng(0)
    t = np.round(rng.exponential(5, 40))  # many ties
    e = rng.integers(0, 2, 40).astype(float)
    r = rng.normal(size=40)
    cox = jax.jit(lambda r, t, e, w: losses.cox_neg_log_partial_likelihood(r, t, e, w, "sum"))
    ours = cox(r, t, e, np.r_[np.ones(40), np.zeros(5)][:40])
    assert float(ours) == pytest.approx(_cox_numpy(r, t, e), rel=1e-5)
    # padding rows (weight 0) change nothing, whatever their values
    w = np.r_[np.ones(40), np.zeros(5)]
    padded = cox(np.r_[r, rng.normal(size=5) * 9], np.r_[t, np.zeros(5)], np.r_[e, np.ones(5)], w)
    assert float(padded) == pytest.approx(float(ours), rel=1e-5)


def test_cox_loss_matches_lifelines():
    """At lifelines' fitted coefficients (no ties, so Efron = Breslow) our loss equals
    -log_likelihood_, and minimising ours gives the same coefficients."""
    from lifelines import CoxPHFitter
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 2))
    t = rng.exponential(1.0 / np.exp(x @ np.array([0.8, -0.5])))
    e = (rng.random(60) < 0.7).astype(float)
    df = pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "T": t, "E": e})
    cph = CoxPHFitter().fit(df, "T", "E")
    beta = cph.params_[["a", "b"]].to_numpy()
    f = jax.jit(jax.value_and_grad(lambda b: losses.cox_neg_log_partial_likelihood(
        jnp.asarray(x) @ b, jnp.asarray(t), jnp.asarray(e), reduction="sum")))
    value, grad = f(jnp.asarray(beta))
    assert float(value) == pytest.approx(-cph.log_likelihood_, rel=1e-5)
    # lifelines' fitted coefficients are the optimum of our loss: the gradient vanishes there
    # (and not at a perturbed point)
    np.testing.assert_allclose(np.asarray(grad), 0.0, atol=1e-3)
    assert np.abs(np.asarray(f(jnp.asarray(beta) + 0.1)[1])).max() > 0.1


def test_discrete_time_nll_matches_numpy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(30, 4))
    y = rng.integers(0, 4, 30)
    ev = rng.integers(0, 2, 30).astype(float)
    h = 1 / (1 + np.exp(-logits))
    s = np.cumprod(1 - h, axis=1)
    ref_full, ref_unc = [], []
    for i in range(30):
        s_prev = 1.0 if y[i] == 0 else s[i, y[i] - 1]
        unc = -(np.log(s_prev) + np.log(h[i, y[i]])) if ev[i] else 0.0
        cen = 0.0 if ev[i] else -np.log(s[i, y[i]])
        ref_full.append(unc + cen)
        ref_unc.append(unc)
    nll = jax.jit(lambda lg, y, ev, a: (losses.discrete_time_nll(lg, y, ev, alpha=a),
                                        losses.discrete_risk(lg)))
    for alpha in (0.0, 0.4):
        ref = np.mean((1 - alpha) * np.array(ref_full) + alpha * np.array(ref_unc))
        ours, risk = nll(logits, y, ev, alpha)
        assert float(ours) == pytest.approx(ref, rel=1e-5)
    np.testing.assert_allclose(np.asarray(risk), -s.sum(1), rtol=1e-5)
    edges = losses.survival_bins(np.arange(1.0, 101.0), np.ones(100), 4)
    np.testing.assert_allclose(edges, [25.75, 50.5, 75.25])
    assert list(losses.to_bins([1, 30, 99], edges)) == [0, 1, 3]


def _batch(b=5, g=12, c=3, n=6, dt=8):
    rng = np.random.default_rng(3)
    return {"omics": jnp.asarray(rng.normal(size=(b, g)), jnp.float32),
            "omics_mask": jnp.asarray([True, True, False, True, True]),
            **{k: jnp.asarray(v) for k, v in group_edges([range(0, 4), range(4, 12), [0, 5]],
                                                         16).items()},
            "clinical": jnp.asarray(rng.normal(size=(b, c)), jnp.float32),
            "clinical_mask": jnp.asarray(rng.random((b, c)) > 0.3),
            "tiles": jnp.asarray(rng.normal(size=(b, n, dt)), jnp.float32),
            "tile_mask": jnp.asarray(rng.random((b, n)) > 0.4).at[1].set(False)}


def test_fusion_model_with_each_modality_missing():
    model = FusionModel(n_out=3, dim=8, heads=2, depth=0, modality_dropout=0.5, n_groups=3)
    full = _batch()
    params = jax.jit(lambda b: model.init({"params": jax.random.key(0, impl="rbg")},
                                          b)["params"])(full)
    apply = jax.jit(lambda p, b: model.apply({"params": p}, b))
    ref = np.asarray(apply(params, full))
    assert ref.shape == (5, 3) and np.all(np.isfinite(ref))
    masks = {"omics": "omics_mask", "clinical": "clinical_mask", "tiles": "tile_mask"}
    for m, key in masks.items():  # the modality missing for every patient of the batch
        b = dict(full, **{key: jnp.zeros_like(full[key])})
        out = np.asarray(apply(params, b))
        assert np.all(np.isfinite(out)) and not np.allclose(out, ref), m
        # ... then its values are ignored
        junk = dict(b, **{m: full[m] * 0 + 50.0})
        np.testing.assert_allclose(np.asarray(apply(params, junk)), out, atol=1e-4)
    # patient 2 has no omics: its output must not depend on its omics values, patient 0's does
    out2 = np.asarray(apply(params, dict(full, omics=full["omics"].at[2].set(100.0))))
    np.testing.assert_allclose(ref[2], out2[2], atol=1e-5)
    out3 = np.asarray(apply(params, dict(full, omics=full["omics"].at[0].set(3.0))))
    assert not np.allclose(ref[0], out3[0])
    # (training with modality dropout, and batches without a tiles key at all, run in the
    # end-to-end test below: each extra variant here would cost another compile)


def test_integrated_gradients_completeness():
    model = FusionModel(n_out=1, dim=8, heads=2, depth=0, n_groups=3)
    batch = {k: v for k, v in _batch().items() if not k.startswith("tile")}
    params = jax.jit(lambda b: model.init({"params": jax.random.key(0, impl="rbg")},
                                          b)["params"])(batch)
    fixed = {k: v for k, v in batch.items() if k not in ("omics", "clinical")}

    def f(inp):
        return model.apply({"params": params}, dict(fixed, **inp))[:, 0]

    inputs = {"omics": batch["omics"], "clinical": batch["clinical"]}
    base = {k: jnp.zeros_like(v) for k, v in inputs.items()}
    ig = attributions.integrated_gradients(f, inputs, base, steps=64)
    f = jax.jit(f)
    gap = attributions.completeness_gap(f, inputs, base, ig)
    delta = np.asarray(f(inputs) - f(base))
    assert np.all(np.abs(gap) <= 0.02 * np.abs(delta) + 1e-4), (gap, delta)
    assert np.abs(ig["omics"][2]).max() == 0.0  # patient without omics: no omics attribution
    table = attributions.biomarker_table(np.c_[ig["omics"], ig["clinical"]],
                                         np.c_[inputs["omics"], inputs["clinical"]],
                                         [f"g{i}" for i in range(12)] + ["age", "sex", "tmb"],
                                         ["expr"] * 12 + ["clinical"] * 3)
    assert list(table["rank"]) == list(range(1, 16))
    assert table["mean_abs_ig"].is_monotonic_decreasing


def _cli(tmp_path, *overrides, preset="test", cfg="icb_response.py"):
    os.chdir(ROOT)
    return main(["x", "--config", f"configs/finetune/{cfg}:{preset}",
                 "--workdir", str(tmp_path / "run"), *overrides])


def test_bad_inputs_exit_2_and_write_nothing(shared_data, tmp_path, capsys):
    data = f"--config.data.path={shared_data}"
    hugo = pd.read_csv(shared_data / "icb" / "Hugo_clinical.csv.gz")["patientid"]
    unmatched = tmp_path / "unmatched.csv"
    pd.DataFrame({"patient_id": ["nobody_1", "nobody_2"], "label": [0, 1]}).to_csv(
        unmatched, index=False)
    one_class = tmp_path / "one_class.csv"
    pd.DataFrame({"patient_id": hugo, "label": 1}).to_csv(one_class, index=False)
    cases = [
        ([f"--config.data.labels={unmatched}"], "no features"),
        ([f"--config.data.labels={one_class}"], "same class"),
        (["--config.data.clinical=stage", "--config.modalities=clinical"],
         "missing for every patient"),
        (["--config.omics.encoder=/some/encoder"], "is neither a cfm.export folder"),
        (["--config.data.cohorts=Nathanson"], "unknown ICB cohort"),
        (["--config.modle.dim=3"], "bad command line"),
    ]
    for overrides, msg in cases:
        assert _cli(tmp_path, data, *overrides) == 2, overrides
        assert msg in capsys.readouterr().err, overrides
        assert os.listdir(tmp_path) == [p for p in os.listdir(tmp_path)
                                        if p.endswith(".csv")], overrides  # no run, no temp


def test_end_to_end_one_cohort(shared_data, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _cli(tmp_path, f"--config.data.path={shared_data}") == 0
    run = tmp_path / "run"
    res = json.loads((run / "results.json").read_text())
    unit = res["units"]["pooled"]
    assert res["n_patients"] == 27 and unit["n_splits"] == 3
    assert set(unit["models"]) == {"cfm_fusion", "logreg", "CD274", "IFNG6", "CYT"}
    for m in unit["models"].values():
        auc = m["auc"]
        assert 0 <= auc["value"] <= 1 and auc["low"] <= auc["value"] <= auc["high"]
    assert unit["explain"]["ig_completeness_max_abs_gap"] < 0.05
    cmp = unit["comparison"]  # which model wins and by how much
    aucs = {m: r["auc"]["value"] for m, r in unit["models"].items()}
    assert cmp["winner"] == max(aucs, key=aucs.get) and cmp["cfm_best"] == "cfm_fusion"
    assert cmp["best_baseline"] == max((m for m in aucs if m != "cfm_fusion"), key=aucs.get)
    d = cmp["difference"]
    assert np.isclose(d["value"], aucs["cfm_fusion"] - aucs[cmp["best_baseline"]])
    assert d["low"] <= d["value"] <= d["high"]
    assert f"difference {d['value']:+.3f}" in (run / "report.md").read_text()
    assert "best baseline" in res["summary_line"]
    for name in ("report.md", "roc_pooled.png", "calibration_pooled.png", "patient_reports.md",
                 "biomarkers_pooled.csv", "biomarkers_pooled.md", "config.json"):
        assert (run / name).stat().st_size > 0, name
    table = pd.read_csv(run / "biomarkers_pooled.csv")
    # the 64 most variable genes of each training fold (their union) + age, sex (stage and TMB
    # are absent in Hugo)
    assert 64 + 2 <= len(table) <= 3 * 64 + 2
    assert set(table["modality"]) == {"expr", "clinical"}
    assert "Patient" in (run / "patient_reports.md").read_text()
    # a second run without overwrite refuses and leaves the results alone
    before = (run / "results.json").read_text()
    assert _cli(tmp_path, f"--config.data.path={shared_data}") == 2
    assert "already holds results" in capsys.readouterr().err
    assert (run / "results.json").read_text() == before


def test_tcga_types_pooled_into_one_cohort(shared_data):
    """`data.cancer = "blca+luad+kirc"`: one cohort of the three types, with the features all
    three have, a type indicator per type but the first, and folds stratified by type."""
    from cfm.finetune import fusion_data, tabular_data
    kinds, clin = ["rnaseq", "cnv", "mut"], ["age", "sex_female", "stage"]
    parts = {t: tabular_data.load_tcga(str(shared_data), t, kinds, clin)
             for t in ("blca", "luad", "kirc")}
    pooled = tabular_data.load_tcga_pooled(str(shared_data), list(parts), kinds, clin)
    assert len(pooled) == sum(len(p) for p in parts.values())
    common = set.intersection(*(set(p.feature_names) for p in parts.values()))
    assert set(pooled.feature_names) == common and len(common) > 1500
    assert pooled.clinical_names == clin + ["type_LUAD", "type_KIRC"]
    at = 0
    for t, p in parts.items():  # rows stay in type order, values unchanged
        rows = slice(at, at + len(p))
        col = [p.feature_names.index(n) for n in pooled.feature_names]
        np.testing.assert_array_equal(pooled.omics[rows], p.omics[:, col])
        assert set(pooled.cohort[rows]) == {t.upper()}
        assert np.all(pooled.clinical[rows, 3] == (t == "luad"))
        assert np.all(np.isnan(pooled.clinical[rows, 2])) == (t != "blca")  # stage: BLCA only
        np.testing.assert_array_equal(pooled.time[rows], p.time)
        at += len(p)
    c = load_config("finetune/tcga_survival.py", "pooled")
    units, _ = fusion_data.evaluation_units(pooled, c)
    assert [u["name"] for u in units] == ["pooled"] and len(units[0]["splits"]) == 5
    for _, te in units[0]["splits"]:  # every fold holds every type
        assert set(pooled.cohort[te]) == {"BLCA", "LUAD", "KIRC"}
