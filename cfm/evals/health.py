"""Representation health on a fixed batch, for every objective: does the backbone still tell
inputs apart?

Measures (keys of `health_metrics`, under "health/" in the logs):

- `cls_std`: the per-dimension standard deviation across the batch of the L2-normalised CLS
  embeddings, averaged over dimensions (SimSiam's collapse monitor, Chen & He 2021, Sec. 4.1):
  0 for a collapsed model whose outputs are all the same; about 1/sqrt(D) (`cls_std_ref`) for
  embeddings spread over the unit sphere.
- `rankme`: effective rank of the [N, D] CLS matrix (RankMe, Garrido et al. 2023): exp of the
  entropy of its singular values normalised to sum 1 (p_k = s_k / sum s + 1e-7); between 1 and
  min(N, D), 0 for an all-zero matrix.
- for a run with a DINO head (DINOv2): `teacher_entropy` / `student_entropy`, the mean over the
  batch of the entropy (nats) of each image's softmax over the K prototypes (teacher: logits
  minus the EMA centre, zero under Sinkhorn-Knopp, at the step's teacher temperature; student:
  at the student temperature), `teacher_batch_entropy`, the entropy of their batch mean, and
  `ln_k`. DINO (Caron et al. 2021, Sec. 5.3) names the two collapses: every image the uniform
  distribution (entropy -> ln K) or the same dominant prototype (batch entropy -> 0).

Collapse warnings (`collapse_warnings`), thresholds in `THRESHOLDS`:

- `cls_std < 0.1 / sqrt(D)`: a tenth of the spread of isotropic embeddings;
- `rankme < 2`: the batch's embeddings span about one direction;
- `teacher_entropy > 0.99 ln K` together with `cls_std < 0.5 / sqrt(D)`: uniform collapse of
  the teacher's targets over embeddings that barely vary;
- `teacher_batch_entropy < 0.05 ln K`: every image sent to the same prototype.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cfm.evals import forward
from cfm.evals.base import Evaluator

# The collapse thresholds of the module docstring.
THRESHOLDS = {"cls_std_ratio": 0.1, "rankme": 2.0, "uniform_entropy": 0.99,
              "uniform_std_ratio": 0.5, "dominant_entropy": 0.05}


def _entropy(p: np.ndarray) -> np.ndarray:
    """Entropy (nats) of the distributions along the last axis."""
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def rankme(z: np.ndarray, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023, eq. 1) of an embedding matrix [N, D]; 0 when it is zero."""
    s = np.linalg.svd(np.asarray(z, np.float64), compute_uv=False)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total + eps
    return float(np.exp(-np.sum(p * np.log(p))))


def normalised_std(z: np.ndarray) -> float:
    """Mean over dimensions of the batch std of the L2-normalised rows of `z` [N, D]."""
    z = np.asarray(z, np.float64)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return float(z.std(axis=0).mean())


def health_metrics(cls: np.ndarray, teacher_logits: np.ndarray | None = None,
                   student_logits: np.ndarray | None = None, center: np.ndarray | float = 0.0,
                   teacher_temp: float = 0.07, student_temp: float = 0.1) -> dict[str, float]:
    """The measures of the module docstring for CLS embeddings [N, D] and, when given, DINO-head
    logits [N, K] (temperatures as the objective uses them)."""
    d = cls.shape[1]
    out = {"cls_std": normalised_std(cls), "cls_std_ref": 1.0 / math.sqrt(d),
           "rankme": rankme(cls)}
    if teacher_logits is not None:
        t = _softmax((np.asarray(teacher_logits, np.float64) - center) / teacher_temp)
        s = _softmax(np.asarray(student_logits, np.float64) / student_temp)
        out.update(teacher_entropy=float(_entropy(t).mean()),
                   student_entropy=float(_entropy(s).mean()),
                   teacher_batch_entropy=float(_entropy(t.mean(0))),
                   ln_k=math.log(t.shape[1]))
    return out


def collapse_warnings(m: dict[str, float], prefix: str = "health") -> list[str]:
    """One line per collapse signal in metrics `m` (keys as `health_metrics` gives them,
    optionally under `prefix/`), thresholds `THRESHOLDS`; [] for a healthy model."""
    g = lambda k: m.get(f"{prefix}/{k}", m.get(k))  # noqa: E731
    th, ref, out = THRESHOLDS, g("cls_std_ref"), []
    if g("cls_std") is not None and g("cls_std") < th["cls_std_ratio"] * ref:
        out.append(f"{prefix}: collapse? std of the normalised CLS embedding {g('cls_std'):.2e} "
                   f"< {th['cls_std_ratio']}/sqrt(D) = {th['cls_std_ratio'] * ref:.2e}")
    if g("rankme") is not None and g("rankme") < th["rankme"]:
        out.append(f"{prefix}: collapse? RankMe {g('rankme'):.2f} < {th['rankme']}: the batch's "
                   "embeddings span about one direction")
    if g("teacher_entropy") is not None:
        ln_k = g("ln_k")
        if (g("teacher_entropy") > th["uniform_entropy"] * ln_k
                and g("cls_std") < th["uniform_std_ratio"] * ref):
            out.append(f"{prefix}: collapse? teacher entropy {g('teacher_entropy'):.3f} ~ ln K "
                       f"= {ln_k:.3f} with CLS std {g('cls_std'):.2e} (uniform collapse)")
        if g("teacher_batch_entropy") < th["dominant_entropy"] * ln_k:
            out.append(f"{prefix}: collapse? entropy of the teacher's batch-mean output "
                       f"{g('teacher_batch_entropy'):.3f} << ln K = {ln_k:.3f}: every image "
                       "goes to the same prototype")
    return out


class HealthEvaluator(Evaluator):
    """`health_metrics` of the run's first `n_samples` training items (a fixed batch)."""

    def __init__(self, name: str, every: int, setup: Any, n_samples: int, batch_size: int):
        super().__init__(name, every)
        self.setup = setup
        self.batch = forward.health_batch(setup, n_samples)
        self.outputs = forward.health_outputs(setup, batch_size)

    def compute(self, state: Any) -> dict[str, float]:
        out = self.outputs(state, self.batch)
        if "teacher_logits" not in out:
            return health_metrics(out["cls"])
        config = self.setup.config
        sched = self.setup.objective.step_schedules(config, int(state.step))
        center = np.asarray(state.centers["dino"]) if "dino" in state.centers else 0.0
        return health_metrics(out["cls"], out["teacher_logits"], out["student_logits"], center,
                              float(sched["teacher_temp"]), float(config.ssl.student_temp))

    def warnings(self, metrics: dict[str, float]) -> list[str]:
        return collapse_warnings(metrics, self.name)
