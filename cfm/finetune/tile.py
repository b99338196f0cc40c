"""Tile classification on a pretrained backbone: linear probe, kNN and full fine-tuning.

    python -m cfm.finetune --config configs/finetune/tile_probe.py:synthetic --workdir DIR

`config.methods` (comma-separated) picks any of:

- `linear` (default, kaiko-ai eva's patch-level protocol; e.g. eva's
  `configs/vision/pathology/offline/classification/crc.yaml` and `bach.yaml`): the encoder is
  frozen, a linear head on the CLS embeddings is trained with cross-entropy, SGD with momentum
  0.9 and no weight decay (`config.optimizer="adamw"` for AdamW instead), batch 256, a cosine
  schedule to 0 over at most 12500 steps, validation accuracy checked every epoch, early
  stopping after `patience` epochs without improvement and the best checkpoint kept; one
  departure: features are z-scored with the training part's statistics (`standardize`, folded
  into the head afterwards), which tiny encoders' low-spread features need;
- `knn`: weighted k-nearest neighbours on L2-normalised embeddings (Wu et al. 2018; the DINO
  evaluation, Caron et al. 2021: k = 20, weights exp(cos / 0.07));
- `finetune`: the backbone and a linear head trained end to end on the tile images with AdamW,
  warmup + cosine, and layer-wise lr decay (BEiT, Bao et al. 2022; 0.75 as MAE's ViT-B recipe,
  He et al. 2022): block i of a depth-L ViT gets lr * decay^(L - i), the patch embedding and
  tokens decay^(L + 1); `trainable_blocks = k` freezes all but the last k blocks (partial
  fine-tuning; 0 trains only the final norm and head).

Splits are patient-level (`config.group_key`, default slide_id): `config.folds`-fold CV from
`cfm.evaluate.cv.patient_folds`, a validation part carved from each training part the same way.
Metrics on the pooled out-of-fold predictions: accuracy, balanced accuracy and macro one-vs-rest
AUC, each with a 95% bootstrap interval over patients (`cfm.evaluate.metrics`). Output:
`results.json`, `predictions.csv` (one row per test tile and method), `report.md`.
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

from cfm.evaluate import metrics as M
from cfm.finetune import slide_data
from cfm.finetune.common import FinetuneError, check, write_json

METHODS = ("linear", "knn", "finetune")
MIN_CHECK_STEPS = 25


# ============================================================================ heads ===========
class LinearHead(nn.Module):
    """Linear classifier on [B, D] features (logical axes embed -> vocab)."""

    n_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.n_classes, kernel_init=nn.with_logical_partitioning(
            nn.initializers.zeros, ("embed", "vocab")), bias_init=nn.with_logical_partitioning(
            nn.initializers.zeros, ("vocab",)), name="linear")(x)


def _optimizer(name: str, lr: float, steps: int, weight_decay: float, warmup: int = 0
               ) -> optax.GradientTransformation:
    if warmup > 0:
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1))
    else:
        schedule = optax.cosine_decay_schedule(lr, max(steps, 1))
    if name == "sgd":
        return optax.chain(optax.add_decayed_weights(weight_decay),
                           optax.sgd(schedule, momentum=0.9))
    if name == "adamw":
        return optax.adamw(schedule, weight_decay=weight_decay)
    raise FinetuneError(f"config.optimizer={name!r}: choose 'sgd' (eva) or 'adamw'")


# ============================================================================ linear probe ====
def train_linear(x_tr: np.ndarray, y_tr: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                 n_classes: int, lr: float = 0.01, optimizer: str = "sgd", max_steps: int = 12500,
                 batch_size: int = 256, patience: int = 24, weight_decay: float = 0.0,
                 seed: int = 0, standardize: bool = True) -> tuple[dict, dict]:
    """Linear head on frozen features with early stopping on validation accuracy; returns
    (best params, history dict). Batches are drawn at random (with replacement); validation
    accuracy is checked every max(ceil(n_train / batch), MIN_CHECK_STEPS) steps, and training
    stops after `patience` checks without improvement (the best parameters are kept).

    `standardize` z-scores the features with the training part's mean and std while training
    and folds that affine map into the returned head (W / std, b - (mean / std) W), so the head
    applies to raw features. The optimum is the same; only the conditioning changes, which
    matters for features with a large common offset and small spread (tiny encoders: std
    ~0.02 per dimension around a norm of ~6), where SGD barely moves in eva's step budget."""
    mu = x_tr.mean(0) if standardize else np.zeros(x_tr.shape[1], np.float32)
    sd = x_tr.std(0) if standardize else np.ones(x_tr.shape[1], np.float32)
    sd = np.where(sd > 0, sd, 1.0).astype(np.float32)
    x_tr, x_val = (x_tr - mu) / sd, (x_val - mu) / sd
    head = LinearHead(n_classes)
    tx = _optimizer(optimizer, lr, max_steps, weight_decay)

    @jax.jit
    def init(key):  # one compile instead of one per initialiser op
        p = nn.meta.unbox(head.init(key, jnp.zeros((1, x_tr.shape[1])))["params"])
        return p, tx.init(p)

    params, opt_state = init(jax.random.key(seed))
    x_tr_j, y_tr_j = jnp.asarray(x_tr), jnp.asarray(y_tr)  # arguments, not jit constants
    batch = min(batch_size, len(x_tr))
    # One check of the validation accuracy per epoch, but at least every MIN_CHECK_STEPS steps
    # apart: with a few hundred tiles an epoch is 1-2 steps, and eva's patience (24 checks on
    # CRC's 25-step epochs, 400 on BACH's 2-step ones) is meant as ~600-800 steps.
    epoch = max(MIN_CHECK_STEPS, -(-len(x_tr) // batch))

    def loss_fn(p, xb, yb):
        logits = head.apply({"params": p}, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def run_epoch(p, s, xs, ys, key):
        def step(carry, k):
            p, s = carry
            idx = jax.random.randint(k, (batch,), 0, xs.shape[0])
            loss, g = jax.value_and_grad(loss_fn)(p, xs[idx], ys[idx])
            upd, s = tx.update(g, s, p)
            return (optax.apply_updates(p, upd), s), loss
        (p, s), losses = jax.lax.scan(step, (p, s), jax.random.split(key, epoch))
        return p, s, losses.mean()

    predict = jax.jit(lambda p, x: head.apply({"params": p}, x).argmax(-1))
    key = jax.random.key(seed + 1)
    best, best_acc, bad, history = params, -1.0, 0, []
    for e in range(max(1, max_steps // epoch)):
        key, sub = jax.random.split(key)
        params, opt_state, loss = run_epoch(params, opt_state, x_tr_j, y_tr_j, sub)
        acc = float((np.asarray(predict(params, x_val)) == y_val).mean())
        history.append((float(loss), acc))
        if acc > best_acc:
            best, best_acc, bad = params, acc, 0
        else:
            bad += 1
            if bad >= patience:
                break
    best = jax.tree.map(np.asarray, best)
    w = best["linear"]["kernel"] / sd[:, None]
    best = {"linear": {"kernel": w, "bias": best["linear"]["bias"] - (mu / sd) @ best["linear"][
        "kernel"]}}
    return best, {"epochs": len(history), "steps": len(history) * epoch,
                  "best_val_accuracy": best_acc, "final_train_loss": history[-1][0]}


def predict_linear(params: dict, x: np.ndarray) -> np.ndarray:
    """Class probabilities [N, C] of a linear head."""
    w, b = (np.asarray(params["linear"][k], np.float64) for k in ("kernel", "bias"))
    logits = np.asarray(x, np.float64) @ w + b  # numpy: no compile for a matmul
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


# ============================================================================ kNN =============
def knn_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int,
                k: int = 20, temperature: float = 0.07) -> np.ndarray:
    """Weighted kNN class probabilities [N, C] (cosine similarity, weights exp(sim / T))."""
    def norm(a):
        a = np.asarray(a, np.float32)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    sim = norm(x_test) @ norm(x_train).T
    k = min(k, len(x_train))
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    w = np.exp(np.take_along_axis(sim, top, 1) / temperature)
    votes = np.zeros((len(x_test), n_classes))
    np.add.at(votes, (np.arange(len(x_test))[:, None], y_train[top]), w)
    return votes / votes.sum(1, keepdims=True)


# ============================================================================ fine-tuning =====
_BLOCK = re.compile(r"block_(\d+)")
_EMBED = ("patch_embed", "cls_token", "reg_tokens", "mask_token", "pos_embed")


def layer_id(path: str, depth: int) -> int:
    """BEiT's layer id of a backbone parameter: 0 for the patch embedding and tokens, i + 1 for
    block i, depth + 1 for the final norm (and anything after it, e.g. the head)."""
    if any(e in path for e in _EMBED):
        return 0
    m = _BLOCK.search(path)
    return int(m.group(1)) + 1 if m else depth + 1


def layerwise_lr_factors(params: dict, depth: int, decay: float,
                         trainable_blocks: int = -1) -> Any:
    """Tree of lr factors for {"backbone": ..., "head": ...}: decay^(depth + 1 - layer_id) in
    the backbone (as `cfm.optim.lr_multipliers`), 1 for the head; with `trainable_blocks` k >= 0
    every backbone parameter below block depth - k gets 0 (frozen)."""
    def factor(kp, _):
        path = "/".join(str(getattr(k, "key", k)) for k in kp)
        if not path.startswith("backbone"):
            return 1.0
        lid = layer_id(path, depth)
        if trainable_blocks >= 0 and lid <= depth - trainable_blocks:
            return 0.0
        return float(decay ** (depth + 1 - lid))

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
    from cfm import pretrained

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
    tx = optax.chain(_optimizer("adamw", float(cfg.lr), total, float(cfg.weight_decay),
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
    from cfm.data.sources import ShardSource

    source = ShardSource(shards)
    return np.stack([slide_data._prepare(source.tile(int(i))[0], size, mean, std)
                     for i in rows])


# ============================================================================ metrics =========
def macro_auc(y: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC for 2 classes, else the mean one-vs-rest AUC over classes present in `y`."""
    y = np.asarray(y)
    if probs.shape[1] == 2:
        return M.roc_auc(y == 1, probs[:, 1])
    present = [c for c in range(probs.shape[1]) if 0 < (y == c).sum() < len(y)]
    if len(present) < 2:
        raise ValueError("macro AUC needs at least two classes in y")
    return float(np.mean([M.roc_auc(y == c, probs[:, c]) for c in present]))


def classification_metrics(y: np.ndarray, probs: np.ndarray, groups: np.ndarray,
                           n_boot: int = 1000, seed: int = 0) -> dict:
    """accuracy, balanced accuracy, AUC (macro one-vs-rest) with 95% bootstrap intervals
    resampling `groups` (patients)."""
    import warnings

    out = {}
    fns = {"accuracy": lambda a, p: M.accuracy(a, p.argmax(1)),
           "balanced_accuracy": lambda a, p: M.balanced_accuracy(a, p.argmax(1)),
           "auc": macro_auc}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in fns.items():
            point, lo, hi = M.bootstrap_ci(fn, (y, probs), n_boot=n_boot, seed=seed,
                                           groups=groups)
            out[name] = {"value": point, "ci95": [lo, hi]}
    return out


def fmt_metric(m: dict) -> str:
    lo, hi = m["ci95"]
    return f"{m['value']:.3f} [{lo:.3f}, {hi:.3f}]"


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
        from cfm import pretrained

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
                              "accuracy": M.accuracy(y[te], probs.argmax(1)),
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
