"""Federated tile probes (`data.source = "tiles"`): each site holds tile embeddings with tile
labels, and the federation trains the multiclass probe of cfm.finetune's `tile` task (a linear
head on frozen CLS embeddings, softmax cross-entropy) without pooling the tiles.

- A site's data: `<data.path>/<site>/`, a `python -m cfm.embed --out` folder
  (`embeddings-*.npy` + `index.csv`, read by `cfm.finetune.slide_data.read_embeddings`) whose
  index carries the tile label in column `data.label_key` (as cfm.finetune's tile task reads
  it; data_prep.synthetic_tme tiles have `label`) and the slide in `slide_id`. Tiles whose
  label is not one of `data.classes` (the federation's class list, the same at every site) or
  is empty are left out.
- Held-out part: a fraction `data.holdout` of the site's slides (whole slides: never a tile of
  one slide on both sides; `cfm.evaluate.cv.patient_folds` grouped by slide, seed
  `config.seed`); `data.standardize` z-scores the features with the site's own training tiles.
- The head: `cfm.finetune.probe.LinearHead` (`model.kind = "linear"`), zero-initialised as
  there; `local_update`: `train.local_steps` full-batch steps of the mean cross-entropy
  (optax.softmax_cross_entropy_with_integer_labels, the probe's loss) + `train.l2`/2
  ||kernel||^2 + FedProx's term, with the site optimiser of cfm.federated.model.
- `heldout_metrics`: what a site answers to the server's `evaluate` messages: the global head's
  held-out cross-entropy, accuracy and balanced accuracy (cfm.evaluate.metrics) and the number
  of held-out tiles; nothing else (no slide name, no prediction) leaves the site.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cfm.evaluate.metrics import accuracy, balanced_accuracy
from cfm.federated import model as fmodel
from cfm.federated.sites import FederatedError
from cfm.finetune import slide_data
from cfm.finetune.common import FinetuneError
from cfm.finetune.fusion_data import split_list
from cfm.finetune.fusion_train import pad_bucket, pad_rows
from cfm.finetune.probe import LinearHead, predict_linear

HEADS = ("linear",)
METRICS = ("heldout_loss", "heldout_accuracy", "heldout_balanced_accuracy")


def is_tiles(config: ml_collections.ConfigDict) -> bool:
    """Whether the federation trains a tile probe (data.source = "tiles")."""
    return config.data.source == "tiles"


def classes(config: ml_collections.ConfigDict) -> list[str]:
    """The federation's class list `data.classes` (sorted, as cfm.finetune's tile task
    encodes them); FederatedError when it is empty."""
    names = sorted(set(split_list(config.data.get("classes", ""))))
    if len(names) < 2:
        raise FederatedError(f"config.data.classes={config.data.get('classes', '')!r}: name the "
                             "federation's tile classes (at least two, comma-separated)")
    return names


def _folder(config: ml_collections.ConfigDict, site: str) -> str:
    return os.path.join(config.data.path, site)


def server_dim(config: ml_collections.ConfigDict) -> int:
    """Embedding width: `data.embedding_dim`, or (0) read from the header of the first
    embeddings file of a site folder present on this machine (no tile is read)."""
    if int(config.data.get("embedding_dim", 0)) > 0:
        return int(config.data.embedding_dim)
    for site in split_list(config.data.sites):
        files = sorted(glob.glob(os.path.join(_folder(config, site), "embeddings-*.npy")))
        if files:
            return int(np.load(files[0], mmap_mode="r", allow_pickle=False).shape[1])
    raise FederatedError("config.data.embedding_dim=0 and no site folder of data.sites is on "
                         "this machine: set --config.data.embedding_dim to the embeddings' width")


def fingerprint(config: ml_collections.ConfigDict, dim: int) -> str:
    """What fixes the head's parameters (kind, width, classes) as canonical JSON."""
    return json.dumps({"kind": "tiles", "model": config.model.kind, "dim": int(dim),
                       "classes": classes(config), "label_key": config.data.label_key,
                       "standardize": bool(config.data.standardize)}, sort_keys=True)


def _head(config: ml_collections.ConfigDict) -> nn.Module:
    if config.model.kind not in HEADS:
        raise FederatedError(f"config.model.kind={config.model.kind!r}: data.source=tiles "
                             f"trains one of {HEADS}")
    return LinearHead(len(classes(config)))


def init_params(config: ml_collections.ConfigDict, dim: int) -> dict:
    """Round-0 head parameters (LinearHead's zeros), plain arrays."""
    p = _head(config).init(jax.random.key(int(config.seed)), jnp.zeros((1, dim)))["params"]
    return jax.tree.map(np.asarray, nn.meta.unbox(p))


# ============================================================================ the site ========
@dataclasses.dataclass
class TileSite:
    """One site's tiles as padded arrays; the slide names stay here (never sent)."""

    name: str
    n: int  # training tiles (FedAvg's weight)
    x: np.ndarray  # [n_pad, D] training features (standardised when data.standardize)
    y: np.ndarray  # [n_pad] int32 class codes
    w: np.ndarray  # [n_pad] 1 = tile, 0 = padding
    x_heldout: np.ndarray  # [n_heldout, D]
    y_heldout: np.ndarray  # [n_heldout]
    n_heldout: int
    rows: np.ndarray  # the training tiles' rows in the folder's index.csv
    rows_heldout: np.ndarray
    slides: np.ndarray  # slide_id of every row of the folder


