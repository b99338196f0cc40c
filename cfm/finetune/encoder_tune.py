"""Fine-tuning a pretrained omics encoder inside the fusion model
(`omics.encoder_tune = last_k | full`; `frozen` needs none of this: cfm.finetune.omics_encoder
computes its embeddings once).

`EncoderFusion` runs the encoder (`backbone`, a cfm.models.omics.OmicsTransformer) on each
patient's windowed views (enc_* arrays [B, V, L] of `omics_encoder.tuning_arrays`), averages
the views' CLS outputs (as the frozen embedding does) and hands the result to the FusionModel
(`fusion`) as its omics vector. `encoder_optimizer` is AdamW with BEiT's layer-wise lr decay
over the encoder (`cfm.finetune.tile.layerwise_lr_factors`: block i gets
decay^(depth - i), the embeddings decay^(depth + 1); Bao et al. 2021) and, for `last_k`, a zero
update for every encoder parameter below its last k blocks, so those stay exactly as
pretrained; the fusion head trains at the full lr.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cfm.finetune.tile import layerwise_lr_factors
from cfm.models.fusion import FusionModel

TUNE_MODES = ("frozen", "last_k", "full")


class EncoderFusion(nn.Module):
    """FusionModel whose omics input is the CLS of a trainable omics encoder."""

    backbone: Any
    fusion: FusionModel

    @nn.compact
    def __call__(self, batch: dict, train: bool = False) -> jax.Array:
        g = batch["enc_gene_ids"]
        b, v, n = g.shape

        def flat(k):
            return batch[k].reshape(b * v, n)

        cls = self.backbone(flat("enc_gene_ids"), flat("enc_modality"), flat("enc_values"),
                            flat("enc_classes"), train=train)["cls"].reshape(b, v, -1)
        w = batch["enc_view_mask"].astype(cls.dtype)[..., None]
        fb = {k: x for k, x in batch.items() if not k.startswith("enc_")}
        fb["omics"] = (cls * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
        return self.fusion(fb, train)


def tune_spec(config: Any, depth: int) -> tuple | None:
    """Hashable (depth, lr decay, trainable blocks: -1 = all) of a tuned encoder, or None."""
    o = config.omics
    mode = o.get("encoder_tune", "frozen")
    if not o.get("encoder") or mode == "frozen":
        return None
    k = -1 if mode == "full" else int(o.get("encoder_last_k", 1))
    return (int(depth), float(o.get("encoder_lr_decay", 0.75)), k)


def encoder_optimizer(lr: float, wd: float, spec: tuple | None) -> optax.GradientTransformation:
    """AdamW; with a tuned encoder's `spec` its updates are scaled per layer (0 = frozen)."""
    tx = optax.adamw(lr, weight_decay=wd)
    if spec is None:
        return tx
    depth, decay, k = spec

    def update(u, state, params=None):
        f = layerwise_lr_factors(u, depth, decay, k)  # python floats, fixed at trace time
        return jax.tree_util.tree_map(lambda a, s: a * s, u, f), state

    return optax.chain(tx, optax.GradientTransformation(lambda p: optax.EmptyState(), update))
