"""Checks a pretraining config's values before any work starts (DINOv2: `validate_dino`; masked
gene modelling: `validate_mgm`); every error names the offending key. Nothing here changes a
config: what comes from the data is filled in by the objective's `prepare_config`.

Unknown keys on the command line are rejected by ml_collections' config flags themselves
(`--config.modle.variant=...` fails with the key in the message); this module checks values.
"""

from __future__ import annotations

import ml_collections

from cfm.models import omics, ops, vit


class ConfigError(ValueError):
    """A config value that cannot work; the message starts with the key."""


def _check(cond: bool, key: str, value, why: str) -> None:
    if not cond:
        raise ConfigError(f"config.{key}={value!r}: {why}")


def _get(config: ml_collections.ConfigDict, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _check_damaged(config: ml_collections.ConfigDict) -> None:
    """config.damaged_checkpoints (cfm/run_config.py) is one of its two choices."""
    value = config.damaged_checkpoints
    _check(value in ("stop", "set_aside"), "damaged_checkpoints", value,
           "use stop (exit, naming the damaged steps) or set_aside (move them aside, continue "
           "from the newest good step)")


def validate_dino(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError for the first value that cannot work."""
    g = lambda k: _get(config, k)  # noqa: E731
    positive_ints = ["batch_size", "steps_per_epoch", "epochs", "crops.global_size",
                     "crops.local_size", "head.n_prototypes", "head.hidden_dim",
                     "head.bottleneck_dim", "head.n_layers", "log_every", "checkpoint_every",
                     "keep_checkpoints", "model.img_size"]
    for k in positive_ints:
        _check(isinstance(g(k), int) and g(k) > 0, k, g(k), "must be a positive integer")
    for k in ["crops.n_local", "model.num_registers", "data.worker_count", "keep_every",
              "mesh.slices"]:
        _check(isinstance(g(k), int) and g(k) >= 0, k, g(k), "must be an integer >= 0")
    _check(isinstance(g("resume_step"), int) and g("resume_step") >= -1, "resume_step",
           g("resume_step"), "must be -1 (the latest checkpoint) or a step >= 0")
    _check(isinstance(g("init_from_step"), int) and g("init_from_step") >= -1, "init_from_step",
           g("init_from_step"), "must be -1 (the latest checkpoint) or a step >= 0")
    _check_damaged(config)
    _check(g("total_steps") == -1 or g("total_steps") > 0, "total_steps", g("total_steps"),
           "must be -1 (epochs * steps_per_epoch) or positive")
    _check(g("model.variant") in vit.VARIANTS, "model.variant", g("model.variant"),
           f"choose one of {sorted(vit.VARIANTS)}")
    patch = vit.VARIANTS[g("model.variant")][-1]
    for k in ["crops.global_size", "crops.local_size", "model.img_size"]:
        _check(g(k) % patch == 0, k, g(k), f"must be a multiple of the patch size {patch}")
    _check(g("model.ffn") in ("mlp", "swiglu"), "model.ffn", g("model.ffn"), "use mlp or swiglu")
    _check(g("model.attention") in ops.IMPLS, "model.attention", g("model.attention"),
           f"use one of {', '.join(ops.IMPLS)}")
    _check(g("model.dtype") in ("float32", "bfloat16", "float16"), "model.dtype",
           g("model.dtype"), "use float32, bfloat16 or float16")
    _check(0 <= g("model.drop_path_rate") < 1, "model.drop_path_rate", g("model.drop_path_rate"),
           "must be in [0, 1)")
    _check(g("ssl.centering") in ("softmax", "sinkhorn_knopp"), "ssl.centering",
           g("ssl.centering"), "use softmax or sinkhorn_knopp")
    _check(g("ssl.regulariser") in ("koleo", "kde", "none"), "ssl.regulariser",
           g("ssl.regulariser"), "use koleo, kde or none")
    for k in ["ssl.student_temp", "ssl.teacher_temp", "ssl.warmup_teacher_temp",
              "ssl.kde_concentration", "optim.base_lr"]:
        _check(g(k) > 0, k, g(k), "must be > 0")
    for k in ["ssl.center_momentum", "ssl.momentum_teacher", "ssl.final_momentum_teacher",
              "optim.b1", "optim.b2", "ibot.mask_sample_probability", "augment.hflip",
              "augment.vflip", "augment.color_jitter", "augment.grayscale", "augment.solarize"]:
        _check(0 <= g(k) <= 1, k, g(k), "must be in [0, 1]")
    _check(0 <= g("augment.hed_jitter") < 1, "augment.hed_jitter", g("augment.hed_jitter"),
           "must be in [0, 1)")
    _check(isinstance(g("crops.extended_context"), bool), "crops.extended_context",
           g("crops.extended_context"), "must be True or False")
    lo, hi = g("ibot.mask_ratio_min_max")
    _check(0 <= lo <= hi <= 1, "ibot.mask_ratio_min_max", (lo, hi), "need 0 <= min <= max <= 1")
    for k in ["crops.global_scale", "crops.local_scale"]:
        lo, hi = g(k)
        _check(0 < lo <= hi <= 1, k, (lo, hi), "need 0 < min <= max <= 1")
    _check(len(g("augment.blur")) == 3, "augment.blur", g("augment.blur"),
           "three probabilities: global crop 1, global crop 2, local crops")
    _check(g("data.source") in ("synthetic", "folder", "shards"), "data.source",
           g("data.source"), "use synthetic, folder or shards")
    if g("data.source") in ("folder", "shards"):
        _check(bool(g("data.path")), "data.path", g("data.path"),
               "set the folder of tiles (folder) or of tile_wsi's output (shards)")
    _check(g("optim.lr_scaling") in ("sqrt_wrt_1024", "linear_wrt_256", "none"),
           "optim.lr_scaling", g("optim.lr_scaling"), "use sqrt_wrt_1024, linear_wrt_256 or none")
    _check(g("optim.warmup_epochs") <= g("epochs"), "optim.warmup_epochs",
           g("optim.warmup_epochs"), f"longer than the run ({g('epochs')} epochs)")


def validate_mgm(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError for the first value of a masked-gene-modelling config
    (configs/omics_mgm.py) that cannot work."""
    g = lambda k: _get(config, k)  # noqa: E731
    for k in ["batch_size", "steps_per_epoch", "epochs", "log_every", "checkpoint_every",
              "keep_checkpoints", "data.max_tokens"]:
        _check(isinstance(g(k), int) and g(k) > 0, k, g(k), "must be a positive integer")
    for k in ["keep_every", "mesh.slices"]:
        _check(isinstance(g(k), int) and g(k) >= 0, k, g(k), "must be an integer >= 0")
    for k in ["resume_step", "init_from_step"]:
        _check(isinstance(g(k), int) and g(k) >= -1, k, g(k),
               "must be -1 (the latest checkpoint) or a step >= 0")
    _check_damaged(config)
    _check(g("total_steps") == -1 or g("total_steps") > 0, "total_steps", g("total_steps"),
           "must be -1 (epochs * steps_per_epoch) or positive")
    _check(g("model.variant") in omics.VARIANTS, "model.variant", g("model.variant"),
           f"choose one of {sorted(omics.VARIANTS)}")
    _check(g("model.value_encoding") in ("continuous", "binned"), "model.value_encoding",
           g("model.value_encoding"), "use continuous or binned")
    _check(g("mgm.expression_loss") in ("regression", "classification"), "mgm.expression_loss",
           g("mgm.expression_loss"), "use regression or classification")
    _check(0 < g("mgm.mask_ratio") < 1, "mgm.mask_ratio", g("mgm.mask_ratio"),
           "must be in (0, 1)")
    for k in ["mgm.expression_weight", "mgm.mutation_weight", "mgm.cnv_weight"]:
        _check(g(k) >= 0, k, g(k), "must be >= 0")
    attend = g("model.attend_tokens")
    _check(isinstance(attend, int) and attend >= 0, "model.attend_tokens", attend,
           "must be an integer >= 0 (0: every token enters the blocks)")
    _check(not attend or g("mgm.sample_readout"), "model.attend_tokens", attend,
           "needs mgm.sample_readout=True: tokens past the window are read from the CLS")
    _check(not g("mgm.sample_readout") or g("mgm.expression_loss") == "regression",
           "mgm.sample_readout", g("mgm.sample_readout"),
           "needs mgm.expression_loss=regression (it adds to the regressed value)")
    _check(g("model.attention") in ops.IMPLS, "model.attention", g("model.attention"),
           f"use one of {', '.join(ops.IMPLS)}")
    _check(g("model.dtype") in ("float32", "bfloat16", "float16"), "model.dtype",
           g("model.dtype"), "use float32, bfloat16 or float16")
    _check(g("optim.base_lr") > 0, "optim.base_lr", g("optim.base_lr"), "must be > 0")
    _check(not g("init_from") or g("data.source") == "prepared", "init_from", g("init_from"),
           "an omics backbone continues on prepared data (data.source=prepared, data.path=a "
           "data_prep.prepare_omics folder made with its vocab.tsv)")
    _check(g("data.source") in ("synthetic", "prepared"), "data.source", g("data.source"),
           "use synthetic or prepared (a data_prep.prepare_omics folder)")
    if g("data.source") == "prepared":
        _check(bool(g("data.path")), "data.path", g("data.path"),
               "set the folder written by python -m data_prep.prepare_omics")
