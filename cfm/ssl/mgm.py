"""Masked gene modelling (MGM): hide a fraction of a sample's token values, predict them.

The BERT recipe (Devlin et al. 2019) as scGPT (Cui et al. 2024) and BulkRNABert (Gelard et al.
2024) apply it to expression, extended to three modalities: masked expression values are
regressed (mean squared error on the normalised value) or classified into their bin, masked
mutation tokens are classified 0/1 and masked copy-number tokens into their call (-2..2). Each
modality's loss is the mean over its masked tokens in the global batch; the total is their
weighted sum. Gene ids and modalities stay visible: the model is asked for a gene's value.

Masks are drawn on device from the step's key (`jax.random`), Bernoulli(`mask_ratio`) per real
token, so a sharded step draws what a 1-device step draws.

This module wires the backbone and head (Flax modules, passed in) to the losses; it knows
nothing of files, meshes or optimisers.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from cfm.data.omics_records import MODALITIES, PAD_ID

EXPRESSION, MUTATION, CNV = (MODALITIES.index(m) for m in ("expression", "mutation", "cnv"))
INPUT_KEYS = ("gene_ids", "modality", "values", "classes")


def sample_value_mask(rng: jax.Array, gene_ids: jax.Array, ratio: float) -> jax.Array:
    """bool [B, L]: True for real tokens whose value is hidden, each with probability `ratio`."""
    return (jax.random.uniform(rng, gene_ids.shape) < ratio) & (gene_ids != PAD_ID)


def _masked_mean(x: jax.Array, where: jax.Array) -> tuple[jax.Array, jax.Array]:
    n = jnp.sum(where)
    return jnp.sum(jnp.where(where, x, 0.0)) / jnp.maximum(n, 1), n


def forward(backbone: nn.Module, head: nn.Module, params: dict, batch: dict,
            value_mask: jax.Array | None, train: bool = False, rng: jax.Array | None = None
            ) -> tuple[dict, dict]:
    """(backbone outputs {cls, tokens}, head outputs {expression, mutation, cnv})."""
    out = backbone.apply({"params": params["backbone"]}, *(batch[k] for k in INPUT_KEYS),
                         value_mask=value_mask, train=train,
                         rngs={"dropout": rng} if rng is not None else {})
    return out, head.apply({"params": params["mgm_head"]}, out["tokens"], out["cls"],
                           batch["gene_ids"])


def expression_prediction(pred: dict) -> jax.Array:
    """[B, L] predicted normalised expression of a regression head."""
    return pred["expression"][..., 0]


def objective(config: ml_collections.ConfigDict, backbone: nn.Module, head: nn.Module,
              params: dict, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    """Total loss and metrics for one global batch (arrays [B, L], see cfm.data.omics_pipeline)."""
    r_mask, r_drop = jax.random.split(rng)
    mask = sample_value_mask(r_mask, batch["gene_ids"], config.mgm.mask_ratio)
    _, pred = forward(backbone, head, params, batch, mask, train=True, rng=r_drop)
    modality, classes = batch["modality"], batch["classes"]
    ce = optax.softmax_cross_entropy_with_integer_labels
    if config.mgm.expression_loss == "regression":
        e_err = jnp.square(expression_prediction(pred) - batch["values"])
    else:
        e_err = ce(pred["expression"], classes)
    expr, n_e = _masked_mean(e_err, mask & (modality == EXPRESSION))
    mut, n_m = _masked_mean(ce(pred["mutation"], jnp.minimum(classes, 1)),
                            mask & (modality == MUTATION))
    cnv, n_c = _masked_mean(ce(pred["cnv"], jnp.minimum(classes, 4)), mask & (modality == CNV))
    w = config.mgm
    total = w.expression_weight * expr + w.mutation_weight * mut + w.cnv_weight * cnv
    mut_acc, _ = _masked_mean((jnp.argmax(pred["mutation"], -1) == classes).astype(jnp.float32),
                              mask & (modality == MUTATION))
    cnv_acc, _ = _masked_mean((jnp.argmax(pred["cnv"], -1) == classes).astype(jnp.float32),
                              mask & (modality == CNV))
    metrics = {"loss": total, "expression": expr, "mutation": mut, "cnv": cnv,
               "mutation_acc": mut_acc, "cnv_acc": cnv_acc,
               "masked_tokens": (n_e + n_m + n_c).astype(jnp.float32)}
    return total, {"metrics": metrics}
