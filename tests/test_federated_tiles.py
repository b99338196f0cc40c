"""cfm.federated data.source=tiles: a linear tile probe trained across three sites of tile
embeddings (cfm.embed --out folders) through the real ServerApp loop and ClientApp on the
in-process Grid reaches scikit-learn's pooled multinomial logistic regression; the held-out
split keeps slides whole; the logged held-out accuracy is the sites' own; nothing but the
head's parameters and counts leaves a site; a site folder without labels is refused in one
line."""

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from cfm import config_loader
from cfm.evaluate.metrics import accuracy
from cfm.federated import __main__ as fed_main
from cfm.federated import client, grid, server, tiles
from cfm.federated.model import flatten
from cfm.federated.sites import FederatedError
from cfm.finetune.probe import predict_linear
from tests.test_finetune_slide import write_embeddings

SPEC = "configs/federated.py:tiles_test"
SITES = ("a", "b", "c")
CLASSES = ("background", "immune", "stroma", "tumour")
DIM = 6


def _site_tiles(rng, means, shift, site, n_slides=8, per_slide=10):
    feats, meta = [], []
    for s in range(n_slides):
        for t in range(per_slide):
            c = rng.integers(len(CLASSES))
            feats.append(means[c] + shift + rng.normal(0, 1.0, DIM))
            meta.append({"slide_id": f"SLIDE-{site}-{s:02d}", "x": 64 * t, "y": 0,
                         "label": CLASSES[c]})
    return np.array(feats, np.float32), meta


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """(sites folder, {site: (features, metadata)}, result, grid, config, workdir)."""
    d = tmp_path_factory.mktemp("tile_sites")
    rng = np.random.default_rng(0)
    means = rng.normal(0, 1.2, (len(CLASSES), DIM))
    data = {}
    for i, s in enumerate(SITES):
        x, meta = _site_tiles(rng, means, 0.3 * i, s)
        write_embeddings(d / s, x, meta)
        data[s] = (x, meta)
    (d / "nolabel").mkdir()
    write_embeddings(d / "nolabel", data["a"][0], [{k: v for k, v in m.items() if k != "label"}
                                                   for m in data["a"][1]])
    ov = [f"--config.data.path={d}"]
    g = grid.LocalGrid({100 + i: (client.app, {"cfm-config": SPEC, "cfm-overrides": " ".join(ov),
                                               "site": s}) for i, s in enumerate(SITES)})
    config = config_loader.load_config(SPEC, ov)
    work = d / "fed"
    res = server.run_server(g, config, str(work), log=lambda m: None)
    return d, data, res, g, config, work


def _ce(params, x, y):
    p = predict_linear(params, x).astype(np.float64)
    return float(-np.mean(np.log(p[np.arange(len(y)), y])))


def test_reaches_the_pooled_probe_and_logs_the_sites_heldout_accuracy(setting):
    _, data, res, _, config, work = setting
    sites = {s: tiles.site_data(config, s) for s in SITES}
    code = {c: i for i, c in enumerate(CLASSES)}
    ys = {s: np.array([code[m["label"]] for m in data[s][1]]) for s in SITES}
    for s, site in sites.items():  # whole slides on each side, a quarter of them held out
        slides = np.array([m["slide_id"] for m in data[s][1]])
        held = set(slides[site.rows_heldout])
        assert len(held) == 2 and not held & set(slides[site.rows])
        assert site.n + site.n_heldout == len(slides)
    x = np.concatenate([data[s][0][sites[s].rows] for s in SITES])
    y = np.concatenate([ys[s][sites[s].rows] for s in SITES])
    ref = LogisticRegression(C=1 / (0.05 * len(x)), tol=1e-10, max_iter=10000).fit(x, y)
    ref_params = {"linear": {"kernel": ref.coef_.T, "bias": ref.intercept_}}
    fed = res["params"]
    np.testing.assert_allclose(predict_linear(fed, x), ref.predict_proba(x), atol=0.01)
    assert _ce(fed, x, y) == pytest.approx(_ce(ref_params, x, y), abs=1e-3)
    hist = [json.loads(ln) for ln in open(work / "history.jsonl")]
    assert [h["round"] for h in hist] == list(range(0, 81))
    assert hist[0]["heldout_accuracy"] == {"100": pytest.approx(0.25, abs=0.25),
                                           "101": pytest.approx(0.25, abs=0.25),
                                           "102": pytest.approx(0.25, abs=0.25)}
    last = hist[-1]
    for node, s in zip(("100", "101", "102"), SITES):
        xh, yh = data[s][0][sites[s].rows_heldout], ys[s][sites[s].rows_heldout]
        mine = accuracy(yh, predict_linear(fed, xh).argmax(1))
        assert last["heldout_accuracy"][node] == pytest.approx(mine, abs=1e-6)
        assert abs(mine - accuracy(yh, ref.predict(xh))) <= 0.05
        assert last["heldout_loss"][node] == pytest.approx(_ce(fed, xh, yh), rel=1e-4)
    assert last["heldout_accuracy_mean"] > 0.6 > hist[0]["heldout_accuracy_mean"]
    assert json.load(open(work / "result.json"))["final_heldout_balanced_accuracy_mean"] == \
        last["heldout_balanced_accuracy_mean"]


def test_only_the_head_and_counts_leave_a_site(setting):
    _, data, res, g, _, _ = setting
    out = [(raw, m) for direction, _, raw, m in g.log if direction == "from_site"]
    assert len(out) == 3 * 80 + 3 * 81  # train replies, evaluations of rounds 0-80
    names = set(flatten(res["params"]))
    for raw, m in out:
        keys = set(m.content["metrics"].keys())
        assert keys in ({"num-examples", "train_loss"},
                        {"num-examples", *tiles.METRICS})
        if "train_loss" in keys:
            assert set(m.content["arrays"].keys()) == names
        else:
            assert set(m.content.keys()) == {"metrics"}
        assert b"SLIDE" not in raw
        for s in SITES:
            assert f"-{s}-".encode() not in raw
            for row in data[s][0][:20]:
                assert row.tobytes() not in raw


def test_site_without_labels_is_refused_in_one_line(setting, capsys):
    d = setting[0]
    ov = f"--config.data.path={d}"
    with pytest.raises(FederatedError, match="site 'nolabel' has no data.*'label' column"):
        client.load_site(SPEC, ov, "nolabel")
    assert fed_main.main(["cfm.federated", "client", "--config", SPEC, ov,
                          "--site", "nolabel"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nolabel" in err and "label" in err and "\n" not in err, err
    with pytest.raises(FederatedError, match="site 'west' has no data"):
        client.load_site(SPEC, ov, "west")
