"""The DINOv2 objective (Oquab et al. 2023): DINO on CLS tokens + iBOT on masked patches + KoLeo
(or KDE), with an EMA teacher whose outputs are centred by softmax-centering or Sinkhorn-Knopp.

This module wires backbone and heads (Flax modules) to the losses in `cfm.ssl.losses` and
`cfm.ssl.centering`, and ends with `OBJECTIVE`, what the trainer needs of DINOv2
(`cfm.ssl.objective`). It knows nothing of files or optimisers; of the mesh it reads only how
many ways the active sharding rules split the batch (`act_batch`), to pad the masked-token
buffer to whole rows per device. Every statistic (centering, Sinkhorn-Knopp, KoLeo neighbours,
masked-token buffer) is taken over the global batch, so a sharded step computes what a
1-device step computes.

Crop layout: batches are image-major: global crops [B, 2, G, G, 3] (uint8), local crops
[B, n_local, L, L, 3], masks [B, 2, N]. They are flattened to [B*2, ...] (row 2i+c is crop c of
image i), which keeps every image's crops on the device that loaded it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cfm import config_check, flops, schedules
from cfm.data import pipeline
from cfm.models import backbone as backbone_lib
from cfm.models import heads, vit
from cfm.parallel import sharding
from cfm.ssl import centering, losses
from cfm.ssl.objective import Objective


def normalise(images: jax.Array, mean, std) -> jax.Array:
    """uint8 RGB -> float32, (x/255 - mean) / std per channel."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _mesh_sizes() -> dict[str, int]:
    """Sizes of the current mesh's axes ({} outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return {} if mesh is None or mesh.empty else dict(mesh.shape)


def _batch_shards() -> int:
    """How many ways the active rules' `act_batch` axes split the batch on the current mesh;
    1 outside a mesh or without rules."""
    sizes = _mesh_sizes()
    axes = sharding.batch_axes(nn.get_logical_axis_rules())
    return math.prod(sizes.get(a, 1) for a in axes)


def _buffer_rows(x: jax.Array) -> jax.Array:
    """Split the masked-token buffer's rows over the batch axes, like the CLS rows: left alone,
    XLA keeps the whole buffer (and its [buffer, prototypes] logits) on every device, which is
    what keeps ViT-g/14 at batch 4096 off a 16 GiB v5e chip (benchmarks/scaling.py).

    Not applied on meshes where data, fsdp and tensor are all > 1: there the constraint gave
    gradients off by up to 9% (jax 0.10.2, CPU, mesh 2x2x2; a partitioner bug like the one in
    `_heads`; tests/test_train.py compares that mesh with 1 device). The buffer's length must
    divide evenly, which `objective` ensures by padding."""
    sizes = _mesh_sizes()
    if all(sizes.get(a, 1) > 1 for a in ("data", "fsdp", "tensor")):
        return x
    return nn.with_logical_constraint(x, ("act_batch", "act_embed"))


def _heads(params: dict, dino_head: nn.Module, ibot_head: nn.Module | None, cls: jax.Array,
           patches: jax.Array) -> tuple[jax.Array, jax.Array]:
    """DINO logits for CLS rows and iBOT logits for patch rows.

    When iBOT shares the DINO head (DINOv2's default) the head is applied to the two sets of
    rows separately rather than to their concatenation, as DINOv2 does: the head acts row by row,
    so the result is the same, and concatenating a batch-sharded [2B, D] array with the
    masked-token buffer made XLA's SPMD partitioner return NaN gradients on meshes with both
    `data` and `tensor` axes (jax 0.10.2, CPU; tests/test_train.py covers that mesh).
    """
    head = ibot_head if ibot_head is not None else dino_head
    name = "ibot_head" if ibot_head is not None else "dino_head"
    return (dino_head.apply({"params": params["dino_head"]}, cls),
            head.apply({"params": params[name]}, patches))


def objective(config: ml_collections.ConfigDict, backbone: nn.Module, dino_head: nn.Module,
              ibot_head: nn.Module | None, buffer_size: int, params: dict, teacher: dict,
              centers: dict, batch: dict, sched: dict, rng: jax.Array
              ) -> tuple[jax.Array, dict]:
    """Total loss and (metrics, new centers) for one global batch.

    buffer_size: static upper bound on masked patches in the batch (DINOv2's `upperbound`);
    sched: the step's schedule values (`cfm.schedules.optimizer_schedules` and `step_schedules`).
    """
    aug = config.augment
    gl = batch["global_crops"]
    b, n_global = gl.shape[:2]
    n_local = batch["local_crops"].shape[1]
    g = normalise(gl.reshape((b * n_global,) + gl.shape[2:]), aug.mean, aug.std)
    masks = batch["masks"].reshape(b * n_global, -1)
    n_patch = masks.shape[1]
    temp = sched["teacher_temp"]

    # ---- masked-patch buffer: flat indices of masked patches, padded to a static size -------
    flat = masks.reshape(-1)
    n_masked = jnp.sum(flat)
    shards = _batch_shards()  # pad to whole rows per device; padding rows have weight 0
    buffer_size = -(-buffer_size // shards) * shards
    (idx,) = jnp.nonzero(flat, size=buffer_size, fill_value=0)
    valid = jnp.arange(buffer_size) < n_masked
    per_image = jnp.maximum(jnp.sum(masks, axis=1), 1)
    weights = jnp.where(valid, 1.0 / per_image[idx // n_patch], 0.0)

    # ---- teacher: global crops only, no masks, no gradient ----------------------------------
    teacher = jax.lax.stop_gradient(teacher)
    t_out = backbone.apply({"params": teacher["backbone"]}, g, train=False)
    t_patch = _buffer_rows(t_out["patch"].reshape(-1, t_out["patch"].shape[-1])[idx])
    t_cls_logits, t_ibot_logits = _heads(teacher, dino_head, ibot_head, t_out["cls"], t_patch)
    new_centers = dict(centers)
    if config.ssl.centering == "softmax":
        t_cls = centering.softmax_center(t_cls_logits, centers["dino"], temp)
        t_ibot = centering.softmax_center(t_ibot_logits, centers["ibot"], temp)
        m = config.ssl.center_momentum
        new_centers["dino"] = centering.update_center(centers["dino"], t_cls_logits, m)
        new_centers["ibot"] = centering.update_center(centers["ibot"], t_ibot_logits, m,
                                                      weights=valid.astype(jnp.float32))
    else:
        it = config.ssl.sinkhorn_iterations
        t_cls = centering.sinkhorn_knopp(t_cls_logits, temp, it)
        t_ibot = centering.sinkhorn_knopp(t_ibot_logits, temp, it, valid=valid)
    t_cls = jax.lax.stop_gradient(t_cls)
    t_ibot = jax.lax.stop_gradient(t_ibot)

    # ---- student: masked global crops and local crops ---------------------------------------
    r_global, r_local = jax.random.split(rng)
    s_g = backbone.apply({"params": params["backbone"]}, g, masks=masks, train=True,
                         rngs={"dropout": r_global})
    s_patch = _buffer_rows(s_g["patch"].reshape(-1, s_g["patch"].shape[-1])[idx])
    cls_rows = [s_g["cls"]]
    if n_local:
        loc = batch["local_crops"]
        loc = normalise(loc.reshape((b * n_local,) + loc.shape[2:]), aug.mean, aug.std)
        s_l = backbone.apply({"params": params["backbone"]}, loc, train=True,
                             rngs={"dropout": r_local})
        cls_rows.append(s_l["cls"])
    s_cls_logits, s_ibot_logits = _heads(params, dino_head, ibot_head,
                                         jnp.concatenate(cls_rows), s_patch)
    k = s_cls_logits.shape[-1]
    s_global = s_cls_logits[: b * n_global].reshape(b, n_global, k)
    s_local = s_cls_logits[b * n_global:].reshape(b, n_local, k)

    # ---- losses -------------------------------------------------------------------------------
    st = config.ssl.student_temp
    dino = losses.dino_loss(s_global, s_local, t_cls.reshape(b, n_global, k), st)
    ibot = losses.ibot_loss(s_ibot_logits, t_ibot, weights, b * n_global, st)
    cls_by_crop = s_g["cls"].reshape(b, n_global, -1)
    reg = sum(losses.regulariser(config.ssl.regulariser, cls_by_crop[:, c],
                                 kde_concentration=config.ssl.kde_concentration)
              for c in range(n_global))
    reg_weight = {"koleo": config.ssl.koleo_loss_weight, "kde": config.ssl.kde_loss_weight,
                  "none": 0.0}[config.ssl.regulariser]
    total = config.ssl.dino_loss_weight * dino + config.ssl.ibot_loss_weight * ibot \
        + reg_weight * reg
    metrics = {"loss": total, "dino": dino, "ibot": ibot, config.ssl.regulariser: reg,
               "masked_patches": n_masked.astype(jnp.float32)}
    if config.ssl.regulariser == "none":
        metrics.pop("none")
    return total, {"metrics": metrics, "centers": new_centers}


# ---------------------------------------------------------------- what the trainer uses -----
class Models(NamedTuple):
    backbone: nn.Module  # cfm.models.vit.ViT
    dino_head: nn.Module
    ibot_head: nn.Module | None  # None when iBOT shares the DINO head


def build_models(config: ml_collections.ConfigDict) -> Models:
    h = config.head
    dtype = jnp.dtype(config.model.dtype)
    make_head = lambda: heads.DINOHead(h.n_prototypes, h.hidden_dim, h.bottleneck_dim,  # noqa
                                       h.n_layers, dtype)
    return Models(backbone_lib.from_config(config.model), make_head(),
                  make_head() if config.ibot.separate_head else None)


def init_params(config: ml_collections.ConfigDict, models: Models, rng: jax.Array) -> dict:
    """Boxed student parameters {backbone, dino_head[, ibot_head]}."""
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


def init_extra(config: ml_collections.ConfigDict, params: dict) -> tuple[dict, dict]:
    """The teacher starts as a copy of the student; the centering buffers at zero."""
    k = config.head.n_prototypes
    return jax.tree.map(jnp.copy, params), {"dino": jnp.zeros((k,)), "ibot": jnp.zeros((k,))}


def buffer_size(config: ml_collections.ConfigDict) -> int:
    """Static size of the masked-token buffer (`cfm.data.pipeline.mask_buffer_size_for`)."""
    return pipeline.mask_buffer_size_for(config, vit.spec(config.model.variant).patch)


def step_schedules(config: ml_collections.ConfigDict, step) -> dict:
    """The teacher's schedules at `step` (cfm.schedules): EMA momentum and temperature."""
    return {"momentum": schedules.teacher_momentum(config, step),
            "teacher_temp": schedules.teacher_temperature(config, step)}


def loss(config: ml_collections.ConfigDict, models: Models, params: dict, state, batch: dict,
         sched: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    """`objective` with the teacher and centers of `state`."""
    return objective(config, models.backbone, models.dino_head, models.ibot_head,
                     buffer_size(config), params, state.teacher, state.centers, batch, sched, rng)


def after_update(config: ml_collections.ConfigDict, state, aux: dict, sched: dict):
    """EMA teacher update with the step's momentum; the new centering buffers."""
    m = sched["momentum"]
    teacher = jax.tree.map(lambda t, s: m * t + (1.0 - m) * s, state.teacher, state.params)
    return (state.replace(teacher=teacher, centers=aux["centers"]),
            {"momentum": m, "teacher_temp": sched["teacher_temp"]})


def batch_spec(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Global batch shapes and dtypes (`cfm.data.pipeline`'s batches, all processes')."""
    b, c = int(config.batch_size), config.crops
    g, n_loc = int(c.global_size), int(c.n_local)
    patch = vit.spec(config.model.variant).patch
    return {"global_crops": ((b, 2, g, g, 3), "uint8"),
            "local_crops": ((b, n_loc, int(c.local_size), int(c.local_size), 3), "uint8"),
            "masks": ((b, 2, (g // patch) ** 2), "bool")}


def batches(config: ml_collections.ConfigDict, start_step: int, process_index: int,
            process_count: int):
    return pipeline.make_train_iterator(
        config, patch_size=vit.spec(config.model.variant).patch, process_index=process_index,
        process_count=process_count, start_step=start_step)


def step_flops(config: ml_collections.ConfigDict) -> dict[str, float]:
    parts = flops.dino_step_flops(config, buffer_size(config))
    return dict(parts, backbone=parts["student_backbone"])


def _validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config_check.validate_dino(config)
    return config


OBJECTIVE = Objective(
    name="dinov2", unit="images", prepare_config=_validate, build_models=build_models,
    init_params=init_params, init_extra=init_extra, step_schedules=step_schedules, loss=loss,
    after_update=after_update, batch_spec=batch_spec, batches=batches, flops=step_flops,
    depth=lambda config: vit.spec(config.model.variant).depth, export_tree="teacher")
