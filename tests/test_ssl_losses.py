"""Tests of cfm/ssl/losses.py against float64 numpy references written independently of the jnp
code.

Also holds the one subprocess check that every function of cfm.ssl.losses and cfm.ssl.centering
gives the same result under `jax.jit` with the batch axis sharded over a 2-device CPU mesh as
without sharding.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfm.ssl import losses

REPO_ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5
ATOL = 1e-6

# Jitted versions (what the trainer uses; also much faster than eager op-by-op on CPU).
dino_jit = jax.jit(losses.dino_loss)
ibot_jit = jax.jit(losses.ibot_loss)
koleo_jit = jax.jit(losses.koleo_loss)
kde_jit = jax.jit(losses.kde_loss)
koleo_grad_jit = jax.jit(jax.grad(losses.koleo_loss))
kde_grad_jit = jax.jit(jax.grad(lambda x: losses.kde_loss(x, 5.0)))


def jit_grad(fn, argnums=0):
    return jax.jit(jax.grad(fn, argnums))


# ----------------------------------------------------------------------------- numpy references


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(np_log_softmax(x))


def ref_dino(sg, sl, tp, temp) -> float:
    """Explicit loop over images and (student crop, teacher crop) pairs of DINO eq. (2)."""
    sg, tp = np.asarray(sg, np.float64), np.asarray(tp, np.float64)
    b_, g_, _ = sg.shape
    sl = np.zeros((b_, 0, sg.shape[2])) if sl is None else np.asarray(sl, np.float64)
    l_ = sl.shape[1]
    total, n_pairs = 0.0, 0
    for b in range(b_):
        n_pairs = 0
        for t in range(g_):
            for s in range(g_):
                if s == t:
                    continue
                total += -np.sum(tp[b, t] * np_log_softmax(sg[b, s] / temp))
                n_pairs += 1
            for s in range(l_):
                total += -np.sum(tp[b, t] * np_log_softmax(sl[b, s] / temp))
                n_pairs += 1
    return total / (b_ * n_pairs)


def ref_dinov2(sg, sl, tp, temp, loss_scales: float = 2.0) -> float:
    """DINOv2's `SSLMetaArch` formulation (G=2): crop-major, swapped teacher, loss_scales."""
    sg, tp = np.asarray(sg, np.float64), np.asarray(tp, np.float64)
    b_, g_, k_ = sg.shape
    assert g_ == 2
    l_ = 0 if sl is None else sl.shape[1]
    n_terms = g_ * (g_ - 1) + g_ * l_
    # Crop-major [2B, K]: all images of crop 0, then all images of crop 1.
    student_cat = sg.transpose(1, 0, 2).reshape(g_ * b_, k_)
    teacher_list = [tp[:, i] for i in range(g_)]  # teacher_dino_softmaxed_centered_list
    teacher_swapped = np.concatenate(teacher_list[::-1], axis=0)  # .flip(0).flatten(0, 1)
    per_crop = np.sum(teacher_swapped * np_log_softmax(student_cat / temp), axis=-1)
    global_term = -per_crop.mean() * loss_scales / n_terms
    local_term = 0.0
    if l_:
        sl = np.asarray(sl, np.float64)
        local_chunks = [sl[:, i] for i in range(l_)]  # student_local...chunk(n_local_crops)
        for s in local_chunks:
            lsm = np_log_softmax(s / temp)
            for t in teacher_list:
                local_term -= np.sum(t * lsm, axis=-1).mean()
        local_term /= n_terms
    return global_term + local_term


def ref_ibot(s, t, w, n_images, temp) -> float:
    total = 0.0
    for u in range(s.shape[0]):
        if w[u] == 0:
            continue
        total += w[u] * np.sum(np.asarray(t[u], np.float64) * np_log_softmax(s[u] / temp))
    return -total / n_images


def np_unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)


def ref_koleo(x, eps=1e-8) -> float:
    """Nearest neighbour by smallest Euclidean distance (the jnp code uses inner products)."""
    z = np_unit(x)
    n = z.shape[0]
    logs = []
    for i in range(n):
        dists = [np.linalg.norm(z[i] - z[j]) for j in range(n) if j != i]
        logs.append(np.log(min(dists) + eps))
    return -float(np.mean(logs))


