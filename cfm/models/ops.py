"""Numerical building blocks shared by the models and losses: exact GELU, multi-head attention,
sums over the leading axis and column scaling.

Each computes the textbook function; they exist because the obvious jnp spelling is slow on CPU
(`benchmarks/train_step.py` measures the difference).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Abramowitz & Stegun 7.1.26: erf(z) = 1 - t (a1 + a2 t + ... + a5 t^4) exp(-z^2),
# t = 1 / (1 + p z), z >= 0, absolute error <= 1.5e-7 (float32 resolution).
_P = 0.3275911
_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _cdf_pdf(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    z = jnp.abs(x) * np.float32(2 ** -0.5)
    t = 1.0 / (1.0 + _P * z)
    poly = t * (_A[0] + t * (_A[1] + t * (_A[2] + t * (_A[3] + t * _A[4]))))
    e = jnp.exp(-z * z)
    cdf = 0.5 * (1.0 + jnp.sign(x) * (1.0 - poly * e))
    return cdf, e * np.float32((2 * np.pi) ** -0.5)


@jax.custom_jvp
def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x) (Hendrycks & Gimpel 2016; DINOv2 and timm use the exact form), to
    float32 accuracy (|error| < 1e-6 against `jax.nn.gelu(approximate=False)`), with the exact
    derivative Phi(x) + x phi(x). About 2x faster than XLA's erf on CPU."""
    cdf, _ = _cdf_pdf(x)
    return x * cdf.astype(x.dtype)


@gelu.defjvp
def _gelu_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    cdf, pdf = _cdf_pdf(x)
    cdf, pdf = cdf.astype(x.dtype), pdf.astype(x.dtype)
    return x * cdf, (cdf + x * pdf) * dx


def sum_rows(x: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """sum_n w_n x[n, :] over the leading axis of a 2-D array (w = 1 when `weights` is None), in
    x's dtype.

    Written as a vector-matrix product because XLA:CPU reduces a wide matrix over its leading
    axis 10-40x slower than it multiplies it by a vector (a [974, 65536] float32 array, 2 cores:
    about 280 ms against 8 ms; the DINO head's prototype columns are this shape). HIGHEST
    precision so that TPUs and GPUs do not round x to bfloat16/TF32 in the product.
    """
    w = jnp.ones(x.shape[:1], x.dtype) if weights is None else weights.astype(x.dtype)
    return jnp.dot(w, x, precision=jax.lax.Precision.HIGHEST)


@jax.custom_vjp
def scale_columns(v: jax.Array, s: jax.Array) -> jax.Array:
    """v * s[None, :] for a 2-D v and a vector s, whose gradient for s sums over v's rows with
    `sum_rows` (the derivative JAX would write is the slow leading-axis reduction)."""
    return v * s


def _scale_columns_fwd(v, s):
    return v * s, (v, s)


def _scale_columns_bwd(res, g):
    v, s = res
    return g * s, sum_rows(g * v)


scale_columns.defvjp(_scale_columns_fwd, _scale_columns_bwd)


def _attention_heads_major(q: jax.Array, k: jax.Array, v: jax.Array,
                           mask: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v with heads moved before tokens, so each head's products are
    contiguous batched matmuls; XLA:CPU runs this ~2x faster than the [B, T, N, H] layout."""
    scale = np.float32(q.shape[-1] ** -0.5)
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, N, T, H]
    logits = jnp.einsum("bnth,bnsh->bnts", q * scale.astype(q.dtype), k)
    if mask is not None:  # padding keys get a large negative logit (not -inf: no NaN rows)
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bnsh->bnth", probs, v).transpose(0, 2, 1, 3)


IMPLS = ("auto", "dot_product_attention", "cudnn", "xla", "heads_major")  # model.attention


def attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = "auto",
              mask: jax.Array | None = None) -> jax.Array:
    """Multi-head attention on [B, T, N, H] queries/keys/values -> [B, T, N, H].

    mask: optional [B, T] bool, False for padding tokens, which no query attends to (the omics
    model's padded gene sets); None = every token is real (ViT crops).

    impl: "dot_product_attention" (`jax.nn.dot_product_attention`: cuDNN flash attention on GPUs
    where it applies, XLA's fused kernel on TPUs), "cudnn" / "xla" (the same function with its
    `implementation` forced: cuDNN flash attention, an error where it cannot run, e.g. float32;
    or XLA's own path, the reference `benchmarks/gpu_check.py` compares cuDNN with),
    "heads_major" (the CPU-friendly spelling above), or "auto" = heads_major when the default
    backend is CPU, else dot_product_attention. Ahead-of-time compiles for accelerators from a
    CPU host must pass "dot_product_attention" explicitly.
    """
    if impl == "auto":
        impl = "heads_major" if jax.default_backend() == "cpu" else "dot_product_attention"
    if impl in ("dot_product_attention", "cudnn", "xla"):
        return jax.nn.dot_product_attention(
            q, k, v, mask=None if mask is None else mask[:, None, None, :],
            implementation=None if impl == "dot_product_attention" else impl)
    if impl == "heads_major":
        return _attention_heads_major(q, k, v, mask)
    raise ValueError(f"model.attention={impl!r}: use one of {', '.join(IMPLS)}")
