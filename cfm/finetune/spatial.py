"""Spatial gene expression from tile embeddings, HEST-Benchmark's protocol (Jaume et al. 2024,
"HEST-1k", NeurIPS Datasets & Benchmarks).

    python -m cfm.finetune --config configs/finetune/spatial.py:synthetic --workdir DIR

Each spot is one tile (its embedding: the frozen backbone's CLS token); its target is the log1p
expression of the `config.n_genes` most variable genes (variance of log1p counts on the
training spots). `config.expression` is a CSV with slide_id, x, y (the tile's level-0 corner)
and one column per gene; spots are joined to tiles on (slide_id, x, y).

Regressors (`config.methods`):
- `ridge`: HEST's linear probe: standardise, PCA to 256 components (fit on the training spots),
  ridge regression without intercept, alpha = 100 / (n_features * n_genes) (HEST's
  `train_test_reg`); solved in closed form;
- `mlp`: a small MLP (linen, logical axes) on the same PCA features: one hidden layer of 256
  GELU units, AdamW 1e-3, full-batch steps, early stopping on a validation part.

Splits are patient-level k-fold (`config.group_key`, default slide_id); the metric is the
Pearson r per gene between predicted and measured expression on the test spots, averaged over
genes, reported per fold and as mean +- std over folds (HEST's summary), plus the per-gene r of
the pooled out-of-fold predictions. Output: `results.json`, `pearson_per_gene.csv` and
`predictions.csv` (out-of-fold: one row per spot, one column per method and gene).
"""

from __future__ import annotations

import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from cfm.evaluate.metrics import pearson_per_column
from cfm.finetune import slide_data
from cfm.finetune.common import FinetuneError, check, write_json

METHODS = ("ridge", "mlp")
PCA_COMPONENTS = 256  # HEST-Benchmark's latent_dim


# ============================================================================ features ========
def fit_pca(x: np.ndarray, n_components: int = PCA_COMPONENTS) -> dict:
    """Standardise + PCA fitted on `x` [n, d]: {mean, scale, components [k, d]}, k <= n, d."""
    mean = x.mean(0)
    scale = x.std(0)
    scale = np.where(scale > 0, scale, 1.0)
    z = (x - mean) / scale
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    k = min(n_components, vt.shape[0])
    return {"mean": mean, "scale": scale, "components": vt[:k]}


def apply_pca(pca: dict, x: np.ndarray) -> np.ndarray:
    """`x` [n, d] standardised and projected on the components of `fit_pca`: [n, k]."""
    return ((x - pca["mean"]) / pca["scale"]) @ pca["components"].T


def ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float | None = None) -> np.ndarray:
    """Ridge weights [d, g] without intercept: (X^T X + alpha I)^-1 X^T Y; alpha defaults to
    HEST's 100 / (d * g)."""
    d, g = x.shape[1], y.shape[1]
    alpha = 100.0 / (d * g) if alpha is None else float(alpha)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    return np.linalg.solve(x64.T @ x64 + alpha * np.eye(d), x64.T @ y64)


class ExpressionMLP(nn.Module):
    """Features [n, d] -> expression [n, g]: Dense(hidden) - GELU - Dense(g)."""

    n_genes: int
    hidden: int = 256

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = lambda names: nn.with_logical_partitioning(  # noqa: E731
            nn.initializers.lecun_normal(), names)
        h = nn.gelu(nn.Dense(self.hidden, kernel_init=init(("embed", "mlp")),
                             bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                                    ("mlp",)), name="fc1")(x))
        return nn.Dense(self.n_genes, kernel_init=init(("mlp", "vocab")),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                               ("vocab",)), name="fc2")(h)


