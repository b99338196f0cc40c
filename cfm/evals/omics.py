"""Masked gene modelling evaluator: held-out imputation of hidden values, against kNN imputation.

The measures of `benchmarks/omics_eval.py`, computed inside the run: held-out samples (a prepared
folder's `split`, default val; for the synthetic source, samples past the training range, which
share its gene modules) have `mask_ratio` of their tokens hidden (seeded, the same tokens at
every evaluation) and the network predicts them from the rest.

- `pearson`: masked-expression Pearson r per gene across held-out samples (genes with at least
  `MIN_PER_GENE` masked values and a non-constant truth; a constant prediction counts r = 0),
  averaged over genes; `mse` the mean squared error of those values (normalised units);
- `mutation_acc`, `cnv_acc`: accuracy of the predicted class of masked mutation and copy-number
  tokens (absent when the held-out samples have none);
- `knn_pearson`, `knn_mutation_acc`, `knn_cnv_acc`: the same for scikit-learn's KNNImputer
  (nan-Euclidean distance over the visible features, `neighbours` nearest training samples,
  rounded to the nearest call for mutation / CNV), the reference a model should beat. It depends
  on the data only, so it is computed once, at start-up.

Differences from the benchmark, which evaluates a finished run: each held-out sample enters as
the training pipeline feeds it, at most `data.max_tokens` tokens (a subset seeded by sample),
so one jitted shape serves every evaluation; the kNN reference sees the same visible tokens;
at most `max_samples` held-out and `max_train` training samples are used. Under a
classification expression loss the predicted value is the arg-max bin index, a monotone but
non-linear map of the value, so its Pearson r is only comparable between such runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cfm.data import omics_pipeline, omics_source
from cfm.data.omics_records import PAD_ID
from cfm.evals.base import Evaluator, ShardedForward, check, fail
from cfm.ssl import mgm

MIN_PER_GENE = 5  # masked values a gene needs to enter the per-gene Pearson mean


def pearson_per_gene(genes: np.ndarray, truth: np.ndarray, pred: np.ndarray,
                     min_n: int = MIN_PER_GENE) -> float:
    """Mean over genes of Pearson r(truth, pred) of each gene's values; genes with fewer than
    `min_n` values or a constant truth are skipped, a constant prediction counts 0; nan when no
    gene qualifies."""
    rs = []
    for g in np.unique(genes):
        t = np.asarray(truth[genes == g], np.float64)
        p = np.asarray(pred[genes == g], np.float64)
        # "constant" by range, not std: float32 std of equal values is ~1e-8, not 0, and
        # corrcoef then divides 0 by 0 (a gene at 0 in every held-out sample of TCGA did)
        if len(t) < min_n or np.ptp(t) == 0:
            continue
        rs.append(0.0 if np.ptp(p) == 0 else float(np.corrcoef(t, p)[0, 1]))
    return float(np.mean(rs)) if rs else float("nan")


def _matrix(samples: list[dict], columns: dict[tuple[int, int], int]) -> np.ndarray:
    """[samples, features] values (nan where a sample lacks the (gene, modality) token)."""
    x = np.full((len(samples), len(columns)), np.nan)
    for i, s in enumerate(samples):
        keep = s["gene_ids"] != PAD_ID
        idx = [columns[(int(g), int(m))] for g, m in zip(s["gene_ids"][keep],
                                                          s["modality"][keep])]
        x[i, idx] = s["values"][keep]
    return x


def _scores(mod: np.ndarray, genes: np.ndarray, truth: np.ndarray, pred: np.ndarray,
            prefix: str) -> dict[str, float]:
    """Pearson/MSE on expression tokens, rounded-call accuracy on mutation and CNV tokens."""
    e = mod == mgm.EXPRESSION
    out = {f"{prefix}pearson": pearson_per_gene(genes[e], truth[e], pred[e])}
    if prefix == "":
        out["mse"] = float(np.mean((truth[e] - pred[e]) ** 2)) if e.any() else float("nan")
    for m, lo, hi, key in ((mgm.MUTATION, 0, 1, "mutation_acc"), (mgm.CNV, -2, 2, "cnv_acc")):
        sel = mod == m
        if sel.any():
            out[prefix + key] = float(np.mean(np.clip(np.round(pred[sel]), lo, hi)
                                              == truth[sel]))
    return out


class MGMEvaluator(Evaluator):
    """The measures of the module docstring (entry keys split, mask_ratio, neighbours,
    max_samples, max_train, seed, batch_size)."""

    def __init__(self, name: str, every: int, setup: Any, entry: dict):
        super().__init__(name, every)
        config = setup.config
        data = config.data
        check(0.0 < float(entry["mask_ratio"]) < 1.0, name, "mask_ratio", entry["mask_ratio"],
              "must be in (0, 1)")
        check(int(entry["neighbours"]) >= 1, name, "neighbours", entry["neighbours"],
              "must be >= 1")
        n_held, n_train = int(entry["max_samples"]), int(entry["max_train"])
        check(n_held >= 2, name, "max_samples", n_held, "must be >= 2")
        check(n_train >= 1, name, "max_train", n_train, "must be >= 1")
        seed, split = int(entry["seed"]), entry["split"]
        if data.source == "synthetic":
            source = omics_pipeline.make_source(data, config.seed)
            train_src, held_src = source, omics_pipeline.SyntheticOmicsSource(
                source.size + n_held, source.n_genes, source.seed, source.n_bins, source.n_mut,
                source.n_cnv)
            held_idx = range(source.size, source.size + n_held)
        else:
            try:
                manifest = omics_source.read_manifest(data.path)
            except (OSError, ValueError) as e:
                fail(name, "split", split, f"config.data.path={data.path!r}: {e}")
            n = manifest.get("splits", {}).get(split, {}).get("samples", 0)
            check(split in omics_source.SPLITS and n > 0, name, "split", split,
                  f"config.data.path={data.path!r} has no samples in that split (choose one of "
                  f"{list(omics_source.SPLITS)} with samples)")
            train_src = omics_source.OmicsShardSource(data.path, "train")
            held_src = omics_source.OmicsShardSource(data.path, split)
            held_idx = range(min(n_held, len(held_src)))
        train = [train_src[i][1] for i in range(min(n_train, len(train_src)))]
        shuffle = config.model.get("attend_tokens", 0) > 0
        held = [omics_pipeline.pad_sample(held_src[i][1], int(data.max_tokens),
                                          np.random.default_rng([seed, i]), shuffle)
                for i in held_idx]
        batch = {k: np.stack([h[k] for h in held]) for k in held[0]}
        real = batch["gene_ids"] != PAD_ID
        rng = np.random.default_rng([seed, 0x3A5C])
        batch["value_mask"] = (rng.random(real.shape) < float(entry["mask_ratio"])) & real
        self.batch = batch
        self.classification = config.mgm.expression_loss == "classification"
        self.reference = self._knn_reference(train, held, int(entry["neighbours"]))
        models = setup.models

        def fn(params, b):
            _, pred = mgm.forward(models.backbone, models.mgm_head, params, b, b["value_mask"])
            expr = (pred["expression"].argmax(-1) if self.classification
                    else mgm.expression_prediction(pred))
            return {"expression": expr.astype(np.float32),
                    "mutation": pred["mutation"].argmax(-1),
                    "cnv": pred["cnv"].argmax(-1) - 2}

        self.forward = ShardedForward(setup, fn, int(entry["batch_size"]))
        self.export_tree = setup.objective.export_tree

    def _masked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(modality, gene, true value) of every masked token, in row-major order."""
        m = self.batch["value_mask"]
        return self.batch["modality"][m], self.batch["gene_ids"][m], self.batch["values"][m]

    def _knn_reference(self, train: list[dict], held: list[dict], k: int) -> dict[str, float]:
        keys = sorted({(int(g), int(m)) for s in train + held
                       for g, m in zip(s["gene_ids"], s["modality"])
                       if g != PAD_ID})
        columns = {key: j for j, key in enumerate(keys)}
        x_train = _matrix(train, columns)
        visible = [dict(h, gene_ids=np.where(self.batch["value_mask"][i],
                                             PAD_ID, h["gene_ids"]))
                   for i, h in enumerate(held)]
        from sklearn.impute import KNNImputer  # here: a second of import for every cfm.train
        x_held = KNNImputer(n_neighbors=k, keep_empty_features=True).fit(x_train).transform(
            _matrix(visible, columns))
        mod, genes, truth = self._masked()
        rows = np.nonzero(self.batch["value_mask"])[0]
        pred = x_held[rows, [columns[(int(g), int(m))] for g, m in zip(genes, mod)]]
        return _scores(mod, genes, truth, pred, "knn_")

    def compute(self, state: Any) -> dict[str, float]:
        out = self.forward(getattr(state, self.export_tree), self.batch)
        mod, genes, truth = self._masked()
        m = self.batch["value_mask"]
        pred = np.where(mod == mgm.EXPRESSION, out["expression"][m],
                        np.where(mod == mgm.MUTATION, out["mutation"][m], out["cnv"][m]))
        return dict(_scores(mod, genes, truth, pred.astype(np.float64), ""), **self.reference)
