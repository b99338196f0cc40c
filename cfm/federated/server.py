"""The federated server's round loop, run inside a Flower ServerApp (or on an in-process grid).

Each round: wait for `server.min_sites` sites, send every site the global parameters (Flower
`train` messages with an ArrayRecord and a ConfigRecord), aggregate the replies, step the
global parameters with the server optimiser, checkpoint with orbax, log one history line
(model.kind=mgm or dino and data.source=tiles: with the sites' held-out metrics, from `evaluate`
messages before round 1 and after every round).

Aggregation (Reddi et al. 2021, ICLR, "Adaptive Federated Optimization", Algorithm 1): the
pseudo-gradient g = w - sum_k p_k w_k (p_k = n_k / n, the sites' patient shares; equal shares
under DP, where the sensitivity must not depend on n_k) is fed to an optax optimiser:
`fedavg` / `fedprox` = optax.sgd(1.0), so w <- the weighted mean (FedProx adds its proximal
term on the sites, cfm.federated.model); `fedadam` = optax.adam(server.lr, b1, b2,
eps=server.tau). Differential privacy (`dp.enabled`): every site's update w_k - w is clipped to
L2 norm `dp.clip` by Flower's `fixedclipping_mod` on the site, and the server adds Gaussian
noise of std `dp.noise_multiplier * dp.clip / m` to the mean of the m updates (DP-FedAvg,
McMahan et al. 2018, ICLR; Flower's `compute_stdv`); the (epsilon, delta) spent is Flower's
RDP accountant's (dp-accounting), reported every round. With `secure_aggregation.enabled`
the sites' updates are summed by Flower's SecAgg+ (cfm.federated.secagg): the server sees only
masked, quantised updates and their weighted mean.

A round whose replies number fewer than `server.min_sites` (a site died) is sent again when
the sites are back: a killed client rejoins by starting again. The state (parameters,
optimiser state, round, accountant) is saved every `server.checkpoint_every` rounds; a server
started again on the same workdir resumes after its last saved round (later rounds run
again, their history lines are replaced).
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.serde import message_to_proto
from flwr.serverapp import (GaussianPrivacyEvent, Grid, NeighboringRelation, PrivacyConfig,
                            RdpAccountant, SamplingMethod)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_stdv

from cfm.federated import model as fmodel
from cfm.federated import secagg
from cfm.federated import dino, pretrain, tiles
from cfm.federated.sites import FederatedError, feature_names
from cfm.finetune.fusion_data import split_list

STRATEGIES = ("fedavg", "fedprox", "fedadam")


def server_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The optax transformation applied to the pseudo-gradient (module docstring)."""
    s = config.server
    if s.strategy in ("fedavg", "fedprox"):
        return optax.sgd(1.0)
    if s.strategy == "fedadam":
        return optax.adam(s.lr, b1=s.b1, b2=s.b2, eps=s.tau)
    raise FederatedError(f"config.server.strategy={s.strategy!r}: use one of {STRATEGIES}")


def noise_std(config: ml_collections.ConfigDict, m: int) -> float:
    """Std of the Gaussian noise added to the mean of m clipped updates: sigma * C / m."""
    return compute_stdv(config.dp.noise_multiplier, config.dp.clip, m)


def accountant(config: ml_collections.ConfigDict, n_sites: int) -> RdpAccountant:
    """Flower's RDP accountant for client-level DP, every site taking part in every round."""
    return RdpAccountant(PrivacyConfig(
        target_delta=config.dp.delta, population_size=n_sites,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION))


def message_bytes(msg: Message) -> int:
    """Size of a message on the wire (its protobuf serialisation), bytes."""
    return message_to_proto(msg).ByteSize()


def _reason(reply: Message) -> str:
    return secagg.error_reason(reply.error.reason or "")


def _plain_round(grid: Grid, contents: dict[int, RecordDict], r: int, timeout: float,
                 flat: dict, equal: bool) -> secagg.RoundResult:
    """One round without secure aggregation: each site's new parameters in the clear; the
    mean update weighted by the sites' patients (`equal`: equal weights, under DP)."""
    msgs = [Message(c, dst_node_id=n, message_type="train", group_id=str(r))
            for n, c in contents.items()]
    sent = sum(message_bytes(m) for m in msgs)
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    reasons = [_reason(x) for x in replies if x.has_error()]
    ok = [x for x in replies if not x.has_error()]
    if not ok:
        return secagg.RoundResult(None, float("nan"), 0, sent, 0, reasons)
    received = sum(message_bytes(x) for x in ok)
    n_k = np.array([x.content["metrics"]["num-examples"] for x in ok], np.float64)
    p = np.full(len(ok), 1.0 / len(ok)) if equal else n_k / n_k.sum()
    news = [fmodel.flatten(fmodel.from_record(x.content["arrays"])) for x in ok]
    deltas = [{k: new[k] - flat[k] for k in flat} for new in news]
    mean = {k: sum(pi * d[k] for pi, d in zip(p, deltas)) for k in flat}
    loss = float(sum(pk * x.content["metrics"]["train_loss"] for pk, x in
                     zip(n_k / n_k.sum(), ok)))
    return secagg.RoundResult(mean, loss, len(ok), sent, received, reasons)


