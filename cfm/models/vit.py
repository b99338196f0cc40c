"""Vision Transformer (Dosovitskiy et al. 2021) in the DINOv2 layout (Oquab et al. 2023).

CLS token, optional register tokens (Darcet et al. 2024, "Vision Transformers Need Registers"),
LayerScale (Touvron et al. 2021, CaiT), stochastic depth, GELU MLP or SwiGLU (Shazeer 2020), learned
position embeddings stored for `img_size` and bicubically resampled to any crop size, and a mask
token that replaces masked patches (iBOT). Attention goes through `jax.nn.dot_product_attention`
(cuDNN flash attention on GPUs) on accelerators and through a heads-major einsum on CPU
(`cfm.models.ops.attention`).

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `layers`, ...) and
activations carry their own (`act_batch`, `act_seq`, `act_embed`, ...), so FSDP can shard a
weight's `embed` axis while activations keep theirs whole; the rules in `cfm.parallel.sharding`
map both onto mesh axes. Parameters are float32; `dtype` is the compute
dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cfm.models import ops

# name -> (width, depth, heads, mlp hidden, patch). S/B/L/H/g as in DINOv2 and timm; the SwiGLU
# hidden size follows DINOv2 (2/3 of 4*width, rounded up to a multiple of 8).
VARIANTS: dict[str, tuple[int, int, int, int, int]] = {
    "vit_test": (32, 2, 2, 64, 8),
    "vit_demo": (96, 4, 3, 384, 8),
    "vit_ti16": (192, 12, 3, 768, 16),
    "vit_s16": (384, 12, 6, 1536, 16),
    "vit_s14": (384, 12, 6, 1536, 14),
    "vit_b16": (768, 12, 12, 3072, 16),
    "vit_b14": (768, 12, 12, 3072, 14),
    "vit_l16": (1024, 24, 16, 4096, 16),
    "vit_l14": (1024, 24, 16, 4096, 14),
    "vit_h14": (1280, 32, 16, 5120, 14),
    "vit_h16": (1280, 32, 16, 5120, 16),
    "vit_g14": (1536, 40, 24, 6144, 14),
}


@dataclasses.dataclass(frozen=True)
class ViTSpec:
    width: int
    depth: int
    heads: int
    mlp_dim: int
    patch: int


def lookup(table: dict[str, tuple[int, ...]], variant: str, spec_type: type) -> Any:
    """`spec_type(*table[variant])`, with a clear error for an unknown name (the ViT's and the
    omics transformer's variant tables)."""
    if variant not in table:
        raise ValueError(f"model.variant={variant!r} is not one of {sorted(table)}")
    return spec_type(*table[variant])


def spec(variant: str) -> ViTSpec:
    """The sizes of a named variant, with a clear error for an unknown name."""
    return lookup(VARIANTS, variant, ViTSpec)


def swiglu_hidden(mlp_dim: int) -> int:
    """DINOv2's SwiGLU hidden width: 2/3 of the GELU MLP's, rounded up to a multiple of 8."""
    return (int(mlp_dim * 2 / 3) + 7) // 8 * 8


def _init(init: Any, names: tuple[str | None, ...]) -> Any:
    return nn.with_logical_partitioning(init, names)


TRUNC = nn.initializers.truncated_normal(0.02)


class MLP(nn.Module):
    mlp_dim: int
    ffn: str
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        dense = lambda f, names, name: nn.Dense(  # noqa: E731
            f, dtype=self.dtype, kernel_init=_init(TRUNC, names),
            bias_init=_init(nn.initializers.zeros, names[1:]), name=name)
        if self.ffn == "mlp":
            h = ops.gelu(dense(self.mlp_dim, ("embed", "mlp"), "fc1")(x))
        else:  # SwiGLU: silu(x W1) * (x W2), as one matmul with a 2*hidden output.
            hidden = swiglu_hidden(self.mlp_dim)
            h = dense(2 * hidden, ("embed", "mlp"), "w12")(x)
            h = nn.silu(h[..., :hidden]) * h[..., hidden:]
        h = nn.with_logical_constraint(h, ("act_batch", "act_seq", "act_mlp"))
        return dense(width, ("mlp", "embed"), "fc2")(h)


class Attention(nn.Module):
    heads: int
    qkv_bias: bool
    dtype: Any
    impl: str = "auto"  # see cfm.models.ops.attention

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x: [B, T, D]; mask: optional [B, T] bool, False = padding (see ops.attention)."""
        width = x.shape[-1]
        hd = width // self.heads
        w_qkv = self.param("qkv_kernel", _init(TRUNC, ("embed", None, "heads", "kv")),
                           (width, 3, self.heads, hd))
        qkv = jnp.einsum("btd,dshk->btshk", x, w_qkv.astype(self.dtype))
        if self.qkv_bias:
            b_qkv = self.param("qkv_bias", _init(nn.initializers.zeros, (None, "heads", "kv")),
                               (3, self.heads, hd))
            qkv = qkv + b_qkv.astype(self.dtype)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, Dh]
        out = ops.attention(q, k, v, self.impl, mask)
        out = nn.with_logical_constraint(out, ("act_batch", "act_seq", "act_heads", "act_kv"))
        w_out = self.param("proj_kernel", _init(TRUNC, ("heads", "kv", "embed")),
                           (self.heads, hd, width))
        b_out = self.param("proj_bias", _init(nn.initializers.zeros, ("embed",)), (width,))
        return jnp.einsum("bthk,hkd->btd", out, w_out.astype(self.dtype)) + b_out.astype(self.dtype)


class LayerScale(nn.Module):
    init_value: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param("gamma", _init(nn.initializers.constant(self.init_value), ("embed",)),
                           (x.shape[-1],))
        return x * gamma.astype(x.dtype)


def _norm(dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-6, dtype=dtype, name=name,
                        scale_init=_init(nn.initializers.ones, ("embed",)),
                        bias_init=_init(nn.initializers.zeros, ("embed",)))


def drop_path(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Stochastic depth (Huang et al. 2016): drop the whole residual branch per sample."""
    if rate == 0.0 or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Block(nn.Module):
    heads: int
    mlp_dim: int
    ffn: str
    qkv_bias: bool
    layerscale_init: float
    drop_path_rate: float
    dtype: Any
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        def rng():
            return self.make_rng("dropout") if train and self.drop_path_rate > 0 else None

        def ls(name):
            if not self.layerscale_init:
                return lambda y: y
            return LayerScale(self.layerscale_init, name=name)

        attn = Attention(self.heads, self.qkv_bias, self.dtype, self.attention, name="attn")
        y = attn(_norm(self.dtype, "norm1")(x), mask)
        x = x + drop_path(ls("ls1")(y), self.drop_path_rate, rng())
        y = MLP(self.mlp_dim, self.ffn, self.dtype, name="mlp")(_norm(self.dtype, "norm2")(x))
        x = x + drop_path(ls("ls2")(y), self.drop_path_rate, rng())
        return nn.with_logical_constraint(x, ("act_batch", "act_seq", "act_embed"))


class ScanBlock(Block):
    """A Block with the (carry, out) signature `nn.scan` needs."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool):  # type: ignore[override]
        return super().__call__(x, train), None


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> width, as a stride-`patch` convolution would compute it, but
    written as patchify + one matmul (one GEMM on every backend; a convolution's weight gradient
    is slow on CPU). The kernel keeps the convolution layout [patch, patch, 3, width]."""

    patch: int
    width: int
    dtype: Any

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        b, h, w, c = images.shape
        p = self.patch
        kernel = self.param("kernel", _init(TRUNC, (None, None, None, "embed")),
                            (p, p, c, self.width))
        bias = self.param("bias", _init(nn.initializers.zeros, ("embed",)), (self.width,))
        x = images.astype(self.dtype).reshape(b, h // p, p, w // p, p, c)
        x = jnp.einsum("bhpwqc,pqcd->bhwd", x, kernel.astype(self.dtype))
        return x + bias.astype(self.dtype)


def resample_pos_embed(pos: jax.Array, grid: int) -> jax.Array:
    """Bicubically resample [1, g*g, D] patch position embeddings to a grid x grid layout."""
    n = pos.shape[1]
    old = int(round(n ** 0.5))
    if old == grid:
        return pos
    img = pos.reshape(1, old, old, -1)
    img = jax.image.resize(img, (1, grid, grid, img.shape[-1]), method="bicubic", antialias=False)
    return img.reshape(1, grid * grid, -1)


class ViT(nn.Module):
    """ViT backbone. Returns dict(cls [B, D], patch [B, N, D], registers [B, R, D]), all after
    the final LayerNorm (DINOv2's x_norm_*)."""

    variant: str
    img_size: int = 224
    num_registers: int = 0
    layerscale_init: float = 1e-5
    drop_path_rate: float = 0.0
    ffn: str = "mlp"
    qkv_bias: bool = True
    dtype: Any = jnp.float32
    remat: bool = False
    scan_layers: bool = False
    attention: str = "auto"  # cfm.models.ops.attention (ops.IMPLS)

    @nn.compact
    def __call__(self, images: jax.Array, masks: jax.Array | None = None,
                 train: bool = False) -> dict[str, jax.Array]:
        """images: [B, H, W, 3] float, normalised; masks: [B, N] bool, True = replace the patch
        by the mask token (N = (H/patch)*(W/patch))."""
        s = spec(self.variant)
        if images.shape[1] % s.patch or images.shape[2] % s.patch:
            raise ValueError(f"crop size {images.shape[1:3]} is not a multiple of patch {s.patch}")
        x = PatchEmbed(s.patch, s.width, self.dtype, name="patch_embed")(images)
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d)
        if masks is not None:
            mask_token = self.param("mask_token", _init(nn.initializers.zeros, ("embed",)), (d,))
            x = jnp.where(masks[..., None], mask_token.astype(x.dtype), x)
        base = self.img_size // s.patch
        pos = self.param("pos_embed", _init(TRUNC, (None, None, "embed")), (1, 1 + base * base, d))
        if gh != gw:
            raise ValueError(f"square crops only, got {images.shape[1:3]}")
        cls = self.param("cls_token", _init(nn.initializers.normal(1e-6), (None, None, "embed")),
                         (1, 1, d))
        x = x + resample_pos_embed(pos[:, 1:], gh).astype(x.dtype)
        tokens = [jnp.broadcast_to((cls + pos[:, :1]).astype(x.dtype), (b, 1, d))]
        if self.num_registers:
            reg = self.param("reg_tokens",
                             _init(nn.initializers.normal(1e-6), (None, None, "embed")),
                             (1, self.num_registers, d))
            tokens.append(jnp.broadcast_to(reg.astype(x.dtype), (b, self.num_registers, d)))
        x = jnp.concatenate(tokens + [x], axis=1)
        x = nn.with_logical_constraint(x, ("act_batch", "act_seq", "act_embed"))

        kw = dict(heads=s.heads, mlp_dim=s.mlp_dim, ffn=self.ffn, qkv_bias=self.qkv_bias,
                  layerscale_init=self.layerscale_init, drop_path_rate=self.drop_path_rate,
                  dtype=self.dtype, attention=self.attention)
        if self.scan_layers:
            block = ScanBlock
            if self.remat:
                block = nn.remat(block, static_argnums=(2,))
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True,
                            "dropout": True}, in_axes=nn.broadcast, length=s.depth,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(**kw, name="blocks")(x, train)
        else:
            block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
            for i in range(s.depth):
                x = block(**kw, name=f"block_{i}")(x, train)
        x = _norm(self.dtype, "norm")(x)
        r = 1 + self.num_registers
        return {"cls": x[:, 0], "registers": x[:, 1:r], "patch": x[:, r:]}
