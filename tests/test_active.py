"""cfm.active: each strategy against a direct numpy reference on small embeddings, the Label
Studio / QuPath GeoJSON / CSV round trips and their row-naming errors, and a loop resumed across
processes' worth of calls picking what direct calls pick."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from sklearn.cluster import KMeans

from cfm.active import ActiveError, label_io, strategies
from cfm.active.__main__ import main as active_main
from cfm.evals.probes import linear_probe

CLASSES = ["tumour", "stroma", "immune", "background"]


def blobs(n_per=15, dim=6, seed=0):
    """Four well-separated classes in `dim` dimensions: (x [4 n_per, dim], y)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (4, dim))
    y = np.repeat(np.arange(4), n_per)
    return centres[y] + rng.normal(0, 1.0, (len(y), dim)), y


def partly_labelled(y, per_class=2):
    known = np.full(len(y), strategies.UNLABELLED)
    for c in np.unique(y):
        rows = np.nonzero(y == c)[0][:per_class]
        known[rows] = y[rows]
    return known


def reference_probs(x, known):
    """The probe fitted directly with scikit-learn on the labelled rows, [N, 4] probabilities."""
    lab = known != strategies.UNLABELLED
    clf = linear_probe().fit(x[lab], known[lab])
    p = np.zeros((len(x), 4))
    p[:, clf.classes_] = clf.predict_proba(x)
    return p


# ============================================================================ strategies ======
@pytest.mark.parametrize("kind", ["entropy", "margin"])
def test_uncertainty_picks_the_top_of_a_numpy_score(kind):
    x, y = blobs()
    x = strategies.standardize(x)
    known = partly_labelled(y)
    p = np.clip(reference_probs(x, known), 1e-12, 1)
    top = np.sort(p, 1)
    score = -(p * np.log(p)).sum(1) if kind == "entropy" else -(top[:, -1] - top[:, -2])
    score[known != strategies.UNLABELLED] = -np.inf
    want = np.argsort(-score, kind="stable")[:7]
    got, used = strategies.select(kind, x, known, 7, 4, seed=0)
    assert used == kind
    assert sorted(got) == sorted(want)
    u = strategies.uncertainty(p)  # the report's summary is the same numpy score
    np.testing.assert_allclose(u["entropy"], -(p * np.log(p)).sum(1))


def test_coreset_is_k_center_greedy():
    x, y = blobs(seed=1)
    known = partly_labelled(y, 1)
    dist = np.linalg.norm(x[:, None] - x[None, known != strategies.UNLABELLED], axis=-1).min(1)
    want = []
    for _ in range(9):  # the row farthest from every centre becomes a centre
        i = int(np.argmax(np.where(known == strategies.UNLABELLED, dist, -1)))
        want.append(i)
        known_i = np.linalg.norm(x - x[i], axis=1)
        dist = np.minimum(dist, known_i)
        dist[want] = -1
    got, used = strategies.select("coreset", x, partly_labelled(y, 1), 9, 4, seed=0)
    assert used == "coreset"
    assert list(got) == want


def test_mix_is_entropy_weighted_kmeans_then_nearest_to_each_centre():
    x, y = blobs(seed=2)
    x = strategies.standardize(x)
    known = partly_labelled(y)
    free = np.nonzero(known == strategies.UNLABELLED)[0]
    p = np.clip(reference_probs(x, known), 1e-12, 1)
    ent = -(p * np.log(p)).sum(1)[free]
    km = KMeans(n_clusters=5, n_init=1, random_state=3).fit(x[free], sample_weight=ent)
    d = np.linalg.norm(x[free][:, None] - km.cluster_centers_[None], axis=-1)
    want = []
    for b in range(5):
        order = [free[i] for i in np.argsort(d[:, b]) if free[i] not in want]
        want.append(order[0])
    got, used = strategies.select("mix", x, known, 5, 4, seed=3)
    assert used == "mix"
    assert sorted(got) == sorted(want)


