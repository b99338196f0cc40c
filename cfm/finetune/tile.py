"""Tile classification on a pretrained backbone: linear probe, kNN and full fine-tuning.

    python -m cfm.finetune --config configs/finetune/tile_probe.py:synthetic --workdir DIR

`config.methods` (comma-separated) picks any of:

- `linear` (default): a linear head on the frozen CLS embeddings, kaiko-ai eva's patch-level
  protocol (`cfm.finetune.probe.train_linear`; SGD with momentum, or `config.optimizer="adamw"`);
- `knn`: weighted k-nearest neighbours on L2-normalised embeddings (`cfm.finetune.probe.
  knn_predict`; the DINO evaluation, k = 20, weights exp(cos / 0.07));
- `finetune`: the backbone and a linear head trained end to end on the tile images with AdamW,
  warmup + cosine, and layer-wise lr decay (BEiT, Bao et al. 2022; 0.75 as MAE's ViT-B recipe,
  He et al. 2022; the factor is `cfm.optim.layer_decay`, as in pretraining): block i of a
  depth-L ViT gets lr * decay^(L - i), the patch embedding and tokens decay^(L + 1);
  `trainable_blocks = k` freezes all but the last k blocks (partial fine-tuning; 0 trains only
  the final norm and head).

Splits are patient-level (`config.group_key`, default slide_id): `config.folds`-fold CV from
`cfm.evaluate.cv.patient_folds`, a validation part carved from each training part the same way.
Metrics on the pooled out-of-fold predictions: accuracy, balanced accuracy and macro one-vs-rest
AUC, each with a 95% bootstrap interval over patients (`cfm.evaluate.metrics.
classification_metrics`). Output: `results.json`, `predictions.csv` (one row per test tile and
method), `report.md`.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from cfm import pretrained
from cfm.data.sources import ShardSource
from cfm.evaluate.metrics import accuracy, classification_metrics
from cfm.evaluate.report import fmt_metric
from cfm.finetune import slide_data
from cfm.finetune.common import FinetuneError, check, write_json
from cfm.finetune.probe import (LinearHead, knn_predict, make_optimizer, predict_linear,
                                train_linear)
from cfm.optim import layer_decay

METHODS = ("linear", "knn", "finetune")


# ============================================================================ fine-tuning =====
_BLOCK = re.compile(r"block_(\d+)")
_EMBED = ("patch_embed", "cls_token", "reg_tokens", "mask_token", "pos_embed",
          # the omics encoder's token embeddings (cfm.models.omics), layer 0 too
          "gene_embed", "modality_embed", "value_in", "value_out", "value_embed",
          "gene_norm", "value_norm", "gene_value_embed", "sketch_norm", "mask_value")


def layer_id(path: str, depth: int) -> int:
    """BEiT's layer id of a backbone parameter: 0 for the patch embedding and tokens, i + 1 for
    block i, depth + 1 for the final norm (and anything after it, e.g. the head)."""
    if any(e in path for e in _EMBED):
        return 0
    m = _BLOCK.search(path)
    return int(m.group(1)) + 1 if m else depth + 1


def layerwise_lr_factors(params: dict, depth: int, decay: float,
                         trainable_blocks: int = -1) -> Any:
    """Tree of lr factors for {"backbone": ..., "head": ...}: `cfm.optim.layer_decay`,
    decay^(depth + 1 - layer_id), in the backbone (as `cfm.optim.lr_multipliers`), 1 for the
    head; with `trainable_blocks` k >= 0 every backbone parameter below block depth - k gets 0
    (frozen)."""
    def factor(kp, _):
        path = "/".join(str(getattr(k, "key", k)) for k in kp)
        if not path.startswith("backbone"):
            return 1.0
        lid = layer_id(path, depth)
        if trainable_blocks >= 0 and lid <= depth - trainable_blocks:
            return 0.0
        return float(layer_decay(decay, lid, depth))

    return jax.tree_util.tree_map_with_path(factor, params)


def _scale_by_tree(factors: Any) -> optax.GradientTransformation:
    return optax.GradientTransformation(
        lambda p: optax.EmptyState(),
        lambda u, s, p=None: (jax.tree.map(lambda a, f: a * f, u, factors), s))


def finetune_classifier(model_path: str, images: np.ndarray, y: np.ndarray, tr: np.ndarray,
                        val: np.ndarray, n_classes: int, cfg: Any, seed: int = 0
                        ) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """Fine-tune the backbone at `model_path` + a linear head on `images` [N, S, S, 3]
    (already normalised) rows `tr`, early stopping on rows `val`. Returns (probability function
    over images, history)."""
    p = pretrained.load(model_path, drop_path_rate=float(cfg.drop_path_rate))
    depth = int(p.info["architecture"]["depth"])
    backbone, head = p.module, LinearHead(n_classes)
    params = {"backbone": p.params, "head": nn.meta.unbox(head.init(
        jax.random.key(seed), jnp.zeros((1, p.info["architecture"]["width"])))["params"])}
    batch = min(int(cfg.batch_size), len(tr))
    steps_per_epoch = max(1, len(tr) // batch)
    total = steps_per_epoch * int(cfg.epochs)
    factors = layerwise_lr_factors(params, depth, float(cfg.layerwise_decay),
                                   int(cfg.trainable_blocks))
    tx = optax.chain(make_optimizer("adamw", float(cfg.lr), total, float(cfg.weight_decay),
                                    warmup=steps_per_epoch * int(cfg.warmup_epochs)),
                     _scale_by_tree(factors))
    opt_state = tx.init(params)

    def logits_fn(prm, x, train, key):
        rngs = {"dropout": key} if train else {}
        feats = backbone.apply({"params": prm["backbone"]}, x, train=train, rngs=rngs)["cls"]
        return head.apply({"params": prm["head"]}, feats)

    @jax.jit
    def step(prm, s, xb, yb, key):
        k_aug, k_dp = jax.random.split(key)
        flip = jax.random.bernoulli(k_aug, 0.5, (xb.shape[0], 1, 1, 1))
        xb = jnp.where(flip, xb[:, :, ::-1], xb)  # horizontal flips; tiles have no orientation
        loss, g = jax.value_and_grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(
            logits_fn(q, xb, True, k_dp), yb).mean())(prm)
        upd, s = tx.update(g, s, prm)
        return optax.apply_updates(prm, upd), s, loss

    probs_fn = jax.jit(lambda prm, x: jax.nn.softmax(logits_fn(prm, x, False, None), -1))

    def predict(prm, x):
        return np.concatenate([np.asarray(probs_fn(prm, x[i:i + 256]))
                               for i in range(0, len(x), 256)])

    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    best, best_acc, bad, epochs = params, -1.0, 0, 0
    for _ in range(int(cfg.epochs)):
        order = rng.permutation(tr)
        for i in range(steps_per_epoch):
            rows = order[i * batch:(i + 1) * batch]
            key, sub = jax.random.split(key)
            params, opt_state, _ = step(params, opt_state, images[rows], y[rows], sub)
        epochs += 1
        acc = float((predict(params, images[val]).argmax(1) == y[val]).mean())
        if acc > best_acc:
            best, best_acc, bad = params, acc, 0
        else:
            bad += 1
            if bad >= int(cfg.patience):
                break
    frozen = sum(int(np.size(v)) for v, f in zip(jax.tree.leaves(params["backbone"]),
                                                  jax.tree.leaves(factors["backbone"]))
                 if f == 0.0)
    return (lambda x: predict(best, x)), {"epochs": epochs, "best_val_accuracy": best_acc,
                                          "frozen_backbone_params": frozen}


def load_images(shards: str, rows: np.ndarray, size: int, mean, std) -> np.ndarray:
    """Tiles `rows` of the shards, resized and normalised as for embedding: [N, size, size, 3]."""
    source = ShardSource(shards)
    return np.stack([slide_data.prepare_tile(source.tile(int(i))[0], size, mean, std)
                     for i in rows])


# ============================================================================ task ============
def run(config: Any, workdir: str) -> dict:
    """The tile classification task (see module docstring)."""
    t0 = time.time()
    methods = [m.strip() for m in str(config.methods).split(",") if m.strip()]
    check(bool(methods) and all(m in METHODS for m in methods), "methods", config.methods,
          f"a comma-separated subset of {METHODS}")
    check(int(config.folds) >= 2, "folds", config.folds, "needs at least 2 folds")
    tiles = slide_data.load_tiles(config)
    key = config.label_key
    if key not in tiles.meta:
        raise FinetuneError(f"config.label_key={key!r}: the tiles carry no such metadata key "
                            f"(keys: {sorted(tiles.meta.columns)})")
    keep = tiles.meta[key].notna().to_numpy()
    if config.get("classes", ""):
        wanted = [c.strip() for c in str(config.classes).split(",")]
        keep &= tiles.meta[key].astype(str).isin(wanted).to_numpy()
    if not keep.any():
        raise FinetuneError(f"config.label_key={key!r}: no tile has a label to train on")
    x, meta = tiles.features[keep], tiles.meta[keep].reset_index(drop=True)
    y, names = slide_data.encode_classes(meta[key].astype(str), "label_key")
    groups = meta[config.group_key].astype(str).to_numpy()
    folds = slide_data.folds_for(groups, np.zeros(len(y)), int(config.folds), int(config.seed),
                                 "folds")
    run_folds = min(int(config.run_folds), len(folds)) if int(config.run_folds) > 0 else len(folds)
    n_classes = len(names)
    images = None
    if "finetune" in methods:
        check(bool(config.get("model", "")) and bool(config.get("shards", "")), "model",
              config.get("model", ""), "full fine-tuning needs config.model and config.shards "
              "(tile images), not only config.embeddings")
        info = pretrained.load(config.model).info
        images = load_images(config.shards, meta["tile"].to_numpy(),
                             int(info["architecture"]["img_size"]),
                             info["preprocessing"]["mean"], info["preprocessing"]["std"])
    preds, fold_rows = {m: [] for m in methods}, []
    for f in range(run_folds):
        tr_all, te = folds[f]
        inner = slide_data.folds_for(groups[tr_all], np.zeros(len(tr_all)),
                                     int(config.val_folds), int(config.seed) + 1 + f, "val_folds")
        tr, val = tr_all[inner[0][0]], tr_all[inner[0][1]]
        if len(np.unique(y[tr])) < n_classes:
            raise FinetuneError(f"fold {f}: a class is missing from the training tiles; "
                                "lower config.folds or add patients")
        for m in methods:
            t = time.time()
            if m == "linear":
                params, hist = train_linear(
                    x[tr], y[tr], x[val], y[val], n_classes, lr=float(config.lr),
                    optimizer=config.optimizer, max_steps=int(config.max_steps),
                    batch_size=int(config.batch_size), patience=int(config.patience),
                    weight_decay=float(config.weight_decay), seed=int(config.seed) + f,
                    standardize=bool(config.standardize))
                probs = predict_linear(params, x[te])
            elif m == "knn":
                probs = knn_predict(x[tr_all], y[tr_all], x[te], n_classes, int(config.knn_k),
                                    float(config.knn_temperature))
                hist = {"k": int(config.knn_k), "memory": int(len(tr_all))}
            else:
                if f >= int(config.finetune.folds):
                    continue
                predict, hist = finetune_classifier(config.model, images, y, tr, val, n_classes,
                                                    config.finetune, seed=int(config.seed) + f)
                probs = predict(images[te])
            preds[m].append((te, probs, f))
            fold_rows.append({"method": m, "fold": f, "n_test": int(len(te)),
                              "accuracy": accuracy(y[te], probs.argmax(1)),
                              "seconds": round(time.time() - t, 2), **hist})
    results: dict = {"task": "tile", "classes": names, "n_tiles": int(len(y)),
                     "n_patients": int(len(np.unique(groups))), "features": tiles.info,
                     "folds_run": run_folds, "folds": int(config.folds), "methods": {}}
    rows = []
    for m, parts in preds.items():
        if not parts:
            continue
        te = np.concatenate([p[0] for p in parts])
        probs = np.concatenate([p[1] for p in parts])
        results["methods"][m] = classification_metrics(y[te], probs, groups[te],
                                                       int(config.n_boot), int(config.seed))
        results["methods"][m]["n_test_tiles"] = int(len(te))
        for (idx, pr, f) in parts:
            for j, i in enumerate(idx):
                rows.append({"method": m, "fold": f, "slide_id": meta["slide_id"][i],
                             "x": meta["x"][i] if "x" in meta else "",
                             "y": meta["y"][i] if "y" in meta else "", "label": names[y[i]],
                             "pred": names[int(pr[j].argmax())],
                             **{f"p_{c}": round(float(pr[j, k]), 5)
                                for k, c in enumerate(names)}})
    results["per_fold"] = fold_rows
    results["seconds"] = round(time.time() - t0, 1)
    results["summary_line"] = "; ".join(
        f"{m}: balanced acc {fmt_metric(r['balanced_accuracy'])}, AUC {fmt_metric(r['auc'])}"
        for m, r in results["methods"].items())
    pd.DataFrame(rows).to_csv(os.path.join(workdir, "predictions.csv"), index=False)
    write_json(os.path.join(workdir, "results.json"), results)
    _report(os.path.join(workdir, "report.md"), results)
    return results


def _report(path: str, r: dict) -> None:
    """report.md: one row per method with its metrics and 95% intervals."""
    lines = [f"# Tile classification ({', '.join(r['classes'])})", "",
             f"{r['n_tiles']} tiles of {r['n_patients']} patients; {r['folds_run']} of "
             f"{r['folds']} patient-level folds; 95% bootstrap intervals over patients.", "",
             "| method | accuracy | balanced accuracy | AUC (macro OvR) | test tiles |",
             "|---|---|---|---|---|"]
    for m, v in r["methods"].items():
        lines.append(f"| {m} | {fmt_metric(v['accuracy'])} | {fmt_metric(v['balanced_accuracy'])}"
                     f" | {fmt_metric(v['auc'])} | {v['n_test_tiles']} |")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
