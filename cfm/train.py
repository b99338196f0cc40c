"""The cfm trainer: DINOv2-style pretraining of a ViT on tiles (`config.objective="dinov2"`) or
masked gene modelling of an omics transformer (`"mgm"`), with one loop, one checkpoint format.

    python -m cfm.train --config configs/dino_vit.py:demo --workdir /tmp/cfm_demo/run \
        [--config.key=value ...]
    python -m cfm.train --config configs/omics_mgm.py:demo --workdir /tmp/cfm_omics_demo

Reads top to bottom: config -> mesh -> models -> sharded state (or the latest checkpoint) ->
data -> jitted step -> loop (log, checkpoint) -> loss curve. The step is a pure function of
(state, batch), jitted with explicit shardings on the mesh and donated state buffers.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh

from cfm import checkpoint, config_check, init_from, metrics, optim, preemption, schedules
from cfm.models import heads, omics, vit
from cfm.parallel import mesh as mesh_lib
from cfm.parallel import sharding
from cfm.ssl import dinov2, mgm


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # completed optimiser steps
    params: Any  # student {backbone, dino_head[, ibot_head]} | {backbone, mgm_head}
    teacher: Any  # EMA of the student, same tree (dinov2); {} (mgm)
    opt_state: Any
    centers: Any  # {"dino": [K], "ibot": [K]} softmax-centering buffers (dinov2); {} (mgm)
    rng: jax.Array  # base key; step keys are fold_in(rng, step)


class Models(NamedTuple):
    backbone: nn.Module
    dino_head: nn.Module
    ibot_head: nn.Module | None  # None when iBOT shares the DINO head


class OmicsModels(NamedTuple):
    backbone: nn.Module  # cfm.models.omics.OmicsTransformer
    mgm_head: nn.Module


def is_mgm(config: ml_collections.ConfigDict) -> bool:
    """True for masked gene modelling (configs/omics_mgm.py), False for DINOv2."""
    return config.get("objective", "dinov2") == "mgm"


def depth(config: ml_collections.ConfigDict) -> int:
    """Transformer blocks of the configured backbone (layer-wise lr decay counts them)."""
    return (omics.spec if is_mgm(config) else vit.spec)(config.model.variant).depth


# ================================================================================ models ======
def build_models(config: ml_collections.ConfigDict) -> Models | OmicsModels:
    m = config.model
    dtype = jnp.dtype(m.dtype)
    if is_mgm(config):
        backbone = omics.OmicsTransformer(
            variant=m.variant, vocab_size=m.vocab_size, n_bins=m.n_bins,
            value_encoding=m.value_encoding, layerscale_init=m.layerscale_init,
            drop_path_rate=m.drop_path_rate, dtype=dtype, remat=m.remat, attention=m.attention,
            gene_values=m.get("gene_values", False), attend_tokens=m.get("attend_tokens", 0))
        head = omics.MGMHead(m.n_bins, config.mgm.expression_loss, dtype, m.vocab_size,
                             config.mgm.get("sample_readout", False))
        return OmicsModels(backbone, head)
    backbone = vit.ViT(variant=m.variant, img_size=m.img_size, num_registers=m.num_registers,
                       layerscale_init=m.layerscale_init, drop_path_rate=m.drop_path_rate,
                       ffn=m.ffn, qkv_bias=m.qkv_bias, dtype=dtype, remat=m.remat,
                       scan_layers=m.scan_layers, attention=m.attention)
    h = config.head
    make_head = lambda: heads.DINOHead(h.n_prototypes, h.hidden_dim, h.bottleneck_dim,  # noqa
                                       h.n_layers, dtype)
    return Models(backbone, make_head(), make_head() if config.ibot.separate_head else None)


def _init_params(config, models: Models, rng: jax.Array) -> dict:
    """Boxed (logically partitioned) student parameters."""
    if is_mgm(config):
        r1, r2 = jax.random.split(rng)
        t = jnp.zeros((1, 4), jnp.int32)
        backbone = models.backbone.init(r1, t, t, t.astype(jnp.float32), t,
                                        value_mask=t.astype(bool))["params"]
        width = omics.spec(config.model.variant).width
        return {"backbone": backbone,
                "mgm_head": models.mgm_head.init(r2, jnp.zeros((1, 4, width)),
                                                 jnp.zeros((1, width)), t)["params"]}
    s = vit.spec(config.model.variant)
    g = config.crops.global_size
    n = (g // s.patch) ** 2
    r1, r2, r3 = jax.random.split(rng, 3)
    params = {"backbone": models.backbone.init(
        r1, jnp.zeros((1, g, g, 3)), masks=jnp.zeros((1, n), bool))["params"]}
    feat = jnp.zeros((1, s.width))
    params["dino_head"] = models.dino_head.init(r2, feat)["params"]
    if models.ibot_head is not None:
        params["ibot_head"] = models.ibot_head.init(r3, feat)["params"]
    return params


# ================================================================================ state =======
def state_spec(config: ml_collections.ConfigDict, models: Models, mesh: Mesh
               ) -> tuple[TrainState, TrainState, optax.GradientTransformation, Any]:
    """The initial state's shapes (jax.ShapeDtypeStruct), its shardings, the optimiser and the
    init function, without allocating anything (cfm.aot compiles with these for devices it
    cannot run on). Parameter shardings come from each parameter's logical axis names and the
    rules in `cfm.parallel.mesh`."""
    rng = jax.random.key(config.seed)
    boxed = jax.eval_shape(functools.partial(_init_params, config, models), rng)
    rules = sharding.rules_from_config(config)
    param_sh = sharding.param_shardings(boxed, mesh, rules, config.sharding.min_shard_size)
    tx = optim.dinov2_adamw(config, nn.meta.unbox(boxed), depth(config))
    repl = mesh_lib.replicated(mesh)

    def init(rng):
        params = nn.meta.unbox(_init_params(config, models, rng))
        if is_mgm(config):  # no teacher, no centers
            teacher, centers = {}, {}
        else:
            k = config.head.n_prototypes
            teacher = jax.tree.map(jnp.copy, params)
            centers = {"dino": jnp.zeros((k,)), "ibot": jnp.zeros((k,))}
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


def create_state(config: ml_collections.ConfigDict, models: Models, mesh: Mesh
                 ) -> tuple[TrainState, TrainState, optax.GradientTransformation]:
    """The initial state, created directly in its sharded layout (`state_spec`'s init jitted
    with its shardings), its shardings, and the optimiser."""
    _, shardings, tx, init = state_spec(config, models, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_from_config(config)):
        state = jax.jit(init, out_shardings=shardings)(jax.random.key(config.seed))
    return state, shardings, tx


def check_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """ConfigError unless the global batch splits evenly over data x fsdp (cfm.train, cfm.aot)."""
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % n_batch_shards:
        raise config_check.ConfigError(
            f"config.batch_size={config.batch_size}: must divide by data*fsdp={n_batch_shards} "
            f"(mesh {dict(mesh.shape)})")


# ================================================================================ step ========
def make_train_step(config: ml_collections.ConfigDict, models: Models | OmicsModels,
                    tx: optax.GradientTransformation, buffer_size: int):
    """The pure step function (state, batch) -> (state, metrics); jit it with shardings."""
    if is_mgm(config):
        return _make_mgm_step(config, models, tx)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        sched = schedules.all_schedules(config, state.step)
        rng = jax.random.fold_in(state.rng, state.step)
        loss_fn = functools.partial(dinov2.objective, config, models.backbone, models.dino_head,
                                    models.ibot_head, buffer_size)
        (_, aux), grads = jax.value_and_grad(loss_fn, argnums=0, has_aux=True)(
            state.params, state.teacher, state.centers, batch, sched, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        m = sched["momentum"]
        teacher = jax.tree.map(lambda t, s: m * t + (1.0 - m) * s, state.teacher, params)
        out = dict(aux["metrics"], grad_norm=optax.tree.norm(grads), lr=sched["lr"],
                   wd=sched["wd"], momentum=m, teacher_temp=sched["teacher_temp"])
        return state.replace(step=state.step + 1, params=params, teacher=teacher,
                             opt_state=opt_state, centers=aux["centers"]), out

    return train_step


def _make_mgm_step(config, models: OmicsModels, tx: optax.GradientTransformation):
    """Masked gene modelling: one network, no teacher (cfm.ssl.mgm)."""

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        sched = schedules.all_schedules(config, state.step)
        rng = jax.random.fold_in(state.rng, state.step)
        loss_fn = functools.partial(mgm.objective, config, models.backbone, models.mgm_head)
        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        out = dict(aux["metrics"], grad_norm=optax.tree.norm(grads), lr=sched["lr"],
                   wd=sched["wd"])
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out

    return train_step


def jit_train_step(config, models: Models, tx, buffer_size: int, mesh: Mesh,
                   shardings: TrainState, batch_ndims: dict):
    step_fn = make_train_step(config, models, tx, buffer_size)
    rules = sharding.rules_from_config(config)

    def step_with_rules(state, batch):  # activation constraints resolve through the rules
        with nn.logical_axis_rules(rules):
            return step_fn(state, batch)

    batch_sh = {k: mesh_lib.batch_sharding(mesh, nd) for k, nd in batch_ndims.items()}
    return jax.jit(step_with_rules, in_shardings=(shardings, batch_sh),
                   out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Assemble process-local numpy batches into global arrays split over (data, fsdp)."""
    return {k: jax.make_array_from_process_local_data(mesh_lib.batch_sharding(mesh, v.ndim), v)
            for k, v in local.items()}