def typiclust_reference(x, known, batch, seed, k=strategies.TYPICLUST_K):
    """TypiClust in numpy: k-means with labelled + batch clusters; from each of the largest
    clusters without a label, the row with the highest 1 / mean distance to its k nearest."""
    lab = np.nonzero(known != strategies.UNLABELLED)[0]
    km = KMeans(n_clusters=len(lab) + batch, n_init=1, random_state=seed).fit(x)
    sizes = np.bincount(km.labels_, minlength=len(lab) + batch).astype(float)
    sizes[km.labels_[lab]] = 0
    picks = []
    for _ in range(batch):
        members = np.nonzero(km.labels_ == np.argmax(sizes))[0]
        kk = min(k, len(members) - 1)
        d = np.sort(np.linalg.norm(x[members][:, None] - x[members][None], axis=-1), 1)
        typicality = kk / (d[:, :kk + 1].sum(1) + 1e-7) if kk else np.ones(1)
        picks.append(members[np.argmax(typicality)])
        sizes[np.argmax(sizes)] = 0
    return picks


def test_cold_start_is_typiclust_and_balanced():
    x, y = blobs(n_per=25, seed=4)
    x = strategies.standardize(x)
    none = np.full(len(y), strategies.UNLABELLED)
    got, used = strategies.select("mix", x, none, 4, 4, seed=5)
    assert used == "cold"
    assert sorted(got) == sorted(typiclust_reference(x, none, 4, 5))
    assert sorted(y[got]) == [0, 1, 2, 3]  # one per class, without a label
    one_class = none.copy()
    one_class[np.nonzero(y == 2)[0][:3]] = 2  # one class only: still no probe, still cold
    got, used = strategies.select("entropy", x, one_class, 3, 4, seed=5)
    assert used == "cold"
    assert sorted(got) == sorted(typiclust_reference(x, one_class, 3, 5))


def test_random_is_seeded_and_picks_unlabelled_rows():
    x, y = blobs()
    known = partly_labelled(y)
    a, used = strategies.select("random", x, known, 10, 4, seed=7)
    b, _ = strategies.select("random", x, known, 10, 4, seed=7)
    assert used == "random" and list(a) == list(b) and len(set(a)) == 10
    assert (known[a] == strategies.UNLABELLED).all()
    with pytest.raises(ActiveError, match="choose one of"):
        strategies.select("bald", x, known, 3, 4)


# ============================================================================ files ===========
ROWS = [{"cfm_id": "5", "slide_id": "s000", "x": 64, "y": 0},
        {"cfm_id": "9", "slide_id": "s000", "x": 128, "y": 64},
        {"cfm_id": "17", "slide_id": "s001", "x": 0, "y": 0}]
TRUTH = {"5": "tumour", "9": "immune", "17": "stroma"}
POOL_IDS = [str(i) for i in range(20)]
CORNERS = {(r["slide_id"], r["x"], r["y"]): r["cfm_id"] for r in ROWS}


@pytest.fixture()
def batch_dir(tmp_path):
    images = [np.full((8, 8, 3), i * 40, np.uint8) for i in range(3)]
    label_io.write_batch(str(tmp_path), ROWS, CLASSES, "tile", 2, [("stroma", 0.6)] * 3, images,
                         {"s000": (64.0, 64.0), "s001": (64.0, 64.0)}, "/data/local-files/?d=",
                         "round-002")
    return tmp_path


