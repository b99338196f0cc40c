"""cfm.federated model.kind=mgm: continued masked-gene pretraining of an omics export across
sites. A tiny export (configs/omics_mgm.py:test's model on a prepared table) is continued on
three CSV sites through the real ServerApp loop and ClientApp on the in-process Grid: the
held-out masked loss falls at every site, the logged losses are the sites' own, nothing but
updates and two numbers leaves a site, the final export loads like a cfm.train export, and a
config without an (omics) export is refused in one line."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pandas as pd
import pytest

import cfm
from cfm import compat, config_loader, export
from cfm.federated import __main__ as fed_main
from cfm.federated import client, grid, pretrain, server
from cfm.ssl import mgm
from data_prep import prepare_omics
from tests.conftest import ROOT, load_config

SPEC = "configs/federated.py:mgm_test"
SITES = ("a", "b", "c")
GENES = 16


def _table(rng, n: int, shift: float, prefix: str) -> pd.DataFrame:
    """Expression of GENES genes driven by 2 factors (predictable from each other), 4 mutation
    and 4 copy-number columns; patients `prefix-k`."""
    load = np.random.default_rng(7).normal(size=(2, GENES))
    z = rng.normal(size=(n, 2)) + shift
    expr = z @ load + 0.3 * rng.normal(size=(n, GENES))
    df = pd.DataFrame(expr, columns=[f"G{j}_rnaseq" for j in range(GENES)])
    for j in range(4):
        df[f"G{j}_mut"] = (expr[:, j] > 1.0).astype(int)
        df[f"G{j + 4}_cnv"] = np.clip(np.round(expr[:, j + 4]), -2, 2).astype(int)
    df.insert(0, "patient_id", [f"PATIENT-{prefix}-{k:03d}" for k in range(n)])
    return df


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """(site tables folder, tiny export, federated result, grid, config)."""
    d = tmp_path_factory.mktemp("mgm_sites")
    rng = np.random.default_rng(0)
    _table(rng, 60, 0.0, "pool").to_csv(d / "pool.csv", index=False)
    for i, s in enumerate(SITES):
        _table(rng, 30, 0.5 * i, s).to_csv(d / f"{s}.csv", index=False)
    prep = d / "pool_prepared"
    assert prepare_omics.main(["--input", str(d / "pool.csv"), "--out", str(prep),
                               "--expression-transform", "none",
                               "--patient-column", "patient_id"]) == 0
    c = load_config("omics_mgm.py", "test")
    c.data.source, c.data.path = "prepared", str(prep)
    c = mgm.OBJECTIVE.prepare_config(c)
    models = mgm.OBJECTIVE.build_models(c)
    params = jax.jit(lambda k: mgm.OBJECTIVE.init_params(c, models, k))(jax.random.key(1))
    exp = d / "export"
    export.write_export(str(exp), c.to_dict(), jax.tree.map(
        np.asarray, nn.meta.unbox(params["backbone"])), 0)
    ov = [f"--config.data.path={d}", f"--config.model.init_from={exp}"]
    res, g, config = federate(SPEC, {s: ov for s in SITES}, d / "fed")
    return d, exp, res, g, config, d / "fed"


def federate(spec: str, overrides: dict, work) -> tuple:
    """(result, grid, config) of cfm.federated's server loop in `work` on the in-process grid,
    site k of `overrides` ({site: its --config overrides}) node 100 + k; the server reads the
    first site's overrides."""
    g = grid.LocalGrid({100 + i: (client.app, {"cfm-config": spec, "site": s,
                                               "cfm-overrides": " ".join(ov)})
                        for i, (s, ov) in enumerate(overrides.items())})
    config = config_loader.load_config(spec, next(iter(overrides.values())))
    return server.run_server(g, config, str(work), log=lambda m: None), g, config


