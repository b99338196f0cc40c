"""The DINO projection head (Caron et al. 2021; sizes from DINOv2, Oquab et al. 2023).

MLP (n_layers Dense layers, GELU between, the last one to `bottleneck_dim`), L2 normalisation,
then a weight-normalised prototype layer without bias (Salimans & Kingma 2016): each prototype
column is `g * v / ||v||` with `g` starting at 1, so logits are cosine similarities times g.
The prototype parameters live under the name `last_layer`, which the optimiser freezes for the
first epoch (DINOv2 `freeze_last_layer_epochs`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cfm.models import ops
from cfm.models.vit import TRUNC, _init


class WeightNormPrototypes(nn.Module):
    n_prototypes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        v = self.param("kernel", _init(TRUNC, ("embed", "vocab")), (x.shape[-1], self.n_prototypes))
        g = self.param("scale", _init(nn.initializers.ones, ("vocab",)), (self.n_prototypes,))
        w = ops.scale_columns(v, g / jnp.sqrt(ops.sum_rows(v * v) + 1e-12))
        return jnp.dot(x.astype(self.dtype), w.astype(self.dtype))


class DINOHead(nn.Module):
    n_prototypes: int
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    n_layers: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., D] backbone features -> [..., n_prototypes] float32 logits."""
        dims = [self.hidden_dim] * (self.n_layers - 1) + [self.bottleneck_dim]
        for i, f in enumerate(dims):
            x = nn.Dense(f, dtype=self.dtype, name=f"mlp_{i}",
                         kernel_init=_init(TRUNC, ("embed", "mlp")),
                         bias_init=_init(nn.initializers.zeros, ("mlp",)))(x)
            if i < len(dims) - 1:
                x = ops.gelu(x)
        x = x.astype(jnp.float32)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return WeightNormPrototypes(self.n_prototypes, self.dtype, name="last_layer")(x).astype(
            jnp.float32)