def ref_kde(x, kappa) -> float:
    z = np_unit(x)
    n = z.shape[0]
    vals = []
    for i in range(n):
        s = sum(np.exp(kappa * (z[i] @ z[j] - 1.0)) for j in range(n) if j != i)
        vals.append(np.log(s / (n - 1)))
    return float(np.mean(vals))


def mean_nn_distance(x) -> float:
    z = np_unit(x)
    d = np.linalg.norm(z[:, None] - z[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    return float(d.min(axis=1).mean())


def random_probs(rng, shape, scale=3.0) -> np.ndarray:
    return np_softmax(rng.normal(size=shape) * scale).astype(np.float32)


# ----------------------------------------------------------------------------- dino_loss


@pytest.mark.parametrize(
    "b,g,l,k", [(4, 2, 0, 16), (3, 2, 5, 7), (1, 2, 1, 3), (6, 2, 8, 33), (5, 3, 2, 11)]
)
def test_dino_loss_matches_reference(b, g, l, k):
    rng = np.random.default_rng(b * 100 + l * 10 + k)
    sg = rng.normal(size=(b, g, k)).astype(np.float32) * 2
    sl = rng.normal(size=(b, l, k)).astype(np.float32) * 2
    tp = random_probs(rng, (b, g, k))
    got = losses.dino_loss(sg, sl, tp, 0.1)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(got, ref_dino(sg, sl, tp, 0.1), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        dino_jit(sg, sl, tp, 0.1), got, rtol=RTOL, atol=ATOL
    )


def test_dino_loss_no_local_crops_none_and_empty_agree():
    rng = np.random.default_rng(0)
    sg = rng.normal(size=(4, 2, 9)).astype(np.float32)
    tp = random_probs(rng, (4, 2, 9))
    want = ref_dino(sg, None, tp, 0.2)
    for sl in (None, np.zeros((4, 0, 9), np.float32), jnp.zeros((0,))):
        np.testing.assert_allclose(dino_jit(sg, sl, tp, 0.2), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("n_local", [0, 1, 8])
def test_dino_loss_equals_dinov2_formulation(n_local):
    rng = np.random.default_rng(n_local)
    b, k = 5, 17
    sg = rng.normal(size=(b, 2, k)).astype(np.float32) * 3
    sl = rng.normal(size=(b, n_local, k)).astype(np.float32) * 3
    tp = random_probs(rng, (b, 2, k))
    got = float(dino_jit(sg, sl, tp, 0.1))
    np.testing.assert_allclose(got, ref_dinov2(sg, sl, tp, 0.1), rtol=RTOL, atol=ATOL)
    # The check is sensitive to DINOv2's loss_scales=2 on the global term.
    assert not np.isclose(got, ref_dinov2(sg, sl, tp, 0.1, loss_scales=1.0), rtol=1e-3)


def test_dino_loss_pairs_exclude_same_crop():
    # Student crop 0 equals teacher crop 0 exactly and crop 1 is the reverse: only the swapped
    # pairing counts, so the loss must equal the cross-entropy of the mismatched pairs.
    logits_a = np.array([[5.0, 0, 0, 0, 0, 0]], np.float32)
    logits_b = np.array([[0, 0, 0, 0, 0, 5.0]], np.float32)
    sg = np.stack([logits_a, logits_b], axis=1)  # [1, 2, K]
    tp = np.stack([np_softmax(logits_a / 0.1), np_softmax(logits_b / 0.1)], 1).astype(np.float32)
    matched = -np.sum(tp[0, 0] * np_log_softmax(logits_a[0] / 0.1))
    swapped = -np.sum(tp[0, 1] * np_log_softmax(logits_a[0] / 0.1))
    got = float(dino_jit(sg, None, tp, 0.1))
    assert got > 10 * matched
    np.testing.assert_allclose(got, swapped, rtol=RTOL)


def test_dino_loss_gradients():
    rng = np.random.default_rng(1)
    sg = jnp.asarray(rng.normal(size=(3, 2, 8)), jnp.float32)
    sl = jnp.asarray(rng.normal(size=(3, 4, 8)), jnp.float32)
    tp = jnp.asarray(random_probs(rng, (3, 2, 8)))
    g_sg, g_sl, g_tp = jit_grad(lambda a, b, c: losses.dino_loss(a, b, c, 0.1), (0, 1, 2))(
        sg, sl, tp
    )
    assert np.all(np.isfinite(g_sg)) and np.all(np.isfinite(g_sl))
    assert np.abs(g_sg).max() > 0 and np.abs(g_sl).max() > 0
    # Teacher targets carry no gradient (stop_gradient, as the teacher is an EMA).
    np.testing.assert_array_equal(g_tp, 0.0)


def test_dino_loss_bfloat16_inputs_computed_in_float32():
    rng = np.random.default_rng(2)
    sg = rng.normal(size=(2, 2, 8)).astype(np.float32)
    tp = random_probs(rng, (2, 2, 8))
    got = dino_jit(jnp.asarray(sg, jnp.bfloat16), None, tp, 0.1)
    assert got.dtype == jnp.float32
    want = ref_dino(np.asarray(jnp.asarray(sg, jnp.bfloat16), np.float32), None, tp, 0.1)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_dino_loss_rejects_bad_shapes():
    with pytest.raises(ValueError):
        losses.dino_loss(np.zeros((2, 2, 4)), None, np.zeros((2, 2, 5)), 0.1)
    with pytest.raises(ValueError):
        losses.dino_loss(np.zeros((2, 1, 4)), None, np.zeros((2, 1, 4)), 0.1)


# ----------------------------------------------------------------------------- ibot_loss


def make_ibot_buffer(rng, n_images=6, n_patches=10, k=12, u=40):
    """A DINOv2-style masked buffer: masks [n_images, P], gathered tokens padded to U."""
    masks = rng.random((n_images, n_patches)) < 0.4
    masks[0] = False  # one image without any masked patch
    n_masked = int(masks.sum())
    assert n_masked <= u
    student = rng.normal(size=(n_images, n_patches, k)).astype(np.float32) * 2
    teacher = random_probs(rng, (n_images, n_patches, k))
    per_image_w = 1.0 / np.maximum(masks.sum(-1), 1)
    s_buf = np.full((u, k), np.inf, np.float32)  # garbage padding
    t_buf = np.full((u, k), np.nan, np.float32)  # even NaN padding must not leak
    w_buf = np.zeros((u,), np.float32)
    s_buf[:n_masked] = student[masks]
    t_buf[:n_masked] = teacher[masks]
    w_buf[:n_masked] = np.broadcast_to(per_image_w[:, None], masks.shape)[masks]
    return masks, student, teacher, s_buf, t_buf, w_buf


def test_ibot_loss_matches_reference_and_dinov2_forward_masked():
    rng = np.random.default_rng(3)
    masks, student, teacher, s_buf, t_buf, w_buf = make_ibot_buffer(rng)
    n_images = masks.shape[0]
    got = ibot_jit(s_buf, t_buf, w_buf, n_images, 0.1)
    assert np.isfinite(got)
    np.testing.assert_allclose(got, ref_ibot(s_buf, t_buf, w_buf, n_images, 0.1), rtol=RTOL)
    # DINOv2 forward_masked, on the un-gathered tensors: mean over masked patches per image,
    # summed over images, / n_images (its loss_scales * ibot_loss_scale = 2 * 1/2 = 1).
    per_image = [
        np.mean(np.sum(teacher[i][masks[i]] * np_log_softmax(student[i][masks[i]] / 0.1), -1))
        for i in range(n_images)
        if masks[i].any()
    ]
    np.testing.assert_allclose(got, -np.sum(per_image) / n_images, rtol=RTOL)


@pytest.mark.parametrize("u,k", [(1, 3), (7, 5), (16, 64)])
def test_ibot_loss_random_shapes(u, k):
    rng = np.random.default_rng(u + k)
    s = rng.normal(size=(u, k)).astype(np.float32)
    t = random_probs(rng, (u, k))
    w = (rng.random(u) * (rng.random(u) < 0.7)).astype(np.float32)
    got = ibot_jit(s, t, w, 4, 0.1)
    np.testing.assert_allclose(got, ref_ibot(s, t, w, 4, 0.1), rtol=RTOL, atol=ATOL)


def test_ibot_loss_gradient_finite_and_zero_on_padding():
    rng = np.random.default_rng(4)
    _, _, _, s_buf, t_buf, w_buf = make_ibot_buffer(rng)
    g = jit_grad(lambda s: losses.ibot_loss(s, t_buf, w_buf, 6, 0.1))(jnp.asarray(s_buf))
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g[w_buf == 0], 0.0)
    assert np.abs(g[w_buf > 0]).max() > 0


# ----------------------------------------------------------------------------- koleo / kde


@pytest.mark.parametrize("n,d", [(2, 3), (5, 4), (16, 32), (9, 2)])
def test_koleo_matches_reference(n, d):
    x = np.random.default_rng(n * d).normal(size=(n, d)).astype(np.float32) * 3
    np.testing.assert_allclose(koleo_jit(x), ref_koleo(x), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(losses.koleo_loss(x), ref_koleo(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("n,d,kappa", [(2, 3, 5.0), (6, 4, 0.5), (16, 32, 5.0), (10, 8, 40.0)])
def test_kde_matches_reference(n, d, kappa):
    x = np.random.default_rng(n + d).normal(size=(n, d)).astype(np.float32)
    np.testing.assert_allclose(kde_jit(x, kappa), ref_kde(x, kappa), rtol=RTOL, atol=ATOL)


def spread_and_clustered(rng, n=16, d=8):
    spread = rng.normal(size=(n, d)).astype(np.float32)
    centre = rng.normal(size=(1, d))
    clustered = (centre + 0.05 * rng.normal(size=(n, d))).astype(np.float32)
    return spread, clustered


@pytest.mark.parametrize(
    "loss_fn", [losses.koleo_loss, lambda x: losses.kde_loss(x, 5.0)], ids=["koleo", "kde"]
)
def test_regulariser_sign_minimising_spreads_points(loss_fn):
    rng = np.random.default_rng(5)
    spread, clustered = spread_and_clustered(rng)
    assert float(loss_fn(spread)) < float(loss_fn(clustered))
    # A few gradient-descent steps on the loss push clustered points apart.
    x = jnp.asarray(clustered)
    grad = jax.jit(jax.grad(loss_fn))
    for _ in range(20):
        x = x - 0.5 * grad(x)
    assert mean_nn_distance(x) > 1.5 * mean_nn_distance(clustered)
    assert float(loss_fn(x)) < float(loss_fn(clustered))


def test_kde_finite_for_identical_points_and_n2():
    same = np.ones((5, 4), np.float32)
    np.testing.assert_allclose(kde_jit(same, 5.0), 0.0, atol=1e-6)  # log(1): collapse
    assert np.all(np.isfinite(kde_grad_jit(same)))
    pair = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    np.testing.assert_allclose(kde_jit(pair, 5.0), -5.0, rtol=RTOL)  # log exp(5*(0-1))
    assert np.all(np.isfinite(kde_grad_jit(pair)))
    # Very concentrated kernel: a naive exp-then-log would underflow to log(0) = -inf.
    assert np.isfinite(kde_jit(np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32), 500.0))


def test_koleo_gradients_finite_including_coincident_points():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(8, 5)).astype(np.float32)
    g = koleo_grad_jit(x)
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
    x[1] = x[0] * 2.0  # same direction: distance 0 after normalisation
    assert np.isfinite(koleo_jit(x))
    assert np.all(np.isfinite(koleo_grad_jit(x)))
    assert np.all(np.isfinite(kde_grad_jit(x)))


def test_regulariser_dispatch():
    x = np.random.default_rng(7).normal(size=(6, 4)).astype(np.float32)
    np.testing.assert_allclose(
        losses.regulariser("koleo", x, kde_concentration=5.0), ref_koleo(x), rtol=RTOL
    )
    np.testing.assert_allclose(
        losses.regulariser("kde", x, kde_concentration=3.0), ref_kde(x, 3.0), rtol=RTOL
    )
    none = losses.regulariser("none", x, kde_concentration=5.0)
    assert none.shape == () and none.dtype == jnp.float32 and float(none) == 0.0
    with pytest.raises(ValueError, match=r"ssl\.regulariser"):
        losses.regulariser("koLeo ", x, kde_concentration=5.0)


def test_regularisers_reject_single_point():
    for fn in (losses.koleo_loss, lambda x: losses.kde_loss(x, 1.0)):
        with pytest.raises(ValueError):
            fn(np.ones((1, 3), np.float32))


# ----------------------------------------------------------------------------- sharded jit

_SHARDED_CHILD = textwrap.dedent(
    r"""
    import numpy as np
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

    from cfm.ssl import centering, losses

    assert jax.device_count() == 2, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("batch",), axis_types=(AxisType.Auto,))
    BATCH, REPL = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())

    rng = np.random.default_rng(0)
    def probs(shape):
        x = rng.normal(size=shape) * 3
        e = np.exp(x - x.max(-1, keepdims=True))
        return (e / e.sum(-1, keepdims=True)).astype(np.float32)
    f32 = lambda *s: (rng.normal(size=s) * 2).astype(np.float32)

    B, K, U = 4, 24, 12
    sg, sl, tp = f32(B, 2, K), f32(B, 6, K), probs((B, 2, K))
    s_buf, t_buf = f32(U, K), probs((U, K))
    w_buf = np.where(np.arange(U) < 9, 1.0 / 3.0, 0.0).astype(np.float32)
    valid = np.arange(U) < 9
    emb = f32(8, 16)
    center = f32(K)

    # name: (function, args, per-arg "batch" sharded?)
    cases = {
        "dino_loss": (lambda a, b, c: losses.dino_loss(a, b, c, 0.1), (sg, sl, tp), (1, 1, 1)),
        "dino_loss_no_local": (lambda a, c: losses.dino_loss(a, None, c, 0.1), (sg, tp), (1, 1)),
        "ibot_loss": (lambda a, b, c: losses.ibot_loss(a, b, c, 2 * B, 0.1),
                      (s_buf, t_buf, w_buf), (1, 1, 1)),
        "koleo_loss": (losses.koleo_loss, (emb,), (1,)),
        "kde_loss": (lambda x: losses.kde_loss(x, 5.0), (emb,), (1,)),
        "regulariser_kde": (lambda x: losses.regulariser("kde", x, kde_concentration=2.0),
                            (emb,), (1,)),
        "softmax_center": (lambda t, c: centering.softmax_center(t, c, 0.04),
                           (sg, center), (1, 0)),
        "update_center": (lambda c, t: centering.update_center(c, t, 0.9),
                          (center, s_buf), (0, 1)),
        "update_center_weighted": (lambda c, t, w: centering.update_center(c, t, 0.9, w),
                                   (center, s_buf, w_buf), (0, 1, 1)),
        "sinkhorn_knopp": (lambda t: centering.sinkhorn_knopp(t, 0.07), (s_buf,), (1,)),
        "sinkhorn_knopp_valid": (lambda t, v: centering.sinkhorn_knopp(t, 0.07, 3, v),
                                 (s_buf, valid), (1, 1)),
    }
    for name, (fn, args, sharded) in cases.items():
        plain = jax.jit(fn)(*[jax.device_put(a, jax.devices()[0]) for a in args])
        placed = [jax.device_put(a, BATCH if s else REPL) for a, s in zip(args, sharded)]
        for a, s in zip(placed, sharded):
            if s:
                assert len(a.sharding.device_set) == 2 and a.addressable_shards[0].data.shape[0] \
                    == a.shape[0] // 2, (name, a.sharding)
        out = jax.jit(fn)(*placed)
        np.testing.assert_allclose(np.asarray(out), np.asarray(plain), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
        assert np.all(np.isfinite(np.asarray(out))), name
        print("ok", name, flush=True)
    # Gradients through sharded inputs too (what the trainer differentiates).
    for name, fn, arg in [
        ("grad_dino", lambda a: losses.dino_loss(a, sl, tp, 0.1), sg),
        ("grad_koleo", losses.koleo_loss, emb),
        ("grad_kde", lambda x: losses.kde_loss(x, 5.0), emb),
    ]:
        plain = jax.jit(jax.grad(fn))(arg)
        out = jax.jit(jax.grad(fn))(jax.device_put(arg, BATCH))
        np.testing.assert_allclose(np.asarray(out), np.asarray(plain), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
        print("ok", name, flush=True)
    print("ALL_SHARDED_OK", flush=True)
    """
)


def test_sharded_jit_matches_unsharded_all_functions():
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    env["XLA_FLAGS"] = flags.strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_CHILD],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "ALL_SHARDED_OK" in proc.stdout, (
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-5000:]}"
    )
