"""Short per-patient text reports, filled from a template (no language model): the prediction,
its uncertainty (the spread of the ensemble members trained in the patient's test fold) and
the inputs that drove it most (largest |integrated gradient|)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def patient_report(patient_id: str, cohort: str, task: str, score: float,
                   members: Sequence[float], drivers: Sequence[tuple[str, float, float]],
                   reference: str = "", truth: str = "") -> str:
    """One markdown paragraph. `task` 'response' (score = probability of response) or
    'survival' (score = risk score, higher = shorter survival); `members` = the ensemble's
    individual scores; `drivers` = (feature, standardised value, attribution) by importance."""
    m = np.asarray(members, float)
    lo, hi = (float(m.min()), float(m.max())) if m.size else (score, score)
    if task == "response":
        what = f"predicted probability of response **{score:.2f}**"
        unc = f"ensemble of {m.size} models: {lo:.2f}-{hi:.2f}, sd {m.std():.2f}"
        up, down = "towards response", "towards non-response"
    else:
        what = f"predicted risk score **{score:+.2f}** (higher = shorter survival)"
        unc = f"ensemble of {m.size} models: {lo:+.2f} to {hi:+.2f}, sd {m.std():.2f}"
        up, down = "towards higher risk", "towards lower risk"
    spread = hi - lo
    conf = ("the models agree" if spread < 0.1 * max(1.0, abs(score)) * 2
            else "the models disagree noticeably; treat this prediction as uncertain")
    parts = [f"**Patient {patient_id}** ({cohort}): {what} ({unc}; {conf})."]
    if reference:
        parts.append(reference)
    if drivers:
        ds = []
        for name, value, attr in drivers:
            level = "high" if value > 0.5 else ("low" if value < -0.5 else "average")
            ds.append(f"{name} ({level}, z={value:+.1f}) {up if attr > 0 else down} "
                      f"({attr:+.3f})")
        parts.append("Top drivers: " + "; ".join(ds) + ".")
    if truth:
        parts.append(f"Observed: {truth}.")
    return " ".join(parts)
