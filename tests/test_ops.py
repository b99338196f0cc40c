"""The fast exact GELU, the CPU attention spelling and the leading-axis sums compute the textbook
functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfm.models import ops


def test_gelu_matches_exact_gelu_and_its_derivative():
    x = jnp.linspace(-12.0, 12.0, 20001)
    np.testing.assert_allclose(ops.gelu(x), jax.nn.gelu(x, approximate=False), atol=1e-6)
    g = jax.vmap(jax.grad(ops.gelu))(x)
    g_ref = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
    np.testing.assert_allclose(g, g_ref, atol=2e-6)
    # and it is not the tanh approximation, which is off by up to ~5e-4 near |x| = 2
    assert float(jnp.abs(jax.nn.gelu(x, approximate=True) - ops.gelu(x)).max()) > 1e-4
    assert ops.gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


def test_attention_spellings_agree():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(r, (2, 7, 3, 8)) for r in (k1, k2, k3))
    ref = jax.nn.dot_product_attention(q, k, v)
    np.testing.assert_allclose(ops.attention(q, k, v, "heads_major"), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ops.attention(q, k, v, "auto"), ref, rtol=1e-5, atol=1e-6)
    # an independent numpy reference
    qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bthd,bshd->bhts", qn, kn) / np.sqrt(8)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(ref, np.einsum("bhts,bshd->bthd", p, vn), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="model.attention"):
        ops.attention(q, k, v, "flash9")


def test_sum_rows_and_scale_columns_match_jnp_with_gradients():
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k1, (37, 300))
    w = jax.random.uniform(k2, (37,))
    s = jax.random.normal(k3, (300,))
    np.testing.assert_allclose(ops.sum_rows(x), jnp.sum(x, axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ops.sum_rows(x, w), jnp.sum(w[:, None] * x, axis=0), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(ops.scale_columns(x, s), x * s, rtol=1e-6)

    def loss(f):
        return lambda x, s: jnp.sum(jnp.sin(f(x, s)) * jnp.arange(300.0))

    got = jax.grad(loss(ops.scale_columns), argnums=(0, 1))(x, s)
    ref = jax.grad(loss(lambda x, s: x * s), argnums=(0, 1))(x, s)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
