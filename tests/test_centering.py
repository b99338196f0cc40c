"""Tests of cfm/ssl/centering.py against float64 numpy references written independently of the jnp
code. (The sharded-jit check of these functions is in tests/test_ssl_losses.py, in the single
subprocess shared with the losses.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfm.ssl import centering

RTOL = 1e-5
ATOL = 1e-6

# Jitted versions (what the trainer uses; also much faster than eager op-by-op on CPU).
update_center_jit = jax.jit(centering.update_center)
sinkhorn_jit = jax.jit(centering.sinkhorn_knopp, static_argnums=2)


# ----------------------------------------------------------------------------- numpy references


def np_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def ref_sinkhorn(t, temp, n_iterations, valid=None) -> np.ndarray:
    """SwAV / DINOv2 Sinkhorn-Knopp in float64, run on the valid subset only (no masking)."""
    t = np.asarray(t, np.float64)
    n, k = t.shape
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    q = np.exp(t[valid] / temp).T  # [K, B] as in the papers' notation
    b = q.shape[1]
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    q *= b
    out = np.zeros((n, k))
    out[valid] = q.T
    return out


# ----------------------------------------------------------------------------- softmax centering


@pytest.mark.parametrize("shape", [(5, 7), (3, 2, 11), (1, 4)])
def test_softmax_center_matches_reference(shape):
    rng = np.random.default_rng(len(shape) * 10 + shape[-1])
    t = rng.normal(size=shape).astype(np.float32)
    c = rng.normal(size=shape[-1:]).astype(np.float32)
    got = centering.softmax_center(t, c, 0.07)
    assert got.shape == shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_softmax((t - c) / 0.07), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(got).sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        jax.jit(centering.softmax_center)(t, c, 0.07), got, rtol=RTOL, atol=ATOL
    )


def test_softmax_center_uses_the_center():
    t = np.zeros((2, 3), np.float32)
    c = np.array([1.0, 0.0, 0.0], np.float32)
    got = np.asarray(centering.softmax_center(t, c, 1.0))
    assert got[0, 0] < got[0, 1]  # a prototype with a high running mean is damped


# ----------------------------------------------------------------------------- update_center


def test_update_center_matches_reference():
    rng = np.random.default_rng(1)
    c = rng.normal(size=(9,)).astype(np.float32)
    t = rng.normal(size=(13, 9)).astype(np.float32)
    got = centering.update_center(c, t, 0.9)
    want = 0.9 * c.astype(np.float64) + 0.1 * t.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(jax.jit(centering.update_center)(c, t, 0.9), want, rtol=RTOL,
                               atol=ATOL)


def test_update_center_weighted_matches_reference():
    rng = np.random.default_rng(2)
    c = rng.normal(size=(6,)).astype(np.float32)
    t = rng.normal(size=(10, 6)).astype(np.float32)
    w = rng.random(10).astype(np.float32)
    w[[3, 7]] = 0.0
    t[3] = np.nan  # padding may hold garbage
    tt = np.nan_to_num(t.astype(np.float64))
    mean = (w[:, None] * tt).sum(0) / w.sum()
    got = update_center_jit(c, t, 0.8, w)
    np.testing.assert_allclose(got, 0.8 * c + 0.2 * mean, rtol=RTOL, atol=ATOL)


def test_update_center_binary_weights_equal_mean_of_valid_rows():
    rng = np.random.default_rng(3)
    c = rng.normal(size=(5,)).astype(np.float32)
    t = rng.normal(size=(8, 5)).astype(np.float32)
    valid = np.array([1, 1, 0, 1, 0, 0, 1, 1], bool)
    got = update_center_jit(c, t, 0.9, valid.astype(np.float32))
    np.testing.assert_allclose(got, update_center_jit(c, t[valid], 0.9), rtol=RTOL,
                               atol=ATOL)
    # ...and it differs from the unweighted mean over the whole padded buffer.
    assert not np.allclose(got, update_center_jit(c, t, 0.9), rtol=1e-3)


def test_update_center_all_zero_weights_keeps_center():
    c = np.arange(4, dtype=np.float32)
    got = update_center_jit(c, np.ones((3, 4), np.float32), 0.9, np.zeros(3, np.float32))
    np.testing.assert_array_equal(got, c)


# ----------------------------------------------------------------------------- sinkhorn_knopp


@pytest.mark.parametrize("n,k,temp,iters", [(8, 5, 0.1, 3), (16, 32, 0.07, 3), (5, 3, 1.0, 1),
                                            (12, 12, 0.05, 10), (6, 4, 0.2, 0)])
def test_sinkhorn_matches_reference(n, k, temp, iters):
    rng = np.random.default_rng(n * k)
    t = rng.normal(size=(n, k)).astype(np.float32)
    got = sinkhorn_jit(t, temp, iters)
    assert got.shape == (n, k) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref_sinkhorn(t, temp, iters), rtol=1e-4, atol=1e-7)


def test_sinkhorn_marginals():
    """The last step normalises samples, so row sums are exact; prototype sums are approximate.

    After the final per-sample step (then the scaling by B) every row sums to 1 up to float
    rounding. The per-prototype (column) sums were exactly 1/K * B only before that step, so after
    a finite number of iterations they are approximately B/K, converging as iterations grow.
    """
    rng = np.random.default_rng(4)
    n, k = 64, 16
    # Realistic scale: DINO-head logits are cosines times a scale ~1, teacher temperature 0.07.
    t = (0.1 * rng.normal(size=(n, k))).astype(np.float32)
    q = np.asarray(sinkhorn_jit(t, 0.07, 3), np.float64)
    np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)  # exact marginal: tight
    col_dev = np.abs(q.sum(axis=0) / (n / k) - 1.0).max()
    softmax_dev = np.abs(np_softmax(t / 0.07).sum(axis=0) / (n / k) - 1.0).max()
    assert col_dev < 0.1  # approximate marginal: loose
    assert softmax_dev > 0.2 and col_dev < 0.25 * softmax_dev  # and far more even than softmax

    # Sharp logits: 3 iterations are far from balanced, but the prototype marginal converges.
    t = rng.normal(size=(n, k)).astype(np.float32)
    devs = []
    for iters in (1, 3, 10, 100, 500):
        q = np.asarray(sinkhorn_jit(t, 0.1, iters), np.float64)
        np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)
        devs.append(np.abs(q.sum(axis=0) / (n / k) - 1.0).max())
    assert all(a > b for a, b in zip(devs, devs[1:4])), devs
    assert devs[-1] < 1e-4, devs


def test_sinkhorn_valid_mask():
    rng = np.random.default_rng(5)
    n, k = 20, 8
    t = rng.normal(size=(n, k)).astype(np.float32)
    t[~(np.arange(n) < 13)] = 1e4  # padding with huge logits must not affect anything
    valid = np.arange(n) < 13
    fn = sinkhorn_jit
    q = np.asarray(fn(t, 0.1, 3, valid))
    assert np.all(np.isfinite(q))
    np.testing.assert_array_equal(q[~valid], 0.0)
    np.testing.assert_allclose(q, ref_sinkhorn(t, 0.1, 3, valid), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(q[valid], sinkhorn_jit(t[valid], 0.1, 3), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(q[valid].sum(axis=1), 1.0, rtol=1e-5)
    # B is traced: the same compiled function with another number of valid rows.
    valid2 = np.zeros(n, bool)
    valid2[[0, 4, 5, 9, 12]] = True
    q2 = np.asarray(fn(t, 0.1, 3, valid2))
    np.testing.assert_allclose(q2, ref_sinkhorn(t, 0.1, 3, valid2), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(q2[valid2].sum(axis=1), 1.0, rtol=1e-5)
    # No valid row at all: zeros, not NaN.
    np.testing.assert_array_equal(fn(t, 0.1, 3, np.zeros(n, bool)), 0.0)


def test_sinkhorn_large_logits_do_not_overflow():
    rng = np.random.default_rng(6)
    t = (50.0 + rng.normal(size=(10, 6))).astype(np.float32)  # exp(50 / 0.04) overflows float32
    q = np.asarray(sinkhorn_jit(t, 0.04, 3))
    assert np.all(np.isfinite(q))
    np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)
    # Shift invariance (the global max cancels): same result as the shifted logits.
    np.testing.assert_allclose(q, sinkhorn_jit(t - 50.0, 0.04, 3), rtol=1e-4,
                               atol=1e-7)
