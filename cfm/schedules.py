"""Per-step schedules of the DINOv2 recipe (Oquab et al. 2023; facebookresearch/dinov2
`ssl_default_config.yaml`), all as jnp functions of the integer step so they live in the jitted
train step; masked gene modelling uses the optimiser's, DINOv2 also the teacher's. Epochs are
`steps_per_epoch` iterations (DINOv2's OFFICIAL_EPOCH_LENGTH).

- learning rate: linear warmup from 0 over `warmup_epochs`, then cosine to `min_lr`;
  peak = base_lr * sqrt(batch / 1024) ("sqrt_wrt_1024" scaling rule);
- weight decay: cosine from `weight_decay` (0.04) to `weight_decay_end` (0.4);
- teacher momentum: cosine from `momentum_teacher` (0.992) to `final_momentum_teacher` (1.0);
- teacher temperature: linear from `warmup_teacher_temp` (0.04) to `teacher_temp` (0.07) over
  `warmup_teacher_temp_epochs` (30), then constant;
- last-layer freeze: prototypes get no update for `freeze_last_layer_epochs` (1).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections


def peak_lr(config: ml_collections.ConfigDict) -> float:
    """The learning rate reached after warmup, from the base lr and the batch-size rule."""
    rule = config.optim.lr_scaling
    if rule == "sqrt_wrt_1024":
        return config.optim.base_lr * (config.batch_size / 1024) ** 0.5
    if rule == "linear_wrt_256":
        return config.optim.base_lr * config.batch_size / 256
    if rule == "none":
        return config.optim.base_lr
    raise ValueError(f"optim.lr_scaling={rule!r}: use sqrt_wrt_1024, linear_wrt_256 or none")


def schedule_steps(config: ml_collections.ConfigDict) -> int:
    """Length of the schedules in steps (epochs * steps_per_epoch), independent of total_steps."""
    return config.epochs * config.steps_per_epoch


def cosine(step, start: float, end: float, total: int, warmup: int = 0, warmup_start: float = 0.0):
    """DINOv2's CosineScheduler: `warmup` steps evenly spaced from `warmup_start` to `start`
    (both ends included, like np.linspace), then a half cosine from `start` at step `warmup`
    to `end` at step `total`, held at `end` after."""
    step = jnp.asarray(step, jnp.float32)
    t = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
    value = end + 0.5 * (start - end) * (1.0 + jnp.cos(jnp.pi * t))
    if warmup > 0:
        warm = warmup_start + (start - warmup_start) * step / max(warmup - 1, 1)
        value = jnp.where(step < warmup, warm, value)
    return value


def learning_rate(config: ml_collections.ConfigDict, step):
    spe = config.steps_per_epoch
    return cosine(step, peak_lr(config), config.optim.min_lr, schedule_steps(config),
                  warmup=config.optim.warmup_epochs * spe)


def weight_decay(config: ml_collections.ConfigDict, step):
    return cosine(step, config.optim.weight_decay, config.optim.weight_decay_end,
                  schedule_steps(config))


def teacher_momentum(config: ml_collections.ConfigDict, step):
    return cosine(step, config.ssl.momentum_teacher, config.ssl.final_momentum_teacher,
                  schedule_steps(config))


def teacher_temperature(config: ml_collections.ConfigDict, step):
    warm = config.ssl.warmup_teacher_temp_epochs * config.steps_per_epoch
    step = jnp.asarray(step, jnp.float32)
    if warm <= 0:
        return jnp.full((), config.ssl.teacher_temp, jnp.float32)
    t0, t1 = config.ssl.warmup_teacher_temp, config.ssl.teacher_temp
    return jnp.where(step < warm, t0 + (t1 - t0) * step / max(warm - 1, 1), t1)


def last_layer_trainable(config: ml_collections.ConfigDict, step):
    """1.0 once the prototypes may move, 0.0 during the first `freeze_last_layer_epochs`."""
    frozen = config.optim.freeze_last_layer_epochs * config.steps_per_epoch
    return (jnp.asarray(step) >= frozen).astype(jnp.float32)


def optimizer_schedules(config: ml_collections.ConfigDict, step) -> dict:
    """The optimiser's schedule values at `step` (lr, weight decay, last-layer freeze), shared
    by every objective; an objective adds its own (`Objective.step_schedules`: DINOv2's teacher
    momentum and temperature)."""
    return {"lr": learning_rate(config, step), "wd": weight_decay(config, step),
            "last_layer": last_layer_trainable(config, step)}
