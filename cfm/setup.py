"""One set-up path from a config to a runnable step: objective, mesh, models, the train state's
shapes and shardings, and the jitted step. `cfm.train`, `cfm.aot`, the benchmarks and the tests
all start here, so what they compile is what the trainer runs.

    s = setup.setup(config)                 # checks the config; allocates nothing
    state = setup.create_state(s)           # the initial state, born sharded
    state, metrics = s.step(state, setup.global_batch(s, local_batch))

The step is a pure function of (state, batch), jitted with explicit in/out shardings on the mesh
and the state's buffers donated. Parameter shardings come from each parameter's logical axis
names and the rules in `config.sharding` (`cfm.parallel.sharding`); batches are split by the
same rules' `act_batch` entry.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from cfm import objectives, optim, schedules
from cfm.config_check import ConfigError
from cfm.parallel import mesh as mesh_lib
from cfm.parallel import sharding
from cfm.ssl.objective import Objective


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # completed optimiser steps
    params: Any  # the trained networks: {backbone, heads...}
    teacher: Any  # EMA of the student, same tree (DINOv2); {} for objectives without one
    opt_state: Any
    centers: Any  # DINOv2's softmax-centering buffers {"dino": [K], "ibot": [K]}; {} otherwise
    rng: jax.Array  # base key; step keys are fold_in(rng, step)


class Setup(NamedTuple):
    config: ml_collections.ConfigDict  # as the objective prepared it (checkpointed as is)
    objective: Objective
    mesh: Mesh
    rules: sharding.Rules
    models: Any  # the objective's NamedTuple of Flax modules
    tx: optax.GradientTransformation
    abstract_state: TrainState  # jax.ShapeDtypeStruct leaves
    shardings: TrainState  # NamedSharding leaves
    init: Callable[[jax.Array], TrainState]  # rng -> initial state (jit it with `shardings`)
    batch_spec: dict[str, tuple[tuple[int, ...], str]]  # global batch {name: (shape, dtype)}
    step: Callable  # jitted (state, global batch) -> (state, metrics), state donated


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
    """`config.mesh` on `devices` (default: all); ConfigError when it does not fit."""
    try:
        return mesh_lib.make_mesh(config.mesh, devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None


def check_batch(config: ml_collections.ConfigDict, mesh: Mesh, rules: sharding.Rules) -> None:
    """ConfigError unless the global batch splits evenly over the mesh axes of `act_batch`."""
    n = sharding.batch_shards(mesh, rules)
    if config.batch_size % n:
        axes = "*".join(sharding.batch_axes(rules))
        raise ConfigError(f"config.batch_size={config.batch_size}: must divide by {axes}={n} "
                          f"(mesh {dict(mesh.shape)})")


def state_spec(config: ml_collections.ConfigDict, objective: Objective, models: Any, mesh: Mesh,
               rules: sharding.Rules
               ) -> tuple[TrainState, TrainState, optax.GradientTransformation, Callable]:
    """The initial state's shapes, its shardings, the optimiser and the init function, without
    allocating anything (cfm.aot compiles with these for devices it cannot run on)."""
    rng = jax.random.key(config.seed)
    boxed = jax.eval_shape(functools.partial(objective.init_params, config, models), rng)
    param_sh = sharding.param_shardings(boxed, mesh, rules, config.sharding.min_shard_size,
                                        config.sharding.zero3_axis)
    tx = optim.adamw(config, nn.meta.unbox(boxed), objective.depth(config))
    repl = mesh_lib.replicated(mesh)

    def init(rng: jax.Array) -> TrainState:
        params = nn.meta.unbox(objective.init_params(config, models, rng))
        teacher, centers = objective.init_extra(config, params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, teacher=teacher,
                          opt_state=tx.init(params), centers=centers,
                          rng=jax.random.fold_in(rng, 1))

    abstract = jax.eval_shape(init, rng)
    opt_sh = jax.tree.map(lambda _: repl, abstract.opt_state)
    opt_sh = opt_sh._replace(adam=opt_sh.adam._replace(mu=param_sh, nu=param_sh))
    shardings = TrainState(step=repl, params=param_sh,
                           teacher=param_sh if abstract.teacher else {}, opt_state=opt_sh,
                           centers=jax.tree.map(lambda _: repl, abstract.centers), rng=repl)
    return abstract, shardings, tx, init


def make_step(config: ml_collections.ConfigDict, objective: Objective, models: Any,
              tx: optax.GradientTransformation) -> Callable:
    """The pure step (state, batch) -> (state, metrics): the objective's loss and gradient,
    the optimiser update, then the objective's own update (teacher EMA, buffers)."""

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        sched = dict(schedules.optimizer_schedules(config, state.step),
                     **objective.step_schedules(config, state.step))
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            return objective.loss(config, models, params, state, batch, sched, rng)

        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        state, logged = objective.after_update(config, state, aux, sched)
        out = dict(aux["metrics"], grad_norm=optax.tree.norm(grads), lr=sched["lr"],
                   wd=sched["wd"], **logged)
        return state, out

    return train_step


def setup(config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Setup:
    """Everything a run needs before its first batch; ConfigError for a config that cannot
    work (checked before anything is built)."""
    objective = objectives.get(config)
    config = objective.prepare_config(config)
    mesh = make_mesh(config, devices)
    rules = sharding.rules_from_config(config)
    check_batch(config, mesh, rules)
    models = objective.build_models(config)
    abstract, shardings, tx, init = state_spec(config, objective, models, mesh, rules)
    spec = objective.batch_spec(config)
    step_fn = make_step(config, objective, models, tx)

    def step_with_rules(state, batch):  # activation constraints resolve through the rules
        with nn.logical_axis_rules(rules):
            return step_fn(state, batch)

    batch_sh = {k: sharding.batch_sharding(mesh, len(shape), rules)
                for k, (shape, _) in spec.items()}
    step = jax.jit(step_with_rules, in_shardings=(shardings, batch_sh),
                   out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))
    return Setup(config, objective, mesh, rules, models, tx, abstract, shardings, init, spec,
                 step)


def create_state(s: Setup) -> TrainState:
    """The initial state, created directly in its sharded layout (init jitted with its
    shardings)."""
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
        return jax.jit(s.init, out_shardings=s.shardings)(jax.random.key(s.config.seed))


def global_batch(s: Setup, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Process-local numpy batches -> global arrays split as the rules' `act_batch` says."""
    return {k: jax.make_array_from_process_local_data(
        sharding.batch_sharding(s.mesh, v.ndim, s.rules), v) for k, v in local.items()}


def abstract_batch(s: Setup) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch as ShapeDtypeStructs with their shardings (AOT compilation)."""
    return {k: jax.ShapeDtypeStruct(shape, dtype,
                                    sharding=sharding.batch_sharding(s.mesh, len(shape), s.rules))
            for k, (shape, dtype) in s.batch_spec.items()}


def abstract_state(s: Setup) -> TrainState:
    """The state as ShapeDtypeStructs with their shardings (AOT compilation)."""
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        s.abstract_state, s.shardings)
