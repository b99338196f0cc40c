"""`cfm_probe`: the small-cohort alternative to the fusion network (14 to 300 patients): a
linear model on the frozen pretrained encoder's CLS embedding (standardised on the training
patients) + the clinical values and their presence flags. Binary response: class-balanced L2
logistic regression; survival: ridge Cox (lifelines CoxPHFitter, l1_ratio 0). The L2 strength
is chosen by an inner patient-level stratified k-fold CV on the training patients only (AUC /
Harrell's c-index), then the model is refitted on all of them: the probe's "early stopping".
`probe.l2_grid` are logistic 1/C values; the Cox penalizer is each / 100 (lifelines penalises
the mean log-likelihood).
"""

from __future__ import annotations

import warnings

import ml_collections
import numpy as np
import pandas as pd
from lifelines import CoxPHFitter
from sklearn.linear_model import LogisticRegression

from cfm.evaluate import cv, metrics
from cfm.finetune.fusion_baselines import best_threshold
from cfm.finetune.fusion_data import split_list
from cfm.finetune.losses import SURVIVAL_HEADS


def probe_matrix(feats: dict) -> np.ndarray:
    """Encoder CLS (standardised), clinical values and their presence flags."""
    parts = [feats["probe_x"]]
    if "clinical" in feats:
        parts += [feats["clinical"], feats["clinical_mask"].astype(np.float32)]
    return np.concatenate(parts, axis=1).astype(np.float64)


def _fit(head: str, x: np.ndarray, y: np.ndarray, t: np.ndarray, e: np.ndarray, lam: float):
    """A fitted model whose `score(x)` is the logit / log partial hazard."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if head in SURVIVAL_HEADS:
            keep = x.std(0) > 0
            df = pd.DataFrame(x[:, keep])
            df.columns = [f"x{i}" for i in range(df.shape[1])]
            df["T"], df["E"] = t, e
            # lifelines penalises the mean log-likelihood: its penalizer ~ our lam / n_train
            cph = CoxPHFitter(penalizer=lam / 100.0, l1_ratio=0.0).fit(df, "T", "E")
            beta = cph.params_.to_numpy()
            return lambda z: z[:, keep] @ beta
        clf = LogisticRegression(C=1.0 / lam, class_weight="balanced", max_iter=5000)
        clf.fit(x, y.astype(int))
        return clf.decision_function


def _metric(head: str, s: np.ndarray, y: np.ndarray, t: np.ndarray, e: np.ndarray) -> float:
    if head in SURVIVAL_HEADS:
        return metrics.c_index(t, e, s)
    return metrics.roc_auc(y, s) if len(np.unique(y)) > 1 else 0.5


def probe_scores(data, feats: dict, train: np.ndarray, test: np.ndarray, strata: np.ndarray,
                 config: ml_collections.ConfigDict
                 ) -> tuple[np.ndarray, np.ndarray | None, float]:
    """(test scores, test predicted classes or None, the chosen L2 strength)."""
    head = config.head
    x = probe_matrix(feats)
    y, t, e = data.label, data.time, data.event
    grid = [float(v) for v in split_list(config.probe.l2_grid)]
    s_tr = strata[train]
    k = int(min(config.probe.inner_k, np.bincount(s_tr.astype(int)).min()))
    best, best_val = grid[0], -np.inf
    if k >= 2 and len(grid) > 1:
        folds = cv.patient_folds(data.patient_ids[train], s_tr, k=k, seed=config.cv.seed)
        for lam in grid:
            vals = []
            for a, b in folds:
                ra, rb = train[a], train[b]
                f = _fit(head, x[ra], y[ra], t[ra], e[ra], lam)
                vals.append(_metric(head, f(x[rb]), y[rb], t[rb], e[rb]))
            if np.mean(vals) > best_val:
                best, best_val = lam, float(np.mean(vals))
    f = _fit(head, x[train], y[train], t[train], e[train], best)
    s = f(x[test])
    if head in SURVIVAL_HEADS:
        return s, None, best
    thr = best_threshold(y[train].astype(int), f(x[train]))
    return s, (s >= thr).astype(int), best
