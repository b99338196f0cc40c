"""The model every site trains and the server aggregates, its jitted local step, and the
conversions between its parameters and Flower's ArrayRecord.

- `model.kind = "fusion"`: cfm.models.fusion.FusionModel on the site's omics vector (one token)
  and clinical tokens, the model of cfm.finetune's response / survival tasks;
  `"linear"`: one Dense layer on [omics, clinical] (logistic or Cox regression; convex, the
  tests' reference problem); `"mgm"`: an omics export's own model (cfm.federated.pretrain).
- `local_update`: `train.local_steps` full-batch steps of the head's loss
  (cfm.finetune.losses) + `l2`/2 ||kernels||^2 + FedProx's `mu`/2 ||w - w_global||^2
  (Li et al. 2020, MLSys, "Federated Optimization in Heterogeneous Networks"), with optax SGD
  or AdamW; one XLA executable per (config, padded size), cached for the process.
- `model_fingerprint`: the config keys that fix the parameters' shapes and meaning; a client
  whose keys differ from the server's refuses the round and names them.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flwr.app import Array, ArrayRecord

from cfm.checkpoint import flatten, unflatten
from cfm.finetune.fusion_data import split_list
from cfm.finetune.fusion_train import prng_key
from cfm.finetune.losses import loss_fn, score_fn
from cfm.models.fusion import FusionModel

_FNS: dict = {}


class LinearModel(nn.Module):
    """w . [omics, clinical * present] + b: logistic (binary head) or Cox (risk) regression."""

    @nn.compact
    def __call__(self, batch: dict, train: bool = False) -> jax.Array:
        x = [batch["omics"]]
        if "clinical" in batch:
            x.append(batch["clinical"] * batch["clinical_mask"])
        return nn.Dense(1, name="head")(jnp.concatenate(x, axis=-1))


def model_keys(config: ml_collections.ConfigDict, names: list[str]) -> dict:
    """What fixes the parameters: head, model, features and clinical variables."""
    clinical = split_list(config.data.clinical) if config.data.source != "csv" else []
    return {"head": config.head, "model": config.model.to_dict(), "features": list(names),
            "clinical": clinical}


def model_fingerprint(config: ml_collections.ConfigDict, names: list[str]) -> str:
    """`model_keys` as canonical JSON (sent to clients; compared there)."""
    return json.dumps(model_keys(config, names), sort_keys=True)


def build(config: ml_collections.ConfigDict) -> nn.Module:
    """The flax module of `config.model`."""
    m = config.model
    if m.kind == "linear":
        return LinearModel()
    if m.kind == "fusion":
        return FusionModel(n_out=1, dim=m.dim, heads=m.heads, depth=m.depth, dropout=m.dropout,
                           feature_dropout=m.feature_dropout,
                           modality_dropout=m.modality_dropout)
    raise ValueError(f"config.model.kind={m.kind!r}: use fusion or linear")


def example_batch(n_features: int, n_clinical: int, n: int = 2) -> dict:
    """A zero batch of the federation's shapes (to initialise parameters on the server)."""
    b = {"omics": jnp.zeros((n, n_features)), "omics_mask": jnp.ones((n,), bool)}
    if n_clinical:
        b["clinical"] = jnp.zeros((n, n_clinical))
        b["clinical_mask"] = jnp.ones((n, n_clinical), bool)
    return b


def init_params(config: ml_collections.ConfigDict, n_features: int, n_clinical: int) -> dict:
    """The round-0 parameters (seed `config.seed`), identical on every machine; plain arrays
    (the fusion model's logical-axis boxes removed)."""
    key = prng_key(int(config.seed))
    params = build(config).init({"params": key, "dropout": key},
                                example_batch(n_features, n_clinical))["params"]
    return jax.tree.map(np.asarray, nn.meta.unbox(params))


def local_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """A site's optimiser (`train.optimizer`, `lr`, `weight_decay`), its state reset every
    round."""
    t = config.train
    return optax.sgd(t.lr) if t.optimizer == "sgd" else optax.adamw(t.lr,
                                                                     weight_decay=t.weight_decay)


def proximal(params: dict, glob: dict) -> jax.Array:
    """||params - glob||^2 over every leaf (FedProx's term, without its mu / 2)."""
    return sum(jnp.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(params),
                                                      jax.tree.leaves(glob)))


def _fns(config: ml_collections.ConfigDict) -> dict:
    t = config.train
    key = (json.dumps(config.model.to_dict(), sort_keys=True), config.head, t.optimizer,
           float(t.lr), float(t.weight_decay), float(t.l2), int(t.local_steps))
    if key in _FNS:
        return _FNS[key]
    model, head = build(config), config.head
    tx = local_optimizer(config)

    def loss(params, glob, batch, tg, w, rng, mu):
        out = model.apply({"params": params}, batch, train=True, rngs={"dropout": rng})
        kern = sum(jnp.sum(v ** 2) for k, v in flatten(params).items() if "kernel" in k)
        return (loss_fn(head, out, tg, w, 0.0) + 0.5 * t.l2 * kern
                + 0.5 * mu * proximal(params, glob))

    @jax.jit
    def update(glob, batch, tg, w, rng, mu):
        def body(i, carry):
            params, opt, _ = carry
            val, g = jax.value_and_grad(loss)(params, glob, batch, tg, w,
                                              jax.random.fold_in(rng, i), mu)
            upd, opt = tx.update(g, opt, params)
            return optax.apply_updates(params, upd), opt, val
        params, _, last = jax.lax.fori_loop(0, int(t.local_steps), body,
                                            (glob, tx.init(glob), jnp.float32(0)))
        return params, last

    @jax.jit
    def scores(params, batch):
        return score_fn(head, model.apply({"params": params}, batch))

    _FNS[key] = {"update": update, "scores": scores}
    return _FNS[key]


def site_batch(site) -> tuple[dict, dict, jax.Array]:
    """(batch, targets, weights) of a cfm.federated.sites.SiteData, padded."""
    b = {k: jnp.asarray(v[site.rows]) for k, v in site.feats.items()
         if k in ("omics", "omics_mask", "clinical", "clinical_mask")}
    tg = {k: jnp.asarray(v[site.rows]) for k, v in site.targets.items()}
    return b, tg, jnp.asarray(site.weight)


def local_update(config: ml_collections.ConfigDict, params: dict, site, mu: float,
                 seed: int) -> tuple[dict, float]:
    """`train.local_steps` steps from `params` on the site's patients: (new params, loss)."""
    b, tg, w = site_batch(site)
    new, last = _fns(config)["update"](params, b, tg, w, prng_key(seed), jnp.float32(mu))
    return jax.tree.map(np.asarray, new), float(last)


def predict(config: ml_collections.ConfigDict, params: dict, site) -> np.ndarray:
    """The head's scores (P(response) or Cox risk) of the site's patients."""
    b, _, _ = site_batch(site)
    return np.asarray(_fns(config)["scores"](params, b))[:site.n]


def to_record(params: dict) -> ArrayRecord:
    """Parameters as a Flower ArrayRecord keyed by their "."-joined path."""
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in sorted(flatten(params).items())})


def from_record(record: ArrayRecord) -> dict:
    """The parameter tree of an ArrayRecord made by `to_record`."""
    return unflatten({k: record[k].numpy() for k in record.keys()})