# ================================================================================ train =======
def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run (or resume) pretraining in `workdir`; returns the last logged metrics."""
    from cfm.data import omics_pipeline, pipeline  # data apart from models: wired in here

    # ---- config and mesh ------------------------------------------------------------------
    if is_mgm(config):
        config = config_check.validate_mgm(config)  # also fills vocab_size/n_bins from the data
    else:
        config_check.validate_dino(config)
    try:
        mesh = mesh_lib.make_mesh(config.mesh)
    except ValueError as e:
        raise config_check.ConfigError(f"config.mesh: {e}") from None
    check_batch(config, mesh)
    total_steps = config.total_steps if config.total_steps > 0 else schedules.schedule_steps(
        config)
    is_main = jax.process_index() == 0
    if is_main:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # local or gs://
        print(f"cfm.train: {config.model.variant}, batch {config.batch_size}, {total_steps} steps,"
              f" mesh {dict(mesh.shape)}"
              + (f" over {config.mesh.slices} slices" if config.mesh.slices > 1 else "")
              + f" on {jax.device_count()} {jax.devices()[0].platform} device(s)", flush=True)

    # ---- models and state (fresh, or the latest checkpoint in workdir) ------------------------
    models = build_models(config)
    state, shardings, tx = create_state(config, models, mesh)
    ckpt = checkpoint.manager(workdir, config)
    resume_step = config.resume_step if config.resume_step >= 0 else None
    try:
        restored = checkpoint.restore(ckpt, state, resume_step)
    except checkpoint.CheckpointError as e:
        ckpt.close()
        raise config_check.ConfigError(str(e)) from None
    start = 0
    if restored is not None:
        state, start = restored
        if is_main:
            print(f"cfm.train: resumed from step {start} in {ckpt.directory}", flush=True)
            if config.init_from:
                print(f"cfm.train: config.init_from={config.init_from} ignored: resuming this "
                      "workdir's own checkpoint", flush=True)
    else:  # a new run: weights from config.init_from, if set (cfm/init_from.py)
        try:
            state = init_from.maybe_init_from(state, config, workdir, is_main)
        except init_from.InitFromError:
            ckpt.close()
            raise
    n_params = sum(x.size for x in jax.tree.leaves(state.params["backbone"]))
    if is_main:
        print(f"cfm.train: backbone {n_params / 1e6:.2f} M parameters", flush=True)
    if start >= total_steps:
        ckpt.close()
        if is_main:
            print(f"cfm.train: nothing to do, the checkpoint is at step {start} >= total_steps "
                  f"{total_steps} (raise --config.total_steps to train on)", flush=True)
        return {}

    # ---- data ------------------------------------------------------------------------------
    if is_mgm(config):
        buffer_size = 0
        batches = omics_pipeline.make_train_iterator(
            config, process_index=jax.process_index(), process_count=jax.process_count(),
            start_step=start)
    else:
        patch = vit.spec(config.model.variant).patch
        buffer_size = pipeline.mask_buffer_size_for(config, patch)
        batches = pipeline.make_train_iterator(
            config, patch_size=patch, process_index=jax.process_index(),
            process_count=jax.process_count(), start_step=start)

    # ---- step ------------------------------------------------------------------------------
    first = next(batches)
    step_fn = jit_train_step(config, models, tx, buffer_size, mesh, shardings,
                             {k: v.ndim for k, v in first.items()})

    # ---- loop ------------------------------------------------------------------------------
    writer = metrics.MetricWriter(workdir, total_steps, config.batch_size, enabled=is_main,
                                  unit="samples" if is_mgm(config) else "images")
    watcher = preemption.PreemptionWatcher()  # SIGTERM / preemption notice: save and exit 0
    last: dict = {}
    local = first
    with jax.set_mesh(mesh), watcher:  # the watcher restores the old handler on exit
        for step in range(start, total_steps):
            state, out = step_fn(state, global_batch(local, mesh))
            done = step + 1
            if step == start:
                jax.block_until_ready(out)
                writer.start_clock(done)  # throughput excludes compilation
            if done % config.log_every == 0 or done == total_steps:
                last = writer.write(done, jax.device_get(out))
                if not np.isfinite(last["loss"]):
                    raise FloatingPointError(f"loss is {last['loss']} at step {done}")
            stop = watcher.should_stop(done, ckpt)
            if done % config.checkpoint_every == 0 or done == total_steps or stop:
                checkpoint.save(ckpt, done, state, config, force=done == total_steps or stop)
            if stop:
                ckpt.wait_until_finished()
                if is_main:
                    print(f"cfm.train: stopped by {watcher.signal_name} after step {done}; "
                          f"checkpoint {done} saved, run the same command to resume", flush=True)
                break
            if done < total_steps:
                local = next(batches)
    ckpt.wait_until_finished()
    ckpt.close()
    writer.close()
    if watcher.signal_name is not None:
        return last
    if is_main:
        print(f"cfm.train: done at step {total_steps}; workdir {workdir}", flush=True)
    return last


def main(argv: list[str] | None = None) -> int:
    from absl import flags
    from ml_collections import config_flags

    flags_def = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "configs/<file>.py:<arg>",
                                    flag_values=flags_def, lock_config=True)
    flags.DEFINE_string("workdir", None, "where checkpoints, events and plots go",
                        flag_values=flags_def)
    argv = sys.argv if argv is None else argv
    try:
        flags_def(argv)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        # ml_collections raises KeyError (with a did-you-mean) for a misspelt --config.key and
        # TypeError/ValueError for a value of the wrong type; absl raises flags.Error.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"cfm.train: bad command line: {msg}", file=sys.stderr)
        return 2
    if flags_def.config is None or flags_def.workdir is None:
        print("cfm.train: both --config configs/<file>.py:<arg> and --workdir DIR are required",
              file=sys.stderr)
        return 2
    from cfm.parallel import distributed  # before anything starts a JAX backend
    try:
        distributed.initialize()  # CFM_*, SLURM or TPU-pod processes join; one process: no-op
    except distributed.DistributedConfigError as e:
        print(f"cfm.train: bad multi-process setup: {e}", file=sys.stderr)
        return 2
    try:
        train(flags_def.config, flags_def.workdir)
    except config_check.ConfigError as e:
        print(f"cfm.train: bad config: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
