"""Slide tasks of cfm.finetune: MIL pooling, probes, layer-wise lr decay, TME arithmetic,
heatmaps, spatial ridge, bad inputs, and one tiny end-to-end run (synthetic data + a randomly
initialised tiny ViT export)."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cfm import optim, pretrained
from cfm.explain import heatmap
from cfm.explain import tiles as tile_png
from cfm.finetune import FinetuneError, spatial, tile, tme
from cfm.finetune import run as finetune_run
from cfm.models.mil import GatedAttentionMIL
from tests.conftest import load_config


# ============================================================================ helpers =========
def write_embeddings(folder, feats, meta: list[dict]) -> str:
    """A cfm.embed --out folder (one .npy + index.csv) from features and tile metadata."""
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, "embeddings-00000-of-00001.npy"), feats.astype(np.float32))
    pd.DataFrame([{"file": 0, "row": i, "tile": i, **m} for i, m in enumerate(meta)]).to_csv(
        os.path.join(folder, "index.csv"), index=False)
    return str(folder)


def toy_slides(folder, n_slides=8, tiles=6, dim=4, seed=0):
    """Embeddings of `n_slides` slides whose label (1 for even slides) shows in some tiles."""
    rng = np.random.default_rng(seed)
    feats, meta, labels = [], [], []
    for s in range(n_slides):
        lab = int(s % 2 == 0)
        for t in range(tiles):
            f = rng.normal(0, 1, dim)
            f[0] += 4.0 * lab * (t < 2)
            feats.append(f)
            meta.append({"slide_id": f"s{s}", "x": 64 * t, "y": 0, "mpp": 1.0, "tile_size": 64})
        labels.append({"slide_id": f"s{s}", "patient_id": f"p{s}", "y": lab})
    emb = write_embeddings(folder / "emb", np.array(feats), meta)
    return emb, pd.DataFrame(labels)


def mil_config(emb, labels_csv, **kw):
    c = load_config("finetune/slide_mil.py", "test")
    c.model, c.shards, c.embeddings, c.labels, c.label_key = "", "", emb, str(labels_csv), "y"
    for k, v in kw.items():
        c[k] = v
    return c


def random_vit_export(folder) -> str:
    """A safetensors cfm.export folder holding a randomly initialised vit_test backbone."""
    from safetensors.numpy import save_file

    c = load_config("dino_vit.py", "test")
    arch = pretrained.architecture(c.model.to_dict())
    rng = np.random.default_rng(0)  # numpy fill of the shapes: no op-by-op init compiles

    def fill(name, shape):
        if name.endswith("scale"):
            return np.ones(shape, np.float32)
        if name.endswith("bias"):
            return np.zeros(shape, np.float32)
        return (0.1 if name.endswith("gamma") else 0.02) * rng.standard_normal(shape).astype(
            np.float32)

    flat = {k: fill(k, v.shape) for k, v in pretrained.flatten(
        pretrained.abstract_params(arch)).items()}
    os.makedirs(folder)
    save_file(flat, os.path.join(folder, "model.safetensors"))
    info = {"architecture": arch, "preprocessing": {"mean": list(c.augment.mean),
                                                    "std": list(c.augment.std)},
            "provenance": {"step": 0, "training_config": c.to_dict()},
            "export": {"format": "safetensors", "dtype": "float32"}}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(info, f)
    return str(folder)


# ============================================================================ models ==========
def test_gated_attention_masks_sums_to_one_and_is_permutation_invariant():
    model = GatedAttentionMIL(3, hidden=8, attention_dim=4, dropout=0.0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 5)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    boxed = jax.jit(model.init)(jax.random.key(0), x, mask)["params"]
    params = nn.meta.unbox(boxed)
    apply = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m))
    out = apply(params, x, mask)
    a = np.asarray(out["attention"])
    np.testing.assert_allclose(a.sum(1), 1.0, rtol=1e-6)
    assert np.all(a[0, 4:] == 0.0) and np.all(a[0, :4] > 0)
    # padding content does not matter; tile order does not matter
    x2 = x.copy()
    x2[0, 4:] = 1e3
    perm = np.array([2, 0, 3, 1, 4, 5])
    out2 = apply(params, x2[:, perm], mask[:, perm])
    np.testing.assert_allclose(np.asarray(out2["logits"]), np.asarray(out["logits"]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out2["attention"]), a[:, perm], rtol=1e-5, atol=1e-7)
    # logical axis names on every parameter
    assert all(isinstance(v, nn.LogicallyPartitioned) for v in jax.tree.leaves(
        boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned)))


def test_knn_and_linear_probe_separate_toy_embeddings():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 8))
    y = np.repeat(np.arange(3), 60)
    x = (centres[y] + rng.normal(0, 0.5, (len(y), 8))).astype(np.float32)
    tr, te = np.arange(len(y)) % 3 != 0, np.arange(len(y)) % 3 == 0
    probs = tile.knn_predict(x[tr], y[tr], x[te], 3, k=5)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    assert (probs.argmax(1) == y[te]).mean() == 1.0
    params, hist = tile.train_linear(x[tr], y[tr], x[te], y[te], 3, max_steps=500, patience=3)
    assert (tile.predict_linear(params, x[te]).argmax(1) == y[te]).mean() >= 0.95
    m = tile.classification_metrics(y[te], tile.predict_linear(params, x[te]),
                                    np.arange(te.sum()) % 6, n_boot=20)
    assert m["auc"]["value"] > 0.95 and m["balanced_accuracy"]["ci95"][1] <= 1.0


def test_layerwise_lr_decay_factors():
    z = np.zeros(2, np.float32)
    params = {"backbone": {"patch_embed": {"kernel": z}, "cls_token": z,
                           "block_0": {"w": z}, "block_1": {"w": z}, "block_2": {"w": z},
                           "norm": {"scale": z}},
              "head": {"linear": {"kernel": z}}}
    f = tile.layerwise_lr_factors(params, depth=3, decay=0.5)
    b = f["backbone"]
    assert (b["block_2"]["w"], b["block_1"]["w"], b["block_0"]["w"]) == (0.5, 0.25, 0.125)
    assert b["patch_embed"]["kernel"] == b["cls_token"] == 0.0625
    assert b["norm"]["scale"] == 1.0 and f["head"]["linear"]["kernel"] == 1.0
    # the same rule as pretraining's optimiser (cfm.optim, BEiT's layer ids)
    cfg = load_config("dino_vit.py", "test")
    cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult = 0.5, 1.0
    ref = optim.lr_multipliers(cfg, params, 3)
    for a, r in zip(jax.tree.leaves(f), jax.tree.leaves(ref)):
        assert a == pytest.approx(float(r))
    # partial fine-tuning: only the last block (and norm, head) train
    p = tile.layerwise_lr_factors(params, depth=3, decay=0.5, trainable_blocks=1)["backbone"]
    assert p["block_2"]["w"] == 0.5 and p["block_1"]["w"] == p["block_0"]["w"] == 0.0
    assert p["patch_embed"]["kernel"] == 0.0 and p["norm"]["scale"] == 1.0


def test_tme_density_arithmetic():
    classes = ["tumour", "stroma", "immune", "background"]
    T, S, I, B = range(4)
    grid = np.array([[B, B, B, B, -1],
                     [S, T, T, I, S],
                     [S, T, T, S, S],
                     [I, S, S, S, I]])
    # 100 px tiles at 0.5 um/px: 50 um sides, 0.0025 mm^2 each
    s = tme.tme_scores(grid, 100, 0.5, classes)
    assert s["tile_area_mm2"] == pytest.approx(0.0025)
    assert s["tissue_tiles"] == 15 and s["n_background"] == 4 and s["tiles"] == 19
    assert s["tumour_area_mm2"] == pytest.approx(0.01)
    assert s["fraction_immune"] == pytest.approx(3 / 15)
    assert s["til_tiles"] == 2  # (1, 3) touches tumour, (3, 0) touches (2, 1) diagonally
    assert s["til_density_per_mm2"] == pytest.approx(2 / 0.01)
    assert s["immune_tumour_ratio"] == pytest.approx(3 / 4)
    d = tme.immune_density_grid(grid, classes, 100, 0.5)
    # tile (3, 4): window rows 2-3, cols 3-4 -> tissue 4 tiles, 1 immune
    assert d[3, 4] == pytest.approx(1 / (4 * 0.0025))
    assert np.isnan(d[0, 0])
    assert np.isnan(tme.tme_scores(np.full((2, 2), S), 100, 0.5, classes)["til_density_per_mm2"])


def test_heatmap_png_has_the_thumbnail_shape(tmp_path):
    rng = np.random.default_rng(0)
    xs, ys = [0, 128, 256, 0, 128, 256], [0, 0, 0, 128, 128, 128]
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in xs]
    foot = heatmap.infer_footprint(xs, ys, 64)
    assert foot == (128.0, 128.0)
    thumb = heatmap.thumbnail_from_tiles(images, xs, ys, foot, px=10)
    assert thumb.image.shape == (20, 30, 3)
    path = heatmap.heatmap_png(thumb, xs, ys, foot, np.linspace(0, 1, 6), str(tmp_path / "h.png"))
    assert np.asarray(Image.open(path)).shape == thumb.image.shape
    # an OpenSlide-like thumbnail of another shape: tiles cover its top-left part only
    other = heatmap.Thumb(np.full((37, 53, 3), 200, np.uint8), (0.0, 0.0), (10.0, 10.0))
    path = heatmap.heatmap_png(other, xs, ys, foot, [np.nan, 1, 2, 3, 4, 5],
                               str(tmp_path / "o.png"))
    img = np.asarray(Image.open(path))
    assert img.shape == (37, 53, 3)
    assert np.all(img[:12, :12] == 200) and np.any(img[:12, 13:25] != 200)  # NaN: unpainted
    assert np.all(img[26:, :] == 200) and np.all(img[:, 39:] == 200)
    grid = tile_png.top_tiles_png(images, np.arange(6.0), str(tmp_path / "top.png"), k=4)
    assert Image.open(grid).size[0] > 0
    assert list(tile_png.top_indices([0.1, np.nan, 0.9, 0.5], 2)) == [2, 3]


def test_spatial_ridge_pearson_on_a_linear_problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12))
    y = x @ rng.normal(size=(12, 5)) + 0.05 * rng.normal(size=(300, 5))
    pca = spatial.fit_pca(x[:200])
    assert pca["components"].shape == (12, 12)  # min(256, n, d)
    w = spatial.ridge_fit(spatial.apply_pca(pca, x[:200]), y[:200] - y[:200].mean(0))
    pred = spatial.apply_pca(pca, x[200:]) @ w
    from cfm.evaluate.metrics import pearson_per_column

    assert np.all(pearson_per_column(y[200:], pred) > 0.99)


# ============================================================================ bad inputs ======
def test_bad_mil_inputs_raise_and_leave_results_alone(tmp_path):
    emb, labels = toy_slides(tmp_path)
    good = tmp_path / "labels.csv"
    labels.to_csv(good, index=False)
    cases = {
        "no tiles for 1 labelled slide": pd.concat([labels, pd.DataFrame(
            [{"slide_id": "ghost", "patient_id": "px", "y": 1}])]),
        "do not match": labels.assign(slide_id=[f"other{i}" for i in range(len(labels))]),
        "only one class": labels.assign(y=1),
    }
    for needle, table in cases.items():
        bad = tmp_path / f"bad_{len(needle)}.csv"
        table.to_csv(bad, index=False)
        with pytest.raises(FinetuneError, match=needle):
            finetune_run(mil_config(emb, bad), str(tmp_path / "never"))
        assert not (tmp_path / "never").exists()
    with pytest.raises(FinetuneError, match="label_key"):
        finetune_run(mil_config(emb, good, label_key="nope"), str(tmp_path / "never"))
    # an existing workdir is kept unless overwrite, and kept whole when an overwrite fails
    out = tmp_path / "done"
    out.mkdir()
    (out / "results.json").write_text("{}")
    with pytest.raises(FinetuneError, match="already holds results"):
        finetune_run(mil_config(emb, good), str(out))
    with pytest.raises(FinetuneError, match="only one class"):
        finetune_run(mil_config(emb, tmp_path / f"bad_{len('only one class')}.csv",
                                overwrite=True), str(out))
    assert os.listdir(out) == ["results.json"] and (out / "results.json").read_text() == "{}"
    # tile task: features without labels; spatial task: spots without tiles
    c = load_config("finetune/tile_probe.py", "test")
    c.model, c.shards, c.embeddings = "", "", emb
    with pytest.raises(FinetuneError, match="label"):
        finetune_run(c, str(tmp_path / "never"))
    expr = tmp_path / "expr.csv"
    pd.DataFrame({"slide_id": ["s0", "s9"], "x": [0, 0], "y": [0, 0], "G": [1, 2]}).to_csv(
        expr, index=False)
    c = load_config("finetune/spatial.py", "test")
    c.model, c.shards, c.embeddings, c.expression = "", "", emb, str(expr)
    with pytest.raises(FinetuneError, match="no tile"):
        finetune_run(c, str(tmp_path / "never"))


def test_mil_learns_toy_bags(tmp_path):
    emb, labels = toy_slides(tmp_path, n_slides=16)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    c = mil_config(emb, tmp_path / "labels.csv", epochs=20, hidden=16, lr=1e-2)
    r = finetune_run(c, str(tmp_path / "run"))
    assert r["metrics"]["auc"]["value"] >= 0.9
    att = pd.read_csv(tmp_path / "run" / "attention.csv")
    pos = att[att["slide_id"].isin(labels["slide_id"][labels["y"] == 1])]
    # the two informative tiles of a positive slide get more attention than the others
    assert pos[pos["x"] < 128]["attention"].mean() > pos[pos["x"] >= 128]["attention"].mean()


# ============================================================================ end to end ======
def test_end_to_end_tme_on_synthetic_slides(tmp_path):
    from data_prep import synthetic_tme

    data = tmp_path / "data"
    assert synthetic_tme.main(["--out", str(data), "--tile-size", "32", "--patients", "6",
                               "--tiles-per-class", "3", "--slides", "2", "--grid", "4"]) == 0
    assert synthetic_tme.main(["--out", str(data)]) == 2  # exists, no --overwrite
    model = random_vit_export(tmp_path / "encoder")
    c = load_config("finetune/tme.py", "test")
    c.model, c.train_shards, c.slide_shards = model, str(data / "tiles"), str(data / "slides")
    r = finetune_run(c, str(tmp_path / "tme"))
    assert r["slides"] == 2 and r["classes"] == ["background", "immune", "stroma", "tumour"]
    assert 0.0 <= r["agreement_with_truth"]["tile_accuracy_mean"] <= 1.0
    out = tmp_path / "tme" / "slides" / "s000"
    j = json.loads((out / "tme.json").read_text())
    assert np.asarray(j["class_grid"]).shape == (4, 4)
    assert j["scores"]["tile_area_mm2"] == pytest.approx((32 * 1.0 / 1000) ** 2)
    shapes = {np.asarray(Image.open(out / n)).shape for n in ("class_map.png",
                                                               "immune_density.png")}
    assert len(shapes) == 1 and shapes.pop()[:2] == (4 * 32, 4 * 32)  # 4x4 tiles, 32 px each
    assert (out / "panel.png").is_file() and (out / "top_immune_tiles.png").is_file()
    truth = pd.read_csv(data / "slide_labels.csv")
    scores = pd.read_csv(tmp_path / "tme" / "tme_scores.csv")
    assert np.allclose(scores["true_fraction_immune"], truth["fraction_immune"], atol=1e-5)


def test_heatmap_on_a_real_slide_thumbnail(shared_data, tmp_path):
    """OpenSlide thumbnail of the real H&E crop; tiles placed in level-0 px land on it."""
    thumb = heatmap.thumbnail_from_slide(str(shared_data / "wsi" / "CMU-1-Small-Region.svs"),
                                         256)
    h, w = thumb.image.shape[:2]
    assert max(h, w) == 256
    xs, ys = [0, 500, 1000], [0, 500, 1000]  # level-0 px; footprint 500 px
    path = heatmap.heatmap_png(thumb, xs, ys, (500.0, 500.0), [0.0, 0.5, 1.0],
                               str(tmp_path / "real.png"))
    img = np.asarray(Image.open(path))
    assert img.shape == thumb.image.shape
    x1, y1 = int(1500 / thumb.scale[0]), int(1500 / thumb.scale[1])
    assert np.array_equal(img[y1 + 2:, x1 + 2:], thumb.image[y1 + 2:, x1 + 2:])
    assert not np.array_equal(img[:y1, :x1], thumb.image[:y1, :x1])
