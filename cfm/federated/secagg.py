"""Secure aggregation of the sites' updates with Flower's SecAgg+ (`secure_aggregation.enabled`).

SecAgg+ (Bell et al. 2020, ACM CCS, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead"; after SecAgg, Bonawitz et al. 2017, ACM CCS): each site quantises its update to
integers, adds a private mask and pairwise masks agreed with its neighbours (ECDH keys), and
sends only that; the pairwise masks cancel in the sum, and the private masks (and a dropped
site's pairwise masks) are removed with Shamir shares the sites hold of each other's secrets,
so the server learns the sum and nothing per site. All the protocol and crypto is Flower's:

- site: Flower's `secaggplus_mod` (flwr.client.mod), wrapped by `secure_aggregation_mod`,
  which turns the ClientApp's Message-API reply (new parameters, patients, loss) into the
  legacy FitRes the mod masks: the update w_k - w (not the parameters, so `clipping_range`
  bounds an update), its last element the local loss, and the weight n_k (1 under DP);
  the plain weight it leaves in the reply is set to 0 before the reply leaves.
- server: the four stages of Flower's `SecAggPlusWorkflow` (setup, share keys, collect masked
  vectors, unmask), called from our round loop (`secure_round`). The workflow's `__call__`
  needs a LegacyContext with a legacy Strategy; its stages read only a few members of them,
  which `_Legacy` provides, and the collect stage's message is our round's own (parameters,
  config), so the ClientApp gets the same message with and without SecAgg+.

Weights: the mod multiplies the update by n_k / `max_weight` and sends that weight with it,
both masked; the server gets sum_k n_k w_k-updates and sum_k n_k, i.e. the patient-weighted
mean update (FedAvg) and the weighted mean loss, never a site's n_k. Under DP every weight is 1
(DP-FedAvg's equal weights) and `max_weight` is 1. With DP (Flower's guidance): the site's
update is clipped to L2 norm `dp.clip` by Flower's `fixedclipping_mod` before it is masked,
the secure sum is unmasked, the server adds Gaussian noise to the mean.

Quantisation (Flower's): each coordinate of the weighted update is clipped to
[-clipping_range, clipping_range] and stochastically rounded to `quantization_range` levels
(unbiased); the sum is taken modulo 2**32, so sites x quantization_range must stay < 2**32.
"""

from __future__ import annotations

import dataclasses
import re
import types
from typing import TYPE_CHECKING, Iterable

import ml_collections
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters,
                         parameters_to_ndarrays)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.serde import message_to_proto
from flwr.compat.common import recorddict_compat as compat
from flwr.serverapp import Grid
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from cfm.federated.sites import FederatedError

if TYPE_CHECKING:
    from flwr.server.workflow import SecAggPlusWorkflow

MOD_RANGE = 2 ** 32          # Flower's modulus_range: masks and sums are taken modulo this
NUM_EXAMPLES = "fitres.num_examples"


def enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether the config turns SecAgg+ on (configs without the block: off)."""
    sa = config.get("secure_aggregation")
    return bool(sa is not None and sa.enabled)


def _count_or_share(x: float) -> int | float:
    """Flower's convention: a float <= 1 is a fraction, an int a count (here: a value > 1)."""
    return float(x) if x <= 1 else int(round(x))


def resolve(config: ml_collections.ConfigDict, m: int) -> tuple[int, int]:
    """(shares, threshold) per site for m sites, as SecAggPlusWorkflow.setup_stage sets them."""
    sa = config.secure_aggregation
    shares, t = _count_or_share(sa.num_shares), _count_or_share(sa.reconstruction_threshold)
    if isinstance(shares, float):
        k = round(shares * m)
        k += 1 if k < m and k % 2 == 0 else 0
        shares = m if k <= 2 else k
    elif shares < m and shares % 2 == 0:
        shares += 1  # Flower: an even count of shares becomes odd
    threshold = max(round(t * shares), 2) if isinstance(t, float) else t
    return shares, threshold


def check_config(config: ml_collections.ConfigDict, m: int) -> None:
    """FederatedError (one line naming the key) for settings SecAgg+ cannot run with m sites."""
    sa, key = config.secure_aggregation, "config.secure_aggregation"
    for name in ("num_shares", "reconstruction_threshold"):
        v = float(sa[name])
        if v <= 0 or (v > 1 and v != round(v)):
            raise FederatedError(f"{key}.{name}={v}: use a fraction in (0, 1] or a whole count")
    if m < 2:
        raise FederatedError(f"secure aggregation needs at least 2 sites, config.data.sites has "
                             f"{m}")
    if sa.clipping_range <= 0 or sa.max_weight <= 0:
        raise FederatedError(f"{key}.clipping_range={sa.clipping_range} and .max_weight="
                             f"{sa.max_weight} must be > 0")
    q = int(sa.quantization_range)
    if q != sa.quantization_range or q < 2 or m * q >= MOD_RANGE:
        raise FederatedError(f"{key}.quantization_range={sa.quantization_range}: use a whole "
                             f"number >= 2 with {m} sites x it < 2**32 (the sum's modulus)")
    shares, threshold = resolve(config, m)
    if shares > m:
        raise FederatedError(f"{key}.num_shares={sa.num_shares}: {shares} shares per site "
                             f"but only {m} sites")
    if threshold > shares:
        raise FederatedError(f"{key}.reconstruction_threshold={sa.reconstruction_threshold}: "
                             f"{threshold} shares needed but only {shares} made per site")
    try:
        workflow(config)
    except (TypeError, ValueError) as e:  # Flower's own checks
        raise FederatedError(f"{key}: {e}") from None


