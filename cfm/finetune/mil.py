"""Slide classification and regression with gated-attention MIL over frozen tile embeddings.

    python -m cfm.finetune --config configs/finetune/slide_mil.py:synthetic --workdir DIR

Each slide is a bag of its tiles' CLS embeddings (`cfm.finetune.slide_data`; bags padded to the
longest with a mask, or capped at `config.max_tiles` random tiles); `cfm.models.mil.
GatedAttentionMIL` (Ilse et al. 2018, CLAM's sizes, Lu et al. 2021) pools them into a slide
prediction. Training follows CLAM's defaults: Adam (lr 2e-4, L2 weight decay 1e-5), one bag
per step (`config.batch_size`), dropout 0.25, early stopping on the validation loss
(`patience` epochs) keeping the best epoch; each epoch is one jitted `lax.scan` over its steps.
Tile features are z-scored with the training slides' tile statistics (`config.standardize`).

Labels: `config.labels`, a CSV with slide_id, the target column `config.label_key` and
optionally `config.patient_key` (default patient_id; slides of one patient stay in one fold).
`config.target` = classification (cross-entropy; any number of classes) or regression (MSE on
the standardised target). Patient-level `config.folds`-fold CV (`cfm.evaluate.cv`), a
validation part carved from each training part. Metrics on the pooled out-of-fold predictions
with 95% bootstrap intervals over patients: AUC (macro one-vs-rest), balanced accuracy and
accuracy, or Pearson r for regression.

Output: `results.json`, `predictions.csv` (out-of-fold, per slide), `attention.csv` (every
tile's out-of-fold attention), and for `config.heatmaps` test slides `heatmaps/<slide_id>/`:
`attention.png` (attention percentile over the thumbnail, the thumbnail's shape), `panel.png`
and `top_tiles.png` (the most-attended tiles).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
from PIL import Image

from cfm.evaluate import metrics
from cfm.evaluate.report import fmt_metric
from cfm.explain import heatmap
from cfm.explain import tiles as tile_png
from cfm.finetune import slide_data
from cfm.finetune.common import FinetuneError, check, write_json
from cfm.finetune.tme import slide_grid, slide_paths, slide_thumbnail
from cfm.models.mil import GatedAttentionMIL


# ============================================================================ training ========
def standardize_bags(bags: slide_data.Bags, train: np.ndarray) -> slide_data.Bags:
    """Bags with features z-scored by the mean and std of the tiles of bags `train` (padding
    stays 0). Tiny encoders' features have a large common offset and ~0.02 spread per
    dimension; CLAM's lr 2e-4 barely moves on them unstandardised."""
    tiles = bags.features[train][bags.mask[train]]
    mu, sd = tiles.mean(0), tiles.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    feats = np.where(bags.mask[..., None], (bags.features - mu) / sd, 0.0).astype(np.float32)
    return slide_data.Bags(feats, bags.mask, bags.rows)


@functools.lru_cache(maxsize=16)
def _compiled(model: GatedAttentionMIL, lr: float, weight_decay: float, regression: bool):
    """(optimizer, jitted epoch, jitted validation loss) for one model and optimiser setting,
    shared by every fold (data are arguments, not constants baked into the program)."""
    tx = optax.chain(optax.add_decayed_weights(weight_decay),  # torch Adam's L2 weight decay
                     optax.adam(lr))

    def loss_of(out, y):
        if regression:  # y [B] (one target) or [B, n_outputs] (e.g. a gene program)
            return jnp.mean(((out[:, 0] if y.ndim == 1 else out) - y) ** 2)
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

    def loss_fn(p, feats, mask, y, dkey):
        out = model.apply({"params": p}, feats, mask, train=True, rngs={"dropout": dkey})
        return loss_of(out["logits"], y)

    @jax.jit
    def epoch(p, s, feats, mask, y, order, ekey):
        def step(carry, xs):
            p, s = carry
            idx, k = xs
            loss, g = jax.value_and_grad(loss_fn)(p, feats[idx], mask[idx], y[idx], k)
            upd, s = tx.update(g, s, p)
            return (optax.apply_updates(p, upd), s), loss
        keys = jax.random.split(ekey, order.shape[0])
        (p, s), losses = jax.lax.scan(step, (p, s), (order, keys))
        return p, s, losses.mean()

    @jax.jit
    def eval_loss(p, feats, mask, y):
        return loss_of(model.apply({"params": p}, feats, mask)["logits"], y)

    return tx, epoch, eval_loss


