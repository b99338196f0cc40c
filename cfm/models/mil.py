"""Gated-attention multiple-instance learning over the tile embeddings of a slide.

Ilse, Tomczak & Welling 2018 (ICML, "Attention-based Deep Multiple Instance Learning"): each
tile embedding h_k gets an attention score

    a_k = softmax_k( w^T (tanh(V h_k) * sigmoid(U h_k)) ),

the slide embedding is sum_k a_k h_k and a linear head maps it to the outputs. Sizes and
dropout follow CLAM's defaults (Lu et al. 2021, Nat. Biomed. Eng. 5:555; `size_arg="small"`:
a first layer to 512 units with ReLU, attention width 256, dropout 0.25 after the first layer
and inside the attention branches).

Bags are padded to a common length: `mask` [B, T] is True on real tiles; padded tiles get
attention exactly 0 and change nothing (the softmax runs over real tiles only), so a bag's
output does not depend on its padding or on the order of its tiles.

Parameters carry logical axis names (`embed` for the input features, `mlp` for the hidden
units, `vocab` for the outputs) as in `cfm.models.vit`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

TRUNC = nn.initializers.truncated_normal(0.02)
# CLAM `size_dict["small"] = [1024, 512, 256]`: input, hidden, attention width.
CLAM_HIDDEN = 512
CLAM_ATTENTION = 256
CLAM_DROPOUT = 0.25


def _dense(features: int, names: tuple[str | None, str | None], dtype: Any, name: str
           ) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_normal(),
                                                             names),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]))


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis restricted to `mask`; exactly 0 on masked entries (and an
    all-zero row for a bag with no tile, never NaN)."""
    top = jnp.max(jnp.where(mask, logits, -1e30), axis=-1, keepdims=True)
    z = jnp.where(mask, logits - jax.lax.stop_gradient(top), 0.0)  # no inf anywhere
    e = jnp.where(mask, jnp.exp(z), 0.0)
    return e / jnp.maximum(e.sum(-1, keepdims=True), 1e-30)


class GatedAttentionMIL(nn.Module):
    """Gated-attention MIL: features [B, T, D], mask [B, T] -> dict(logits [B, n_outputs],
    attention [B, T], slide [B, hidden])."""

    n_outputs: int
    hidden: int = CLAM_HIDDEN
    attention_dim: int = CLAM_ATTENTION
    dropout: float = CLAM_DROPOUT
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, train: bool = False) -> dict:
        drop = lambda y: nn.Dropout(self.dropout, deterministic=not train)(y)  # noqa: E731
        h = drop(nn.relu(_dense(self.hidden, ("embed", "mlp"), self.dtype, "fc")(x)))
        a = drop(jnp.tanh(_dense(self.attention_dim, ("mlp", None), self.dtype,
                                 "attention_a")(h)))
        b = drop(nn.sigmoid(_dense(self.attention_dim, ("mlp", None), self.dtype,
                                   "attention_b")(h)))
        scores = _dense(1, (None, None), self.dtype, "attention_c")(a * b)[..., 0]
        attn = masked_softmax(scores.astype(jnp.float32), mask)
        slide = jnp.einsum("bt,btd->bd", attn, h.astype(jnp.float32))
        logits = _dense(self.n_outputs, ("mlp", "vocab"), self.dtype, "classifier")(slide)
        return {"logits": logits.astype(jnp.float32), "attention": attn, "slide": slide,
                "scores": scores}