def _wait_for_sites(grid: Grid, n: int, timeout_s: float, log: Callable[[str], None]
                    ) -> list[int]:
    t0, said = time.time(), False
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.time() - t0 > timeout_s:
            raise FederatedError(f"only {len(nodes)} of {n} sites connected within "
                                 f"{timeout_s:.0f} s (config.server.wait_s)")
        if not said:
            log(f"cfm.federated server: waiting for {n} sites ({len(nodes)} connected)")
            said = True
        time.sleep(0.5)


def _truncate_history(path: str, last_round: int) -> None:
    """Drop the history lines of rounds after `last_round` (not in the checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as fh:
        keep = [ln for ln in fh if ln.strip() and json.loads(ln)["round"] <= last_round]
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        fh.writelines(keep)
    os.replace(path + ".tmp", path)


def _heldout(line: dict, tile: bool, what: str = "masked") -> str:
    """The log's words for a history line's held-out means (mgm, dino or tile probe)."""
    if tile:
        return (f"held-out accuracy {line.get('heldout_accuracy_mean')}, balanced "
                f"{line.get('heldout_balanced_accuracy_mean')}")
    return f"held-out {what} loss {line.get('heldout_loss_mean')}"


def pretraining(config: ml_collections.ConfigDict):
    """The continued-pretraining module of `model.kind` (cfm.federated.dino for dino,
    cfm.federated.pretrain for mgm), or None for fine-tuning and tile probes."""
    return dino if dino.is_dino_kind(config) else pretrain if pretrain.is_mgm_kind(config) else None


class _State:
    """Parameters, optimiser state, round and accountant compositions; orbax-saved."""

    def __init__(self, config: ml_collections.ConfigDict, n_features: int, n_clinical: int):
        pre = pretraining(config)
        self.params = (pre.init_params(config) if pre is not None else
                       tiles.init_params(config, n_features) if tiles.is_tiles(config) else
                       fmodel.init_params(config, n_features, n_clinical))
        self.tx = server_optimizer(config)
        self.opt = self.tx.init(self.params)
        self.round = 0
        self.dp_rounds = 0

    def tree(self) -> dict:
        return {"params": self.params, "opt": {str(i): np.asarray(x) for i, x in
                                               enumerate(jax.tree.leaves(self.opt))},
                "round": np.asarray(self.round, np.int64),
                "dp_rounds": np.asarray(self.dp_rounds, np.int64)}

    def load(self, tree: dict) -> None:
        self.params = jax.tree.map(np.asarray, tree["params"])
        treedef = jax.tree.structure(self.opt)
        self.opt = jax.tree.unflatten(treedef, [tree["opt"][str(i)] for i in
                                                range(len(tree["opt"]))])
        self.round, self.dp_rounds = int(tree["round"]), int(tree["dp_rounds"])


def run_server(grid: Grid, config: ml_collections.ConfigDict, workdir: str,
               log: Callable[[str], None] = print) -> dict:
    """Federated training to `server.rounds` (resuming in `workdir`); returns the summary
    (also `workdir/result.json`; one JSON line a round in `workdir/history.jsonl`)."""
    pre = pretraining(config)  # continued pretraining: masked-gene (mgm) or DINOv2 (dino)
    mgm = pre is not None
    what = "DINOv2" if pre is dino else "masked"  # the held-out loss the log names
    tile = tiles.is_tiles(config)  # a tile probe on tile embeddings (cfm.federated.tiles)
    keys = tiles.METRICS if tile else ("heldout_loss",)  # what `evaluate` replies carry
    names = [] if mgm or tile else feature_names(config)
    clinical = (split_list(config.data.clinical)
                if config.data.source not in ("csv", "tiles") else [])
    sites = split_list(config.data.sites)
    s, dp = config.server, config.dp
    min_sites = int(s.min_sites) or len(sites)
    if secagg.enabled(config):
        secagg.check_config(config, len(sites))
    dim = tiles.server_dim(config) if tile else len(names)
    state = _State(config, dim, len(clinical))
    os.makedirs(workdir, exist_ok=True)
    mngr = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2))
    if mngr.latest_step() is not None:
        state.load(mngr.restore(mngr.latest_step(),
                                args=ocp.args.StandardRestore(state.tree())))
        log(f"cfm.federated server: resumed after round {state.round}")
    acct = accountant(config, len(sites)) if dp.enabled else None
    if acct is not None and state.dp_rounds:
        acct.compose(GaussianPrivacyEvent(dp.noise_multiplier, len(sites), len(sites)),
                     count=state.dp_rounds)
    fingerprint = (pre.fingerprint(config) if mgm else
                   tiles.fingerprint(config, dim) if tile else
                   fmodel.model_fingerprint(config, names))
    rng = np.random.default_rng([int(config.seed), state.round])
    hist_path = os.path.join(workdir, "history.jsonl")
    _truncate_history(hist_path, state.round if state.round else -1)
    line: dict = {}
    if (mgm or tile) and state.round == 0:  # the held-out metrics before any round
        line = {"round": 0, **pretrain.evaluate_round(
            grid, _wait_for_sites(grid, min_sites, s.wait_s, log), state.params, fingerprint,
            0, s.round_timeout_s, keys)}
        with open(hist_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
        log(f"cfm.federated server: round 0: {_heldout(line, tile, what)}")
    t_start, tries = time.time(), 0
    while state.round < s.rounds:
        r = state.round + 1
        t0 = time.time()
        nodes = _wait_for_sites(grid, min_sites, s.wait_s, log)
        cfg = {"server-round": r, "model": fingerprint,
               "mu": float(s.mu) if s.strategy == "fedprox" else 0.0}
        if dp.enabled:
            cfg[KEY_CLIPPING_NORM] = float(dp.clip)
        arrays = fmodel.to_record(state.params)
        contents = {n: RecordDict({"arrays": arrays, "config": ConfigRecord(cfg)})
                    for n in nodes}
        flat = fmodel.flatten(state.params)
        if secagg.enabled(config):
            got = secagg.secure_round(grid, contents, config, r, sorted(flat))
        else:
            got = _plain_round(grid, contents, r, s.round_timeout_s, flat, dp.enabled)
        reasons = got.reasons
        for reason in reasons:
            if "model config differs" in reason or "has no data" in reason:
                raise FederatedError(reason)
            log(f"cfm.federated server: round {r}: a site failed: {reason}")
        if got.mean is None or got.sites < min_sites:
            tries += 1
            if tries > s.max_retries:
                raise FederatedError(f"round {r} failed {tries} times: {got.sites} of "
                                     f"{min_sites} sites replied ({'; '.join(reasons[:3])})")
            log(f"cfm.federated server: round {r}: {got.sites} of {min_sites} sites replied; "
                "sending the round again")
            continue
        tries = 0
        mean = got.mean
        if dp.enabled:
            std = noise_std(config, got.sites)
            mean = {k: v + rng.normal(0.0, std, v.shape).astype(v.dtype) for k, v in
                    mean.items()}
            acct.compose(GaussianPrivacyEvent(dp.noise_multiplier, got.sites, len(sites)))
            state.dp_rounds += 1
        grad = fmodel.unflatten({k: -v for k, v in mean.items()})
        upd, state.opt = state.tx.update(grad, state.opt, state.params)
        state.params = jax.tree.map(np.asarray, optax.apply_updates(state.params, upd))
        state.round = r
        loss = got.loss
        line = {"round": r, "sites": got.sites, "train_loss": round(loss, 6),
                "bytes_sent": got.sent, "bytes_received": got.received,
                "wall_s": round(time.time() - t0, 3)}
        if acct is not None:
            line["epsilon"] = round(acct.get_epsilon(dp.delta), 4)
        if mgm or tile:
            line.update(pretrain.evaluate_round(grid, nodes, state.params, fingerprint, r,
                                                s.round_timeout_s, keys))
        if r % max(1, s.checkpoint_every) == 0 or r == s.rounds:
            mngr.save(r, args=ocp.args.StandardSave(state.tree()))
            mngr.wait_until_finished()
        with open(hist_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
        if r == 1 or r % max(1, s.log_every) == 0 or r == s.rounds:
            log(f"cfm.federated server: round {r}/{s.rounds}: {got.sites} sites, loss "
                f"{loss:.4f}, {got.sent + got.received} bytes, {line['wall_s']} s"
                + (f", epsilon {line['epsilon']}" if "epsilon" in line else "")
                + (f", {_heldout(line, tile, what)}" if mgm or tile else ""))
    mngr.close()
    result = {"rounds": state.round, "strategy": s.strategy, "sites": sites,
              "wall_s": round(time.time() - t_start, 2)}
    if tile:
        result.update({f"final_{k}_mean": line.get(f"{k}_mean") for k in keys})
    if mgm:
        result["export"] = pre.write_export(config, state.params, workdir, state.round, log)
    if acct is not None:
        result["epsilon"] = acct.get_epsilon(dp.delta)
        result["delta"] = float(dp.delta)
    tmp = os.path.join(workdir, "result.json.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    os.replace(tmp, os.path.join(workdir, "result.json"))
    result["params"] = state.params
    return result
