"""Tumour-microenvironment (TME) maps: a tile classifier applied over whole slides.

    python -m cfm.finetune --config configs/finetune/tme.py:synthetic --workdir DIR

1. A linear probe (`cfm.finetune.probe.train_linear`, eva's protocol) on the frozen backbone's
   CLS embeddings learns the classes of the labelled tiles (`config.train_shards`, class in the
   tile metadata key `config.label_key`: tumour, stroma, immune, background, ...). Its quality is
   reported on a held-out patient-level fold (accuracy, balanced accuracy, macro AUC).
2. Every tile of the slides in `config.slide_shards` gets a class; each slide becomes a class
   grid (tile corners x, y in level-0 px on the tiling grid) from which `tme_scores` computes,
   with the tiles' physical size (tile_size px * mpp um/px, from the tile metadata written by
   `data_prep.tile_wsi` / `data_prep.synthetic_tme`):
     - tiles, area (mm^2) and fraction of tissue of every class (background is not tissue);
     - `til_density_per_mm2`: immune tiles inside or touching (8-neighbourhood) the tumour, per
       mm^2 of tumour area (a tile-level stand-in for the TIL density of the TIL scoring
       guidelines, Salgado et al. 2015, which count lymphocytes in tumour and its stroma);
     - `immune_tumour_ratio` = immune tiles / tumour tiles, `stroma_tumour_ratio` likewise.
3. Output per slide in `slides/<slide_id>/`: `tme.json` (scores, the class grid and per-class
   probability grids), `class_map.png` and `immune_density.png` (local immune tiles per mm^2 of
   tissue in a 3 x 3-tile window) over the thumbnail, `panel.png` (thumbnail | classes |
   density) and `top_immune_tiles.png`; `tme_scores.csv` (one row per slide) and `results.json`.
   With tiles that carry true classes (synthetic slides) the tile accuracy on the slides and the
   Pearson r of predicted against true scores across slides are reported too.

The thumbnail comes from OpenSlide when the tile_wsi output's `private/slide_ids.csv` names a
slide file that still exists (`config.thumbnail="auto"`), else from the tiles themselves.
"""

from __future__ import annotations

import csv
import os
import time
from typing import Any, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from cfm.evaluate import metrics
from cfm.evaluate.report import fmt_metric
from cfm.explain import heatmap
from cfm.explain import tiles as tile_png
from cfm.finetune import slide_data
from cfm.finetune.common import FinetuneError, check, write_json
from cfm.finetune.probe import predict_linear, train_linear

DENSITY_WINDOW = 3  # tiles per side of the local immune density window


# ============================================================================ arithmetic ======
def tile_area_mm2(tile_size: float, mpp: float) -> float:
    """Area of one tile in mm^2: (tile_size px * mpp um/px / 1000)^2."""
    return (float(tile_size) * float(mpp) / 1000.0) ** 2


