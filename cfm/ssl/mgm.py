"""Masked gene modelling (MGM): hide a fraction of a sample's token values, predict them.

The BERT recipe (Devlin et al. 2019) as scGPT (Cui et al. 2024) and BulkRNABert (Gelard et al.
2024) apply it to expression, extended to three modalities: masked expression values are
regressed (mean squared error on the normalised value) or classified into their bin, masked
mutation tokens are classified 0/1 and masked copy-number tokens into their call (-2..2). Each
modality's loss is the mean over its masked tokens in the global batch; the total is their
weighted sum. Gene ids and modalities stay visible: the model is asked for a gene's value.

Masks are drawn on device from the step's key (`jax.random`), Bernoulli(`mask_ratio`) per real
token, so a sharded step draws what a 1-device step draws.

This module wires the backbone and head (Flax modules) to the losses and ends with
`OBJECTIVE`, what the trainer needs of masked gene modelling (`cfm.ssl.objective`): one network,
no teacher, no centering buffers. It knows nothing of files, meshes or optimisers.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from cfm import config_check, flops
from cfm.data import omics_pipeline
from cfm.data.omics_records import MODALITIES, PAD_ID
from cfm.models import backbone as backbone_lib
from cfm.models import omics
from cfm.ssl.objective import Objective

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


# ---------------------------------------------------------------- what the trainer uses -----
class Models(NamedTuple):
    backbone: nn.Module  # cfm.models.omics.OmicsTransformer
    mgm_head: nn.Module


def prepare_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check the config (`config_check.validate_mgm`) and return a copy whose model.vocab_size
    and model.n_bins (-1 = from the data) are filled from the data, so the checkpointed config
    builds the same model without the data."""
    config_check.validate_mgm(config)
    try:
        vocab, n_bins = omics_pipeline.data_sizes(config.data)
    except (OSError, ValueError, KeyError) as e:
        raise config_check.ConfigError(f"config.data.path={config.data.path!r}: {e}") from None
    for key, have, found in (("model.vocab_size", config.model.vocab_size, vocab),
                             ("model.n_bins", config.model.n_bins, n_bins)):
        if have not in (-1, found):
            raise config_check.ConfigError(f"config.{key}={have!r}: the data has {found}; use "
                                           f"-1 or {found}")
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model.vocab_size, config.model.n_bins = vocab, n_bins
    return config


def build_models(config: ml_collections.ConfigDict) -> Models:
    m = config.model
    return Models(backbone_lib.from_config(m),
                  omics.MGMHead(m.n_bins, config.mgm.expression_loss, jnp.dtype(m.dtype),
                                m.vocab_size, config.mgm.get("sample_readout", False)))


def init_params(config: ml_collections.ConfigDict, models: Models, rng: jax.Array) -> dict:
    """Boxed parameters {backbone, mgm_head}."""
    r1, r2 = jax.random.split(rng)
    t = jnp.zeros((1, 4), jnp.int32)
    backbone = models.backbone.init(r1, t, t, t.astype(jnp.float32), t,
                                    value_mask=t.astype(bool))["params"]
    width = omics.spec(config.model.variant).width
    return {"backbone": backbone,
            "mgm_head": models.mgm_head.init(r2, jnp.zeros((1, 4, width)),
                                             jnp.zeros((1, width)), t)["params"]}


def loss(config: ml_collections.ConfigDict, models: Models, params: dict, state, batch: dict,
         sched: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    return objective(config, models.backbone, models.mgm_head, params, batch, rng)


def batch_spec(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Global batch shapes and dtypes (`cfm.data.omics_pipeline`'s padded token sets)."""
    shape = (int(config.batch_size), int(config.data.max_tokens))
    return {"gene_ids": (shape, "int32"), "modality": (shape, "int32"),
            "values": (shape, "float32"), "classes": (shape, "int32")}


def batches(config: ml_collections.ConfigDict, start_step: int, process_index: int,
            process_count: int):
    return omics_pipeline.make_train_iterator(config, process_index=process_index,
                                              process_count=process_count, start_step=start_step)


OBJECTIVE = Objective(
    name="mgm", unit="samples", prepare_config=prepare_config, build_models=build_models,
    init_params=init_params, init_extra=lambda config, params: ({}, {}),
    step_schedules=lambda config, step: {}, loss=loss,
    after_update=lambda config, state, aux, sched: (state, {}), batch_spec=batch_spec,
    batches=batches,
    flops=lambda config: flops.omics_step_flops(config, int(config.data.max_tokens)),
    depth=lambda config: omics.spec(config.model.variant).depth, export_tree="params")
