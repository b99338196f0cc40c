"""Teacher-target normalisation against collapse: EMA centering (DINO) and Sinkhorn-Knopp (SwAV).

- `softmax_center` / `update_center`: DINO's centering and sharpening (Caron et al. 2021,
  arXiv:2104.14294, sec. 3.1 and eq. (4)); the same is used for iBOT patch tokens (Zhou et al.
  2021, arXiv:2111.07832) and in DINOv2 (Oquab et al. 2023, arXiv:2304.07193).
- `sinkhorn_knopp`: the equipartition normalisation of SwAV (Caron et al. 2020,
  arXiv:2006.09882, sec. 3.1 and appendix A.1), which DINOv2 uses instead of centering for its
  largest models (DINOv2 sec. 4, `sinkhorn_knopp_teacher`).

All functions are pure, float32 internally, and take their statistics over the whole (global)
array with plain jnp reductions, so under `jax.jit` with the sample axis sharded over a mesh XLA
inserts the cross-device sums itself (no psum/pmap). The teacher logits are wrapped in
`jax.lax.stop_gradient`: targets never carry gradients (DINOv2 runs these under `torch.no_grad`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cfm.models import ops


def _safe_div(a: jax.Array, b: jax.Array) -> jax.Array:
    """a / b where b > 0, and a / 1 (which is 0 for all-zero padding) where b == 0; never NaN."""
    return a / jnp.where(b > 0, b, 1.0)


def softmax_center(
    teacher_logits: jax.Array, center: jax.Array, temp: float | jax.Array
) -> jax.Array:
    """DINO teacher targets: softmax((teacher_logits - center) / temp) over the last axis.

    Args:
        teacher_logits: [..., K] teacher head logits.
        center: [K] running mean of the teacher logits (`update_center`).
        temp: teacher temperature tau_t (0.04 -> 0.07 warmup in DINOv2; see cfm/schedules.py).

    Returns:
        [..., K] float32 probabilities, each row summing to 1.

    Why: subtracting the centre stops one prototype from dominating and sharpening with a low
    tau_t stops the uniform collapse; the two balance each other (DINO sec. 3.1, eq. (4)).
    """
    t = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))
    c = jnp.asarray(center, jnp.float32)
    return jax.nn.softmax((t - c) / temp, axis=-1)


def update_center(
    center: jax.Array,
    teacher_logits: jax.Array,
    momentum: float | jax.Array,
    weights: jax.Array | None = None,
) -> jax.Array:
    """EMA update of the centre with the (weighted) batch mean of the teacher logits.

    Args:
        center: [K] current centre.
        teacher_logits: [N, K] teacher logits of the whole global batch (CLS tokens of all global
            crops, or the masked-patch buffer).
        momentum: m, 0.9 in DINO/DINOv2 (`ssl.center_momentum`).
        weights: optional [N] non-negative weights. For the fixed-size masked-patch buffer pass
            1 for valid tokens (or the iBOT per-image weights, to weight images equally) and 0
            for padding, so padding never enters the mean.

    Returns:
        [K] float32 new centre = m * center + (1 - m) * batch_mean, where
        batch_mean = sum_n w_n * t_n / sum_n w_n (the plain mean when weights is None).
        If the weights sum to 0 (no valid token anywhere) the centre is returned unchanged,
        rather than decayed towards 0.

    Why: DINO eq. (4). The mean is over the global batch, as DINOv2 all-reduces it. For iBOT
    patches DINOv2 averages per-GPU means of the valid tokens; the weighted global mean here is the
    exact mean over all valid tokens instead, which is what that per-GPU average approximates.
    """
    c = jnp.asarray(center, jnp.float32)
    t = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))
    if t.ndim != 2 or c.shape != t.shape[1:]:
        raise ValueError(f"update_center: teacher_logits {t.shape} must be [N, K], center [K]")
    if weights is None:
        batch_mean = ops.sum_rows(t) / t.shape[0]
        return c * momentum + batch_mean * (1.0 - momentum)
    w = jax.lax.stop_gradient(jnp.asarray(weights, jnp.float32))
    if w.shape != t.shape[:1]:
        raise ValueError(f"update_center: weights {w.shape} must be [N={t.shape[0]}]")
    total = jnp.sum(w)
    # `where` so garbage (even NaN) in zero-weight padding rows cannot leak into the sum.
    batch_mean = _safe_div(ops.sum_rows(jnp.where(w[:, None] != 0, t, 0.0), w), total)
    return jnp.where(total > 0, c * momentum + batch_mean * (1.0 - momentum), c)


def sinkhorn_knopp(
    teacher_logits: jax.Array,
    temp: float | jax.Array,
    n_iterations: int = 3,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Sinkhorn-Knopp teacher targets: soft assignments with equal total mass per prototype.

    Args:
        teacher_logits: [N, K] teacher logits (N samples of the global batch, K prototypes).
        temp: teacher temperature tau_t.
        n_iterations: number of (prototype step, sample step) pairs; 3 in SwAV and DINOv2.
        valid: optional [N] bool; False rows (padding of a fixed-size buffer) are excluded
            everywhere: they add nothing to any sum and come back as zero rows. B is the number of
            valid rows, a traced value, so N stays static and the function jits.

    Returns:
        [N, K] float32 Q. With B valid rows:

            Q <- exp(t / tau_t), over valid rows; Q <- Q / sum(Q)
            repeat n_iterations times:
                Q[:, k] <- Q[:, k] / sum_n Q[n, k] / K     (each prototype gets mass 1/K)
                Q[n, :] <- Q[n, :] / sum_k Q[n, k] / B     (each sample gets mass 1/B)
            Q <- B * Q

        Marginals: the sample step is the last one, so every valid row sums to exactly 1 (up to
        float rounding): Q is a soft assignment per sample. The per-prototype sums over valid rows
        are only approximately B/K after a finite number of iterations (the sample step moves
        them off their exact value 1/K of the step before); Sinkhorn's theorem gives convergence
        of both marginals as n_iterations grows, because exp(.) is strictly positive.

    Why: SwAV's equipartition constraint (its eq. (3)-(5)) forces the batch to use all prototypes
    equally, which prevents collapse without a centre; DINOv2 uses it for the teacher of both the
    DINO and the iBOT loss (`sinkhorn_knopp_teacher`), with B the global number of (valid) samples.
    The global maximum of t / tau_t (over valid rows) is subtracted before exp to avoid float32
    overflow; it is a constant factor, cancelled by the normalisation to total 1. Divisions guard
    against zero sums (padding rows, or a prototype whose column underflowed) so the result has
    zeros there instead of NaN; DINOv2 would return NaN in that case.
    """
    t = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))
    if t.ndim != 2:
        raise ValueError(f"sinkhorn_knopp: teacher_logits {t.shape} must be [N, K]")
    n_rows, n_protos = t.shape
    if valid is None:
        valid = jnp.ones((n_rows,), dtype=bool)
    else:
        valid = jnp.asarray(valid).astype(bool)
        if valid.shape != (n_rows,):
            raise ValueError(f"sinkhorn_knopp: valid {valid.shape} must be [N={n_rows}]")
    row_mask = valid[:, None]  # [N, 1]
    n_valid = jnp.sum(valid.astype(jnp.float32))  # B, traced

    scores = jnp.where(row_mask, t / temp, -jnp.inf)
    global_max = jnp.max(scores)
    global_max = jnp.where(jnp.isfinite(global_max), global_max, 0.0)  # no valid row at all
    q = jnp.where(row_mask, jnp.exp(scores - global_max), 0.0)
    q = _safe_div(q, jnp.sum(q))

    def one_iteration(_: int, q: jax.Array) -> jax.Array:
        q = _safe_div(q, ops.sum_rows(q)[None, :]) / n_protos  # per prototype: 1/K
        q = _safe_div(q, jnp.sum(q, axis=1, keepdims=True))  # per sample: 1/B ...
        return _safe_div(q, n_valid)  # ... B may be 0 in a degenerate step

    q = jax.lax.fori_loop(0, n_iterations, one_iteration, q)
    return q * n_valid
