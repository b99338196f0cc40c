"""Turning out-of-fold predictions into numbers, plots and a markdown report.

- `summarize_binary` / `summarize_survival`: AUC, balanced accuracy / Harrell's C with
  percentile-bootstrap 95% CIs over patients (cfm.evaluate.metrics).
- `plot_roc`, `plot_calibration`, `plot_km`: PNGs drawn on a `matplotlib.figure.Figure` (no
  pyplot state; saving a PNG renders with Agg, whatever the process's backend). KM curves
  split patients at the median predicted risk; the log-rank p value is lifelines'
  `logrank_test`.
- `markdown_table`, `fmt_ci`: the report's tables; `fmt_metric`: '0.712 [0.601, 0.809]' of the
  slide tasks' {"value", "ci95"} metrics.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test
from matplotlib.figure import Figure

from cfm.evaluate import metrics


def fmt_ci(d: dict | None, digits: int = 3) -> str:
    """'0.712 (0.601-0.809)' from {'value','low','high'}; 'n/a' for None/NaN."""
    if not d or d.get("value") is None or not np.isfinite(d["value"]):
        return "n/a"
    lo, hi = d.get("low"), d.get("high")
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{d['value']:.{digits}f}"
    return f"{d['value']:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def fmt_metric(m: dict) -> str:
    """'0.712 [0.601, 0.809]' from {'value', 'ci95': [low, high]}."""
    lo, hi = m["ci95"]
    return f"{m['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def _ci(metric, arrays, n_boot, seed) -> dict:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            v, lo, hi = metrics.bootstrap_ci(metric, arrays, n_boot=n_boot, seed=seed)
    except ValueError as e:
        return {"value": None, "low": None, "high": None, "error": str(e)}
    return {"value": v, "low": lo, "high": hi}


def summarize_binary(y: np.ndarray, score: np.ndarray, pred: np.ndarray | None = None,
                     n_boot: int = 1000, seed: int = 0) -> dict:
    """AUC (+CI), balanced accuracy and accuracy of `pred` (+CI), n, positives."""
    y = np.asarray(y, float)
    out = {"n": int(len(y)), "n_pos": int(y.sum()),
           "auc": _ci(metrics.roc_auc, (y, np.asarray(score, float)), n_boot, seed)}
    if pred is not None:
        out["balanced_accuracy"] = _ci(metrics.balanced_accuracy, (y, np.asarray(pred)),
                                       n_boot, seed)
        out["accuracy"] = metrics.accuracy(y, pred)
    return out


def summarize_survival(time: np.ndarray, event: np.ndarray, risk: np.ndarray,
                       n_boot: int = 1000, seed: int = 0) -> dict:
    """Harrell's C (+CI), n, events."""
    return {"n": int(len(time)), "n_events": int(np.sum(event)),
            "c_index": _ci(metrics.c_index, (np.asarray(time, float), np.asarray(event, float),
                                             np.asarray(risk, float)), n_boot, seed)}


def roc_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1)."""
    y = np.asarray(y, float)
    s = np.asarray(score, float)
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return (np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)])


def plot_roc(curves: dict, path: str, title: str) -> None:
    """curves: name -> (y, score). One ROC line per model, AUC in the legend."""
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    for name, (y, s) in curves.items():
        try:
            auc = metrics.roc_auc(y, s)
        except ValueError:
            continue
        fpr, tpr = roc_curve(y, s)
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} ({auc:.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_calibration(y: np.ndarray, prob: np.ndarray, path: str, title: str,
                     n_bins: int = 5) -> None:
    """Observed response rate against mean predicted probability in quantile bins."""
    y = np.asarray(y, float)
    p = np.asarray(prob, float)
    edges = np.unique(np.quantile(p, np.linspace(0, 1, n_bins + 1)))
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, max(len(edges) - 2, 0))
    xs, ys = [], []
    for b in np.unique(idx):
        xs.append(p[idx == b].mean())
        ys.append(y[idx == b].mean())
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.plot(xs, ys, "o-")
    ax.set(xlabel="mean predicted probability", ylabel="observed fraction positive",
           xlim=(0, 1), ylim=(0, 1), title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_km(time: np.ndarray, event: np.ndarray, high_risk: np.ndarray, path: str,
            title: str) -> float:
    """Kaplan-Meier curves of the high / low predicted-risk groups; returns log-rank p."""
    t = np.asarray(time, float)
    e = np.asarray(event, float)
    hi = np.asarray(high_risk, bool)
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    for mask, name in ((~hi, "low risk"), (hi, "high risk")):
        if mask.any():
            KaplanMeierFitter().fit(t[mask], e[mask], label=f"{name} (n={mask.sum()})").plot(
                ax=ax, ci_show=False)
    p = float("nan")
    if hi.any() and (~hi).any():
        p = float(logrank_test(t[hi], t[~hi], e[hi], e[~hi]).p_value)
    ax.set(xlabel="months", ylabel="survival probability", title=f"{title}\nlog-rank p={p:.3g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return p


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A markdown table of `rows` under `header`."""
    lines = ["| " + " | ".join(map(str, header)) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)
