"""The fast exact GELU and the CPU attention spelling compute the textbook functions."""

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