def workflow(config: ml_collections.ConfigDict, dp: bool = False) -> "SecAggPlusWorkflow":
    """Flower's SecAggPlusWorkflow with the config's settings (max_weight 1 under DP)."""
    from flwr.server.workflow import SecAggPlusWorkflow  # server only: not on a site
    sa = config.secure_aggregation
    return SecAggPlusWorkflow(
        _count_or_share(sa.num_shares), _count_or_share(sa.reconstruction_threshold),
        max_weight=1.0 if dp else float(sa.max_weight), clipping_range=float(sa.clipping_range),
        quantization_range=int(sa.quantization_range), modulus_range=MOD_RANGE,
        timeout=float(config.server.round_timeout_s))


# ----------------------------------------------------------------------------- site side

def _as_fitres(call_next: ClientAppCallable) -> ClientAppCallable:
    """The ClientApp (and the mods after this one) as secaggplus_mod expects to call it."""

    def inner(msg: Message, ctxt: Context) -> Message:
        del msg.content.config_records[RECORD_KEY_CONFIGS]  # the next mods see our message
        sent = msg.content["arrays"]
        reply = call_next(msg, ctxt)
        if reply.has_error():
            raise FederatedError(reply.error.reason)
        new, metrics = reply.content["arrays"], reply.content["metrics"]
        if list(new.keys()) != list(sent.keys()):
            raise FederatedError("the local update's arrays differ from the server's")
        update = [b - a for a, b in zip(sent.to_numpy_ndarrays(), new.to_numpy_ndarrays())]
        update.append(np.array([metrics["train_loss"]], np.float32))
        weight = 1 if KEY_CLIPPING_NORM in msg.content["config"] else metrics["num-examples"]
        res = FitRes(Status(Code.OK, "Success"), ndarrays_to_parameters(update), int(weight),
                     {})
        return Message(compat.fitres_to_recorddict(res, False), reply_to=msg)

    return inner


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable
                           ) -> Message:
    """Flower's `secaggplus_mod` for the server's SecAgg+ messages; other messages pass."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)
    out = secaggplus_mod(msg, ctxt, _as_fitres(call_next))
    if NUM_EXAMPLES in out.content.metric_records:  # the weight travels masked only
        out.content.metric_records[NUM_EXAMPLES] = MetricRecord({"num_examples": 0})
    return out


# ----------------------------------------------------------------------------- server side

@dataclasses.dataclass
class RoundResult:
    """One round's aggregate: the mean update {name: array}, mean loss, sites in it, bytes
    sent and received (serialised messages), the failed sites' reasons."""

    mean: dict | None
    loss: float
    sites: int
    sent: int
    received: int
    reasons: list[str]


class _Counted:
    """The grid, counting the serialised bytes of every message both ways."""

    def __init__(self, grid: Grid):
        self.grid, self.sent, self.received = grid, 0, 0

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        msgs = list(messages)
        self.sent += sum(message_to_proto(m).ByteSize() for m in msgs)
        replies = list(self.grid.send_and_receive(msgs, timeout=timeout))
        self.received += sum(message_to_proto(x).ByteSize() for x in replies)
        return replies


class _Legacy:
    """What SecAggPlusWorkflow's stages read of a LegacyContext (state, strategy,
    client_manager, history): the round number, every node sampled, and `aggregate_fit`,
    which keeps the unmasked aggregate instead of stepping a legacy Strategy."""

    def __init__(self, nodes: list[int], rnd: int):
        self.state = RecordDict({"config": ConfigRecord({"current_round": rnd}),
                                 "parameters": ArrayRecord()})
        self.strategy = self.client_manager = self.history = self
        self.nodes, self.aggregate, self.sites = nodes, None, 0

    def num_available(self) -> int:
        return len(self.nodes)

    def configure_fit(self, server_round, parameters, client_manager) -> list:
        return [(types.SimpleNamespace(node_id=n), FitIns(Parameters([], ""), {}))
                for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures) -> tuple[None, dict]:
        self.sites = len(results)
        if results:
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}


def error_reason(reason: str) -> str:
    """The error's own text of a site's error reply ("<class ...>:<'text'>" -> text)."""
    m = re.search(r":<'(.*)'>$", reason, re.S)
    return (m.group(1) if m else reason).strip()


def _why(failure: Exception) -> str:
    err = failure.args[0] if failure.args else failure
    return error_reason(err.reason or "") if isinstance(err, Error) else str(err)


def secure_round(grid: Grid, contents: dict[int, RecordDict], config: ml_collections.ConfigDict,
                 rnd: int, keys: list[str]) -> RoundResult:
    """One SecAgg+ round: Flower's four stages; `contents` {node: the round's train message
    content}; `keys` the parameter names in the sites' order (sorted). The mean is None when
    the protocol halted (too few sites answered a stage)."""
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
    wf = workflow(config, dp=bool(config.dp.enabled))
    g, ctx, state = _Counted(grid), _Legacy(sorted(contents), rnd), WorkflowState()
    for stage in (wf.setup_stage, wf.share_keys_stage, wf.collect_masked_vectors_stage,
                  wf.unmask_stage):
        ok = stage(g, ctx, state)
        if stage == wf.setup_stage:
            state.nid_to_fitins = {n: contents[n] for n in state.nid_to_fitins}
        if not ok:
            break
    reasons = [_why(f) for f in state.failures]
    if ctx.aggregate is None:
        return RoundResult(None, float("nan"), 0, g.sent, g.received, reasons)
    if len(ctx.aggregate) != len(keys) + 1:
        raise FederatedError(f"secure aggregate of {len(ctx.aggregate)} arrays, expected "
                             f"{len(keys) + 1}")
    mean = {k: np.asarray(v, np.float32) for k, v in zip(keys, ctx.aggregate)}
    return RoundResult(mean, float(ctx.aggregate[-1][0]), ctx.sites, g.sent, g.received,
                       reasons)
