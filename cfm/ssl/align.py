"""Slide–omics alignment: a slide encoder over tile-embedding bags, contrasted with the omics
encoder of the same patient by SigLIP's sigmoid loss.

The multimodal pretraining of TANGLE (Jaume et al., CVPR 2024: slide embeddings contrasted with
expression profiles, plus an expression-reconstruction term) and THREADS (2025), with the loss of
SigLIP (Zhai et al. 2023), computed in per-device chunks (`cfm.ssl.sigmoid_loss`): each device
keeps its slides and the omics embeddings travel round the batch axes, so no device holds the
B x B pair matrix.

Networks: `backbone` the slide encoder (`cfm.models.slide`, released), `omics` the omics
transformer (`config.omics_model`, from scratch or `align.omics_init`: a masked-gene-modelling
workdir or export; `align.freeze_omics` keeps it fixed), linear projections of both to
`align.proj_dim` (L2-normalised), the loss's t' and b, and, with `align.recon_weight > 0`, a
linear read-out of every gene's normalised expression from the slide embedding (TANGLE's
reconstruction term: mean squared error over the batch's expression tokens).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cfm import config_check
from cfm.data import paired_pipeline
from cfm.data.omics_records import MODALITIES, PAD_ID
from cfm.models import backbone as backbone_lib
from cfm.models import omics
from cfm.parallel import sharding
from cfm.ssl import sigmoid_loss
from cfm.ssl.objective import Objective

EXPRESSION = MODALITIES.index("expression")
OMICS_KEYS = ("gene_ids", "modality", "values", "classes")


class AlignHeads(nn.Module):
    """Projections, the sigmoid loss's scalars and the expression read-out."""

    proj_dim: int
    vocab_size: int
    recon: bool
    temperature_init: float = 10.0  # t = exp(t') at init (SigLIP: 10)
    bias_init: float = sigmoid_loss.BIAS_INIT  # b at init (SigLIP: -10)

    def setup(self):
        dense = lambda f, name: nn.Dense(  # noqa: E731
            f, name=name, kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None)))
        self.slide_proj, self.omics_proj = dense(self.proj_dim, "slide"), dense(self.proj_dim,
                                                                                 "omics")
        self.t_prime = self.param("t_prime", nn.initializers.constant(
            math.log(self.temperature_init)), ())
        self.bias = self.param("bias", nn.initializers.constant(self.bias_init), ())
        if self.recon:
            self.read_out = dense(self.vocab_size, "recon")

    def __call__(self, slide: jax.Array, om: jax.Array) -> dict:
        norm = lambda z: z / jnp.linalg.norm(z, axis=-1, keepdims=True).clip(1e-6)  # noqa
        out = {"x": norm(self.slide_proj(slide)), "y": norm(self.omics_proj(om)),
               "t_prime": self.t_prime, "bias": self.bias}
        if self.recon:
            out["recon"] = self.read_out(slide)
        return out


class Models(NamedTuple):
    backbone: nn.Module  # cfm.models.slide.SlideEncoder (released)
    omics: nn.Module  # cfm.models.omics.OmicsTransformer
    heads: nn.Module  # AlignHeads


def embed(models: Models, params: dict, batch: dict, train: bool = False,
          rng: jax.Array | None = None) -> dict:
    """Head outputs (x, y normalised projections, t', b, recon) and both raw embeddings."""
    rngs = {"dropout": rng} if rng is not None else {}
    slide = models.backbone.apply({"params": params["backbone"]}, batch["bag"], batch["coords"],
                                  batch["bag_mask"], train=train, rngs=rngs)["embedding"]
    om = models.omics.apply({"params": params["omics"]}, *(batch[k] for k in OMICS_KEYS),
                            train=train, rngs=rngs)["cls"]
    out = models.heads.apply({"params": params["heads"]}, slide, om)
    return dict(out, slide=slide, omics=om)