def test_heldout_masked_loss_falls_at_every_site(setting):
    d, _, res, _, config, work = setting
    hist = [json.loads(ln) for ln in open(work / "history.jsonl")]
    assert [h["round"] for h in hist] == [0, 1, 2, 3, 4]
    first, last = hist[0]["heldout_loss"], hist[-1]["heldout_loss"]
    assert sorted(first) == ["100", "101", "102"]
    for node in first:
        assert last[node] < first[node] - 0.05, (node, first[node], last[node])
    # the logged loss of node 100 is site a's held-out loss of the final global model
    site = pretrain.site_data(config, "a")
    assert site.n + site.n_heldout == 30 and site.n_heldout > 0
    np.testing.assert_allclose(last["100"], pretrain.heldout_loss(
        config, res["params"], site)["loss"], rtol=1e-5)
    # ... and a hand-made masked MSE on its expression tokens is what mgm.objective averages
    src = pretrain.source(config)
    b = site.heldout
    mask = mgm.sample_value_mask(jax.random.split(pretrain.prng_key(pretrain.EVAL_SEED))[0],
                                 b["gene_ids"], src.mgm_config.mgm.mask_ratio)
    _, pred = jax.jit(lambda p, m: mgm.forward(src.models.backbone, src.models.mgm_head, p, b,
                                               m))(res["params"], mask)
    sel = np.asarray(mask) & (b["modality"] == mgm.EXPRESSION)
    mse = np.mean((np.asarray(pred["expression"])[..., 0][sel] - b["values"][sel]) ** 2)
    np.testing.assert_allclose(mse, pretrain.heldout_loss(config, res["params"], site)
                               ["expression"], rtol=1e-4)


def test_only_updates_and_counts_leave_a_site(setting):
    d, _, _, g, _, _ = setting
    out = [m for direction, _, _, m in g.log if direction == "from_site"]
    assert len(out) == 3 * 4 + 3 * 5  # train replies of 4 rounds, evaluations of rounds 0-4
    raws = [raw for direction, _, raw, _ in g.log if direction == "from_site"]
    for m, raw in zip(out, raws):
        keys = set(m.content["metrics"].keys())
        assert keys in ({"num-examples", "train_loss"}, {"num-examples", "heldout_loss"})
        assert b"PATIENT" not in raw


def test_final_export_loads_like_a_cfm_train_export(setting, tmp_path):
    from cfm.omics_embed import embed_omics

    d, exp, res, _, _, work = setting
    out = res["export"]
    assert out == str(work / "export")
    model, params = cfm.load_pretrained(out)
    jax.tree.map(np.testing.assert_array_equal, params, res["params"]["backbone"])
    info = json.loads(open(os.path.join(out, "config.json")).read())
    assert info["provenance"]["federated"]["rounds"] == 4
    assert info["architecture"] == json.loads(open(exp / "config.json").read())["architecture"]
    prep = tmp_path / "a_prepared"
    assert prepare_omics.main(["--input", str(d / "a.csv"), "--out", str(prep),
                               "--vocab", os.path.join(out, "vocab.tsv"),
                               "--expression-transform", "none"]) == 0
    assert "match" in compat.check_omics(compat.model_spec(out), str(prep))
    assert embed_omics(out, str(prep), str(tmp_path / "emb")) == 30


@pytest.mark.parametrize("init_from, needle", [
    ("", "config.model.init_from is empty"),
    ("tests/fixtures/v0_1/dino_export", "a vit export"),
    ("/nonexistent/export", "does not exist"),
])
def test_bad_init_from_is_refused_in_one_line(init_from, needle, tmp_path, capsys):
    assert_refused(SPEC, init_from, needle, tmp_path, capsys)


def assert_refused(spec: str, init_from: str, needle: str, tmp_path, capsys) -> None:
    """`python -m cfm.federated local` of `spec` with model.init_from `init_from` (a path
    under tests/ is taken from the repository root) exits 2 with one line holding `needle`,
    before it makes the workdir."""
    path = str(ROOT / init_from) if init_from.startswith("tests") else init_from
    rc = fed_main.main(["cfm.federated", "local", "--config", spec, "--workdir",
                        str(tmp_path / "w"), f"--config.model.init_from={path}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and "\n" not in err, err
    assert not (tmp_path / "w").exists()
