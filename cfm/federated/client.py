"""The site's Flower ClientApp: local training on the site's private patients.

A `train` message carries the global parameters (ArrayRecord) and the round's settings
(ConfigRecord: round, the server's model keys, FedProx's mu, DP's clipping norm). The site
checks the model keys against its own config (a difference is refused, naming the keys),
runs cfm.federated.model.local_update on its patients and replies with the new parameters and
two numbers: its number of patients (FedAvg's weight) and its last local loss. Nothing else
leaves the site: no ids, no feature values, no predictions (tests/test_federated.py inspects
every message). With DP on, Flower's `fixedclipping_mod` clips the update w_k - w to the
server's norm before the reply leaves. With secure aggregation on, Flower's `secaggplus_mod`
(cfm.federated.secagg) answers the SecAgg+ stages and masks the (clipped) update.

With `model.kind = "mgm"` (cfm.federated.pretrain) the site trains on its omics table, and
also answers `evaluate` messages: the global model's masked-gene loss on its held-out patients
and their number (`model.kind = "dino"`, cfm.federated.dino: DINOv2 on its tiles, the held-out
tiles' DINOv2 loss); with `data.source = "tiles"` (cfm.federated.tiles) it trains a tile probe on
its tile embeddings and answers with its held-out tiles' loss, accuracy and balanced accuracy.

Which site and config: the node config of the SuperNode (`cfm-config`, `cfm-overrides`,
`site`; set by `python -m cfm.federated client`) or of the in-process grid.
"""

from __future__ import annotations

import functools
import json
import shlex
import zlib

import ml_collections
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from cfm import config_loader
from cfm.federated import model as fmodel
from cfm.federated import dino, pretrain, tiles
from cfm.federated.secagg import secure_aggregation_mod
from cfm.federated.sites import FederatedError, SiteData, feature_names, site_data


@functools.lru_cache(maxsize=8)
def load_site(spec: str, overrides: str, site: str) -> tuple[ml_collections.ConfigDict,
                                                               SiteData, str]:
    """(config, the site's data, its model keys) of a node config; cached per process."""
    config = config_loader.load_config(spec, shlex.split(overrides))
    if dino.is_dino_kind(config):  # continued DINOv2 pretraining on the site's tiles
        return config, dino.site_data(config, site), dino.fingerprint(config)
    if pretrain.is_mgm_kind(config):  # continued masked-gene pretraining on the site's table
        return config, pretrain.site_data(config, site), pretrain.fingerprint(config)
    if tiles.is_tiles(config):  # a tile probe on the site's tile embeddings
        data = tiles.site_data(config, site)
        return config, data, tiles.fingerprint(config, data.x.shape[1])
    names = feature_names(config)
    return config, site_data(config, site, names), fmodel.model_fingerprint(config, names)


def _differences(mine: str, theirs: str) -> list[str]:
    a, b = json.loads(mine), json.loads(theirs)
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += [f"{k}.{x}" for x in sorted(set(a[k]) | set(b[k]))
                    if a[k].get(x) != b[k].get(x)]
        elif a.get(k) != b.get(k):
            out.append(k)
    return out


def dp_clipping_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `fixedclipping_mod` when the server asks for clipping (DP on), else a no-op."""
    cfg = msg.content.config_records.get("config")
    if cfg is not None and KEY_CLIPPING_NORM in cfg:
        return fixedclipping_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


app = ClientApp(mods=[secure_aggregation_mod, dp_clipping_mod])  # clip, then mask


def _checked_site(msg: Message, context: Context):
    """(config, site data) of the node config, after checking the server's model keys."""
    nc = context.node_config
    config, site, mine = load_site(str(nc["cfm-config"]), str(nc.get("cfm-overrides", "")),
                                   str(nc["site"]))
    if msg.content["config"]["model"] != mine:
        theirs = str(msg.content["config"]["model"])
        raise FederatedError(f"site {site.name!r}: its model config differs from the server's "
                             f"({', '.join(_differences(mine, theirs))}); start "
                             "the client with the server's config")
    return config, site


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training (module docstring)."""
    config, site = _checked_site(msg, context)
    cfg = msg.content["config"]
    params = fmodel.from_record(msg.content["arrays"])
    seed = (int(config.seed) * 100003 + int(cfg["server-round"]) * 101
            + zlib.crc32(site.name.encode()) % 97)
    if dino.is_dino_kind(config):  # its schedules follow the federation's global step
        new, loss = dino.local_update(config, params, site, float(cfg["mu"]), seed,
                                      int(cfg["server-round"]))
    else:
        update = (pretrain.local_update if pretrain.is_mgm_kind(config) else
                  tiles.local_update if tiles.is_tiles(config) else fmodel.local_update)
        new, loss = update(config, params, site, float(cfg["mu"]), seed)
    return Message(RecordDict({"arrays": fmodel.to_record(new),
                               "metrics": MetricRecord({"num-examples": site.n,
                                                        "train_loss": loss})}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """model.kind=mgm: the global model's masked loss on the site's held-out patients;
    data.source=tiles: the global head's held-out loss, accuracy and balanced accuracy
    (cfm.federated.tiles); with the number of held-out examples, nothing else."""
    config, site = _checked_site(msg, context)
    r = int(msg.content["config"]["server-round"])
    if tiles.is_tiles(config):
        metrics = dict.fromkeys(tiles.METRICS, 0.0)
        if site.n_heldout:
            metrics = tiles.heldout_metrics(fmodel.from_record(msg.content["arrays"]), site)
            tiles.client_log(site.name, r, metrics)
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": site.n_heldout,
                                                            **metrics})}), reply_to=msg)
    pre = dino if dino.is_dino_kind(config) else pretrain if pretrain.is_mgm_kind(config) else None
    if pre is None:
        raise FederatedError("evaluate messages are for model.kind=mgm or dino, or "
                             "data.source=tiles")
    losses = {"loss": 0.0}
    if site.n_heldout:
        losses = pre.heldout_loss(config, fmodel.from_record(msg.content["arrays"]), site)
        pre.client_log(site.name, r, losses)
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": site.n_heldout,
                                                        "heldout_loss": losses["loss"]})}),
                   reply_to=msg)