def _dilate(mask: np.ndarray) -> np.ndarray:
    """8-neighbourhood dilation of a boolean grid by one cell."""
    p = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= p[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
    return out


def tme_scores(class_grid: np.ndarray, tile_size: float, mpp: float,
               classes: Sequence[str]) -> dict:
    """TME figures of one slide from its class grid ([R, C] indices into `classes`, -1 where
    there is no tile): per-class tiles, mm^2 and tissue fractions, TIL density (immune tiles in
    or touching tumour per mm^2 of tumour), immune/tumour and stroma/tumour tile ratios."""
    g = np.asarray(class_grid)
    area = tile_area_mm2(tile_size, mpp)
    idx = {c: i for i, c in enumerate(classes)}
    bg = idx.get("background", -2)
    tissue = (g >= 0) & (g != bg)
    n_tissue = int(tissue.sum())
    out: dict[str, Any] = {"tiles": int((g >= 0).sum()), "tissue_tiles": n_tissue,
                           "tile_area_mm2": area, "tissue_area_mm2": n_tissue * area}
    for c, i in idx.items():
        n = int((g == i).sum())
        out[f"n_{c}"] = n
        out[f"area_mm2_{c}"] = n * area
        if c != "background":
            out[f"fraction_{c}"] = n / n_tissue if n_tissue else float("nan")
    nan = float("nan")
    tumour = g == idx["tumour"] if "tumour" in idx else np.zeros_like(tissue)
    immune = g == idx["immune"] if "immune" in idx else np.zeros_like(tissue)
    n_tumour, n_immune = int(tumour.sum()), int(immune.sum())
    til = int((immune & _dilate(tumour)).sum())
    out["tumour_area_mm2"] = n_tumour * area
    out["til_tiles"] = til
    out["til_density_per_mm2"] = til / (n_tumour * area) if n_tumour else nan
    out["immune_tumour_ratio"] = n_immune / n_tumour if n_tumour else nan
    if "stroma" in idx:
        out["stroma_tumour_ratio"] = (int((g == idx["stroma"]).sum()) / n_tumour if n_tumour
                                      else nan)
    return out


def immune_density_grid(class_grid: np.ndarray, classes: Sequence[str], tile_size: float,
                        mpp: float, window: int = DENSITY_WINDOW) -> np.ndarray:
    """Immune tiles per mm^2 of tissue in a window x window-tile neighbourhood of each tissue
    tile ([R, C], NaN off tissue)."""
    g = np.asarray(class_grid)
    bg = classes.index("background") if "background" in classes else -2
    tissue = ((g >= 0) & (g != bg)).astype(np.float64)
    immune = (g == classes.index("immune")).astype(np.float64) if "immune" in classes else \
        np.zeros_like(tissue)
    r = window // 2

    def box(a):
        p = np.pad(a, r)
        return sum(p[dy:dy + a.shape[0], dx:dx + a.shape[1]]
                   for dy in range(window) for dx in range(window))

    t = box(tissue) * tile_area_mm2(tile_size, mpp)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(t > 0, box(immune) / np.where(t > 0, t, 1.0), np.nan)
    return np.where(tissue > 0, d, np.nan)


def slide_grid(meta: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """(rows, cols, footprint) of a slide's tiles on their tiling grid (level-0 px)."""
    xs, ys = meta["x"].to_numpy(), meta["y"].to_numpy()
    fallback = float(meta["tile_size"].iloc[0]) if "tile_size" in meta else 224.0
    fx, fy = heatmap.infer_footprint(xs, ys, fallback)
    cols = np.round((xs - xs.min()) / fx).astype(int)
    rows = np.round((ys - ys.min()) / fy).astype(int)
    return rows, cols, (fx, fy)


def _tile_geometry(meta: pd.DataFrame, key: str) -> tuple[float, float]:
    """(tile_size px, mpp) of a slide's tiles; FinetuneError if unknown or mixed."""
    for col in ("mpp", "tile_size"):
        if col not in meta or meta[col].isna().any():
            raise FinetuneError(f"config.{key}: tiles of slide {meta['slide_id'].iloc[0]!r} "
                                f"have no {col} in their metadata (needed for areas in mm^2)")
    if meta["mpp"].nunique() > 1 or meta["tile_size"].nunique() > 1:
        raise FinetuneError(f"config.{key}: slide {meta['slide_id'].iloc[0]!r} mixes tile sizes "
                            "or mpps; tile it at one --mpp for TME maps")
    return float(meta["tile_size"].iloc[0]), float(meta["mpp"].iloc[0])


# ============================================================================ thumbnails ======
def slide_paths(shards: str) -> dict:
    """slide_id -> original file from tile_wsi's private mapping (empty if absent)."""
    path = os.path.join(shards, "private", "slide_ids.csv")
    if not os.path.isfile(path):
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {r["slide_id"]: r["source_path"] for r in csv.DictReader(f)
                if r.get("source_path")}


def slide_thumbnail(mode: str, slide_path: str | None, images, xs, ys, footprint
                    ) -> tuple[heatmap.Thumb, str]:
    """(`cfm.explain.heatmap.Thumb`, "openslide" or "tiles"): OpenSlide's thumbnail of
    `slide_path` when `mode` is openslide (or auto and the file exists), else assembled from the
    tile images."""
    if mode in ("auto", "openslide") and slide_path and os.path.isfile(slide_path):
        try:
            return heatmap.thumbnail_from_slide(slide_path, 512), "openslide"
        except Exception as e:  # noqa: BLE001 - openslide missing or unreadable: use tiles
            if mode == "openslide":
                raise FinetuneError(f"config.thumbnail=openslide: cannot read the slide "
                                    f"thumbnail ({type(e).__name__}: {e})") from None
    elif mode == "openslide":
        raise FinetuneError("config.thumbnail=openslide: the slide file is not known (no "
                            "private/slide_ids.csv next to the shards) or no longer exists")
    px = max(8, min(32, 512 // max(1, int(max(np.ptp(xs) / footprint[0],
                                                  np.ptp(ys) / footprint[1])) + 1)))
    return heatmap.thumbnail_from_tiles(images, xs, ys, footprint, px), "tiles"