def test_label_studio_round_trip(batch_dir, tmp_path_factory):
    tasks = json.loads((batch_dir / "tasks.json").read_text())
    assert tasks[0]["data"]["image"] == "/data/local-files/?d=round-002/tiles/5.png"
    assert (batch_dir / "tiles" / "5.png").is_file()
    assert '<Choice value="immune"/>' in (batch_dir / "label_config.xml").read_text()
    out = tmp_path_factory.mktemp("ls")
    # Label Studio's JSON export: the tasks with annotations (one cancelled, one task skipped)
    export = []
    for i, t in enumerate(tasks):
        cid = t["data"]["cfm_id"]
        result = [{"from_name": "label", "to_name": "image", "type": "choices",
                   "value": {"choices": [TRUTH[cid].upper() if i == 1 else TRUTH[cid]]}}]
        anns = [] if i == 2 else [
            {"result": [{**result[0], "value": {"choices": ["background"]}}],
             "was_cancelled": True, "updated_at": "2026-01-02"},
            {"result": result, "was_cancelled": False, "updated_at": "2026-01-01"}]
        export.append({"id": i + 1, "data": t["data"], "annotations": anns,
                       "predictions": t["predictions"]})
    (out / "full.json").write_text(json.dumps(export))
    want = {k: v for k, v in TRUTH.items() if k != "17"}
    assert label_io.read_labels(str(out / "full.json"), CLASSES, POOL_IDS) == want
    minimal = [{"id": 1, "cfm_id": "5", "label": "tumour"}, {"id": 2, "cfm_id": 17,
                                                            "label": {"choices": ["stroma"]}}]
    (out / "min.json").write_text(json.dumps(minimal))
    assert label_io.read_labels(str(out / "min.json"), CLASSES, POOL_IDS) == {
        "5": "tumour", "17": "stroma"}
    export[0]["annotations"][1]["result"][0]["value"]["choices"] = ["tumor"]
    (out / "bad.json").write_text(json.dumps(export))
    with pytest.raises(ActiveError, match=r"bad.json task 0 \(cfm_id 5\): label 'tumor'"):
        label_io.read_labels(str(out / "bad.json"), CLASSES, POOL_IDS)
    (out / "unknown.json").write_text(json.dumps([{"cfm_id": "99", "label": "tumour"}]))
    with pytest.raises(ActiveError, match=r"task 0 .*'99' is not a row"):
        label_io.read_labels(str(out / "unknown.json"), CLASSES, POOL_IDS)


def test_qupath_geojson_round_trip(batch_dir):
    fc = json.loads((batch_dir / "qupath" / "s000.geojson").read_text())
    ring = fc["features"][1]["geometry"]["coordinates"][0]
    assert ring[0] == [128.0, 64.0] and ring[2] == [192.0, 128.0]  # level-0 box of tile 9
    # what QuPath exports after the boxes are classified: names kept, one box renamed
    for f in fc["features"]:
        cid = f["properties"]["name"].split()[-1]
        f["properties"]["classification"] = {"name": TRUTH[cid].capitalize(), "color": [1, 2, 3]}
    fc["features"][0]["properties"].pop("name")  # matched by its corner on slide s000
    path = batch_dir / "qupath" / "s000.geojson"
    path.write_text(json.dumps(fc["features"]))  # QuPath may export a bare list of features
    assert label_io.read_labels(str(path), CLASSES, POOL_IDS, CORNERS) == {
        "5": "tumour", "9": "immune"}
    fc["features"][0]["geometry"]["coordinates"][0][0] = [999, 999]
    for p in fc["features"][0]["geometry"]["coordinates"][0]:
        p[0] += 1000
    path.write_text(json.dumps(fc))
    with pytest.raises(ActiveError, match=r"s000.geojson feature 0: a 'Tumour' annotation"):
        label_io.read_labels(str(path), CLASSES, POOL_IDS, CORNERS)


def test_csv_round_trip_and_bad_rows(batch_dir):
    path = batch_dir / "batch.csv"
    rows = list(csv.DictReader(path.open()))
    assert [r["cfm_id"] for r in rows] == ["5", "9", "17"] and rows[0]["guess"] == "stroma"
    for r in rows[:2]:
        r["label"] = TRUTH[r["cfm_id"]]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert label_io.read_labels(str(path), CLASSES, POOL_IDS) == {"5": "tumour", "9": "immune"}
    rows[2]["label"] = "necrosis"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(ActiveError, match=r"batch.csv line 4: label 'necrosis' is not one"):
        label_io.read_labels(str(path), CLASSES, POOL_IDS)
    (batch_dir / "x.csv").write_text("tile,class\n1,tumour\n")
    with pytest.raises(ActiveError, match="needs a cfm_id"):
        label_io.read_labels(str(batch_dir / "x.csv"), CLASSES, POOL_IDS)


