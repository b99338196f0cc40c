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

Two options make the encoder learn a sample's state fast and see all of it cheaply (both on in
the `tcga` preset of configs/omics_mgm.py):
  * `gene_values`: each token also gets value x a learned per-gene vector, and the CLS input gets
    the mean of those over the sample's visible tokens: a learned linear sketch of the sample
    (the gene-value coupling the additive embeddings only reach through a block's MLP).
  * `attend_tokens`: only the first that many tokens (the pipeline shuffles tokens, so a random
    subset) enter the blocks; the others are embedded, sketched and read out by the head
    (`MGMHead.sample_readout`) but not attended. Attention costs O(window^2), so a sample's
    3000 TCGA tokens train at a 256-token window's cost; at inference every token is predicted
    from a view whose window holds it (`cfm.omics_embed.window_views`).

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
from cfm.models.vit import TRUNC, Block, _init, _norm, lookup

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
    return lookup(VARIANTS, variant, OmicsSpec)


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
    gene_values: bool = False
    attend_tokens: int = 0  # 0: every token enters the blocks

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
        if self.gene_values:
            # value x a learned per-gene direction: the sum over a sample's tokens is then a
            # linear function of its visible values, which attention pooling can read directly
            # (the additive embeddings alone cannot tie a value to its gene before a block's MLP).
            gv = nn.Embed(self.vocab_size, d, dtype=self.dtype, name="gene_value_embed",
                          embedding_init=_init(nn.initializers.normal(1.0),
                                               ("vocab", "embed")))(gene_ids)
            visible = gene_ids != PAD_ID
            if value_mask is not None:
                visible = visible & ~value_mask
            sketch = jnp.where(visible, values, 0.0)[..., None].astype(x.dtype) * gv
            x = x + sketch
        b = x.shape[0]
        cls = self.param("cls_token", _init(nn.initializers.normal(1e-6), (None, None, "embed")),
                         (1, 1, d))
        cls = jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d))
        if self.gene_values:
            n_visible = jnp.maximum(jnp.sum(visible, axis=1), 1)[:, None, None]
            # Layer-normalised: a mean over thousands of tokens is small next to the residual
            # stream, and the read-out should not depend on how many values are visible.
            cls = cls + _norm(self.dtype, "sketch_norm")(
                jnp.sum(sketch, axis=1, keepdims=True) / n_visible)
        # Only the first `attend_tokens` tokens enter the blocks (the data pipeline puts a
        # random subset first); the others reach the head un-attended, so the sketch above and
        # the MGM head's CLS read-out see the whole sample at a window's attention cost.
        w = x.shape[1] if not self.attend_tokens else min(self.attend_tokens, x.shape[1])
        rest = x[:, w:]
        x = jnp.concatenate([cls, x[:, :w]], axis=1)
        x = nn.with_logical_constraint(x, ("act_batch", "act_seq", "act_embed"))
        keep = jnp.concatenate([jnp.ones((b, 1), bool), gene_ids[:, :w] != PAD_ID], axis=1)

        kw = dict(heads=s.heads, mlp_dim=s.mlp_dim, ffn="mlp", qkv_bias=True,
                  layerscale_init=self.layerscale_init, drop_path_rate=self.drop_path_rate,
                  dtype=self.dtype, attention=self.attention)
        block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        for i in range(s.depth):
            x = block(**kw, name=f"block_{i}")(x, train, keep)
        norm = _norm(self.dtype, "norm")
        x = norm(x)
        tokens = jnp.concatenate([x[:, 1:], norm(rest)], axis=1) if rest.shape[1] else x[:, 1:]
        return {"cls": x[:, 0], "tokens": tokens}


class MGMHead(nn.Module):
    """Masked-gene-modelling outputs per token: expression (1 value, or n_bins logits when
    `expression_loss="classification"`), mutation logits [2] and copy-number logits [5].

    With `sample_readout`, each regressed expression value also gets a term read from the
    sample's CLS embedding: <W cls, q_gene>, q a learned vector per gene. This is scGPT's
    "masked value prediction for cell embedding" (MVC/GEPC) objective, folded into the one
    prediction: it makes the CLS a low-rank code of the sample, the structure that per-gene
    linear imputation exploits in bulk expression (PCA of the TCGA tables reconstructs masked
    values at r 0.6-0.7), and it asks the CLS to summarise every visible token.
    """

    n_bins: int = 51
    expression_loss: str = "regression"
    dtype: Any = jnp.float32
    vocab_size: int = 0
    sample_readout: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, cls: jax.Array | None = None,
                 gene_ids: jax.Array | None = None) -> dict[str, jax.Array]:
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
        if self.sample_readout:
            if self.expression_loss != "regression" or cls is None or gene_ids is None:
                raise ValueError("sample_readout needs expression_loss='regression', the CLS "
                                 "embedding and the gene ids")
            d = x.shape[-1]
            q = nn.Embed(self.vocab_size, d, dtype=self.dtype, name="gene_query",
                         embedding_init=_init(nn.initializers.normal(0.02), ("vocab", "embed"))
                         )(gene_ids)
            c = nn.Dense(d, dtype=self.dtype, name="sample_code",
                         kernel_init=_init(TRUNC, ("embed", "mlp")),
                         bias_init=_init(nn.initializers.zeros, ("mlp",)))(cls)
            out["expression"] = out["expression"] + jnp.einsum("bd,bld->bl", c, q)[..., None]
        return {k: v.astype(jnp.float32) for k, v in out.items()}
