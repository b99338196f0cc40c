"""The probe refitted on the labels so far, its guesses for the next batch, and report.md.

After every round the probe (`cfm.active.strategies.fit_probe`, logistic regression on the
standardised embeddings) is refitted on all labels. What is reported needs no held-out labels:
the labels per class, the probe's stratified cross-validated accuracy on the labelled rows
(k = min(5, the rarest class's count) folds; none while a class has fewer than 2 labels), the
mean entropy of its class probabilities over the unlabelled rows (nats; falls as the probe
grows sure) and the fraction of the pool it assigns to each class.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from sklearn.model_selection import StratifiedKFold, cross_val_score

from cfm.active import strategies
from cfm.evals.probes import linear_probe


def _probs(pool, y: np.ndarray, classes: list[str], seed: int) -> np.ndarray | None:
    """The probe's class probabilities [N, C] for every pool row, or None below 2 classes."""
    if len(np.unique(y[y != strategies.UNLABELLED])) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return strategies.fit_probe(pool.x, y, len(classes), seed).predict_proba(pool.x)


def guesses(pool, y: np.ndarray, classes: list[str], idx: np.ndarray, seed: int
            ) -> list[tuple[str, float]] | None:
    """(class, probability) of the probe's guess for rows `idx` (Label Studio
    pre-annotations), or None while fewer than 2 classes are labelled."""
    p = _probs(pool, y, classes, seed)
    if p is None:
        return None
    return [(classes[int(p[i].argmax())], float(p[i].max())) for i in idx]


def probe_figures(pool, y: np.ndarray, classes: list[str], seed: int) -> dict:
    """The figures of the module docstring for labels `y` (codes, `strategies.UNLABELLED`)."""
    labelled = y != strategies.UNLABELLED
    counts = {c: int((y == k).sum()) for k, c in enumerate(classes)}
    out: dict = {"n_labels": int(labelled.sum()), "per_class": counts, "cv_accuracy": None,
                 "cv_folds": None, "pool_mean_entropy": None, "predicted_fractions": None}
    p = _probs(pool, y, classes, seed)
    if p is None:
        return out
    present = [n for n in counts.values() if n > 0]
    k = min(5, min(present))
    if k >= 2:
        cv = StratifiedKFold(k, shuffle=True, random_state=seed)
        scores = cross_val_score(linear_probe(), pool.x[labelled], y[labelled], cv=cv)
        out.update(cv_accuracy=round(float(scores.mean()), 4), cv_folds=k)
    free = ~labelled
    if free.any():
        out["pool_mean_entropy"] = round(float(
            strategies.uncertainty(p[free][:, [k for k, n in enumerate(counts.values()) if n]])
            ["entropy"].mean()), 4)
    pred = p.argmax(1)
    out["predicted_fractions"] = {c: round(float((pred == k).mean()), 4)
                                  for k, c in enumerate(classes)}
    return out


def write_report(path: str, state: dict) -> None:
    """report.md: one row per round (strategy asked / used, picked, labels got, the probe's
    figures after the round)."""
    classes = state["classes"]
    lines = [f"# Active learning loop ({state['unit']}s: {', '.join(classes)})", "",
             f"Embeddings: `{state['embeddings']}`. Probe: logistic regression on the "
             "standardised embeddings, refitted after each round.", "",
             "| round | strategy (used) | picked | labels got | labels so far | per class | "
             "CV accuracy | pool entropy |", "|---|---|---|---|---|---|---|---|"]
    for r in state["rounds"]:
        f = r.get("probe") or {}
        per = f.get("per_class")
        cv = f.get("cv_accuracy")
        ent = f.get("pool_mean_entropy")
        cv_text = "" if cv is None else f"{cv:.3f} ({f['cv_folds']}-fold)"
        lines.append(
            f"| {r['round']} | {r['strategy']} ({r['used']}) | {len(r['ids'])} | "
            f"{len(r['labels']) if r.get('closed') else 'waiting'} | {f.get('n_labels', '')} | "
            f"{' / '.join(str(per[c]) for c in classes) if per else ''} | "
            f"{cv_text} | "
            f"{'' if ent is None else f'{ent:.3f}'} |")
    lines += ["", f"Per class: {' / '.join(classes)}. Pool entropy: mean entropy (nats) of the "
              "probe's probabilities over the unlabelled rows."]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
