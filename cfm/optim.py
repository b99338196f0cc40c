"""AdamW as DINOv2 runs it (Oquab et al. 2023; facebookresearch/dinov2 `ssl_default_config.yaml`),
for every pretraining objective (masked gene modelling has no prototypes to freeze).

Per parameter, with the schedules of `cfm.schedules` evaluated at the optimiser's step count:

    update = -lr(t) * lr_mult * (adam(g) + wd(t) * wd_mask * p)

- decoupled weight decay (Loshchilov & Hutter 2019) scaled by the group's lr, as torch's AdamW
  does for DINOv2's parameter groups;
- lr_mult = layerwise_decay ** (depth + 1 - layer_id) (BEiT, Bao et al. 2021), layer_id 0 for
  patch embedding and tokens, i+1 for block i, depth+1 for the final norm and the heads;
  patch embedding additionally * patch_embed_lr_mult (0.2);
- wd_mask = 0 for biases, norms, LayerScale gammas and the cls/register/mask/position tokens;
- gradients clipped to global norm `clip_grad` separately for the backbone and each head
  (DINOv2 clips each student sub-module on its own);
- prototype (`last_layer`) gradients and updates are zero for `freeze_last_layer_epochs`.
  One known difference: torch skips the frozen parameters entirely, so their Adam step counter
  starts when they unfreeze; here they share the global counter (their moments stay zero while
  frozen), which makes their first updates after unfreezing smaller by the bias correction.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from cfm import schedules

_NO_DECAY = re.compile(r"(bias|norm|/ls\d/gamma|cls_token|reg_tokens|mask_token|pos_embed)")
_EMBED = re.compile(r"(patch_embed|cls_token|reg_tokens|mask_token|pos_embed)")
_BLOCK = re.compile(r"backbone/block_(\d+)/")


def _path(key_path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in key_path)


def layer_decay(decay: float, layer_id: Any, depth: int) -> Any:
    """BEiT's layer-wise lr factor `decay ** (depth + 1 - layer_id)` of a layer id (0: patch
    embedding and tokens, i + 1: block i, depth + 1: final norm and heads) or an array of them;
    shared by pretraining (`lr_multipliers`) and fine-tuning (cfm.finetune.tile)."""
    return decay ** (depth + 1 - layer_id)


def lr_multipliers(config: ml_collections.ConfigDict, params: Any, depth: int) -> Any:
    """Tree of per-parameter lr multipliers; scanned blocks get a [depth, 1, ...] array."""
    decay = config.optim.layerwise_decay

    def mult(key_path, leaf):
        path = _path(key_path)
        if path.startswith("backbone/blocks/"):  # scan_layers: leading axis = layer
            ids = jnp.arange(1, depth + 1, dtype=jnp.float32)
            m = layer_decay(decay, ids, depth)
            return m.reshape((depth,) + (1,) * (leaf.ndim - 1))
        if _EMBED.search(path) and path.startswith("backbone/"):
            layer_id = 0
        elif m := _BLOCK.search(path):
            layer_id = int(m.group(1)) + 1
        else:
            layer_id = depth + 1
        value = layer_decay(decay, layer_id, depth)
        if "patch_embed" in path:
            value *= config.optim.patch_embed_lr_mult
        return jnp.float32(value)

    return jax.tree_util.tree_map_with_path(mult, params)


def decay_mask(params: Any) -> Any:
    """1.0 where weight decay applies, 0.0 for biases, norms, LayerScale and tokens."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: jnp.float32(0.0 if _NO_DECAY.search(_path(kp)) else 1.0), params)


def last_layer_mask(params: Any) -> Any:
    """1.0 on the heads' prototype layers (frozen for the first epoch), else 0.0."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: jnp.float32(1.0 if "/last_layer/" in _path(kp) else 0.0), params)


class DinoAdamWState(NamedTuple):
    count: jax.Array
    adam: optax.OptState


def adamw(config: ml_collections.ConfigDict, params: Any, depth: int
          ) -> optax.GradientTransformation:
    """The optimiser of every pretraining objective, for its params dict {backbone, heads...}."""
    lr_mult = lr_multipliers(config, params, depth)
    wd_mask = decay_mask(params)
    ll_mask = last_layer_mask(params)
    adam = optax.scale_by_adam(b1=config.optim.b1, b2=config.optim.b2)
    clip = optax.clip_by_global_norm(config.optim.clip_grad) if config.optim.clip_grad > 0 else None

    def init(p):
        return DinoAdamWState(count=jnp.zeros((), jnp.int32), adam=adam.init(p))

    def update(grads, state, p=None):
        s = schedules.optimizer_schedules(config, state.count)
        if clip is not None:  # each top-level module (backbone, heads) on its own
            grads = {k: clip.update(g, clip.init(g))[0] for k, g in grads.items()}
        keep = jax.tree.map(lambda m: 1.0 - m * (1.0 - s["last_layer"]), ll_mask)
        grads = jax.tree.map(lambda g, k: g * k, grads, keep)
        upd, adam_state = adam.update(grads, state.adam)
        upd = jax.tree.map(
            lambda u, w, mask, lm, k: -s["lr"] * lm * k * (u + s["wd"] * mask * w),
            upd, p, wd_mask, lr_mult, keep)
        return upd, DinoAdamWState(count=state.count + 1, adam=adam_state)

    return optax.GradientTransformation(init, update)
