"""Baselines of the fusion tasks, fitted on the same training patients and features as the
fusion model: a class-balanced L2 logistic regression (`logreg`), a penalised Cox model
(lifelines) on principal components of the omics + the clinical values (`cox`), and the
immune signatures of the cohorts (e.g. CD274, IFNG6, CYT; survival risk = -score, an a priori
direction; the binary threshold is the one with the best balanced accuracy on the training
patients).
"""

from __future__ import annotations

import warnings

import ml_collections
import numpy as np
import pandas as pd
from lifelines import CoxPHFitter
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression

from cfm.evaluate import metrics
from cfm.finetune import tabular_data
from cfm.finetune.common import FinetuneError
from cfm.finetune.losses import SURVIVAL_HEADS


def design_matrix(feats: dict) -> np.ndarray:
    """The baselines' inputs: the raw omics (never a pretrained encoder's embedding), clinical
    values and their presence flags."""
    parts = []
    if raw_omics(feats) is not None:
        parts.append(raw_omics(feats))
    if "clinical" in feats:
        parts += [feats["clinical"], feats["clinical_mask"].astype(np.float32)]
    return np.concatenate(parts, axis=1).astype(np.float64)


def raw_omics(feats: dict) -> np.ndarray | None:
    """The standardised raw omics features of a split (`raw_omics` when an encoder's
    features took the `omics` slot), or None."""
    return feats.get("raw_omics", feats.get("omics"))


def best_threshold(y: np.ndarray, s: np.ndarray) -> float:
    """Threshold with the best balanced accuracy on the training patients."""
    cands = np.unique(s)
    accs = [metrics.balanced_accuracy(y, (s >= c).astype(int)) for c in cands]
    return float(cands[int(np.argmax(accs))])


def baseline_scores(name: str, data: tabular_data.TabularData, feats: dict, train: np.ndarray,
                    test: np.ndarray, config: ml_collections.ConfigDict
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """(test scores, test predicted classes or None) of one baseline."""
    head = config.head
    if name in data.signatures:
        s = data.signatures[name]
        if head in SURVIVAL_HEADS:  # immune-hot predicted protective: risk = -score (a priori)
            return -s[test], None
        if head == "multiclass":
            return None, None
        thr = best_threshold(data.label[train].astype(int), s[train])
        return s[test], (s[test] >= thr).astype(int)
    x = design_matrix(feats)
    if name == "logreg":
        clf = LogisticRegression(C=config.baselines.C, class_weight="balanced", max_iter=5000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf.fit(x[train], data.label[train].astype(int))
        if head == "multiclass":
            return clf.predict_proba(x[test]), clf.predict(x[test])
        return clf.predict_proba(x[test])[:, 1], clf.predict(x[test])
    if name == "cox":
        parts, k = [], config.baselines.cox_pcs
        raw = raw_omics(feats)
        if raw is not None:
            pca = PCA(min(k, len(train) - 1, raw.shape[1]), random_state=0).fit(raw[train])
            z = pca.transform(raw)
            parts.append(z / z[train].std(0))
        if "clinical" in feats:
            parts.append(feats["clinical"])
        z = np.concatenate(parts, axis=1)
        df = pd.DataFrame(z[train], columns=[f"x{i}" for i in range(z.shape[1])])
        df = df.loc[:, df.std() > 0]
        df["T"], df["E"] = data.time[train], data.event[train]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cph = CoxPHFitter(penalizer=config.baselines.cox_penalizer).fit(df, "T", "E")
        cols = [c for c in df.columns if c not in ("T", "E")]
        zt = pd.DataFrame(z[test], columns=[f"x{i}" for i in range(z.shape[1])])[cols]
        return np.asarray(cph.predict_log_partial_hazard(zt), float).reshape(-1), None
    raise FinetuneError(f"config.baselines.names: unknown baseline {name!r}; use logreg / cox "
                        f"or a signature {sorted(data.signatures)}")
