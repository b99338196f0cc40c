"""cfm.evals: kNN / linear-probe numbers equal a direct scikit-learn computation, collapse is
flagged, a (data=2, fsdp=2) mesh gives the 1-device numbers, bad entries fail at build time with
one line, and the evaluation series is a function of the step (resume continues it)."""

import csv
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image
from sklearn.impute import KNNImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cfm import evals
from cfm import setup as setup_lib
from cfm.config_check import ConfigError
from cfm.data.sources import SyntheticSource
from cfm.evals import build, health, omics, probes, tile_sets
from cfm.evals.base import Evaluator
from cfm.ssl import dinov2
from tests.conftest import load_config
from tests.test_pipeline import _write_shards


# ------------------------------------------------------------------ numbers vs scikit-learn --
def _blobs(n_train=120, n_test=60, d=16, classes=3):
    """Train and test rows of the same Gaussian classes."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (classes, d))
    y = rng.integers(0, classes, n_train + n_test)
    x = (centres[y] + 2.5 * rng.normal(0, 1, (len(y), d))).astype(np.float32)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def test_knn_equals_sklearn_weighted_cosine_knn():
    x_tr, y_tr, x_te, y_te = _blobs()
    t = 0.07
    # cosine distance d = 1 - cos, so DINO's weight exp(cos / T) = exp((1 - d) / T)
    ref = KNeighborsClassifier(20, metric="cosine", weights=lambda d: np.exp((1 - d) / t),
                               algorithm="brute").fit(x_tr, y_tr).predict(x_te)
    got = probes.knn_scores(x_tr, y_tr, x_te, y_te, 3, k=20, temperature=t)
    assert got["top1"] == pytest.approx(np.mean(ref == y_te))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_te, ref))
    assert 0.4 < got["top1"] < 1.0  # neither chance nor trivial: the comparison can fail


def test_linear_probe_equals_sklearn_pipeline():
    x_tr, y_tr, x_te, y_te = _blobs()
    x_tr, x_te = 5.0 + 0.01 * x_tr, 5.0 + 0.01 * x_te  # tiny spread around a large offset
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=500))
    ref = pipe.fit(x_tr, y_tr).predict(x_te)
    got = probes.linear_scores(x_tr, y_tr, x_te, y_te, c=0.5, max_iter=500)
    assert got["top1"] == pytest.approx(np.mean(ref == y_te))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_te, ref))
    assert got["top1"] > 0.5


def test_health_measures_and_thresholds():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1, (64, 32))
    m = health.health_metrics(z)
    assert m["cls_std"] == pytest.approx(1 / math.sqrt(32), rel=0.1)  # isotropic: ~1/sqrt(D)
    s = np.linalg.svd(z, compute_uv=False)
    p = s / s.sum() + 1e-7
    assert m["rankme"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert health.collapse_warnings(m) == []
    low_rank = rng.normal(0, 1, (64, 3)) @ rng.normal(0, 1, (3, 32))
    assert health.rankme(low_rank) < 3.0
    const = np.tile(rng.normal(0, 1, (1, 32)), (64, 1))
    lines = health.collapse_warnings(health.health_metrics(const))
    assert len(lines) == 2 and "std" in lines[0] and "RankMe" in lines[1]
    # uniform teacher over constant embeddings; one dominant prototype for every image
    k = 16
    flat = health.health_metrics(const, np.zeros((64, k)), np.zeros((64, k)))
    assert flat["teacher_entropy"] == pytest.approx(math.log(k))
    assert any("uniform collapse" in w for w in health.collapse_warnings(flat))
    peaked = np.zeros((64, k))
    peaked[:, 3] = 10.0
    m = health.health_metrics(z, peaked, peaked)
    assert [w for w in health.collapse_warnings(m) if "same prototype" in w]


def test_pearson_per_gene_equals_numpy():
    rng = np.random.default_rng(0)
    genes = np.repeat([2, 3, 4, 5], 6)
    truth = rng.normal(0, 1, 24)
    pred = truth + rng.normal(0, 1, 24)
    pred[genes == 4] = 0.7  # constant prediction: r = 0
    truth[genes == 5] = 1.0  # constant truth: skipped
    want = np.mean([np.corrcoef(truth[genes == g], pred[genes == g])[0, 1] for g in (2, 3)]
                   + [0.0])
    assert omics.pearson_per_gene(genes, truth, pred) == pytest.approx(want)
    assert math.isnan(omics.pearson_per_gene(genes[:4], truth[:4], pred[:4]))  # < 5 per gene
    # a constant float32 gene (np.std 1.5e-8, not 0) is skipped, not a nan in the mean
    flat = np.full(7, 0.1, np.float32)
    assert np.std(flat) != 0
    g2 = np.concatenate([genes, np.full(7, genes.max() + 1)])
    assert omics.pearson_per_gene(g2, np.concatenate([truth, flat]),
                                  np.concatenate([pred, np.arange(7.0)])) == pytest.approx(want)


# ------------------------------------------------------------------ tile sets over meshes ----
def _class_folders(root, n_per_class=6):
    """Two classes of synthetic H&E tiles, one brightened: class is visible to the probes."""
    src = SyntheticSource(2 * n_per_class, 40, seed=5)
    for c, name in enumerate(("bright", "dark")):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            img = src[c * n_per_class + i].astype(np.int16) + (40 if c == 0 else -40)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                root / name / f"t{i}.png")
    return root


def _set_evals(config, evals_cfg):
    """config.evals = evals_cfg on a loaded (locked) config."""
    with config.unlocked():
        config.evals = evals_cfg
    return config


def _dino_setup(mesh=None, evals_cfg=None):
    config = _set_evals(load_config("dino_vit.py", "test"), evals_cfg)
    n = 1
    if mesh:
        config.mesh.data, config.mesh.fsdp = mesh
        n = mesh[0] * mesh[1]
    s = setup_lib.setup(config, devices=jax.devices()[:n])
    return config, s


_PARAMS = {}


def _state(s, step=5):
    """A train state for the evaluators (step, params, teacher, centers), laid out with the
    setup's shardings. The initial parameters are computed once per objective and placed on
    each mesh, which skips compiling the optimiser's init for every mesh (test time)."""
    name = s.objective.name
    if name not in _PARAMS:
        init = jax.jit(lambda r: nn.meta.unbox(s.objective.init_params(s.config, s.models, r)))
        _PARAMS[name] = jax.device_get(init(jax.random.key(s.config.seed)))
    params = _PARAMS[name]
    teacher, centers = s.objective.init_extra(s.config, params)
    place = lambda tree, sh: jax.device_put(tree, sh) if tree else tree  # noqa: E731
    return setup_lib.TrainState(
        step=jnp.asarray(step, jnp.int32), params=place(params, s.shardings.params),
        teacher=place(teacher, s.shardings.teacher), opt_state={},
        centers=place(centers, s.shardings.centers), rng=jax.random.key(0))


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    return _class_folders(tmp_path_factory.mktemp("evals") / "tiles")


