"""The omics transformer: one token per (gene, modality, value), a sample-level CLS token.

A token's input is the sum of three embeddings, as in scGPT (Cui et al. 2024, Nat. Methods
21:1470) and BulkRNABert (Gelard et al. 2024): the gene's id, its value and its modality
(expression, mutation, copy number; `cfm.data.omics_records.MODALITIES`). Values enter either
continuously (scGPT's value encoder: Linear(1, D) -> ReLU -> Linear(D, D) -> LayerNorm) or as a
learned embedding of the token's class (expression bin, mutation 0/1, copy-number call). A token
whose value is masked for pretraining keeps its gene and modality embeddings and gets a learned
`mask_value` embedding instead of its value, so the model is asked "what is this gene's value?".
Genes have no order, so there are no position embeddings. Samples carry different numbers of
tokens; padding (gene id 0) is excluded from attention by a key mask.

The blocks are the ViT's (`cfm.models.vit.Block`: pre-norm attention + MLP, LayerScale,
stochastic depth), so parameters carry the same logical axis names and shard the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cfm.data.omics_records import MODALITIES, N_CLASSES, PAD_ID
from cfm.models import ops
from cfm.models.vit import TRUNC, Block, _init, _norm

# name -> (width, depth, heads, mlp hidden).
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "omics_test": (32, 2, 2, 64),
    "omics_tiny": (64, 4, 4, 256),  # the README demo and the TCGA run on a laptop CPU
    "omics_demo": (128, 4, 4, 512),
    "omics_small": (256, 6, 4, 1024),
    "omics_base": (512, 12, 8, 2048),  # issue 6's benchmark size; scGPT's is 512 x 12 too
    "omics_large": (1024, 24, 16, 4096),
}


@dataclasses.dataclass(frozen=True)
class OmicsSpec:
    width: int
    depth: int
    heads: int
    mlp_dim: int


def spec(variant: str) -> OmicsSpec:
    """The sizes of a named variant, with a clear error for an unknown name."""
    if variant not in VARIANTS:
        raise ValueError(f"model.variant={variant!r} is not one of {sorted(VARIANTS)}")
    return OmicsSpec(*VARIANTS[variant])


def n_value_classes(n_bins: int) -> int:
    """Classes of the binned value embedding: expression bins, then mutation, then CNV."""
    return n_bins + N_CLASSES["mutation"] + N_CLASSES["cnv"]


def class_offsets(n_bins: int) -> jax.Array:
    """Per-modality offset of a token's class in the shared class table, [len(MODALITIES)]."""
    return jnp.array([0, n_bins, n_bins + N_CLASSES["mutation"]], jnp.int32)


class OmicsTransformer(nn.Module):
    """Returns dict(cls [B, D], tokens [B, L, D]) after the final LayerNorm.

    Inputs, all [B, L]: gene_ids int (0 = padding), modality int, values float, classes int,
    value_mask bool (True = the value is hidden: the `mask_value` embedding replaces it).
    """

    variant: str
    vocab_size: int
    n_bins: int = 51
    value_encoding: str = "continuous"  # or "binned"
    layerscale_init: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    remat: bool = False
    attention: str = "auto"

    @nn.compact
    def __call__(self, gene_ids: jax.Array, modality: jax.Array, values: jax.Array,
                 classes: jax.Array, value_mask: jax.Array | None = None,
                 train: bool = False) -> dict[str, jax.Array]:
        s = spec(self.variant)
        d = s.width
        emb = lambda n, name: nn.Embed(  # noqa: E731
            n, d, dtype=self.dtype, name=name,
            embedding_init=_init(nn.initializers.normal(0.02), ("vocab", "embed")))
        # As in scGPT, the gene and the value embeddings are each layer-normalised before the
        # sum, so that neither drowns the other in the residual stream.
        x = _norm(self.dtype, "gene_norm")(emb(self.vocab_size, "gene_embed")(gene_ids))
        x = x + emb(len(MODALITIES), "modality_embed")(modality)
        if self.value_encoding == "continuous":
            dense = lambda f, names, name: nn.Dense(  # noqa: E731
                f, dtype=self.dtype, name=name, kernel_init=_init(TRUNC, names),
                bias_init=_init(nn.initializers.zeros, names[1:]))
            # ReLU features of the scalar with kinks spread over the value range: with zero
            # biases, relu(v w) would be v-homogeneous and the LayerNorm below would keep only
            # the sign of v.
            v = nn.Dense(d, dtype=self.dtype, name="value_in",
                         kernel_init=_init(nn.initializers.normal(1.0), (None, "embed")),
                         bias_init=_init(nn.initializers.normal(1.0), ("embed",)))(
                values[..., None].astype(self.dtype))
            v = dense(d, ("mlp", "embed"), "value_out")(nn.relu(v))
        elif self.value_encoding == "binned":
            offset = class_offsets(self.n_bins)[modality]
            v = emb(n_value_classes(self.n_bins), "value_embed")(classes + offset)
        else:
            raise ValueError(f"model.value_encoding={self.value_encoding!r}: use continuous or "
                             "binned")
        if value_mask is not None:
            mask_value = self.param("mask_value", _init(TRUNC, ("embed",)), (d,))
            v = jnp.where(value_mask[..., None], mask_value.astype(v.dtype), v)
        x = x + _norm(self.dtype, "value_norm")(v)
        b = x.shape[0]
        cls = self.param("cls_token", _init(nn.initializers.normal(1e-6), (None, None, "embed")),
                         (1, 1, d))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
        x = nn.with_logical_constraint(x, ("act_batch", "act_seq", "act_embed"))
        keep = jnp.concatenate([jnp.ones((b, 1), bool), gene_ids != PAD_ID], axis=1)

        kw = dict(heads=s.heads, mlp_dim=s.mlp_dim, ffn="mlp", qkv_bias=True,
                  layerscale_init=self.layerscale_init, drop_path_rate=self.drop_path_rate,
                  dtype=self.dtype, attention=self.attention)
        block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        for i in range(s.depth):
            x = block(**kw, name=f"block_{i}")(x, train, keep)
        x = _norm(self.dtype, "norm")(x)
        return {"cls": x[:, 0], "tokens": x[:, 1:]}


class MGMHead(nn.Module):
    """Masked-gene-modelling outputs per token: expression (1 value, or n_bins logits when
    `expression_loss="classification"`), mutation logits [2] and copy-number logits [5]."""

    n_bins: int = 51
    expression_loss: str = "regression"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        dense = lambda f, name: nn.Dense(  # noqa: E731
            f, dtype=self.dtype, name=name, kernel_init=_init(TRUNC, ("embed", None)),
            bias_init=_init(nn.initializers.zeros, (None,)))
        h = ops.gelu(nn.Dense(x.shape[-1], dtype=self.dtype, name="hidden",
                             kernel_init=_init(TRUNC, ("embed", "mlp")),
                             bias_init=_init(nn.initializers.zeros, ("mlp",)))(x))
        n_expr = 1 if self.expression_loss == "regression" else self.n_bins
        out = {"expression": dense(n_expr, "expression")(h),
               "mutation": dense(N_CLASSES["mutation"], "mutation")(h),
               "cnv": dense(N_CLASSES["cnv"], "cnv")(h)}
        return {k: v.astype(jnp.float32) for k, v in out.items()}
