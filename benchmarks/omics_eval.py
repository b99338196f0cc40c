"""Held-out evaluation of a masked-gene-modelling run (issue 6): imputation of masked values
against baselines, and linear probes of the sample embeddings.

    python -m benchmarks.omics_eval --workdir RUN --data PREPARED [--splits val test]
        [--mask-ratio 0.3] [--neighbours 10] [--label oncotree_code] [--out RUN/eval.json]

Held-out samples (patients the run never saw: the prepared folder's val and test splits) get
`--mask-ratio` of their tokens hidden (seeded; the same tokens for every method). Predictions:
  * cfm: the pretrained network sees every visible token of the sample, `mask_value` in place of
    the hidden values, and its MGM head predicts them (a model with `attend_tokens` gets one view
    per window of the sample, `cfm.omics_embed.window_views`, and each hidden token is predicted
    in the view whose window holds it);
  * mean/mode: per feature (gene x modality), the training split's mean (expression) or most
    frequent value (mutation, CNV);
  * kNN: scikit-learn's KNNImputer (nan-Euclidean distance over the visible features, k
    neighbours from the training split), rounded to the nearest call for mutation / CNV.
Figures: masked-expression Pearson r per gene across held-out samples (genes with >= 5 masked
values), averaged over genes (a constant prediction such as the mean counts as r = 0), and MSE;
masked mutation and CNV accuracy. Probes: logistic regression (balanced accuracy) on `--label`
and Cox c-index on `survival_months`/`censorship` (lifelines, where the columns exist), from
the CLS embeddings vs from PCA of the raw features, both fitted on the training split.
The last line holds name=value pairs.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from cfm import cli_help, compat
from cfm.data.omics_records import MODALITIES
from cfm.evals.omics import pearson_per_gene
from cfm.omics_embed import read_samples

EXPR, MUT, CNV = range(3)


def _load(workdir: str):
    import ml_collections

    from cfm import init_from, objectives

    config, params, _, step = init_from.read_checkpoint_params(workdir)
    config = ml_collections.ConfigDict(config)  # as checkpointed: vocab_size/n_bins filled
    return config, objectives.get(config).build_models(config), params, step


def _predict(models, params, samples, masks, batch: int = 8):
    """Per sample: (expression prediction, mutation class, CNV class) for every token."""
    import jax

    from cfm.omics_embed import padded_batches, window_views
    from cfm.ssl import mgm

    @jax.jit
    def run(p, b, m):
        _, pred = mgm.forward(models.backbone, models.mgm_head, p, b, m)
        return (mgm.expression_prediction(pred), pred["mutation"].argmax(-1),
                pred["cnv"].argmax(-1))

    # A windowed model (attend_tokens) predicts each token from the view whose window holds it.
    views, view_masks, owner, index = window_views(
        samples, getattr(models.backbone, "attend_tokens", 0), value_mask=masks)
    out = [(np.zeros(len(s["gene_ids"]), np.float32), np.zeros(len(s["gene_ids"]), np.int64),
            np.zeros(len(s["gene_ids"]), np.int64)) for s in samples]
    lo = 0
    for n, b, m in padded_batches(views, batch, value_mask=view_masks):
        preds = [np.asarray(x) for x in run(params, b, m)]
        for j in range(n):
            i, idx = owner[lo + j], index[lo + j]
            for full, p in zip(out[i], preds):
                full[idx] = p[j, :len(idx)]
        lo += n
    return out


def _matrix(samples, columns: dict) -> np.ndarray:
    x = np.full((len(samples), len(columns)), np.nan)
    for i, s in enumerate(samples):
        idx = [columns[(g, m)] for g, m in zip(s["gene_ids"], s["modality"])]
        x[i, idx] = s["values"]
    return x


def _pearson_per_gene(truth: dict, pred: dict) -> float:
    """`cfm.evals.omics.pearson_per_gene` (the evaluator's measure) of {gene: values} dicts."""
    genes = [g for g, t in truth.items() for _ in t]
    flat = lambda d: np.asarray([v for g in truth for v in d[g]], np.float64)  # noqa: E731
    return pearson_per_gene(np.asarray(genes), flat(truth), flat(pred))


def evaluate(workdir: str, data: str, splits=("val", "test"), mask_ratio: float = 0.3,
             neighbours: int = 10, label: str = "oncotree_code", seed: int = 0,
             trust_data: bool = False, probes: bool = True) -> dict:
    """The result dict (imputation, probes unless `probes` is False); first
    `cfm.compat.check_omics`: CompatError (a ValueError) when `data` was prepared under
    another vocabulary or normalisation than the run trained on (`trust_data`: go on where
    the run's own files cannot be found)."""
    from sklearn.impute import KNNImputer

    t0 = time.perf_counter()
    agreed = compat.check_omics(compat.model_spec(workdir), data, trust_data)
    print(f"omics_eval: {agreed}", file=sys.stderr)
    config, models, params, step = _load(workdir)
    train_meta, train_s = read_samples(data, ("train",))
    held_meta, held = read_samples(data, splits)
    if not held:
        raise ValueError(f"{data}: no samples in splits {list(splits)}")
    keys = sorted({(int(g), int(m)) for s in train_s + held
                   for g, m in zip(s["gene_ids"], s["modality"])})
    columns = {k: i for i, k in enumerate(keys)}
    modality_of = np.array([m for _, m in keys])
    x_train = _matrix(train_s, columns)
    masks = [np.random.default_rng([seed, i]).random(len(s["gene_ids"])) < mask_ratio
             for i, s in enumerate(held)]

    # ---- predictions for the hidden tokens -----------------------------------------------------
    cfm_pred = _predict(models, params, held, masks)
    x_held = _matrix(held, columns)
    for i, (s, mk) in enumerate(zip(held, masks)):
        x_held[i, [columns[(g, m)] for g, m in zip(s["gene_ids"][mk], s["modality"][mk])]] = \
            np.nan
    col_mean = np.nanmean(np.where(np.isnan(x_train), np.nan, x_train), axis=0)
    col_mode = np.zeros(len(keys))
    for j in np.flatnonzero(modality_of != EXPR):
        v = x_train[:, j][~np.isnan(x_train[:, j])]
        if len(v):
            vals, counts = np.unique(v, return_counts=True)
            col_mode[j] = vals[np.argmax(counts)]
    knn = KNNImputer(n_neighbors=neighbours, keep_empty_features=True).fit(x_train)
    x_knn = knn.transform(x_held)

    methods = ("cfm", "mean/mode", "knn")
    truth: dict = {}
    pred: dict = {m: {} for m in methods}
    correct = {m: {MUT: [], CNV: []} for m in methods}
    sq = {m: [] for m in methods}
    for i, (s, mk) in enumerate(zip(held, masks)):
        e, mu, c = cfm_pred[i]
        for t in np.flatnonzero(mk):
            g, mod, v = int(s["gene_ids"][t]), int(s["modality"][t]), float(s["values"][t])
            j = columns[(g, mod)]
            base = col_mean[j] if mod == EXPR else col_mode[j]
            guess = {"cfm": float(e[t]) if mod == EXPR else
                     float(mu[t] if mod == MUT else c[t] - 2),
                     "mean/mode": float(base), "knn": float(x_knn[i, j])}
            if mod == EXPR:
                truth.setdefault(g, []).append(v)
                for m in methods:
                    pred[m].setdefault(g, []).append(guess[m])
                    sq[m].append((guess[m] - v) ** 2)
            else:
                lo, hi = (0, 1) if mod == MUT else (-2, 2)
                for m in methods:
                    correct[m][mod].append(float(np.clip(np.round(guess[m]), lo, hi) == v))
    result = {"workdir": workdir, "step": step, "data": data, "held_out_splits": list(splits),
              "held_out_samples": len(held), "train_samples": len(train_s),
              "mask_ratio": mask_ratio, "neighbours": neighbours, "imputation": {}}
    for m in methods:
        result["imputation"][m] = {
            "expression_pearson": _pearson_per_gene(truth, pred[m]),
            "expression_mse": float(np.mean(sq[m])) if sq[m] else float("nan"),
            "mutation_accuracy": float(np.mean(correct[m][MUT])) if correct[m][MUT] else None,
            "cnv_accuracy": float(np.mean(correct[m][CNV])) if correct[m][CNV] else None}
    result["probes"] = (_probes(models, params, data, train_meta, train_s, held, held_meta,
                                x_train, x_held_full=_matrix(held, columns), label=label)
                        if probes else {})
    result["seconds"] = time.perf_counter() - t0
    return result


def _probes(models, params, data, train_meta, train_s, held, held_meta, x_train, x_held_full,
            label):
    """Logistic regression / Cox on CLS embeddings vs on PCA of the raw features."""
    import pandas as pd
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.preprocessing import StandardScaler

    from cfm.omics_embed import sample_embeddings

    clinical_path = os.path.join(data, "clinical.csv")
    if not os.path.isfile(clinical_path):
        return {"note": "no clinical.csv"}
    clin = pd.read_csv(clinical_path).set_index("sample_id")
    train_ids = [m["sample_id"] for m in train_meta]
    held_ids = [m["sample_id"] for m in held_meta]
    emb_tr = sample_embeddings(models.backbone, params["backbone"], train_s)
    emb_te = sample_embeddings(models.backbone, params["backbone"], held)
    fill = np.nanmean(x_train, axis=0)
    fill = np.where(np.isnan(fill), 0.0, fill)
    raw_tr = np.where(np.isnan(x_train), fill, x_train)
    raw_te = np.where(np.isnan(x_held_full), fill, x_held_full)
    pca = PCA(n_components=min(emb_tr.shape[1], 64), random_state=0).fit(raw_tr)
    feats = {"cfm embedding": (emb_tr, emb_te),
             f"PCA({pca.n_components_}) of raw features": (pca.transform(raw_tr),
                                                          pca.transform(raw_te))}
    out: dict = {}
    if label in clin.columns:
        y_tr, y_te = clin.loc[train_ids, label].astype(str), clin.loc[held_ids, label].astype(str)
        for name, (a, b) in feats.items():
            sc = StandardScaler().fit(a)
            clf = LogisticRegression(max_iter=2000, C=0.1).fit(sc.transform(a), y_tr)
            out[f"{label} balanced accuracy, {name}"] = float(
                balanced_accuracy_score(y_te, clf.predict(sc.transform(b))))
    if {"survival_months", "censorship"} <= set(clin.columns):
        from lifelines import CoxPHFitter
        from lifelines.utils import concordance_index

        for name, (a, b) in feats.items():
            p8 = PCA(n_components=8, random_state=0).fit(a)
            df = pd.DataFrame(p8.transform(a), columns=[f"c{i}" for i in range(8)])
            df["T"] = clin.loc[train_ids, "survival_months"].to_numpy()
            df["E"] = 1 - clin.loc[train_ids, "censorship"].to_numpy()
            df = df.dropna()
            cph = CoxPHFitter(penalizer=0.1).fit(df, "T", "E")
            te = pd.DataFrame(p8.transform(b), columns=[f"c{i}" for i in range(8)])
            t, e = (clin.loc[held_ids, "survival_months"].to_numpy(),
                    1 - clin.loc[held_ids, "censorship"].to_numpy())
            ok = ~(np.isnan(t) | np.isnan(e))
            risk = cph.predict_partial_hazard(te).to_numpy()
            out[f"survival c-index, {name}"] = float(
                concordance_index(t[ok], -risk[ok], e[ok]))
    return out


def _table(r: dict) -> str:
    rows = ["| method | expression Pearson (per gene) | expression MSE | mutation acc | CNV acc |",
            "|---|---|---|---|---|"]
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for m, v in r["imputation"].items():
        rows.append(f"| {m} | {f(v['expression_pearson'])} | {f(v['expression_mse'])} | "
                    f"{f(v['mutation_accuracy'])} | {f(v['cnv_accuracy'])} |")
    rows += [f"| probe: {k} | {v:.3f} | | | |" for k, v in r["probes"].items()
             if isinstance(v, float)]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = cli_help.parser("benchmarks.omics_eval", __doc__, "python -m benchmarks.omics_eval "
                         "--workdir /tmp/cfm_omics_run --data /tmp/cfm_omics")
    ap.add_argument("--workdir", required=True, help="the cfm.train --workdir of the run")
    ap.add_argument("--data", required=True, help="the data_prep.prepare_omics folder")
    ap.add_argument("--splits", nargs="+", default=["val", "test"],
                    help="held-out splits of --data")
    ap.add_argument("--mask-ratio", type=float, default=0.3, help="share of tokens hidden")
    ap.add_argument("--neighbours", type=int, default=10, help="k of the kNN imputation baseline")
    ap.add_argument("--label", default="oncotree_code",
                    help="clinical column the linear probes predict")
    ap.add_argument("--out", default=None, help="JSON result (default: WORKDIR/omics_eval.json)")
    ap.add_argument("--trust-data", action="store_true", help="evaluate even where the run's "
                    "own vocab.tsv/stats.json cannot be found (its data.path is gone)")
    args = ap.parse_args(argv)
    if not 0 < args.mask_ratio < 1 or args.neighbours < 1:
        ap.error("need 0 < --mask-ratio < 1 and --neighbours >= 1")
    try:
        r = evaluate(args.workdir, args.data, tuple(args.splits), args.mask_ratio,
                     args.neighbours, args.label, trust_data=args.trust_data)
    except (FileNotFoundError, ValueError) as e:
        print(f"omics_eval: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.workdir, "omics_eval.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(r, f, indent=1)
    print(_table(r))
    im = r["imputation"]
    print(" ".join([f"held_out={r['held_out_samples']}", f"step={r['step']}"]
                   + [f"pearson_{m.split('/')[0]}={v['expression_pearson']:.4f}"
                      for m, v in im.items()]
                   + [f"seconds={r['seconds']:.0f}"]))
    return 0


if __name__ == "__main__":
    assert MODALITIES[EXPR] == "expression"
    sys.exit(main())