def _pair_loss(config, x: jax.Array, y: jax.Array, t_prime, bias) -> jax.Array:
    """The chunked loss on the context mesh's batch axes (whole-matrix without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not config.align.chunked:
        return sigmoid_loss.sigmoid_loss(x, y, t_prime, bias)
    axes = sharding.batch_axes(sharding.rules_from_config(config))
    return sigmoid_loss.chunked_sigmoid_loss(x, y, t_prime, bias, mesh, axes)


def loss(config: ml_collections.ConfigDict, models: Models, params: dict, state, batch: dict,
         sched: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    if config.align.freeze_omics:
        params = dict(params, omics=jax.lax.stop_gradient(params["omics"]))
    out = embed(models, params, batch, train=True, rng=rng)
    contrast = _pair_loss(config, out["x"], out["y"], out["t_prime"], out["bias"])
    total, metrics = contrast, {"sigmoid": contrast, "temperature": jnp.exp(out["t_prime"]),
                                "bias": out["bias"]}
    if "recon" in out:
        pred = jnp.take_along_axis(out["recon"], batch["gene_ids"], axis=1)
        where = (batch["gene_ids"] != PAD_ID) & (batch["modality"] == EXPRESSION)
        err = jnp.sum(jnp.where(where, jnp.square(pred - batch["values"]), 0.0))
        recon = err / jnp.maximum(jnp.sum(where), 1)
        total = total + config.align.recon_weight * recon
        metrics["recon_mse"] = recon
    # Positive pairs above zero logit: a cheap in-batch health signal.
    pos = jnp.exp(out["t_prime"]) * jnp.sum(out["x"] * out["y"], -1) + out["bias"]
    metrics.update(loss=total, positive_logit=jnp.mean(pos))
    aux = {"metrics": metrics}
    if config.align.freeze_omics:
        aux["omics"] = state.params["omics"]  # put back after the update (weight decay)
    return total, aux


def after_update(config, state, aux: dict, sched: dict):
    if "omics" in aux:
        state = state.replace(params=dict(state.params, omics=aux["omics"]))
    return state, {}


# ---------------------------------------------------------------- what the trainer uses -----
def prepare_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check the config; fill model.in_dim, omics_model.vocab_size and n_bins from the pairs
    folder (or the omics_init model), so the checkpointed config builds without the data."""
    try:
        manifest = paired_pipeline.read_manifest(config.data.path)
    except ValueError as e:
        raise config_check.ConfigError(f"config.data.path={config.data.path!r}: {e}") from None
    if config.align.recon_weight < 0 or config.align.proj_dim < 1 or not config.align.get(
            "temperature_init", 10.0) > 0:
        raise config_check.ConfigError("config.align.recon_weight must be >= 0, "
                                       "config.align.proj_dim >= 1 and "
                                       "config.align.temperature_init > 0")
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model.in_dim = int(manifest["dim"])
        config.omics_model.vocab_size = int(manifest["vocab_size"])
        config.omics_model.n_bins = int(manifest["n_bins"])
        if config.align.omics_init:
            arch = _omics_export(config.align.omics_init).info["architecture"]
            if int(arch["vocab_size"]) != int(manifest["vocab_size"]):
                raise config_check.ConfigError(
                    f"config.align.omics_init={config.align.omics_init!r}: its vocabulary has "
                    f"{arch['vocab_size']} ids, the pairs' {manifest['vocab_size']}: prepare the "
                    "omics with the model's vocabulary")
            for k in ("variant", "n_bins", "value_encoding", "gene_values", "attend_tokens"):
                config.omics_model[k] = arch[k]
    return config


def _omics_export(path: str):
    from cfm import pretrained  # here: cfm.pretrained imports cfm.objectives, which imports us

    return pretrained.load(path)


def build_models(config: ml_collections.ConfigDict) -> Models:
    return Models(backbone_lib.from_config(config.model),
                  backbone_lib.from_config(config.omics_model),
                  AlignHeads(config.align.proj_dim, config.omics_model.vocab_size,
                             config.align.recon_weight > 0,
                             config.align.get("temperature_init", 10.0),  # runs before both
                             config.align.get("bias_init", sigmoid_loss.BIAS_INIT)))


def init_params(config: ml_collections.ConfigDict, models: Models, rng: jax.Array) -> dict:
    """Boxed {backbone, omics, heads}; omics from `align.omics_init` when set."""
    r1, r2, r3 = jax.random.split(rng, 3)
    arch = backbone_lib.architecture(config.model)
    slide = models.backbone.init(r1, *backbone_lib.slide.dummy_inputs(arch))["params"]
    t = jnp.zeros((1, 4), jnp.int32)
    om = models.omics.init(r2, t, t, t.astype(jnp.float32), t)["params"]
    if config.align.omics_init:
        loaded = _omics_export(config.align.omics_init).params
        om = jax.tree.map(lambda box, v: box.replace_boxed(jnp.asarray(v))
                          if isinstance(box, nn.Partitioned) else jnp.asarray(v), om,
                          loaded, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    w = config.model.width
    width = omics.spec(config.omics_model.variant).width
    heads = models.heads.init(r3, jnp.zeros((1, w)), jnp.zeros((1, width)))["params"]
    return {"backbone": slide, "omics": om, "heads": heads}


def batch_spec(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], str]]:
    b, t, l = int(config.batch_size), int(config.data.max_tiles), int(config.data.max_tokens)
    return {"bag": ((b, t, int(config.model.in_dim)), "float32"),
            "coords": ((b, t, 2), "float32"), "bag_mask": ((b, t), "bool"),
            "gene_ids": ((b, l), "int32"), "modality": ((b, l), "int32"),
            "values": ((b, l), "float32"), "classes": ((b, l), "int32")}


def flops(config: ml_collections.ConfigDict) -> dict[str, float]:
    """Slide encoder and heads (forward + 2x backward; the omics transformer as cfm.flops
    counts it for masked gene modelling is left out: small beside it at these sizes)."""
    m, b, t = config.model, int(config.batch_size), int(config.data.max_tiles)
    per_tile = 2 * ((m.in_dim + 16) * m.hidden + 2 * m.hidden * m.attention_dim)
    backbone = 3.0 * b * t * per_tile
    return {"total": backbone + 3.0 * b * b * config.align.proj_dim * 2, "backbone": backbone}


OBJECTIVE = Objective(
    name="align", unit="pairs", prepare_config=prepare_config, build_models=build_models,
    init_params=init_params, init_extra=lambda config, params: ({}, {}),
    step_schedules=lambda config, step: {}, loss=loss, after_update=after_update,
    batch_spec=batch_spec,
    batches=lambda config, start, p, n: paired_pipeline.make_train_iterator(
        config, process_index=p, process_count=n, start_step=start),
    flops=flops, depth=lambda config: omics.spec(config.omics_model.variant).depth,
    export_tree="params")