# ============================================================================ loop ============
def write_embeddings(folder, x, labels):
    """A cfm.embed --out folder by hand: one slide per 10 tiles on an 8-px grid."""
    os.makedirs(folder)
    np.save(os.path.join(folder, "embeddings-00000-of-00001.npy"), x.astype(np.float32))
    with open(os.path.join(folder, "index.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "row", "tile", "slide_id", "x", "y", "tile_size", "label"])
        for i, lab in enumerate(labels):
            w.writerow([0, i, i, f"s{i // 10:03d}", 8 * (i % 10), 0, 8, CLASSES[lab]])


def test_loop_resumes_and_picks_what_direct_calls_pick(tmp_path, capsys):
    x, y = blobs(n_per=10, seed=6)
    emb, work = str(tmp_path / "emb"), str(tmp_path / "loop")
    write_embeddings(emb, x, y)
    common = ["--workdir", work, "--batch", "4", "--seed", "1"]
    assert active_main(common + ["--embeddings", emb, "--classes", ",".join(CLASSES)]) == 0
    assert active_main(common) == 2  # round 1 waits for labels
    assert "round 1 is waiting for labels" in capsys.readouterr().err
    assert active_main(common + ["--classes", "a,b"]) == 2  # another loop's settings
    # round 1 answered from a CSV by hand, then two simulated rounds with other strategies
    state = json.load(open(os.path.join(work, "state.json")))
    with open(tmp_path / "r1.csv", "w") as f:
        f.write("cfm_id,label\n" + "".join(f"{i},{CLASSES[y[int(i)]]}\n"
                                            for i in state["rounds"][0]["ids"]))
    assert active_main(common + ["--labels", str(tmp_path / "r1.csv"), "--strategy",
                                 "coreset"]) == 0
    assert active_main(common + ["--simulate", "label", "--strategy", "entropy"]) == 0
    state = json.load(open(os.path.join(work, "state.json")))
    assert [(r["round"], r["used"], r["seed"]) for r in state["rounds"]] == [
        (1, "cold", 2), (2, "coreset", 3), (3, "entropy", 4)]
    assert state["rounds"][2]["closed"] is None and state["rounds"][1]["probe"]["n_labels"] == 8
    # the same rounds by direct calls
    xs, known = strategies.standardize(x), np.full(len(y), strategies.UNLABELLED)
    for r in state["rounds"]:
        idx, used = strategies.select(r["strategy"], xs, known, 4, 4, r["seed"])
        assert [str(i) for i in idx] == r["ids"] and used == r["used"]
        known[idx] = y[idx]
    assert os.listdir(tmp_path / "loop" / "round-003" / "qupath")  # boxes for QuPath
    lines = open(os.path.join(work, "labels.csv")).read().splitlines()
    assert lines[0] == "cfm_id,label,round" and len(lines) == 1 + 8
    assert "| 2 | coreset (coreset) | 4 | 4 | 8 |" in open(os.path.join(work, "report.md")).read()


def test_slide_unit_and_seed_labels(tmp_path):
    x, y = blobs(n_per=10, seed=8)
    emb, work = str(tmp_path / "emb"), str(tmp_path / "loop")
    write_embeddings(emb, x, y)
    seed_labels = tmp_path / "seed.csv"
    seed_labels.write_text("cfm_id,label\ns000,tumour\ns001,stroma\n")
    assert active_main(["--workdir", work, "--embeddings", emb, "--classes", "tumour,stroma",
                        "--unit", "slide", "--batch", "2", "--labels", str(seed_labels)]) == 0
    state = json.load(open(os.path.join(work, "state.json")))
    assert [r["round"] for r in state["rounds"]] == [0, 1]
    assert state["rounds"][0]["labels"] == {"s000": "tumour", "s001": "stroma"}
    assert set(state["rounds"][1]["ids"]) <= {"s002", "s003"}
    tasks = json.load(open(os.path.join(work, "round-001", "tasks.json")))
    assert tasks[0]["data"]["slide_id"] in ("s002", "s003") and "image" not in tasks[0]["data"]
