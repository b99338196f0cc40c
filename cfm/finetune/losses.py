"""The patient-level heads of the fusion tasks (`response`, `survival`): their losses, each with
per-sample weights `w` (0 = padding row, so folds of different sizes share one compiled step),
and per head the output size, targets, loss, evaluated score and explained scalar.

Heads: `binary` (response), `multiclass` (e.g. RECIST), `cox` and `nll` (survival). Losses:

- `binary_ce`, `softmax_ce`: response (binary) and multi-class heads.
- `cox_neg_log_partial_likelihood`: Cox (1972) partial likelihood with Breslow (1974) ties:
  every event at time t is scored against the risk set {j: t_j >= t}; returns the negative
  log partial likelihood divided by the number of events (sum: `reduction="sum"`, which is
  -lifelines' `log_likelihood_` at the same coefficients).
- `discrete_time_nll`: the discrete-time survival likelihood of Zadeh & Schmid 2021 (IEEE
  TPAMI) as used by MCAT (Chen et al. 2021, `NLLSurvLoss`): hazards h_k = sigmoid(logit_k),
  S_k = prod_{i<=k}(1 - h_i); an event in bin y contributes -log S_{y-1} - log h_y, a patient
  censored in bin y contributes -log S_y; `alpha` up-weights the uncensored term
  ((1 - alpha) * full + alpha * uncensored). `survival_bins` makes MCAT's bins (quantiles of
  the observed event times) and `discrete_risk` its risk score, -sum_k S_k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cfm.finetune.tabular_data import TabularData

EPS = 1e-7
HEADS = ("binary", "multiclass", "cox", "nll")
SURVIVAL_HEADS = ("cox", "nll")


def _wmean(x: jax.Array, w: jax.Array | None) -> jax.Array:
    if w is None:
        return x.mean()
    return (x * w).sum() / jnp.maximum(w.sum(), EPS)


def binary_ce(logit: jax.Array, y: jax.Array, w: jax.Array | None = None) -> jax.Array:
    """Mean sigmoid cross-entropy; `logit` [B] or [B, 1], `y` in {0, 1}."""
    logit = logit.reshape(-1)
    y = y.reshape(-1).astype(logit.dtype)
    loss = jnp.maximum(logit, 0) - logit * y + jnp.log1p(jnp.exp(-jnp.abs(logit)))
    return _wmean(loss, w)


def softmax_ce(logits: jax.Array, y: jax.Array, w: jax.Array | None = None) -> jax.Array:
    """Mean softmax cross-entropy; `logits` [B, K], integer `y` [B]."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    loss = -jnp.take_along_axis(logp, y.reshape(-1, 1).astype(jnp.int32), axis=-1)[:, 0]
    return _wmean(loss, w)


def cox_neg_log_partial_likelihood(risk: jax.Array, time: jax.Array, event: jax.Array,
                                   w: jax.Array | None = None,
                                   reduction: str = "mean") -> jax.Array:
    """Negative Cox log partial likelihood, Breslow ties. `risk` [B] (log hazard ratio),
    `time` [B], `event` [B] (1 = observed). `w` 0 drops a row from events and risk sets."""
    risk = risk.reshape(-1)
    time = time.reshape(-1)
    w = jnp.ones_like(risk) if w is None else w.reshape(-1).astype(risk.dtype)
    ev = event.reshape(-1).astype(risk.dtype) * w
    at_risk = (time[None, :] >= time[:, None]) & (w[None, :] > 0)  # [i, j]: j in R(t_i)
    log_den = jax.nn.logsumexp(jnp.where(at_risk, risk[None, :], -jnp.inf), axis=1)
    log_den = jnp.where(ev > 0, log_den, 0.0)
    nll = -((risk - log_den) * ev).sum()
    if reduction == "sum":
        return nll
    return nll / jnp.maximum(ev.sum(), 1.0)


def survival_bins(time: np.ndarray, event: np.ndarray, n_bins: int = 4) -> np.ndarray:
    """Inner bin edges (n_bins - 1 values) at quantiles of the observed event times (MCAT)."""
    t = np.asarray(time, float)[np.asarray(event, bool)]
    if t.size < n_bins:
        t = np.asarray(time, float)
    return np.quantile(t, np.linspace(0, 1, n_bins + 1)[1:-1])