@functools.lru_cache(maxsize=8)
def _site(spec: str, site: str) -> TileSite:
    config = ml_collections.ConfigDict(json.loads(spec))
    d, folder = config.data, _folder(config, site)
    if not os.path.isdir(folder):
        raise FederatedError(f"site {site!r} has no data: {folder} does not exist")
    try:
        tiles = slide_data.read_embeddings(folder)
    except FinetuneError as e:
        raise FederatedError(f"site {site!r} has no data: {e}") from None
    if d.label_key not in tiles.meta:
        raise FederatedError(f"site {site!r} has no data for a tile probe: {folder}/index.csv "
                             f"has no {d.label_key!r} column (config.data.label_key: the tile "
                             "labels)")
    names = classes(config)
    labels = tiles.meta[d.label_key].astype(str)
    keep = np.flatnonzero(tiles.meta[d.label_key].notna().to_numpy() & labels.isin(names))
    if not len(keep):
        raise FederatedError(f"site {site!r} has no data: no tile of {folder} has a "
                             f"{d.label_key!r} in data.classes {names}")
    lookup = {c: i for i, c in enumerate(names)}
    y = np.array([lookup[v] for v in labels.iloc[keep]], np.int32)
    slides = tiles.meta["slide_id"].to_numpy()
    train, held = keep, keep[:0]
    if float(d.holdout) > 0:
        k = max(2, int(round(1.0 / float(d.holdout))))
        try:
            tr, te = slide_data.folds_for(slides[keep], np.zeros(len(keep)), k,
                                          int(config.seed), "data.holdout")[0]
        except FinetuneError as e:
            raise FederatedError(f"site {site!r}: {e} (too few slides)") from None
        train, held = keep[tr], keep[te]
    x = tiles.features
    mu, sd = np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
    if d.standardize:
        mu, sd = x[train].mean(0), x[train].std(0)
        sd = np.where(sd > 0, sd, 1.0).astype(np.float32)
    x = ((x - mu) / sd).astype(np.float32)
    code = np.zeros(len(x), np.int32)
    code[keep] = y
    idx, w = pad_rows(train, pad_bucket(len(train)))
    return TileSite(site, len(train), x[idx], code[idx], w, x[held], code[held], len(held),
                    train, held, slides)


def site_data(config: ml_collections.ConfigDict, site: str) -> TileSite:
    """Site `site`'s labelled tiles, split by slide (module docstring); cached per process."""
    return _site(json.dumps(config.to_dict(), sort_keys=True), site)


# ============================================================================ local steps =====
_FNS: dict = {}


def _fns(config: ml_collections.ConfigDict):
    t = config.train
    key = (len(classes(config)), t.optimizer, float(t.lr), float(t.weight_decay), float(t.l2),
           int(t.local_steps))
    if key in _FNS:
        return _FNS[key]
    head, tx = _head(config), fmodel.local_optimizer(config)

    def loss(params, glob, x, y, w, mu):
        ce = optax.softmax_cross_entropy_with_integer_labels(head.apply({"params": params}, x),
                                                             y)
        kern = sum(jnp.sum(v ** 2) for k, v in fmodel.flatten(params).items() if "kernel" in k)
        return (jnp.sum(w * ce) / jnp.sum(w) + 0.5 * t.l2 * kern
                + 0.5 * mu * fmodel.proximal(params, glob))

    @jax.jit
    def update(glob, x, y, w, mu):
        def body(_, carry):
            params, opt, _ = carry
            val, g = jax.value_and_grad(loss)(params, glob, x, y, w, mu)
            upd, opt = tx.update(g, opt, params)
            return optax.apply_updates(params, upd), opt, val
        return jax.lax.fori_loop(0, int(t.local_steps), body,
                                 (glob, tx.init(glob), jnp.float32(0)))[::2]

    _FNS[key] = update
    return update


def local_update(config: ml_collections.ConfigDict, params: dict, site: TileSite, mu: float,
                 seed: int) -> tuple[dict, float]:
    """`train.local_steps` full-batch steps from `params` on the site's training tiles:
    (new params, the last step's loss). `seed` is unused (full batches, no dropout)."""
    new, last = _fns(config)(params, site.x, site.y, site.w, np.float32(mu))
    return jax.tree.map(np.asarray, new), float(last)


def heldout_metrics(params: dict, site: TileSite) -> dict:
    """The head's mean cross-entropy (nats), accuracy and balanced accuracy on the site's
    held-out tiles (`METRICS` keys), as floats."""
    probs = predict_linear(params, site.x_heldout).astype(np.float64)
    p_true = probs[np.arange(site.n_heldout), site.y_heldout]
    pred = probs.argmax(1)
    return {"heldout_loss": float(-np.mean(np.log(np.maximum(p_true, 1e-12)))),
            "heldout_accuracy": accuracy(site.y_heldout, pred),
            "heldout_balanced_accuracy": balanced_accuracy(site.y_heldout, pred)}


def client_log(site: str, r: int, m: dict) -> None:
    """The site's own log line of its held-out metrics (its name stays on the site)."""
    print(f"cfm.federated site {site}: round {r}: held-out accuracy "
          f"{m['heldout_accuracy']:.4f}, balanced {m['heldout_balanced_accuracy']:.4f}, "
          f"loss {m['heldout_loss']:.4f}", file=sys.stderr, flush=True)