# ============================================================================ task ============
def run(config: Any, workdir: str) -> dict:
    """The TME task (see module docstring)."""
    t0 = time.time()
    check(config.thumbnail in ("auto", "tiles", "openslide"), "thumbnail", config.thumbnail,
          "choose auto, tiles or openslide")
    train = slide_data.load_tiles(config, shards_key="train_shards")
    key = config.label_key
    if key not in train.meta or train.meta[key].isna().all():
        raise FinetuneError(f"config.train_shards={config.train_shards!r}: its tiles carry no "
                            f"{key!r} metadata to train the tile classifier on")
    lab = train.meta[key].notna().to_numpy()
    x, meta = train.features[lab], train.meta[lab].reset_index(drop=True)
    y, classes = slide_data.encode_classes(meta[key].astype(str), "label_key")
    if "tumour" not in classes or "immune" not in classes:
        raise FinetuneError(f"config.train_shards: the classes {classes} must include 'tumour' "
                            "and 'immune' for TME scores")
    groups = meta[config.group_key].astype(str).to_numpy()
    folds = slide_data.folds_for(groups, np.zeros(len(y)), int(config.folds), int(config.seed),
                                 "folds")
    tr_all, te = folds[0]
    inner = slide_data.folds_for(groups[tr_all], np.zeros(len(tr_all)), 4, int(config.seed) + 1,
                                 "folds")
    tr, val = tr_all[inner[0][0]], tr_all[inner[0][1]]
    params, hist = train_linear(x[tr], y[tr], x[val], y[val], len(classes),
                                lr=float(config.lr), optimizer=config.optimizer,
                                max_steps=int(config.max_steps), batch_size=256,
                                patience=int(config.patience), seed=int(config.seed),
                                standardize=bool(config.standardize))
    held = metrics.classification_metrics(y[te], predict_linear(params, x[te]), groups[te],
                                          int(config.n_boot), int(config.seed))

    slides = slide_data.load_tiles(config, shards_key="slide_shards")
    probs = predict_linear(params, slides.features)
    pred = probs.argmax(1)
    smeta = slides.meta
    truth_known = key in smeta and smeta[key].notna().all() and \
        set(smeta[key].astype(str)) <= set(classes)
    paths = slide_paths(config.slide_shards) if config.thumbnail != "tiles" else {}
    rows, maps_done, pictures = [], 0, {}
    for sid, idx in sorted(smeta.groupby("slide_id").indices.items()):
        sm = smeta.iloc[idx].reset_index(drop=True)
        ts, mpp = _tile_geometry(sm, "slide_shards")
        r, c, foot = slide_grid(sm)
        grid = np.full((r.max() + 1, c.max() + 1), -1, np.int64)
        grid[r, c] = pred[idx]
        scores = tme_scores(grid, ts, mpp, classes)
        row = {"slide_id": sid, **{k: v for k, v in scores.items()}}
        if truth_known:
            tgrid = np.full_like(grid, -1)
            tgrid[r, c] = [classes.index(v) for v in sm[key].astype(str)]
            for k, v in tme_scores(tgrid, ts, mpp, classes).items():
                row[f"true_{k}"] = v
            row["tile_accuracy"] = float((grid[r, c] == tgrid[r, c]).mean())
        rows.append(row)
        if maps_done >= int(config.max_maps):
            continue
        maps_done += 1
        out = os.path.join(workdir, "slides", sid)
        os.makedirs(out)
        images = tile_png.read_tiles(config.slide_shards, sm["tile"].to_numpy()) \
            if "tile" in sm else None
        if images is None:
            raise FinetuneError("config.embeddings: TME maps need the tile images; set "
                                "config.slide_shards and config.model instead")
        thumb, source = slide_thumbnail(config.thumbnail, paths.get(sid), images, sm["x"],
                                        sm["y"], foot)
        xs, ys = sm["x"].to_numpy(), sm["y"].to_numpy()
        cmap_png = heatmap.class_map_png(thumb, xs, ys, foot, [classes[p] for p in pred[idx]],
                                         os.path.join(out, "class_map.png"))
        dens = immune_density_grid(grid, classes, ts, mpp)
        dens_vals = dens[r, c]
        vmax = float(np.nanmax(dens_vals)) if np.isfinite(dens_vals).any() else 1.0
        heatmap.heatmap_png(thumb, xs, ys, foot, dens_vals, os.path.join(out,
                            "immune_density.png"), vmin=0.0, vmax=max(vmax, 1e-9))
        panel = heatmap.panel_png(
            [thumb.image, np.asarray(Image.open(cmap_png)),
             np.asarray(Image.open(os.path.join(out, "immune_density.png")))],
            [f"slide {sid} ({source} thumbnail)", "predicted classes",
             "immune tiles per mm² tissue (3x3 window)"], os.path.join(out, "panel.png"),
            legend={c: heatmap.CLASS_COLOURS.get(c, heatmap.CLASS_COLOURS["other"])
                    for c in classes},
            colorbar=("inferno", 0.0, vmax, "immune tiles / mm²"))
        pictures[sid] = panel
        tile_png.top_tiles_png(images, probs[idx, classes.index("immune")],
                               os.path.join(out, "top_immune_tiles.png"), k=12, label="p=")
        write_json(os.path.join(out, "tme.json"), {
            "slide_id": sid, "scores": scores, "classes": classes, "tile_size_px": ts,
            "mpp": mpp, "footprint_level0_px": foot, "thumbnail": source,
            "class_grid": grid.tolist(),
            "probability_grids": {cl: _grid_of(probs[idx, k], r, c, grid.shape).tolist()
                                  for k, cl in enumerate(classes)},
            "immune_density_per_mm2": dens.tolist()})
    table = pd.DataFrame(rows)
    table.to_csv(os.path.join(workdir, "tme_scores.csv"), index=False)
    results: dict = {"task": "tme", "classes": classes, "features": train.info,
                     "classifier": {"held_out_patient_fold": held, "n_train": int(len(tr)),
                                    "n_test": int(len(te)), **hist},
                     "slides": int(len(table)), "maps_written": maps_done,
                     "pictures": {k: os.path.relpath(v, workdir) for k, v in pictures.items()},
                     "per_slide": table.to_dict("records")}
    if truth_known and len(table) >= 2:
        results["agreement_with_truth"] = {
            "tile_accuracy_mean": float(table["tile_accuracy"].mean()),
            **{f"pearson_{k}": metrics.pearson(table[k], table[f"true_{k}"])
               for k in ("fraction_tumour", "fraction_immune", "fraction_stroma",
                         "til_density_per_mm2", "immune_tumour_ratio") if k in table}}
    results["seconds"] = round(time.time() - t0, 1)
    a = results.get("agreement_with_truth", {})
    results["summary_line"] = (
        f"tile classifier balanced acc {fmt_metric(held['balanced_accuracy'])} on held-out "
        f"patients; {len(table)} slides mapped" + (
            f"; TIL density r = {a.get('pearson_til_density_per_mm2', float('nan')):.3f} vs "
            f"truth, tile accuracy on slides {a['tile_accuracy_mean']:.3f}" if a else ""))
    write_json(os.path.join(workdir, "results.json"), results)
    return results


def _grid_of(values: np.ndarray, r: np.ndarray, c: np.ndarray, shape) -> np.ndarray:
    g = np.full(shape, np.nan)
    g[r, c] = values
    return np.round(g, 4)