def to_bins(time: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index in [0, len(edges)] of each time."""
    return np.searchsorted(np.asarray(edges), np.asarray(time, float), side="right")


def discrete_time_nll(logits: jax.Array, y_bin: jax.Array, event: jax.Array,
                      w: jax.Array | None = None, alpha: float = 0.0) -> jax.Array:
    """MCAT's NLLSurvLoss. `logits` [B, K] hazard logits, `y_bin` [B] int bin, `event` [B]
    (1 = observed; MCAT's c = 1 - event)."""
    h = jax.nn.sigmoid(logits)
    s = jnp.cumprod(1.0 - h, axis=1)
    s_pad = jnp.concatenate([jnp.ones_like(s[:, :1]), s], axis=1)  # S_{-1} = 1
    y = y_bin.reshape(-1, 1).astype(jnp.int32)
    c = 1.0 - event.reshape(-1).astype(logits.dtype)
    log_s_prev = jnp.log(jnp.clip(jnp.take_along_axis(s_pad, y, 1)[:, 0], EPS))
    log_h = jnp.log(jnp.clip(jnp.take_along_axis(h, y, 1)[:, 0], EPS))
    log_s_this = jnp.log(jnp.clip(jnp.take_along_axis(s_pad, y + 1, 1)[:, 0], EPS))
    uncensored = -(1.0 - c) * (log_s_prev + log_h)
    censored = -c * log_s_this
    loss = (1.0 - alpha) * (censored + uncensored) + alpha * uncensored
    return _wmean(loss, w)


def discrete_risk(logits: jax.Array) -> jax.Array:
    """MCAT's risk: -sum_k S_k (higher = earlier death)."""
    s = jnp.cumprod(1.0 - jax.nn.sigmoid(logits), axis=1)
    return -s.sum(axis=1)


# ---------------------------------------------------------------------------------------------
# the heads: output size, targets, loss, evaluated score, explained scalar
# ---------------------------------------------------------------------------------------------

def n_outputs(head: str, data: TabularData, config: ml_collections.ConfigDict) -> int:
    """Output units of the head: 1 (binary, cox), the number of classes, or survival bins."""
    if head == "binary" or head == "cox":
        return 1
    if head == "multiclass":
        return int(np.nanmax(data.label)) + 1
    return int(config.survival.n_bins)


def targets(data: TabularData, head: str, edges: np.ndarray | None) -> dict:
    """Device arrays y, time, event (NaN -> 0) of every patient, plus the time bin `ybin` for
    the nll head (inner bin `edges` from `survival_bins`)."""
    t = {"y": np.nan_to_num(data.label).astype(np.float32),
         "time": np.nan_to_num(data.time).astype(np.float32),
         "event": np.nan_to_num(data.event).astype(np.float32)}
    if head == "nll":
        t["ybin"] = to_bins(data.time, edges).astype(np.int32)
    return {k: jnp.asarray(v) for k, v in t.items()}


def loss_fn(head: str, out: jax.Array, tgt: dict, w: jax.Array, alpha: float) -> jax.Array:
    """The head's weighted training loss of model outputs `out` [B, n_outputs]."""
    if head == "binary":
        return binary_ce(out[:, 0], tgt["y"], w)
    if head == "multiclass":
        return softmax_ce(out, tgt["y"].astype(jnp.int32), w)
    if head == "cox":
        return cox_neg_log_partial_likelihood(out[:, 0], tgt["time"], tgt["event"], w)
    return discrete_time_nll(out, tgt["ybin"], tgt["event"], w, alpha)


def score_fn(head: str, out: jax.Array) -> jax.Array:
    """The number evaluated: P(response), class probabilities, or a risk score."""
    if head == "binary":
        return jax.nn.sigmoid(out[:, 0])
    if head == "multiclass":
        return jax.nn.softmax(out, axis=-1)
    if head == "cox":
        return out[:, 0]
    return discrete_risk(out)


def explain_fn(head: str, out: jax.Array) -> jax.Array:
    """The scalar attributed by integrated gradients: the logit, or the risk score."""
    if head == "binary":
        return out[:, 0]
    if head == "multiclass":  # log-odds of the best (first) class, e.g. CR for RECIST
        return jax.nn.log_softmax(out, axis=-1)[:, 0]
    return score_fn(head, out)
