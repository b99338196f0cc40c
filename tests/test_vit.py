"""ViT variants, features (registers, LayerScale, SwiGLU, masks, pos-embed resampling, scan,
remat, compute dtype), logical axis names on every parameter, and the DINO head."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfm.models import heads, vit


def _count(variant, **kw):
    model = vit.ViT(variant=variant, **kw)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    return sum(np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes)))


@pytest.mark.parametrize("variant,millions", [("vit_s16", 21.67), ("vit_b16", 85.80),
                                              ("vit_l16", 303.3)])
def test_parameter_counts_match_published(variant, millions):
    """DINO ViT-S/16 21.7M, ViT-B/16 85.8M, ViT-L/16 303.3M backbone parameters (timm)."""
    assert _count(variant) / 1e6 == pytest.approx(millions, rel=0.005)


def test_variant_table_and_unknown_name():
    for name, (width, depth, heads_, mlp, patch) in vit.VARIANTS.items():
        assert width % heads_ == 0 and patch in (8, 14, 16), name
    assert vit.spec("vit_g14").width == 1536 and vit.spec("vit_h14").depth == 32
    with pytest.raises(ValueError, match="model.variant='vit_q99'"):
        vit.spec("vit_q99")


def _init_apply(model, x, masks=None):
    params = jax.jit(model.init)(jax.random.key(0), x, masks=masks)
    return params, jax.jit(model.apply)(params, x, masks=masks)


def test_outputs_and_any_crop_size():
    model = vit.ViT("vit_test", img_size=32, num_registers=2)
    params, out = _init_apply(model, jnp.zeros((2, 32, 32, 3)))
    assert out["cls"].shape == (2, 32) and out["patch"].shape == (2, 16, 32)
    assert out["registers"].shape == (2, 2, 32)
    local = model.apply(params, jnp.ones((3, 16, 16, 3)))  # pos embed resampled 4x4 -> 2x2
    assert local["patch"].shape == (3, 4, 32)
    with pytest.raises(ValueError, match="multiple of patch"):
        model.apply(params, jnp.ones((1, 20, 20, 3)))


def test_resample_pos_embed_identity_and_smooth():
    pos = jax.random.normal(jax.random.key(1), (1, 16, 8))
    assert vit.resample_pos_embed(pos, 4) is pos
    const = jnp.ones((1, 16, 8)) * 3.0
    np.testing.assert_allclose(vit.resample_pos_embed(const, 7), 3.0, rtol=1e-5)
    assert vit.resample_pos_embed(pos, 7).shape == (1, 49, 8)


def test_mask_token_replaces_masked_patches():
    model = vit.ViT("vit_test", img_size=32, layerscale_init=1.0)
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    none = jnp.zeros((2, 16), bool)
    params, out0 = _init_apply(model, x, none)
    plain = model.apply(params, x)
    np.testing.assert_allclose(out0["patch"], plain["patch"], rtol=1e-5, atol=1e-6)
    masks = none.at[0, :8].set(True)
    out1 = model.apply(params, x, masks=masks)
    assert not np.allclose(out1["patch"][0], plain["patch"][0])
    # a fully masked image no longer depends on its pixels
    full = jnp.ones((2, 16), bool)
    a = model.apply(params, x, masks=full)["cls"]
    b = model.apply(params, x * 5 + 1, masks=full)["cls"]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_swiglu_and_no_layerscale():
    model = vit.ViT("vit_test", img_size=32, ffn="swiglu", layerscale_init=0.0)
    params, out = _init_apply(model, jnp.ones((1, 32, 32, 3)))
    blk = params["params"]["block_0"]
    assert "ls1" not in blk
    assert blk["mlp"]["w12"]["kernel"].value.shape == (32, 2 * vit.swiglu_hidden(64))
    assert vit.swiglu_hidden(4096) == 2736  # DINOv2's SwiGLU width for ViT-L


def test_scan_and_remat_match_unrolled():
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    base = vit.ViT("vit_test", img_size=32, layerscale_init=1.0)
    params = nn.meta.unbox(jax.jit(base.init)(jax.random.key(0), x))["params"]
    ref = base.apply({"params": params}, x)["cls"]
    scanned = dict(params)
    blocks = [scanned.pop(f"block_{i}") for i in range(2)]
    scanned["blocks"] = jax.tree.map(lambda *a: jnp.stack(a), *blocks)
    for remat in (False, True):
        m = vit.ViT("vit_test", img_size=32, layerscale_init=1.0, scan_layers=True, remat=remat)
        np.testing.assert_allclose(m.apply({"params": scanned}, x)["cls"], ref, rtol=1e-5,
                                   atol=1e-6)
    r = vit.ViT("vit_test", img_size=32, layerscale_init=1.0, remat=True)
    g1 = jax.grad(lambda p: base.apply({"params": p}, x)["cls"].sum())(params)
    g2 = jax.grad(lambda p: r.apply({"params": p}, x)["cls"].sum())(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)


def test_bfloat16_compute_float32_params():
    model = vit.ViT("vit_test", img_size=32, dtype=jnp.bfloat16)
    params, out = _init_apply(model, jnp.ones((1, 32, 32, 3)))
    assert {x.dtype for x in jax.tree.leaves(nn.meta.unbox(params))} == {jnp.dtype("float32")}
    assert out["patch"].dtype == jnp.bfloat16


def test_drop_path_only_in_training():
    model = vit.ViT("vit_test", img_size=32, drop_path_rate=0.5, layerscale_init=1.0)
    x = jax.random.normal(jax.random.key(4), (8, 32, 32, 3))
    params = jax.jit(model.init)(jax.random.key(0), x)
    ev = model.apply(params, x)["cls"]
    np.testing.assert_allclose(ev, model.apply(params, x)["cls"])
    tr = model.apply(params, x, train=True, rngs={"dropout": jax.random.key(5)})["cls"]
    assert not np.allclose(ev, tr)


def test_every_parameter_has_logical_axis_names():
    for m in (vit.ViT("vit_test", img_size=32, num_registers=1),
              vit.ViT("vit_test", img_size=32, scan_layers=True, ffn="swiglu")):
        boxed = jax.eval_shape(m.init, jax.random.key(0), jnp.ones((1, 32, 32, 3)),
                               masks=jnp.zeros((1, 16), bool))
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
        for leaf in leaves:
            assert len(leaf.names) == leaf.value.ndim
    boxed = jax.eval_shape(heads.DINOHead(64, 32, 16).init, jax.random.key(0), jnp.ones((1, 32)))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)


def test_dino_head_weight_normalised_prototypes():
    head = heads.DINOHead(n_prototypes=50, hidden_dim=32, bottleneck_dim=16, n_layers=3)
    x = jax.random.normal(jax.random.key(6), (4, 24))
    params = nn.meta.unbox(jax.jit(head.init)(jax.random.key(0), x))
    out = head.apply(params, x)
    assert out.shape == (4, 50) and out.dtype == jnp.float32
    # g = 1 at init: logits are cosine similarities, so |logit| <= 1; scaling v changes nothing
    assert float(jnp.abs(out).max()) <= 1.0 + 1e-5
    p2 = jax.tree_util.tree_map_with_path(
        lambda kp, v: v * 7.0 if "last_layer" in str(kp) and "kernel" in str(kp) else v, params)
    np.testing.assert_allclose(head.apply(p2, x), out, rtol=1e-5, atol=1e-6)
    assert "bias" not in params["params"]["last_layer"]
    assert [k for k in params["params"] if k.startswith("mlp_")] == ["mlp_0", "mlp_1", "mlp_2"]
