"""One backbone factory: an architecture dict -> the Flax module, for training and for loading.

`architecture(config.model)` is the backbone's description as a release records it
(`config.json` "architecture" of a `cfm.export` folder); `build_backbone(arch, ...)` turns that
dict back into a `cfm.models.vit.ViT` or `cfm.models.omics.OmicsTransformer`. The trainer builds
its backbone with `from_config(config.model)`, which is `build_backbone(architecture(...))`
plus the fields that only matter while training (drop path, remat, scan, attention kernel), so
a model loaded from an export or a checkpoint is the same module the run trained.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cfm.models import omics, slide, vit


class ArchitectureError(ValueError):
    """An architecture dict that does not match cfm's variant table."""


def architecture(model_cfg: Any) -> dict:
    """The released backbone's architecture (config.json "architecture") from `config.model`
    of a training config (a ConfigDict or dict)."""
    m = dict(model_cfg)
    if m["variant"] == slide.VARIANT:
        return slide.architecture(m)
    if m["variant"] in omics.VARIANTS:
        o = omics.spec(m["variant"])
        return {
            "family": "omics", "variant": m["variant"], "width": o.width, "depth": o.depth,
            "heads": o.heads, "mlp_hidden": o.mlp_dim, "vocab_size": int(m["vocab_size"]),
            "n_bins": int(m["n_bins"]), "value_encoding": m.get("value_encoding", "continuous"),
            "gene_values": bool(m.get("gene_values", False)),
            "attend_tokens": int(m.get("attend_tokens", 0)),
            "layerscale": float(m.get("layerscale_init", 0.0)),
            "tokens": "gene-id + value + modality embeddings per token, a learned CLS token; "
                      "gene ids index vocab.tsv (0 padding), modalities expression, mutation, "
                      "cnv; no position embeddings",
            "output": "dict(cls [B, D], tokens [B, L, D]) after the final norm",
        }
    s = vit.spec(m["variant"])
    ffn = m.get("ffn", "mlp")
    return {
        "family": "vit", "variant": m["variant"], "width": s.width, "depth": s.depth,
        "heads": s.heads, "patch": s.patch,
        "mlp_hidden": s.mlp_dim if ffn == "mlp" else vit.swiglu_hidden(s.mlp_dim),
        "num_registers": int(m.get("num_registers", 0)), "layerscale": float(
            m.get("layerscale_init", 0.0)), "ffn": ffn, "img_size": int(m["img_size"]),
        "qkv_bias": bool(m.get("qkv_bias", True)), "class_token": True,
        "norm": "layernorm, eps 1e-6", "activation": "gelu (exact)" if ffn == "mlp" else "silu",
        "pos_embed": "learned, 1 + (img_size/patch)^2 rows: row 0 added to CLS, the rest to the "
                     "patches, none to registers; resampled bicubically for other sizes",
        "output": "dict(cls [B, D], registers [B, R, D], patch [B, N, D]) after the final norm",
    }


def build_backbone(arch: dict, dtype: Any = None, **overrides: Any) -> nn.Module:
    """The module for `arch` (as `architecture` returns): per-block layout, no drop path, no
    remat unless `overrides` say otherwise; `dtype` is the compute dtype (default float32),
    `overrides` any other field of the module (drop_path_rate, remat, attention, scan_layers
    for a ViT, ...)."""
    dtype = jnp.dtype(dtype or jnp.float32)
    if arch.get("family") == "slide":
        return slide.build(arch, dtype, **overrides)
    if arch.get("family") == "omics":
        kw = dict(variant=arch["variant"], vocab_size=arch["vocab_size"], n_bins=arch["n_bins"],
                  value_encoding=arch["value_encoding"], layerscale_init=arch["layerscale"],
                  gene_values=arch.get("gene_values", False),
                  attend_tokens=arch.get("attend_tokens", 0),
                  drop_path_rate=0.0, dtype=dtype, remat=False)
        kw.update(overrides)
        return omics.OmicsTransformer(**kw)
    s = vit.spec(arch["variant"])
    stored = (arch["width"], arch["depth"], arch["heads"], arch["patch"])
    if stored != (s.width, s.depth, s.heads, s.patch):
        raise ArchitectureError(f"architecture {arch['variant']}: width/depth/heads/patch "
                                f"{stored} differ from cfm's table "
                                f"{(s.width, s.depth, s.heads, s.patch)}")
    kw = dict(variant=arch["variant"], img_size=arch["img_size"],
              num_registers=arch["num_registers"], layerscale_init=arch["layerscale"],
              drop_path_rate=0.0, ffn=arch["ffn"], qkv_bias=arch["qkv_bias"], dtype=dtype,
              remat=False, scan_layers=False)
    kw.update(overrides)
    return vit.ViT(**kw)


def from_config(model_cfg: Any) -> nn.Module:
    """The backbone a training config's `config.model` describes, with its training fields."""
    m = dict(model_cfg)
    if m["variant"] == slide.VARIANT:
        return build_backbone(architecture(m), m["dtype"], dropout=m["dropout"])
    train = dict(drop_path_rate=m["drop_path_rate"], remat=m["remat"], attention=m["attention"])
    if m["variant"] not in omics.VARIANTS:
        train["scan_layers"] = m["scan_layers"]
    return build_backbone(architecture(m), m["dtype"], **train)


def dummy_inputs(arch: dict) -> tuple[tuple, dict]:
    """(args, kwargs) of one tiny batch that `module.init` accepts, for shapes only."""
    if arch.get("family") == "slide":
        return slide.dummy_inputs(arch), {}
    if arch.get("family") == "omics":
        t = jnp.zeros((1, 4), jnp.int32)
        return (t, t, t.astype(jnp.float32), t), {"value_mask": t.astype(bool)}
    g = arch["img_size"] - arch["img_size"] % arch["patch"]
    n = (g // arch["patch"]) ** 2
    return (jnp.zeros((1, g, g, 3)),), {"masks": jnp.zeros((1, n), bool)}


def abstract_params(arch: dict, scan_layers: bool = False) -> dict:
    """Shapes and dtypes (jax.ShapeDtypeStruct) of the backbone parameters, mask token included,
    in the per-block (or, for a ViT with `scan_layers`, the stacked `blocks`) layout."""
    module = build_backbone(arch) if arch.get("family") in ("omics", "slide") else build_backbone(
        arch, scan_layers=scan_layers)
    args, kwargs = dummy_inputs(arch)
    shapes = jax.eval_shape(lambda r: module.init(r, *args, **kwargs), jax.random.key(0))
    return nn.meta.unbox(shapes["params"])
