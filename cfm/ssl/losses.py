"""Self-distillation losses and embedding regularisers of DINO / iBOT / DINOv2, as pure jnp
functions.

- `dino_loss`: the image-level (CLS token) cross-entropy between the student's crops and the
  teacher's global crops (DINO, Caron et al. 2021, arXiv:2104.14294, eq. (2); normalisation of
  DINOv2, Oquab et al. 2023, arXiv:2304.07193).
- `ibot_loss`: the masked-patch cross-entropy (iBOT, Zhou et al. 2021, arXiv:2111.07832, eq. (2);
  per-image weighting of DINOv2's `iBOTPatchLoss.forward_masked`).
- `koleo_loss`: the KoLeo differential-entropy regulariser (Sablayrolles et al. 2019,
  arXiv:1806.03198), used by DINOv2 on the student's CLS tokens.
- `kde_loss`: a von Mises-Fisher kernel-density estimate of the negative differential entropy,
  the KoLeo replacement used for pathology foundation models by kaiko.ai (Aben et al. 2024,
  arXiv:2404.15217; also Karasikov et al. 2025, arXiv:2504.05186).
- `regulariser`: dispatch on the config string `ssl.regulariser`.

Conventions shared by every function here:

- computations are float32 whatever the input dtype (bfloat16 logits over 65k prototypes lose
  too much in log-softmax), and contractions use `Precision.HIGHEST` so that TPUs do not run
  float32 matmuls as single-pass bfloat16;
- statistics are taken over the whole (global) array with plain jnp reductions, so the functions
  work unchanged under `jax.jit` when the batch axis is sharded over a mesh: XLA inserts the
  cross-device reductions; there is no psum/pmap and no per-device statistic;
- teacher targets are wrapped in `jax.lax.stop_gradient`: the teacher is an EMA of the student
  and never receives gradients (DINO sec. 3.1; DINOv2 computes them under `torch.no_grad`).

The regularisers return the unweighted loss; the trainer multiplies by `ssl.koleo_loss_weight`
or `ssl.kde_loss_weight`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, dtype=jnp.float32)


def _l2_normalize(x: jax.Array, eps: float) -> jax.Array:
    """Rows of x [n, D] divided by max(||x_i||, eps) (torch `F.normalize`, as DINOv2's KoLeo).

    Written as x * rsqrt(max(||x||^2, eps^2)) so the gradient stays finite at a zero row.
    """
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _safe_norm(v: jax.Array) -> jax.Array:
    """Euclidean norm over the last axis whose gradient is 0 (not NaN) where the norm is 0."""
    sq = jnp.sum(v * v, axis=-1)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def dino_loss(
    student_global: jax.Array,
    student_local: jax.Array | None,
    teacher_global_probs: jax.Array,
    student_temp: float | jax.Array,
) -> jax.Array:
    """DINO cross-entropy between every student crop and every other teacher global crop.

    Args:
        student_global: [B, G, K] student logits of the G global crops (G=2 in DINO/DINOv2).
        student_local: [B, L, K] student logits of the L local crops, or None / a zero-size array
            when there are no local crops (L=0).
        teacher_global_probs: [B, G, K] teacher probabilities of the G global crops, already
            centred and sharpened (`softmax_center` or `sinkhorn_knopp`), rows summing to 1, in
            the same crop order as `student_global` (NOT swapped; the pairing is done here).
        student_temp: student temperature tau_s (0.1 in DINO and DINOv2).

    Returns:
        Scalar float32 loss, in nats:

            loss = -1/(B*T) * sum_b sum_{(s,t) pairs} sum_k P_t[b,k] * log_softmax(S_s[b]/tau_s)_k

        where the pairs are every (student global crop s, teacher global crop t) with s != t,
        plus every (student local crop, teacher global crop), so T = G*(G-1) + G*L.

    Why this normalisation: DINO's eq. (2) sums H(P_t, P_s) over these pairs and averages over the
    number of pairs and images. DINOv2 (`SSLMetaArch.forward_backward`) computes it as
    `dino_global_crops_loss + dino_local_crops_loss`, where the global term is the mean over the
    2B crop-major global crops of the cross-entropy with the swapped teacher, times
    `loss_scales=2`, divided by T, and the local term is minus the sum over local chunks and
    teacher chunks of the per-image mean, divided by T. Both equal the formula above (the factor 2
    turns the mean over 2B crops into a mean over B images); tests/test_ssl_losses.py checks this
    against a separate numpy implementation of DINOv2's formulation.
    """
    s_glob = _f32(student_global)
    teacher = jax.lax.stop_gradient(_f32(teacher_global_probs))
    if s_glob.ndim != 3 or teacher.shape != s_glob.shape:
        raise ValueError(
            f"dino_loss: student_global {s_glob.shape} and teacher_global_probs {teacher.shape} "
            "must both be [B, G, K]"
        )
    n_images, n_global, n_protos = s_glob.shape

    has_local = student_local is not None and jnp.size(student_local) > 0
    n_local = 0
    if has_local:
        s_loc = _f32(student_local)
        if s_loc.ndim != 3 or s_loc.shape[0] != n_images or s_loc.shape[2] != n_protos:
            raise ValueError(
                f"dino_loss: student_local {s_loc.shape} must be [B, L, K] with B={n_images}, "
                f"K={n_protos}"
            )
        n_local = s_loc.shape[1]

    n_terms = n_global * (n_global - 1) + n_global * n_local
    if n_terms == 0:
        raise ValueError("dino_loss: needs G >= 2 global crops or at least one local crop")

    # Global-global pairs: [B, G_teacher, G_student] cross terms; the diagonal (same crop seen by
    # both networks) is excluded, which is the "swap" of DINO's two global crops.
    lsm_glob = jax.nn.log_softmax(s_glob / student_temp, axis=-1)
    cross = jnp.einsum("btk,bsk->bts", teacher, lsm_glob, precision=_HIGHEST)
    off_diagonal = 1.0 - jnp.eye(n_global, dtype=jnp.float32)
    total = jnp.sum(cross * off_diagonal)

    if has_local:
        # Every local crop against every teacher global crop.
        lsm_loc = jax.nn.log_softmax(s_loc / student_temp, axis=-1)
        total = total + jnp.einsum("btk,blk->", teacher, lsm_loc, precision=_HIGHEST)

    return -total / (n_images * n_terms)


def ibot_loss(
    student_logits: jax.Array,
    teacher_probs: jax.Array,
    weights: jax.Array,
    n_images: int | jax.Array,
    student_temp: float | jax.Array,
) -> jax.Array:
    """iBOT masked-image-modelling cross-entropy over a fixed-size buffer of masked patch tokens.

    Args:
        student_logits: [U, K] student logits of the masked patch tokens (student saw them
            masked), gathered into a buffer of static size U; padding entries may hold anything
            finite.
        teacher_probs: [U, K] teacher probabilities of the same tokens (teacher saw them
            unmasked), centred and sharpened; padding entries may hold anything.
        weights: [U] per-token weights: 1 / (number of masked patches in that token's image) for
            valid entries and 0 for padding, so every masked image counts equally whatever its
            mask ratio.
        n_images: number of global crops the buffer was built from (2B), valid or not masked.
        student_temp: student temperature tau_s (0.1 in DINOv2).

    Returns:
        Scalar float32 loss, in nats:

            loss = -(1/n_images) * sum_u w_u * sum_k P_t[u, k] * log_softmax(S[u] / tau_s)_k

    Why: iBOT eq. (2) is the patch-level cross-entropy over masked tokens; this is DINOv2's
    `iBOTPatchLoss.forward_masked` with `masks_weight` = 1/n_masked(image) and the division by
    `masks.shape[0]` = 2B. DINOv2 multiplies it by `loss_scales * ibot_loss_scale`
    = 2 * (1 / n_global_crops) = 2 * 1/2 = 1, so no extra factor appears here. An image with no
    masked patch contributes 0 but still counts in n_images, as in DINOv2.
    """
    s = _f32(student_logits)
    t = jax.lax.stop_gradient(_f32(teacher_probs))
    w = jax.lax.stop_gradient(_f32(weights))
    if s.ndim != 2 or t.shape != s.shape or w.shape != s.shape[:1]:
        raise ValueError(
            f"ibot_loss: student_logits {s.shape}, teacher_probs {t.shape} must be [U, K] and "
            f"weights {w.shape} must be [U]"
        )
    # Zero the padding rows of both inputs first, not just their weight: 0 * NaN from garbage in
    # a padding row would poison the sum, and a `where` on the result alone still lets NaN into
    # the gradient (its backward multiplies the zero cotangent by the NaN teacher entries).
    keep = (w != 0)[:, None]
    s = jnp.where(keep, s, 0.0)
    t = jnp.where(keep, t, 0.0)
    per_token = jnp.sum(t * jax.nn.log_softmax(s / student_temp, axis=-1), axis=-1)  # [U]
    return -jnp.sum(w * per_token) / jnp.asarray(n_images, jnp.float32)


def koleo_loss(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    """KoLeo regulariser: minus the mean log distance of each point to its nearest neighbour.

    Args:
        x: [n, D] embeddings (DINOv2 applies it to the student's backbone CLS tokens of one global
            crop at a time and sums over the two crops); n >= 2.
        eps: added to the distance inside the log (and the floor of the row norms), 1e-8 as in
            DINOv2's `KoLeoLoss`.

    Returns:
        Scalar float32

            loss = -(1/n) * sum_i log(||z_i - z_nn(i)||_2 + eps),   z_i = x_i / max(||x_i||, eps),

        nn(i) = argmax_{j != i} z_i . z_j (for unit vectors the largest inner product is the
        smallest distance). Distances are on the unit sphere, so each lies in [0, 2].

    Why: the Kozachenko-Leonenko estimator of differential entropy is, up to constants,
    (D/n) * sum_i log(rho_i) with rho_i the nearest-neighbour distance (Sablayrolles et al. 2019,
    eq. (2)); minimising its negative spreads the embeddings uniformly and fights collapse
    (DINOv2 sec. 5). Differences from DINOv2's torch code: its `nn.PairwiseDistance` adds eps
    inside the norm (||z_i - z_nn + eps||); here eps is added only outside, as in the formula,
    and the norm's gradient is 0 rather than NaN for coincident points. The neighbour index is
    a constant for the gradient (argmax), but the gradient flows into both z_i and z_nn(i).
    The statistic is over all n rows of the (global) array, whereas DINOv2 computes it per GPU.
    """
    x = _f32(x)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"koleo_loss: x {x.shape} must be [n, D] with n >= 2")
    n = x.shape[0]
    z = _l2_normalize(x, eps)
    sims = jnp.matmul(z, z.T, precision=_HIGHEST)  # [n, n]
    sims = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, sims)  # a point is not its own neighbour
    nn_index = jnp.argmax(sims, axis=1)  # [n]
    dist = _safe_norm(z - z[nn_index])  # [n]
    return -jnp.mean(jnp.log(dist + eps))


def kde_loss(x: jax.Array, concentration: float | jax.Array) -> jax.Array:
    """von Mises-Fisher kernel-density estimate of the negative differential entropy.

    Args:
        x: [n, D] embeddings (applied like KoLeo, to the student's CLS tokens); n >= 2.
        concentration: vMF concentration kappa > 0 (kernel bandwidth ~ 1/sqrt(kappa) on the
            sphere); `ssl.kde_concentration`, 5.0 by default in configs/dino_vit.py.

    Returns:
        Scalar float32, with z_i = x_i / ||x_i||:

            loss = (1/n) * sum_i log( (1/(n-1)) * sum_{j != i} exp(kappa * (z_i . z_j - 1)) ).

    Why: p_hat(z_i) = (1/(n-1)) * sum_{j != i} C_D(kappa) * exp(kappa * z_i . z_j) is a
    leave-one-out vMF kernel-density estimate on the unit sphere, and (1/n) * sum_i log p_hat(z_i)
    estimates E[log p] = -H (the negative differential entropy). Minimising it therefore spreads
    the embeddings, like KoLeo, but every pair contributes a smooth gradient instead of only the
    nearest neighbour. kaiko.ai replace DINOv2's KoLeo with a KDE regulariser for their pathology
    FMs (Aben et al. 2024; Karasikov et al. 2025, "Midnight"); the formula above is the one this
    project specifies, not copied from their code. The normaliser log C_D(kappa) is dropped and
    exp(kappa * z_i . z_j) is shifted by exp(-kappa); both are constants in x, so the gradient is
    unchanged and the loss is <= 0, equal to 0 exactly when all points coincide (collapse).
    Computed with a log-sum-exp, so it is finite for identical points and for any kappa.
    """
    x = _f32(x)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"kde_loss: x {x.shape} must be [n, D] with n >= 2")
    n = x.shape[0]
    z = _l2_normalize(x, 1e-12)
    sims = jnp.matmul(z, z.T, precision=_HIGHEST)  # [n, n] in [-1, 1]
    log_kernel = jnp.asarray(concentration, jnp.float32) * (sims - 1.0)  # in [-2 kappa, 0]
    log_kernel = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, log_kernel)  # leave-one-out
    log_density = jax.nn.logsumexp(log_kernel, axis=1) - jnp.log(jnp.float32(n - 1))  # [n]
    return jnp.mean(log_density)


def regulariser(name: str, x: jax.Array, *, kde_concentration: float | jax.Array) -> jax.Array:
    """The embedding regulariser selected by the config key `ssl.regulariser`, unweighted.

    Args:
        name: "koleo" (`koleo_loss`, DINOv2's default), "kde" (`kde_loss` with
            `kde_concentration`) or "none" (a float32 zero).
        x: [n, D] embeddings.
        kde_concentration: vMF concentration for "kde"; ignored otherwise.

    Returns:
        Scalar float32 loss.

    Raises:
        ValueError: for any other name, naming the config key `ssl.regulariser`.
    """
    if name == "koleo":
        return koleo_loss(x)
    if name == "kde":
        return kde_loss(x, kde_concentration)
    if name == "none":
        return jnp.zeros((), jnp.float32)
    raise ValueError(f"ssl.regulariser={name!r}: use 'koleo', 'kde' or 'none'")
