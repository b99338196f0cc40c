"""Patient-level stratified k-fold cross-validation.

Every row of one patient (several slides, several samples) lands in the same fold, so no
patient is ever in both the training and the test part of a split; folds are stratified by the
patient's label so that each fold keeps the class balance (which matters with 4-42 responders
per cohort). For survival, stratify on the event indicator (the usual choice, e.g. PORPOISE's
5-fold splits are stratified by censorship).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def patient_folds(patient_ids: Sequence, labels: Sequence, k: int = 5,
                  seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train_rows, test_rows) pairs of row indices, stratified at patient level.

    `patient_ids` and `labels` have one entry per row; all rows of a patient must share its
    label. Each class's patients are shuffled (seeded) and dealt round-robin into the k folds,
    continuing where the previous class stopped so fold sizes differ by at most one patient.
    ValueError (naming the class) if a class has fewer than k patients."""
    pids = np.asarray(patient_ids).reshape(-1)
    labs = np.asarray(labels).reshape(-1)
    if len(pids) != len(labs):
        raise ValueError(f"patient_folds: {len(pids)} patient ids but {len(labs)} labels")
    if k < 2:
        raise ValueError(f"patient_folds needs k >= 2, got {k}")
    uniq, first = np.unique(pids, return_index=True)
    inv = np.unique(pids, return_inverse=True)[1]
    plab = labs[first]
    for p in range(len(uniq)):
        rows = labs[inv == p]
        if np.any(rows != rows[0]):
            raise ValueError(f"patient {uniq[p]!r} has rows with different labels "
                             f"{sorted(set(rows.tolist()))}")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(uniq), dtype=np.int64)
    start = 0
    for c in np.unique(plab):
        members = np.flatnonzero(plab == c)
        if len(members) < k:
            raise ValueError(f"class {c!r} has only {len(members)} patient(s), fewer than k={k} "
                             f"folds; use a smaller k (at most {len(members)}) or merge classes")
        members = rng.permutation(members)
        fold_of[members] = (start + np.arange(len(members))) % k
        start = (start + len(members)) % k
    row_fold = fold_of[inv]
    return [(np.flatnonzero(row_fold != f), np.flatnonzero(row_fold == f)) for f in range(k)]