def test_tile_evaluators_match_direct_computation_and_1_device_on_a_2x2_mesh(tiles):
    cfg = ml_collections.ConfigDict({
        "knn": evals.entry("knn", every=5, path=str(tiles), k=3, batch_size=6),
        "linear": evals.entry("linear", every=5, path=str(tiles), batch_size=6)})
    results, feats = [], []
    for mesh in (None, (2, 2)):
        config, s = _dino_setup(mesh, cfg)
        evs = build.build_evaluators(config, s)
        state = _state(s)
        metrics, _ = build.run_due(evs, state, 5)
        results.append(metrics)
        feats.append({e.name: e for e in evs}["knn"].features(state))
    one, four = results
    assert set(one) == set(four) == {"knn/top1", "knn/balanced_accuracy", "knn/seconds",
                                     "linear/top1", "linear/balanced_accuracy", "linear/seconds"}
    for a, b in zip(feats[0], feats[1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for key in one:
        if not key.endswith("seconds"):
            assert one[key] == pytest.approx(four[key], rel=1e-3, abs=1e-5), key

    # Direct: the teacher backbone applied to the same images (no mesh), then sklearn.
    t = tile_sets.load("knn", dict(evals.DEFAULTS["knn"], path=str(tiles)), 32)
    apply = jax.jit(lambda p, x: s.models.backbone.apply(
        {"params": p}, dinov2.normalise(x, config.augment.mean, config.augment.std))["cls"])
    x_tr, x_te = (np.asarray(apply(_PARAMS["dinov2"]["backbone"], side.images))
                  for side in (t.train, t.test))
    np.testing.assert_allclose(feats[0][0], x_tr, rtol=1e-4, atol=1e-5)
    ref = KNeighborsClassifier(3, metric="cosine", weights=lambda d: np.exp((1 - d) / 0.07),
                               algorithm="brute").fit(x_tr, t.train.labels).predict(x_te)
    assert one["knn/top1"] == pytest.approx(np.mean(ref == t.test.labels))
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    ref = pipe.fit(x_tr, t.train.labels).predict(x_te)
    assert one["linear/top1"] == pytest.approx(np.mean(ref == t.test.labels))


def test_collapsed_backbone_triggers_the_warning(tiles):
    cfg = ml_collections.ConfigDict({"health": evals.entry("health", n_samples=8)})
    config, s = _dino_setup(None, cfg)
    (ev,) = build.build_evaluators(config, s)
    state = _state(s)
    # Constant output: the final LayerNorm's scale at zero (its bias is zero at init).
    bb = dict(state.teacher["backbone"])
    bb["norm"] = jax.tree.map(lambda a: a * 0, bb["norm"])
    collapsed = state.replace(teacher=dict(state.teacher, backbone=bb))
    m = ev.run(collapsed)
    assert m["health/cls_std"] == 0.0 and m["health/rankme"] == 0.0
    lines = ev.warnings(m)
    assert any("std of the normalised CLS" in w for w in lines)
    assert any("uniform collapse" in w for w in lines)


# ------------------------------------------------------------------ masked gene modelling ----
def _mgm(mesh=None):
    config = _set_evals(load_config("omics_mgm.py", "test"), ml_collections.ConfigDict({
        "mgm": evals.entry("mgm", every=2, max_samples=24, max_train=48, batch_size=8),
        "health": evals.entry("health", every=2, n_samples=16, batch_size=8)}))
    n = 1
    if mesh:
        config.mesh.data, config.mesh.fsdp = mesh
        n = 4
    s = setup_lib.setup(config, devices=jax.devices()[:n])
    return config, s


def test_mgm_evaluator_on_a_2x2_mesh_equals_1_device_and_random_init_is_healthy():
    out = []
    for mesh in (None, (2, 2)):
        config, s = _mgm(mesh)
        evs = build.build_evaluators(config, s)
        metrics, lines = build.run_due(evs, _state(s, 2), 2)
        out.append(metrics)
        assert lines == []  # a random-init omics model separates its samples
    one, four = out
    for key in ("mgm/pearson", "mgm/mse", "mgm/mutation_acc", "mgm/cnv_acc",
                "health/cls_std", "health/rankme"):
        assert one[key] == pytest.approx(four[key], rel=1e-3, abs=1e-5), key
    # The kNN reference recovers co-expressed genes on the synthetic modules; it is the same
    # number as a direct KNNImputer on the masked tokens (recomputed here).
    assert one["mgm/knn_pearson"] > 0.3 and one["mgm/knn_pearson"] == four["mgm/knn_pearson"]
    assert 0 <= one["mgm/knn_cnv_acc"] <= 1 and 0 <= one["mgm/mutation_acc"] <= 1


def test_mgm_knn_reference_equals_direct_imputation():
    config, s = _mgm()
    ev = {e.name: e for e in build.build_evaluators(config, s)}["mgm"]
    from cfm.data import omics_pipeline

    src = omics_pipeline.make_source(config.data, config.seed)
    train = np.stack([src[i][1]["values"] for i in range(48)])  # synthetic: a full matrix
    b = ev.batch
    rows, cols = np.nonzero(b["value_mask"])
    held = np.full((24, train.shape[1]), np.nan)
    # synthetic samples have every token in one (gene, modality) order; map by token position
    keys = list(zip(src[0][1]["gene_ids"], src[0][1]["modality"]))
    col = {k: j for j, k in enumerate(keys)}
    for i in range(24):
        for g, m, v, hidden in zip(b["gene_ids"][i], b["modality"][i], b["values"][i],
                                   b["value_mask"][i]):
            if g != 0 and not hidden:
                held[i, col[(g, m)]] = v
    imputed = KNNImputer(n_neighbors=10, keep_empty_features=True).fit(train).transform(held)
    j = [col[(g, m)] for g, m in zip(b["gene_ids"][rows, cols], b["modality"][rows, cols])]
    pred, mod = imputed[rows, j], b["modality"][rows, cols]
    e = mod == 0
    want = omics.pearson_per_gene(b["gene_ids"][rows, cols][e], b["values"][rows, cols][e],
                                  pred[e])
    assert ev.reference["knn_pearson"] == pytest.approx(want)


# ------------------------------------------------------------------ bad entries, start-up ----
def _one_line_error(config, s, match):
    with pytest.raises(ConfigError, match=match) as e:
        build.build_evaluators(config, s)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_entries_stop_at_build_with_one_line(tmp_path, tiles):
    config, s = _dino_setup()
    bad = {
        "missing": (evals.entry("knn", path=str(tmp_path / "nope")), r"knn\.path=.*not a folder"),
        "empty": (evals.entry("knn", path=str(tmp_path)), r"knn\.path=.*no .*files"),
        "type": ({"type": "fid"}, r"knn\.type='fid': choose one of"),
        "key": ({"type": "knn", "kk": 3}, r"knn\.kk=3: unknown key"),
        "every": (evals.entry("knn", path=str(tiles), every=-1), r"knn\.every=-1"),
    }
    for entry, match in bad.values():
        _set_evals(config, ml_collections.ConfigDict({"knn": entry}))
        _one_line_error(config, s, match)
    # every=0: listed in the config file but off, so its (empty) path is never read
    _set_evals(config, ml_collections.ConfigDict({"knn": evals.entry("knn", every=0)}))
    assert build.build_evaluators(config, s) == []
    with pytest.raises(ConfigError, match=r"unknown keys \['kk'\]"):
        evals.entry("knn", kk=3)
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(one / "only" / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(one / "only" / "b.png")
    _set_evals(config, ml_collections.ConfigDict({"lin": evals.entry("linear", path=str(one))}))
    _one_line_error(config, s, r"lin\.path=.*only one class")
    (one / "other").mkdir()
    (one / "other" / "c.png").write_bytes(b"not a png")
    (one / "other" / "d.png").write_bytes(b"not a png")
    _one_line_error(config, s, r"lin\.path=.*cannot read image")
    omics_config, omics_s = _mgm()
    _set_evals(omics_config, ml_collections.ConfigDict({"knn": evals.entry("knn",
                                                                       path=str(tiles))}))
    _one_line_error(omics_config, omics_s, r"knn\.type='knn': .*image backbones")


def test_shards_with_labels_csv(tmp_path):
    images = [SyntheticSource(9, 40, seed=1)[i] for i in range(9)]
    _write_shards(str(tmp_path / "shards"), images, per_shard=4)  # slide s{i%3}, x=i, y=0
    labels = tmp_path / "labels.csv"

    def write(rows):
        with open(labels, "w", newline="") as f:
            w = csv.writer(f)
            w.writerows([("slide_id", "x", "y", "label")] + rows)

    write([(f"s{i % 3}", i, 0, "a" if i % 2 else "b") for i in range(9)])
    entry = dict(evals.DEFAULTS["knn"], source="shards", path=str(tmp_path / "shards"),
                 labels=str(labels), test_fraction=0.34)
    t = tile_sets.load("knn", entry, 32)
    assert t.classes == ["a", "b"] and len(t.train.labels) + len(t.test.labels) == 9
    assert t.train.images.shape[1:] == (32, 32, 3) and len(t.test.labels) == 3  # one slide
    write([(f"s{i % 3}", i, 0, "a" if i % 2 else "b") for i in range(9)] + [("s9", 1, 0, "a")])
    with pytest.raises(ConfigError, match=r"knn\.labels=.*1 row\(s\) match no tile") as e:
        tile_sets.load("knn", entry, 32)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ the series over resumes --
def test_evaluation_steps_are_a_function_of_the_step():
    ev = Evaluator("x", every=4)
    straight = [s for s in range(1, 21) if ev.due(s)]
    resumed = [s for s in range(1, 9) if ev.due(s)] + [s for s in range(9, 21) if ev.due(s)]
    assert straight == resumed == [4, 8, 12, 16, 20]
    assert ev.due(7, final=True) and not ev.due(0)
