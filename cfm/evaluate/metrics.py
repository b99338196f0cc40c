"""Patient-level metrics for downstream tasks, in plain numpy (no sklearn at call time, so the
slide and tabular pipelines share one definition; the tests check each against sklearn /
lifelines).

- `roc_auc`: area under the ROC curve as the Mann-Whitney U statistic (ties count 1/2).
- `balanced_accuracy`: mean per-class recall (Brodersen et al. 2010), robust to the 1:2 to
  1:7 responder imbalance of the ICB cohorts.
- `c_index`: Harrell's concordance index (Harrell et al. 1982); a pair (i, j) is comparable when
  the shorter time is an observed event; higher risk should mean earlier event; risk ties count
  1/2; pairs with equal times are comparable only if exactly one is an event (lifelines'
  convention, so `concordance_index(time, -risk, event)` gives the same number).
- `pearson`: Pearson r, nan when either input is constant (no warning spam).
- `macro_auc`: ROC AUC of 2 classes, else the mean one-vs-rest AUC over the classes present.
- `classification_metrics`: accuracy, balanced accuracy and macro AUC of class probabilities,
  each with a 95% bootstrap interval over patients (the slide tasks' metrics).
- `bootstrap_ci`: percentile bootstrap (Efron & Tibshirani 1993) over rows or over groups
  (patients), skipping resamples where the metric is undefined (one class, no comparable pair).
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np


def _1d(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    return a


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based), ties get the mean of their positions."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    # boundaries of tie blocks
    change = np.concatenate([[True], xs[1:] != xs[:-1], [True]])
    idx = np.flatnonzero(change)
    for a, b in zip(idx[:-1], idx[1:]):
        ranks[order[a:b]] = 0.5 * (a + b - 1) + 1.0
    return ranks


def roc_auc(y_true, score) -> float:
    """Binary ROC AUC (labels 0/1 or bool); ValueError if only one class is present."""
    y = _1d(y_true, "y_true")
    s = _1d(score, "score")
    if y.shape != s.shape:
        raise ValueError(f"y_true has {y.size} entries but score has {s.size}")
    if not np.all(np.isin(y, (0.0, 1.0))):
        raise ValueError("roc_auc needs binary labels 0/1")
    if np.any(~np.isfinite(s)):
        raise ValueError("score has non-finite values")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc is undefined with only one class in y_true")
    r = _ranks(s)
    u = r[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def accuracy(y_true, y_pred) -> float:
    """Fraction of exact matches."""
    y = np.asarray(y_true).reshape(-1)
    p = np.asarray(y_pred).reshape(-1)
    if y.shape != p.shape or y.size == 0:
        raise ValueError(f"accuracy: y_true has {y.size} entries, y_pred {p.size}")
    return float(np.mean(y == p))


def balanced_accuracy(y_true, y_pred) -> float:
    """Mean recall over the classes present in y_true."""
    y = np.asarray(y_true).reshape(-1)
    p = np.asarray(y_pred).reshape(-1)
    if y.shape != p.shape or y.size == 0:
        raise ValueError(f"balanced_accuracy: y_true has {y.size} entries, y_pred {p.size}")
    recalls = [np.mean(p[y == c] == c) for c in np.unique(y)]
    return float(np.mean(recalls))


def c_index(time, event, risk) -> float:
    """Harrell's C. `event` 1 = observed (death/progression), 0 = censored; higher `risk` means
    an earlier expected event. ValueError if no pair is comparable."""
    t = _1d(time, "time")
    e = _1d(event, "event").astype(bool)
    r = _1d(risk, "risk")
    if not (t.shape == e.shape == r.shape):
        raise ValueError(f"c_index: time {t.size}, event {e.size}, risk {r.size} differ")
    if np.any(~np.isfinite(r)):
        raise ValueError("risk has non-finite values")
    # i is the earlier one: t_i < t_j with e_i, or t_i == t_j with e_i and not e_j
    ti, tj = t[:, None], t[None, :]
    ei, ej = e[:, None], e[None, :]
    comparable = ei & ((ti < tj) | ((ti == tj) & ~ej))
    n = comparable.sum()
    if n == 0:
        raise ValueError("c_index is undefined: no comparable pair (no observed event?)")
    ri, rj = r[:, None], r[None, :]
    conc = ((ri > rj) & comparable).sum() + 0.5 * ((ri == rj) & comparable).sum()
    return float(conc / n)


def pearson(x, y) -> float:
    """Pearson correlation; nan if either input is constant (or has < 2 finite pairs)."""
    a = _1d(x, "x")
    b = _1d(y, "y")
    if a.shape != b.shape:
        raise ValueError(f"pearson: x has {a.size} entries, y {b.size}")
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 2:
        return float("nan")
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    if den == 0.0:
        return float("nan")
    return float(np.clip((a * b).sum() / den, -1.0, 1.0))


def pearson_per_column(y_true, y_pred) -> np.ndarray:
    """Pearson r for each column of [n, g] arrays -> [g] (nan for constant columns)."""
    a = np.asarray(y_true, dtype=np.float64)
    b = np.asarray(y_pred, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"pearson_per_column needs two [n, g] arrays, got {a.shape}, {b.shape}")
    a = a - a.mean(0)
    b = b - b.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, (a * b).sum(0) / np.where(den > 0, den, 1.0), np.nan)
    return np.clip(r, -1.0, 1.0)


def bootstrap_ci(metric: Callable[..., float], arrays: tuple, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0,
                 groups: Sequence | None = None) -> tuple[float, float, float]:
    """(point, low, high): `metric(*arrays)` and its percentile bootstrap interval.

    Rows are resampled with replacement (all arrays share axis 0); with `groups` (e.g. patient
    ids, one per row) whole groups are resampled, so rows of one patient stay together.
    Resamples where `metric` raises ValueError (one class, no comparable pair) or returns nan
    are skipped; a warning says how many. If all fail, low = high = nan."""
    arrays = tuple(np.asarray(a) for a in arrays)
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array")
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"bootstrap_ci: arrays differ in length {[len(a) for a in arrays]}")
    point = float(metric(*arrays))
    rng = np.random.default_rng(seed)
    if groups is not None:
        g = np.asarray(groups).reshape(-1)
        if len(g) != n:
            raise ValueError(f"groups has {len(g)} entries but arrays have {n} rows")
        uniq, inv = np.unique(g, return_inverse=True)
        members = [np.flatnonzero(inv == k) for k in range(len(uniq))]
    values, skipped = [], 0
    for _ in range(n_boot):
        if groups is None:
            idx = rng.integers(0, n, n)
        else:
            pick = rng.integers(0, len(members), len(members))
            idx = np.concatenate([members[k] for k in pick])
        try:
            v = float(metric(*(a[idx] for a in arrays)))
        except ValueError:
            skipped += 1
            continue
        if not np.isfinite(v):
            skipped += 1
            continue
        values.append(v)
    if skipped:
        warnings.warn(f"bootstrap_ci: {skipped} of {n_boot} resamples skipped (metric undefined "
                      "on them, e.g. one class or no comparable pair)", stacklevel=2)
    if not values:
        return point, float("nan"), float("nan")
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return point, float(lo), float(hi)


def macro_auc(y: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC for 2 classes, else the mean one-vs-rest AUC over classes present in `y`."""
    y = np.asarray(y)
    if probs.shape[1] == 2:
        return roc_auc(y == 1, probs[:, 1])
    present = [c for c in range(probs.shape[1]) if 0 < (y == c).sum() < len(y)]
    if len(present) < 2:
        raise ValueError("macro AUC needs at least two classes in y")
    return float(np.mean([roc_auc(y == c, probs[:, c]) for c in present]))


def classification_metrics(y: np.ndarray, probs: np.ndarray, groups: np.ndarray,
                           n_boot: int = 1000, seed: int = 0) -> dict:
    """accuracy, balanced accuracy, AUC (macro one-vs-rest) of class probabilities `probs`
    [N, C], each {"value", "ci95": [low, high]} with a 95% bootstrap interval resampling
    `groups` (patients)."""
    out = {}
    fns = {"accuracy": lambda a, p: accuracy(a, p.argmax(1)),
           "balanced_accuracy": lambda a, p: balanced_accuracy(a, p.argmax(1)),
           "auc": macro_auc}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in fns.items():
            point, lo, hi = bootstrap_ci(fn, (y, probs), n_boot=n_boot, seed=seed,
                                         groups=groups)
            out[name] = {"value": point, "ci95": [lo, hi]}
    return out
