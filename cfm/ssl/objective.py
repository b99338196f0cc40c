"""What a pretraining objective gives the trainer: one small record of functions.

An objective (`cfm.ssl.dinov2.OBJECTIVE`, `cfm.ssl.mgm.OBJECTIVE`) says which networks it
trains, how to initialise them, what else the train state carries, the loss of one global batch
and what happens after the optimiser update, what a batch looks like, where its batches come
from, how many FLOPs a step costs and which network a release exports. The trainer
(`cfm.train`), the shared set-up (`cfm.setup`), `cfm.aot`, `cfm.flops`' callers, export,
`cfm.load_pretrained` and the benchmarks use only these fields; `cfm.objectives.get` is the one
place that maps `config.objective` to an implementation.

Adding an objective: write a module with these functions, end it with `OBJECTIVE =
Objective(...)`, add one line to `cfm.objectives.OBJECTIVES`, and a config file that sets
`c.objective` (docs/ARCHITECTURE.md walks through it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np

Config = ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class Objective:
    """The functions the trainer calls; each takes the (prepared) config first."""

    name: str  # the value of `config.objective`
    unit: str  # what one batch row is, for the throughput line ("images", "samples")
    # Check every value (ConfigError naming the key) and return the config the run uses, with
    # anything that comes from the data filled in (it is stored in every checkpoint).
    prepare_config: Callable[[Config], Config]
    # The networks, a NamedTuple of Flax modules whose field `backbone` is the released one.
    build_models: Callable[[Config], Any]
    # Boxed (nn.LogicallyPartitioned) student parameters {"backbone": ..., heads ...}.
    init_params: Callable[[Config, Any, jax.Array], dict]
    # (teacher, centers) of the initial state from the unboxed parameters; ({}, {}) for none.
    init_extra: Callable[[Config, dict], tuple[Any, Any]]
    # The objective's own per-step schedule values (jnp functions of the step, e.g. the teacher
    # momentum), beside the optimiser's lr and weight decay (`cfm.schedules`); {} for none.
    step_schedules: Callable[[Config, Any], dict]
    # loss(config, models, params, state, batch, sched, rng) -> (loss, aux): differentiated
    # with respect to `params` only; `state` is the TrainState before the step, `sched` the
    # step's schedule values; aux["metrics"] is logged.
    loss: Callable[..., tuple[jax.Array, dict]]
    # after_update(config, state, aux, sched) -> (state, logged values): `state` already has
    # the new params and optimiser state; update the teacher, centering buffers etc. here.
    after_update: Callable[[Config, Any, dict, dict], tuple[Any, dict]]
    # Global batch: {name: (shape, dtype)} with batch_size rows; the data iterators make
    # process-local slices of exactly these.
    batch_spec: Callable[[Config], dict[str, tuple[tuple[int, ...], str]]]
    # batches(config, start_step, process_index, process_count) -> endless iterator of
    # process-local numpy batches from step `start_step` on (a function of config and step only,
    # so a resumed run sees the batches it would have seen).
    batches: Callable[[Config, int, int, int], Iterator[dict[str, np.ndarray]]]
    # Analytic model FLOPs of one step on the global batch: {"total", "backbone", ...}; backbone
    # is the trained backbone's forward + backward share (cfm.aot's remat correction).
    flops: Callable[[Config], dict[str, float]]
    # Transformer blocks of the backbone (layer-wise lr decay counts them).
    depth: Callable[[Config], int]
    # The TrainState field whose "backbone" a release exports: "teacher" (DINOv2 releases the
    # EMA teacher) or "params".
    export_tree: str
