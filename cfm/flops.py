"""Analytic model FLOPs of a training step (matmuls only, 2 FLOPs per multiply-add): DINOv2 and
masked gene modelling; each objective's `flops` field (`cfm.ssl.objective`) calls its function.

Used by the benchmarks (against XLA's cost analysis, to catch wasted compute) and by `cfm.aot`
for MFU. The DINOv2 count: student forward + backward on every crop (backward = 2x forward,
except the patch embedding, whose input needs no gradient: 1x), teacher forward on the global
crops only, and the heads on exactly the rows the step feeds them (CLS rows and the fixed-size
masked-token buffer).
"""

from __future__ import annotations

import ml_collections

from cfm.models import omics, vit


def vit_forward_flops(variant: str, crop: int, num_registers: int = 0, ffn: str = "mlp"
                      ) -> tuple[float, float]:
    """(patch-embedding FLOPs, transformer-block FLOPs) of one forward pass of one image."""
    s = vit.spec(variant)
    n = (crop // s.patch) ** 2
    t = n + 1 + num_registers
    d = s.width
    embed = 2.0 * n * (s.patch * s.patch * 3) * d
    attn = 2.0 * t * d * 3 * d + 2.0 * 2 * t * t * d + 2.0 * t * d * d
    if ffn == "mlp":
        mlp = 2.0 * 2 * t * d * s.mlp_dim
    else:
        h = vit.swiglu_hidden(s.mlp_dim)
        mlp = 2.0 * t * d * 2 * h + 2.0 * t * h * d
    return embed, s.depth * (attn + mlp)


def head_flops_per_row(config: ml_collections.ConfigDict) -> float:
    """FLOPs of one DINO head forward for one row (MLP + prototypes)."""
    h = config.head
    d = vit.spec(config.model.variant).width
    dims = [d] + [h.hidden_dim] * (h.n_layers - 1) + [h.bottleneck_dim]
    mlp = sum(2.0 * a * b for a, b in zip(dims[:-1], dims[1:]))
    return mlp + 2.0 * h.bottleneck_dim * h.n_prototypes


def dino_step_flops(config: ml_collections.ConfigDict, buffer_size: int) -> dict[str, float]:
    """Model FLOPs of one training step on the global batch, by part, and their total."""
    m, c, b = config.model, config.crops, config.batch_size
    g_embed, g_blocks = vit_forward_flops(m.variant, c.global_size, m.num_registers, m.ffn)
    l_embed, l_blocks = vit_forward_flops(m.variant, c.local_size, m.num_registers, m.ffn)
    n_g, n_l = 2 * b, c.n_local * b
    head = head_flops_per_row(config)
    parts = {
        "student_backbone": n_g * (2 * g_embed + 3 * g_blocks) + n_l * (2 * l_embed + 3 * l_blocks),
        "student_heads": 3 * head * (n_g + n_l + buffer_size),
        "teacher_backbone": n_g * (g_embed + g_blocks),
        "teacher_heads": head * (n_g + buffer_size),
    }
    parts["total"] = sum(parts.values())
    return parts


def omics_step_flops(config: ml_collections.ConfigDict, tokens: int) -> dict[str, float]:
    """Analytic FLOPs of one masked-gene-modelling step (forward + 2x backward) for
    `config.batch_size` samples of `tokens` tokens each (plus CLS; the blocks see at most
    `model.attend_tokens` of them), by part: the backbone (blocks and the continuous value
    encoder), the MGM head on every token, and their total (embedding lookups and the
    gene-value products count 0)."""
    s = omics.spec(config.model.variant)
    attend = config.model.get("attend_tokens", 0)
    d, t = s.width, (min(attend, tokens) if attend else tokens) + 1  # tokens in the blocks
    attn = 2.0 * t * d * 3 * d + 2.0 * 2 * t * t * d + 2.0 * t * d * d
    mlp = 2.0 * 2 * t * d * s.mlp_dim
    value = 2.0 * tokens * d * d if config.model.value_encoding == "continuous" else 0.0
    n_expr = 1 if config.mgm.expression_loss == "regression" else config.model.n_bins
    head = 2.0 * tokens * d * d + 2.0 * tokens * d * (n_expr + 2 + 5)
    if config.mgm.get("sample_readout", False):  # W cls, then one dot product per token
        head += 2.0 * d * d + 2.0 * tokens * d
    per_sample = 3.0 * config.batch_size
    parts = {"backbone": per_sample * (s.depth * (attn + mlp) + value), "head": per_sample * head}
    parts["total"] = parts["backbone"] + parts["head"]
    return parts
