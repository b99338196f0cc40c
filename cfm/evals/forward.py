"""The forwards the evaluators run: image features of the released backbone, and the fixed
batches and outputs of the health check, for whichever objective the run trains.

Which network: the backbone the objective releases (`Objective.export_tree`: DINOv2's EMA
teacher, MGM's trained parameters), in inference mode (no dropout, no drop-path). Image features
are the final-norm CLS token (DINOv2's `x_norm_clstoken`, what `cfm.embed` writes) of uint8
tiles normalised as the DINOv2 objective normalises its crops (`cfm.ssl.dinov2.normalise` with
`config.augment.mean/std`). Whether a run takes images is read from its batch (a
`global_crops` entry), not from the objective's name.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from cfm.data import omics_pipeline
from cfm.data import sources as tile_sources
from cfm.evals.base import ShardedForward
from cfm.evals.tile_sets import square
from cfm.ssl import dinov2, mgm


def takes_images(setup: Any) -> bool:
    """Whether the run's batches are image crops (its backbone a ViT)."""
    return "global_crops" in setup.batch_spec


def released(setup: Any, state: Any) -> Any:
    """The released backbone's parameters in `state` (sharded as the state is)."""
    return getattr(state, setup.objective.export_tree)["backbone"]


def image_features(setup: Any, batch_size: int) -> Callable[[Any, np.ndarray], np.ndarray]:
    """(state, uint8 images [N, G, G, 3]) -> float32 CLS features [N, D] of the released
    backbone, computed over the run's mesh (`ShardedForward`)."""
    config, backbone = setup.config, setup.models.backbone
    mean, std = config.augment.mean, config.augment.std

    def fn(params, batch):
        x = dinov2.normalise(batch["images"], mean, std)
        return backbone.apply({"params": params}, x, train=False)["cls"].astype(jnp.float32)

    forward = ShardedForward(setup, fn, batch_size)
    return lambda state, images: forward(released(setup, state), {"images": images})


def health_batch(setup: Any, n: int) -> dict[str, np.ndarray]:
    """The fixed batch of the health check: the first `n` items of the run's own training
    source (images squared to crops.global_size; omics samples padded to data.max_tokens with
    a gene subset seeded by (seed, index), as the training pipeline draws one)."""
    config = setup.config
    if takes_images(setup):
        source = tile_sources.make_source(config.data, config.seed)
        size = int(config.crops.global_size)
        return {"images": np.stack([square(source[i], size)
                                    for i in range(min(n, len(source)))])}
    source = omics_pipeline.make_source(config.data, config.seed)
    shuffle = config.model.get("attend_tokens", 0) > 0
    rows = [omics_pipeline.pad_sample(source[i][1], int(config.data.max_tokens),
                                      np.random.default_rng([config.seed, i]), shuffle)
            for i in range(min(n, len(source)))]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def health_outputs(setup: Any, batch_size: int) -> Callable[[Any, dict], dict[str, np.ndarray]]:
    """(state, health batch) -> {"cls": released CLS [N, D]} plus, for a run with a DINO head,
    the DINO-head logits of the teacher's and the student's CLS ("teacher_logits",
    "student_logits", [N, K]), all from global views without masks."""
    config, models = setup.config, setup.models
    dino_head = getattr(models, "dino_head", None)
    if takes_images(setup):
        mean, std = config.augment.mean, config.augment.std

        def cls_of(params, batch):
            x = dinov2.normalise(batch["images"], mean, std)
            return models.backbone.apply({"params": params}, x, train=False)["cls"]
    else:
        def cls_of(params, batch):
            return models.backbone.apply({"params": params}, *(batch[k] for k in mgm.INPUT_KEYS),
                                         train=False)["cls"]

    released_tree = setup.objective.export_tree  # "teacher" (DINOv2) or "params"
    teacher_released = released_tree == "teacher"

    def fn(params, batch):
        cls = cls_of(params["released"]["backbone"], batch)
        out = {"cls": cls.astype(jnp.float32)}
        if dino_head is not None:
            for side in ("teacher", "student"):
                c = cls if side == "teacher" and teacher_released else cls_of(
                    params[side]["backbone"], batch)
                out[f"{side}_logits"] = dino_head.apply(
                    {"params": params[side]["dino_head"]}, c).astype(jnp.float32)
        return out

    forward = ShardedForward(setup, fn, batch_size)

    def run(state, batch):
        params = {"released": getattr(state, setup.objective.export_tree)}
        if dino_head is not None:
            params.update(teacher=state.teacher, student=state.params)
        return forward(params, batch)

    return run
