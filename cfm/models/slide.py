"""Slide encoder of the alignment objective: a bag of tile embeddings -> one slide embedding.

Gated-attention pooling (Ilse et al. 2018, `cfm.models.mil.GatedAttentionMIL`) over the tiles
of a slide, with optional 2-D tile positions: each tile's (x, y) in tile units enters as
sine-cosine features (4 frequencies per axis, periods 2-16 tiles), concatenated to its
embedding, so the pooling can weigh tiles by where they lie. Padded tiles (`mask` False) get
attention 0, so a slide's embedding does not depend on its padding or its tiles' order.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cfm.models.mil import GatedAttentionMIL

PERIODS = (2.0, 4.0, 8.0, 16.0)  # tiles; a 10 x 10 slide spans the longest once


def position_features(coords: jax.Array) -> jax.Array:
    """[..., 2] tile coordinates -> [..., 16] sine-cosine features."""
    w = 2 * jnp.pi / jnp.asarray(PERIODS)
    angles = coords[..., :, None] * w  # [..., 2, F]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1).reshape(
        *coords.shape[:-1], 4 * len(PERIODS))


class SlideEncoder(nn.Module):
    """bag [B, T, D], coords [B, T, 2], mask [B, T] -> dict(embedding [B, width],
    attention [B, T])."""

    width: int = 128
    hidden: int = 128
    attention_dim: int = 64
    dropout: float = 0.1
    positions: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, bag: jax.Array, coords: jax.Array, mask: jax.Array,
                 train: bool = False) -> dict:
        x = bag.astype(jnp.float32)
        if self.positions:
            x = jnp.concatenate([x, position_features(coords)], -1)
        out = GatedAttentionMIL(self.width, self.hidden, self.attention_dim, self.dropout,
                                self.dtype, name="pool")(x, mask, train)
        return {"embedding": out["logits"], "attention": out["attention"]}


VARIANT = "slide_gated"  # config.model.variant of the alignment objective's slide encoder


def architecture(m: dict) -> dict:
    """config.json "architecture" of a slide encoder from `config.model`."""
    return {"family": "slide", "variant": VARIANT, "in_dim": int(m["in_dim"]),
            "width": int(m["width"]), "hidden": int(m["hidden"]),
            "attention_dim": int(m["attention_dim"]), "positions": bool(m["positions"]),
            "tokens": "a bag of tile embeddings [B, T, in_dim], (x, y) in tile units, mask",
            "output": "dict(embedding [B, width], attention [B, T]); gated-attention pooling"}


def build(arch: dict, dtype: Any, **overrides: Any) -> SlideEncoder:
    """The SlideEncoder of `arch` (dropout 0 unless overridden)."""
    kw = dict(width=arch["width"], hidden=arch["hidden"], attention_dim=arch["attention_dim"],
              positions=arch["positions"], dropout=0.0, dtype=dtype)
    kw.update(overrides)
    return SlideEncoder(**kw)


def dummy_inputs(arch: dict) -> tuple:
    """(bag, coords, mask) of one tiny bag, for `module.init`."""
    return (jnp.zeros((1, 2, arch["in_dim"])), jnp.zeros((1, 2, 2)), jnp.ones((1, 2), bool))