@functools.lru_cache(maxsize=16)
def _forward(model: GatedAttentionMIL):
    return jax.jit(lambda p, feats, mask: model.apply({"params": p}, feats, mask))


@functools.lru_cache(maxsize=16)
def _init(model: GatedAttentionMIL, tx_key: tuple):
    """Jitted (params, optimiser state) initialiser (one compile instead of one per op)."""
    tx = _compiled(model, *tx_key)[0]

    def init(key, feats, mask):
        params = nn.meta.unbox(model.init(key, feats, mask)["params"])
        return params, tx.init(params)
    return jax.jit(init)


def train_mil(bags: slide_data.Bags, y: np.ndarray, tr: np.ndarray, val: np.ndarray,
              n_outputs: int, regression: bool, cfg: Any, seed: int = 0
              ) -> tuple[GatedAttentionMIL, dict, dict]:
    """Train on bags `tr`, early-stop on bags `val`; returns (model, best params, history)."""
    model = GatedAttentionMIL(n_outputs, hidden=int(cfg.hidden),
                              attention_dim=int(cfg.attention_dim), dropout=float(cfg.dropout))
    tx_key = (float(cfg.lr), float(cfg.weight_decay), regression)
    tx, epoch, eval_loss = _compiled(model, *tx_key)
    feats, mask = jnp.asarray(bags.features), jnp.asarray(bags.mask)
    yj = jnp.asarray(y, jnp.float32 if regression else jnp.int32)
    key = jax.random.key(seed)
    params, opt_state = _init(model, tx_key)(key, bags.features[:1], bags.mask[:1])
    batch = max(1, min(int(cfg.batch_size), len(tr)))
    steps = max(1, len(tr) // batch)
    rng = np.random.default_rng(seed)
    best, best_loss, bad, hist = params, np.inf, 0, []
    vf, vm = bags.features[val], bags.mask[val]
    vy = np.asarray(y, np.float32 if regression else np.int32)[val]
    keys = np.asarray(jax.random.key_data(jax.random.split(key, int(cfg.epochs))))
    for e in range(int(cfg.epochs)):
        order = rng.permutation(tr)[:steps * batch].reshape(steps, batch)
        sub = jax.random.wrap_key_data(keys[e])
        params, opt_state, loss = epoch(params, opt_state, feats, mask, yj, order, sub)
        vloss = float(eval_loss(params, vf, vm, vy))
        hist.append((float(loss), vloss))
        if vloss < best_loss:
            best, best_loss, bad = params, vloss, 0
        elif e + 1 >= int(cfg.min_epochs):
            bad += 1
            if bad >= int(cfg.patience):
                break
    return model, best, {"epochs": len(hist), "best_val_loss": float(best_loss),
                         "final_train_loss": hist[-1][0]}


def predict_mil(model: GatedAttentionMIL, params: dict, bags: slide_data.Bags, idx: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """(outputs [n, C] (probabilities, or the regression value), attention [n, T]) of bags
    `idx`."""
    out = _forward(model)(params, jnp.asarray(bags.features[idx]), jnp.asarray(bags.mask[idx]))
    return np.asarray(out["logits"]), np.asarray(out["attention"])


# ============================================================================ task ============
def run(config: Any, workdir: str) -> dict:
    """The slide MIL task (see module docstring)."""
    t0 = time.time()
    check(config.target in ("classification", "regression"), "target", config.target,
          "choose classification or regression")
    regression = config.target == "regression"
    check(int(config.folds) >= 2, "folds", config.folds, "needs at least 2 folds")
    labels = slide_data.read_table(config.labels, "labels", "slide labels CSV")
    if config.label_key not in labels:
        raise FinetuneError(f"config.label_key={config.label_key!r} is not a column of "
                            f"config.labels={config.labels!r} (columns: {list(labels.columns)})")
    labels = labels[labels[config.label_key].notna()].reset_index(drop=True)
    if labels.empty:
        raise FinetuneError(f"config.labels={config.labels!r}: no slide has a "
                            f"{config.label_key!r} value")
    tiles = slide_data.load_tiles(config)
    labels = slide_data.match_slides(labels, tiles, "labels")
    patients = (labels[config.patient_key] if config.patient_key in labels
                else labels["slide_id"]).astype(str).to_numpy()
    if regression:
        try:
            raw = labels[config.label_key].astype(float).to_numpy()
        except ValueError:
            raise FinetuneError(f"config.label_key={config.label_key!r}: regression needs "
                                "numeric labels") from None
        if np.nanstd(raw) == 0:
            raise FinetuneError(f"config.label_key={config.label_key!r}: the target is constant")
        mu, sd = float(raw.mean()), float(raw.std())
        y = ((raw - mu) / sd).astype(np.float32)
        strata = (raw > np.median(raw)).astype(int)
        names, n_out = [], 1
    else:
        y, names = slide_data.encode_classes(labels[config.label_key].astype(str), "label_key")
        strata, n_out = y, len(names)
    # every slide of a patient gets the patient's first stratum, as patient_folds requires
    first = pd.Series(strata).groupby(patients).transform("first").to_numpy()
    bags = slide_data.make_bags(tiles, labels["slide_id"], int(config.max_tiles),
                                int(config.seed))
    folds = slide_data.folds_for(patients, first, int(config.folds), int(config.seed), "folds")
    n = len(labels)
    oof = np.full((n, n_out), np.nan, np.float32)
    att = np.zeros(bags.mask.shape, np.float32)
    fold_of = np.full(n, -1)
    per_fold = []
    for f, (tr_all, te) in enumerate(folds):
        inner = slide_data.folds_for(patients[tr_all], first[tr_all], int(config.val_folds),
                                     int(config.seed) + 1 + f, "val_folds")
        tr, val = tr_all[inner[0][0]], tr_all[inner[0][1]]
        t = time.time()
        fb = standardize_bags(bags, tr) if config.standardize else bags
        model, params, hist = train_mil(fb, y, tr, val, n_out, regression, config,
                                        int(config.seed) + f)
        out, a = predict_mil(model, params, fb, te)
        oof[te] = out if regression else np.asarray(jax.nn.softmax(out, -1))
        att[te] = a
        fold_of[te] = f
        per_fold.append({"fold": f, "n_train": int(len(tr)), "n_val": int(len(val)),
                         "n_test": int(len(te)), "seconds": round(time.time() - t, 2), **hist})
    results: dict = {"task": "mil", "target": config.target, "label_key": config.label_key,
                     "n_slides": n, "n_patients": int(len(np.unique(patients))),
                     "tiles_per_slide": {"min": int(bags.mask.sum(1).min()),
                                         "max": int(bags.mask.sum(1).max())},
                     "features": tiles.info, "model": "gated-attention MIL (Ilse 2018; CLAM "
                     "small: hidden %d, attention %d, dropout %.2f)" % (
                         int(config.hidden), int(config.attention_dim), float(config.dropout)),
                     "per_fold": per_fold}
    pred_rows = {"slide_id": labels["slide_id"], "patient": patients, "fold": fold_of,
                 "label": labels[config.label_key]}
    if regression:
        pred = oof[:, 0] * sd + mu
        pt, lo, hi = metrics.bootstrap_ci(metrics.pearson, (raw, pred), int(config.n_boot),
                                          seed=int(config.seed), groups=patients)
        results["metrics"] = {"pearson": {"value": pt, "ci95": [lo, hi]},
                              "mae": float(np.abs(raw - pred).mean())}
        pred_rows["prediction"] = pred
        results["summary_line"] = f"Pearson r {fmt_metric(results['metrics']['pearson'])}"
    else:
        results["classes"] = names
        results["metrics"] = metrics.classification_metrics(y, oof, patients,
                                                            int(config.n_boot), int(config.seed))
        for k, c in enumerate(names):
            pred_rows[f"p_{c}"] = oof[:, k]
        pred_rows["prediction"] = [names[i] for i in oof.argmax(1)]
        m = results["metrics"]
        results["summary_line"] = (f"AUC {fmt_metric(m['auc'])}, balanced acc "
                                   f"{fmt_metric(m['balanced_accuracy'])}")
    pd.DataFrame(pred_rows).to_csv(os.path.join(workdir, "predictions.csv"), index=False)
    _write_attention(os.path.join(workdir, "attention.csv"), tiles, labels, bags, att)
    results["heatmaps"] = _heatmaps(config, workdir, tiles, labels, bags, att, oof, names,
                                    regression)
    results["seconds"] = round(time.time() - t0, 1)
    write_json(os.path.join(workdir, "results.json"), results)
    return results


def _write_attention(path: str, tiles, labels, bags, att) -> None:
    s, t = np.nonzero(bags.mask)
    rows = bags.rows[s, t]
    meta = tiles.meta.iloc[rows]
    pd.DataFrame({"slide_id": labels["slide_id"].to_numpy()[s], "x": meta["x"].to_numpy(),
                  "y": meta["y"].to_numpy(), "attention": att[s, t]}).to_csv(path, index=False)


def _percentiles(v: np.ndarray) -> np.ndarray:
    """Rank percentiles in [0, 1] (CLAM draws attention heatmaps as percentiles)."""
    order = np.argsort(np.argsort(v, kind="stable"), kind="stable")
    return order / max(1, len(v) - 1)


def _heatmaps(config, workdir, tiles, labels, bags, att, oof, names, regression) -> dict:
    """Attention heatmaps + top-tile grids for `config.heatmaps` slides (highest predicted
    score first); needs tile images (config.shards)."""
    k = int(config.heatmaps)
    if k <= 0 or "tile" not in tiles.meta or not config.get("shards", ""):
        return {}
    score = oof[:, 0] if regression else oof[:, -1]
    chosen = np.argsort(-np.nan_to_num(score, nan=-np.inf), kind="stable")[:k]
    paths = slide_paths(config.shards) if config.thumbnail != "tiles" else {}
    out = {}
    for i in chosen:
        sid = str(labels["slide_id"][i])
        m = bags.mask[i]
        rows = bags.rows[i][m]
        meta = tiles.meta.iloc[rows].reset_index(drop=True)
        _, _, foot = slide_grid(meta)
        images = tile_png.read_tiles(config.shards, meta["tile"].to_numpy())
        thumb, source = slide_thumbnail(config.thumbnail, paths.get(sid), images, meta["x"],
                                        meta["y"], foot)
        folder = os.path.join(workdir, "heatmaps", sid)
        a = att[i][m]
        png = heatmap.heatmap_png(thumb, meta["x"], meta["y"], foot, _percentiles(a),
                                  os.path.join(folder, "attention.png"), cmap="jet",
                                  vmin=0.0, vmax=1.0)
        what = (f"predicted {float(score[i]):.3g}" if regression else
                f"p({names[-1]}) = {float(score[i]):.2f}")
        heatmap.panel_png([thumb.image, np.asarray(Image.open(png))],
                          [f"slide {sid} ({source} thumbnail)", f"attention, {what}"],
                          os.path.join(folder, "panel.png"),
                          colorbar=("jet", 0.0, 1.0, "attention percentile"))
        tile_png.top_tiles_png(images, a * len(a), os.path.join(folder, "top_tiles.png"), k=12,
                               label="a*n=")
        out[sid] = os.path.relpath(os.path.join(folder, "panel.png"), workdir)
    return out
