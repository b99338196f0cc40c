"""Multimodal fusion of slide tiles, omics and clinical variables for patient-level prediction.

Inputs (a dict batch; any subset of the modalities, each with its own presence mask):

- `tiles` [B, N, d_tile] tile embeddings of a patient's slide(s), padded; `tile_mask` [B, N].
- `omics` [B, G] raw (standardised) features and `omics_mask` [B] (patient has omics). With
  a gene -> group edge list (`group_edges`: gene sets / pathways / expression modules; an
  input, so one compiled model serves every fold) each group becomes a token,
  sum_g x_g W_g over its genes / sqrt(|group|) + b_group (a per-gene linear map pooled per
  set, the pathway tokens of SurvPath); without groups the whole vector is one
  token (the mode for a pretrained encoder's sample embedding).
- `clinical` [B, C] values and `clinical_mask` [B, C] (per variable): token_c = x_c w_c + e_c,
  or a learned per-variable missing token when the value is absent.

Tokens of omics and clinical variables ("context" tokens) attend to the tiles and the tiles
attend back (the genomic-guided co-attention of MCAT, Chen et al. 2021 ICCV, and the
pathway<->histology interactions of SurvPath, Jaume et al. 2024 CVPR), then `depth` masked
self-attention blocks mix the context tokens. Every cross-attention has one learned null key so
a patient without tiles (or without context) attends to something defined. Each modality is
pooled (masked mean for context, gated attention pooling of Ilse et al. 2018 for tiles) into
a fixed slot of the head's input; a modality absent for a patient (or from the whole batch) is
replaced by a learned missing-modality embedding, and in
training whole modalities are dropped per patient with probability `modality_dropout` (never
all of a patient's), so the model learns to predict from any subset.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`) like
cfm.models.vit, so the model can be sharded by cfm.parallel.sharding's rules.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MODALITIES = ("omics", "clinical", "tiles")
# plain normals, not truncated: truncated_normal costs seconds of XLA compile per parameter on CPU
TRUNC = nn.initializers.normal(0.02)
LECUN = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


def _init(init: Any, names: tuple[str | None, ...]) -> Any:
    return nn.with_logical_partitioning(init, names)


def _dense(features: int, names: tuple[str | None, str | None], name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=_init(LECUN, names),
                    bias_init=_init(nn.initializers.zeros, names[1:]), name=name)


def _layernorm(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(scale_init=_init(nn.initializers.ones, ("embed",)),
                        bias_init=_init(nn.initializers.zeros, ("embed",)), name=name)


def group_edges(groups: Sequence[Sequence[int]], n_edges: int | None = None
                ) -> dict[str, np.ndarray]:
    """Gene -> group membership as an edge list padded to `n_edges` (weight 0 pads):
    `omics_edge_gene` [E], `omics_edge_group` [E] and `omics_edge_weight` [E] = 1/sqrt(|group|).
    A gene may be in several sets; an empty group gets no edge (its token is its bias). Sparse,
    so a token costs its genes, not G x P (32x less work than a dense [G, P] map for 32 sets)."""
    gene, grp, wt = [], [], []
    for p, idx in enumerate(groups):
        idx = np.asarray(idx, np.int64).reshape(-1)
        gene.append(idx)
        grp.append(np.full(idx.size, p, np.int64))
        wt.append(np.full(idx.size, 1.0 / np.sqrt(max(idx.size, 1)), np.float32))
    gene, grp, wt = np.concatenate(gene), np.concatenate(grp), np.concatenate(wt)
    n = len(gene) if n_edges is None else n_edges
    if len(gene) > n:
        raise ValueError(f"{len(gene)} gene-group memberships do not fit n_edges={n}")
    pad = n - len(gene)
    return {"omics_edge_gene": np.r_[gene, np.zeros(pad, np.int64)].astype(np.int32),
            "omics_edge_group": np.r_[grp, np.zeros(pad, np.int64)].astype(np.int32),
            "omics_edge_weight": np.r_[wt, np.zeros(pad, np.float32)].astype(np.float32)}


class MaskedAttention(nn.Module):
    """Multi-head attention of queries `x` [B, Tq, D] to keys/values `kv` [B, Tk, D] with a key
    mask [B, Tk] and one learned always-valid null key."""
    heads: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, kv: jax.Array, kv_mask: jax.Array,
                 train: bool = False) -> jax.Array:
        d = x.shape[-1]
        hd = d // self.heads
        wq = self.param("q_kernel", _init(TRUNC, ("embed", "heads", "kv")), (d, self.heads, hd))
        wk = self.param("k_kernel", _init(TRUNC, ("embed", "heads", "kv")), (d, self.heads, hd))
        wv = self.param("v_kernel", _init(TRUNC, ("embed", "heads", "kv")), (d, self.heads, hd))
        wo = self.param("o_kernel", _init(TRUNC, ("heads", "kv", "embed")), (self.heads, hd, d))
        null = self.param("null_kv", _init(TRUNC, (None, "embed")), (1, d))
        b = kv.shape[0]
        kv = jnp.concatenate([jnp.broadcast_to(null[None], (b, 1, d)), kv], axis=1)
        kv_mask = jnp.concatenate([jnp.ones((b, 1), bool), kv_mask.astype(bool)], axis=1)
        q = jnp.einsum("btd,dhk->bthk", x, wq)
        k = jnp.einsum("bsd,dhk->bshk", kv, wk)
        v = jnp.einsum("bsd,dhk->bshk", kv, wv)
        logits = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(hd)
        logits = jnp.where(kv_mask[:, None, None, :], logits, -1e9)
        attn = jax.nn.softmax(logits, axis=-1)
        attn = nn.Dropout(self.dropout, deterministic=not train)(attn)
        out = jnp.einsum("bhts,bshk->bthk", attn, v)
        return jnp.einsum("bthk,hkd->btd", out, wo)


class Block(nn.Module):
    """Pre-norm residual (cross- or self-) attention + MLP."""
    heads: int
    mlp_ratio: int = 2
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, kv: jax.Array | None, kv_mask: jax.Array,
                 train: bool = False) -> jax.Array:
        d = x.shape[-1]
        h = _layernorm("norm1")(x)
        src = h if kv is None else _layernorm("norm_kv")(kv)
        x = x + MaskedAttention(self.heads, self.dropout, name="attn")(h, src, kv_mask, train)
        h = _layernorm("norm2")(x)
        h = nn.gelu(_dense(d * self.mlp_ratio, ("embed", "mlp"), "fc1")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return x + _dense(d, ("mlp", "embed"), "fc2")(h)


class FusionModel(nn.Module):
    """Patient-level fusion model; returns [B, n_out] (a logit, class logits, a Cox risk or
    discrete-time hazard logits, depending on the head the trainer attaches a loss to)."""
    n_out: int = 1
    dim: int = 64
    heads: int = 4
    depth: int = 1
    dropout: float = 0.1
    feature_dropout: float = 0.0   # dropout on the raw omics features (genes), training only
    modality_dropout: float = 0.0  # per patient and modality, training only
    n_groups: int = 0  # omics tokens: 0 = one token for the whole vector; else P groups given
    #                    by the batch's gene -> group edge list (see group_edges)

    @nn.compact
    def __call__(self, batch: dict, train: bool = False) -> jax.Array:
        present = {m: m in batch and batch[m] is not None for m in MODALITIES}
        if not any(present.values()):
            raise ValueError(f"FusionModel needs at least one of {MODALITIES} in the batch")
        b = next(batch[m].shape[0] for m in MODALITIES if present[m])
        d = self.dim
        # per-patient presence of each modality
        has = {}
        if present["omics"]:
            has["omics"] = batch.get("omics_mask", jnp.ones((b,), bool)).astype(bool)
        if present["clinical"]:
            cmask = batch.get("clinical_mask", jnp.ones(batch["clinical"].shape, bool))
            cmask = cmask.astype(bool)
            has["clinical"] = cmask.any(axis=1)
        if present["tiles"]:
            tmask = batch.get("tile_mask", jnp.ones(batch["tiles"].shape[:2], bool)).astype(bool)
            has["tiles"] = tmask.any(axis=1)
        if train and self.modality_dropout > 0 and len(has) > 1:
            names = sorted(has)
            rng = self.make_rng("dropout")
            drop = jax.random.bernoulli(rng, self.modality_dropout, (b, len(names)))
            avail = jnp.stack([has[m] for m in names], axis=1)
            keep = avail & ~drop
            keep = jnp.where(keep.any(axis=1, keepdims=True), keep, avail)  # never drop all
            has = {m: keep[:, i] for i, m in enumerate(names)}

        ctx, ctx_mask, ctx_kind = [], [], []
        if present["omics"]:
            x = batch["omics"].astype(jnp.float32)
            x = nn.Dropout(self.feature_dropout, deterministic=not train)(x)
            g = x.shape[-1]
            if self.n_groups == 0:
                tok = _dense(d, (None, "embed"), "omics_proj")(x)[:, None, :]
            else:
                gi, gp = batch["omics_edge_gene"], batch["omics_edge_group"]
                ew = batch["omics_edge_weight"].astype(jnp.float32)
                w = self.param("omics_gene_kernel", _init(TRUNC, ("vocab", "embed")), (g, d))
                bias = self.param("omics_group_bias", _init(nn.initializers.zeros,
                                                            (None, "embed")), (self.n_groups, d))
                contrib = (x[:, gi] * ew)[..., None] * w[gi][None]  # [B, E, D]
                tok = jax.ops.segment_sum(jnp.swapaxes(contrib, 0, 1), gp,
                                          num_segments=self.n_groups)  # [P, B, D]
                tok = jnp.swapaxes(tok, 0, 1) + bias
                emb = self.param("omics_group_embed", _init(TRUNC, (None, "embed")),
                                 (self.n_groups, d))
                tok = nn.gelu(tok) + emb
            ctx.append(tok)
            ctx_mask.append(jnp.broadcast_to(has["omics"][:, None], tok.shape[:2]))
            ctx_kind += ["omics"] * tok.shape[1]
        if present["clinical"]:
            c = jnp.nan_to_num(batch["clinical"].astype(jnp.float32))
            n_c = c.shape[-1]
            wc = self.param("clinical_value_kernel", _init(TRUNC, (None, "embed")), (n_c, d))
            ec = self.param("clinical_embed", _init(TRUNC, (None, "embed")), (n_c, d))
            mc = self.param("clinical_missing", _init(TRUNC, (None, "embed")), (n_c, d))
            tok = c[..., None] * wc + ec
            tok = jnp.where(cmask[..., None], tok, mc)
            ctx.append(tok)
            ctx_mask.append(jnp.broadcast_to(has["clinical"][:, None], tok.shape[:2]))
            ctx_kind += ["clinical"] * n_c
        tiles = None
        if present["tiles"]:
            tiles = _dense(d, (None, "embed"), "tile_proj")(batch["tiles"].astype(jnp.float32))
            tiles = nn.gelu(tiles)
            tmask = tmask & has["tiles"][:, None]

        if ctx:
            h = jnp.concatenate(ctx, axis=1)
            hm = jnp.concatenate(ctx_mask, axis=1)
            if tiles is not None:  # co-attention: context -> tiles, tiles -> context
                h = Block(self.heads, dropout=self.dropout, name="ctx_to_tiles")(
                    h, tiles, tmask, train)
                tiles = Block(self.heads, dropout=self.dropout, name="tiles_to_ctx")(
                    tiles, h, hm, train)
            for i in range(self.depth):
                h = Block(self.heads, dropout=self.dropout, name=f"self_{i}")(h, None, hm, train)
            h = _layernorm("ctx_norm")(h)

        pooled = []
        kinds = np.asarray(ctx_kind)
        for m in MODALITIES:  # one slot per modality, so any subset fits the same head
            missing = self.param(f"{m}_missing_embed", _init(TRUNC, ("embed",)), (d,))
            if not present[m]:
                pooled.append(jnp.broadcast_to(missing, (b, d)))
                continue
            if m == "tiles":
                t = _layernorm("tiles_norm")(tiles)
                gate = nn.tanh(_dense(d, ("embed", "mlp"), "pool_v")(t)) * nn.sigmoid(
                    _dense(d, ("embed", "mlp"), "pool_u")(t))
                score = _dense(1, ("mlp", None), "pool_w")(gate)[..., 0]
                score = jnp.where(tmask, score, -1e9)
                att = jax.nn.softmax(score, axis=1) * tmask
                p = jnp.einsum("bn,bnd->bd", att, t)
                ok = has["tiles"]
            else:
                part = h[:, kinds == m]
                if m == "clinical":  # mean over the variables actually measured
                    w = cmask.astype(jnp.float32)
                else:
                    w = jnp.ones(part.shape[:2], jnp.float32)
                p = (part * w[..., None]).sum(1) / jnp.maximum(w.sum(1, keepdims=True), 1.0)
                ok = has[m]
            pooled.append(jnp.where(ok[:, None], p, missing))
        z = jnp.concatenate(pooled, axis=-1)
        z = nn.Dropout(self.dropout, deterministic=not train)(z)
        z = nn.gelu(_dense(d, (None, "mlp"), "head_hidden")(z))
        return _dense(self.n_out, ("mlp", None), "head_out")(z)