def mlp_fit_predict(x_tr, y_tr, x_val, y_val, x_te, cfg: Any, seed: int = 0) -> np.ndarray:
    """Train ExpressionMLP full-batch with early stopping on validation MSE; predict `x_te`."""
    model = ExpressionMLP(y_tr.shape[1], int(cfg.mlp_hidden))
    params = nn.meta.unbox(model.init(jax.random.key(seed), jnp.zeros((1, x_tr.shape[1])))[
        "params"])
    tx = optax.adamw(float(cfg.mlp_lr), weight_decay=float(cfg.mlp_weight_decay))
    state = tx.init(params)
    mu, sd = y_tr.mean(0), np.where(y_tr.std(0) > 0, y_tr.std(0), 1.0)
    xt, yt = jnp.asarray(x_tr), jnp.asarray((y_tr - mu) / sd)
    xv, yv = jnp.asarray(x_val), jnp.asarray((y_val - mu) / sd)

    @jax.jit
    def chunk(p, s):
        def step(carry, _):
            p, s = carry
            g = jax.grad(lambda q: jnp.mean((model.apply({"params": q}, xt) - yt) ** 2))(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None
        (p, s), _ = jax.lax.scan(step, (p, s), None, length=10)
        return p, s, jnp.mean((model.apply({"params": p}, xv) - yv) ** 2)

    best, best_loss, bad = params, np.inf, 0
    for _ in range(int(cfg.mlp_steps) // 10):
        params, state, vloss = chunk(params, state)
        if float(vloss) < best_loss:
            best, best_loss, bad = params, float(vloss), 0
        else:
            bad += 1
            if bad >= int(cfg.mlp_patience):
                break
    return np.asarray(model.apply({"params": best}, jnp.asarray(x_te))) * sd + mu


# ============================================================================ data ============
def join_spots(expr: pd.DataFrame, tiles: slide_data.TileSet, key: str
               ) -> tuple[np.ndarray, pd.DataFrame]:
    """(tile row of each spot, spots) joined on (slide_id, x, y); FinetuneError naming the
    slides when spots have no tile."""
    for col in ("x", "y"):
        if col not in expr:
            raise FinetuneError(f"config.{key}: no {col!r} column (spots are joined to tiles on "
                                "slide_id, x, y)")
    expr = expr.copy()
    expr["x"], expr["y"] = expr["x"].astype(np.int64), expr["y"].astype(np.int64)
    lookup = {(s, int(x), int(y)): i for i, (s, x, y) in enumerate(zip(
        tiles.meta["slide_id"], tiles.meta["x"], tiles.meta["y"]))}
    rows = np.array([lookup.get((s, int(x), int(y)), -1)
                     for s, x, y in zip(expr["slide_id"], expr["x"], expr["y"])])
    if (rows < 0).all():
        raise FinetuneError(f"config.{key}: none of its {len(expr)} spots matches a tile "
                            "(slide_id, x, y); expression and tiles do not match")
    if (rows < 0).any():
        bad = sorted(set(expr["slide_id"][rows < 0]))
        raise FinetuneError(f"config.{key}: {int((rows < 0).sum())} spot(s) have no tile, in "
                            f"slide(s) {bad[:5]}")
    return rows, expr.reset_index(drop=True)


# ============================================================================ task ============
def run(config: Any, workdir: str) -> dict:
    """The spatial expression task (see module docstring)."""
    t0 = time.time()
    methods = [m.strip() for m in str(config.methods).split(",") if m.strip()]
    check(bool(methods) and all(m in METHODS for m in methods), "methods", config.methods,
          f"a comma-separated subset of {METHODS}")
    expr = slide_data.read_table(config.expression, "expression", "spot expression CSV")
    genes_all = [c for c in expr.columns if c not in ("slide_id", "x", "y", "patient_id",
                                                      "spot_id", "barcode")]
    if not genes_all:
        raise FinetuneError(f"config.expression={config.expression!r}: no gene columns")
    try:
        counts = expr[genes_all].to_numpy(np.float64)
    except ValueError:
        raise FinetuneError(f"config.expression={config.expression!r}: gene columns must be "
                            "numeric") from None
    if np.isnan(counts).any() or (counts < 0).any():
        raise FinetuneError(f"config.expression={config.expression!r}: counts must be "
                            "non-negative numbers without gaps")
    tiles = slide_data.load_tiles(config)
    rows, expr = join_spots(expr, tiles, "expression")
    x = tiles.features[rows].astype(np.float64)
    y_all = np.log1p(counts) if config.normalize == "log1p" else counts
    groups = (expr[config.group_key] if config.group_key in expr else expr["slide_id"]).astype(
        str).to_numpy()
    check(len(np.unique(groups)) >= int(config.folds), "folds", config.folds,
          f"more folds than groups ({len(np.unique(groups))} {config.group_key}s)")
    folds = slide_data.folds_for(groups, np.zeros(len(groups)), int(config.folds),
                                 int(config.seed), "folds")
    oof = {m: np.full((len(x), 0), np.nan) for m in methods}
    per_fold, genes = [], None
    for f, (tr_all, te) in enumerate(folds):
        var = y_all[tr_all].var(0)
        if genes is None:  # genes chosen on the first training part, kept for every fold
            top = np.argsort(-var, kind="stable")[:int(config.n_genes)]
            top = top[var[top] > 0]
            if len(top) == 0:
                raise FinetuneError(f"config.expression={config.expression!r}: every gene is "
                                    "constant on the training spots")
            genes = [genes_all[i] for i in top]
            gidx = top
            for m in methods:
                oof[m] = np.full((len(x), len(genes)), np.nan)
        y = y_all[:, gidx]
        pca = fit_pca(x[tr_all], int(config.pca_components))
        z = apply_pca(pca, x)
        row = {"fold": f, "n_train": int(len(tr_all)), "n_test": int(len(te)),
               "pca_components": int(pca["components"].shape[0])}
        for m in methods:
            if m == "ridge":
                w = ridge_fit(z[tr_all], y[tr_all])
                pred = z[te] @ w
            else:
                inner = slide_data.folds_for(groups[tr_all], np.zeros(len(tr_all)), 4,
                                             int(config.seed) + 1 + f, "folds")
                tr, val = tr_all[inner[0][0]], tr_all[inner[0][1]]
                pred = mlp_fit_predict(z[tr], y[tr], z[val], y[val], z[te], config,
                                       int(config.seed) + f)
            oof[m][te] = pred
            r = pearson_per_column(y[te], pred)
            row[f"{m}_pearson_mean"] = float(np.nanmean(r))
        per_fold.append(row)
    y = y_all[:, gidx]
    results: dict = {"task": "spatial", "protocol": "HEST-Benchmark (Jaume et al. 2024)",
                     "n_spots": int(len(x)), "n_groups": int(len(np.unique(groups))),
                     "genes": genes, "features": tiles.info, "per_fold": per_fold,
                     "methods": {}}
    gene_table = {"gene": genes}
    for m in methods:
        fold_means = np.array([r[f"{m}_pearson_mean"] for r in per_fold])
        pooled = pearson_per_column(y, oof[m])
        gene_table[m] = np.round(pooled, 4)
        results["methods"][m] = {
            "pearson_mean_over_genes": {"mean_over_folds": float(np.nanmean(fold_means)),
                                        "std_over_folds": float(np.nanstd(fold_means))},
            "pooled_pearson_mean_over_genes": float(np.nanmean(pooled)),
            "best_genes": [genes[i] for i in np.argsort(-np.nan_to_num(pooled, nan=-2))[:5]]}
    pd.DataFrame(gene_table).to_csv(os.path.join(workdir, "pearson_per_gene.csv"), index=False)
    pred = expr[["slide_id", "x", "y"]].copy()
    for m in methods:
        for k, g in enumerate(genes):
            pred[f"{m}_{g}"] = np.round(oof[m][:, k], 4)
    pred.to_csv(os.path.join(workdir, "predictions.csv"), index=False)
    results["seconds"] = round(time.time() - t0, 1)
    results["summary_line"] = "; ".join(
        f"{m}: Pearson r mean over {len(genes)} genes "
        f"{v['pearson_mean_over_genes']['mean_over_folds']:.3f} +- "
        f"{v['pearson_mean_over_genes']['std_over_folds']:.3f} over folds"
        for m, v in results["methods"].items())
    write_json(os.path.join(workdir, "results.json"), results)
    return results
