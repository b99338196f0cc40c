"""cfm.federated model.kind=dino: continued DINOv2 pretraining of a ViT export across sites. A
tiny export (configs/dino_vit.py:test's vit_test, fresh weights) is continued on two tile
sites (ArrayRecord shards as data_prep.tile_wsi writes them, and a folder of PNG tiles) through
the real ServerApp loop and ClientApp on the in-process Grid: the held-out DINOv2 loss is
finite and logged per site each round and equals the site's own computation on the final
state, the aggregate is the sites' weighted mean, nothing but the state and two numbers leaves
a site (no tile or slide name), the final export loads and embeds, and a config without a ViT
export is refused in one line."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

import cfm
from cfm import export
from cfm.checkpoint import flatten, unflatten
from cfm.data.sources import SyntheticSource
from cfm.federated import dino
from cfm.federated import model as fmodel
from cfm.models.backbone import abstract_params, architecture
from cfm.ssl import dinov2
from tests.test_federated_pretrain import assert_refused, federate
from tests.test_pipeline import _write_shards
from tests.test_train import _tiny

SPEC = "configs/federated.py:dino_test"
N_TILES = 12  # per site: 4 held out (one batch of train.batch_size), 8 train


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """(sites folder, tiny export, federated result, grid, config, workdir)."""
    d = tmp_path_factory.mktemp("dino_sites")
    synth = SyntheticSource(2 * N_TILES, 48, seed=5)
    _write_shards(d / "a" / "part0", [synth[i] for i in range(N_TILES)], per_shard=6)
    os.makedirs(d / "b")
    for i in range(N_TILES):  # a tile folder (data.tile_source=folder reads it too)
        Image.fromarray(synth[N_TILES + i]).save(d / "b" / f"SLIDE-B-{i:03d}.png")
    c = dinov2.OBJECTIVE.prepare_config(_tiny())
    rng = np.random.default_rng(1)  # random vit_test weights (no compile), LayerNorm scales 1
    shapes = abstract_params(architecture(c.model.to_dict()))
    params = {k: (np.ones(v.shape) if k.endswith("scale") else 0.1 * rng.standard_normal(
        v.shape)).astype(np.float32) for k, v in flatten(shapes).items()}
    exp = d / "export"
    export.write_export(str(exp), c.to_dict(), unflatten(params), 0)
    ov = {"a": [f"--config.data.path={d}", f"--config.model.init_from={exp}"]}
    ov["b"] = ov["a"] + ["--config.data.tile_source=folder"]
    work = d / "fed"
    res, g, config = federate(SPEC, ov, work)
    return d, exp, res, g, config, work


def test_heldout_loss_is_finite_and_logged_per_site(setting):
    d, _, res, g, config, work = setting
    hist = [json.loads(ln) for ln in open(work / "history.jsonl")]
    assert [h["round"] for h in hist] == [0, 1, 2]
    for h in hist:
        assert sorted(h["heldout_loss"]) == ["100", "101"]
        assert all(np.isfinite(v) and v > 0 for v in h["heldout_loss"].values())
    # node 100's logged loss is site a's held-out DINOv2 loss of the final global state
    site = dino.site_data(config, "a")
    assert (site.n, site.n_heldout, len(site.heldout)) == (8, 4, 1)
    np.testing.assert_allclose(hist[-1]["heldout_loss"]["100"], dino.heldout_loss(
        config, res["params"], site)["loss"], rtol=1e-5)
    for node, first in hist[0]["heldout_loss"].items():  # measured 10.49 -> 8.37, 10.56 -> 8.40
        assert hist[-1]["heldout_loss"][node] < first - 0.5, (node, hist)
    # round 0's state: the export's backbone in student and teacher, fresh identical heads
    p0 = dino.init_params(config)
    _, exported = cfm.load_pretrained(str(setting[1]))
    jax.tree.map(np.testing.assert_array_equal, p0["student"]["backbone"], exported)
    jax.tree.map(np.testing.assert_array_equal, p0["teacher"], p0["student"])


def test_aggregate_is_the_weighted_mean_of_the_site_states(setting):
    _, _, res, g, _, _ = setting
    last = [m for direction, _, _, m in g.log if direction == "from_site"
            and m.metadata.group_id == "2"]
    assert len(last) == 2
    states = [fmodel.flatten(fmodel.from_record(m.content["arrays"])) for m in last]
    n = np.array([m.content["metrics"]["num-examples"] for m in last], float)
    final = fmodel.flatten(res["params"])
    assert {k.split(".")[0] for k in final} == {"student", "teacher", "centers"}
    for k, v in final.items():  # FedAvg: the patient- (here tile-) weighted mean
        np.testing.assert_allclose(v, sum(w * s[k] for w, s in zip(n / n.sum(), states)),
                                   rtol=1e-5, atol=1e-6)


def test_only_states_and_counts_leave_a_site(setting):
    _, _, _, g, _, _ = setting
    out = [(raw, m) for direction, _, raw, m in g.log if direction == "from_site"]
    assert len(out) == 2 * 2 + 2 * 3  # train replies of 2 rounds, evaluations of rounds 0-2
    for raw, m in out:
        assert set(m.content["metrics"].keys()) in ({"num-examples", "train_loss"},
                                                    {"num-examples", "heldout_loss"})
        assert b"SLIDE" not in raw and b"array_record" not in raw and b".png" not in raw


def test_final_export_loads_and_embeds(setting, tmp_path):
    from cfm import embed

    d, exp, res, _, _, work = setting
    out = res["export"]
    assert out == str(work / "export")
    model, params = cfm.load_pretrained(out)
    jax.tree.map(np.testing.assert_array_equal, params, res["params"]["teacher"]["backbone"])
    info = json.loads(open(os.path.join(out, "config.json")).read())
    assert info["provenance"]["federated"]["rounds"] == 2
    assert info["provenance"]["step"] == 2 * 2
    assert info["architecture"] == json.loads(open(exp / "config.json").read())["architecture"]
    assert embed.main(["--model", out, "--shards", str(d / "a"), "--out",
                       str(tmp_path / "emb"), "--batch", "4"]) == 0
    x = np.load(next((tmp_path / "emb").glob("embeddings-*.npy")), allow_pickle=False)
    assert x.shape == (N_TILES, 32) and np.isfinite(x).all()


def test_bad_init_from_is_refused_in_one_line(tmp_path, capsys):
    """Unset, an omics workdir, a missing path: one line each, no workdir made."""
    for i, (init_from, needle) in enumerate([
            ("", "config.model.init_from is empty"),
            ("tests/fixtures/v0_1/mgm", "a omics workdir; DINOv2 continues a ViT export"),
            ("/nonexistent/export", "does not exist")]):
        assert_refused(SPEC, init_from, needle, tmp_path / str(i), capsys)
