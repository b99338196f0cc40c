"""Parameter groups of the DINOv2 optimiser: layer-wise lr decay, patch-embedding multiplier,
no weight decay on biases/norms/LayerScale/tokens, per-module clipping, frozen prototypes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cfm import optim
from cfm.models import heads, vit
from tests.conftest import load_config


def _params(scan=False):
    bb = vit.ViT("vit_test", img_size=32, num_registers=1, scan_layers=scan)
    hd = heads.DINOHead(16, 8, 4)
    x = jnp.ones((1, 32, 32, 3))
    p = {"backbone": jax.eval_shape(bb.init, jax.random.key(0), x, masks=jnp.zeros((1, 16), bool)),
         "dino_head": jax.eval_shape(hd.init, jax.random.key(0), jnp.ones((1, 32)))}
    p = {k: nn.meta.unbox(v)["params"] for k, v in p.items()}
    return jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), p)


@pytest.fixture
def cfg():
    c = load_config(arg="test")
    c.optim.layerwise_decay = 0.5
    c.optim.patch_embed_lr_mult = 0.2
    return c


def test_layerwise_lr_multipliers(cfg):
    p = _params()
    m = optim.lr_multipliers(cfg, p, depth=2)
    # depth 2: embeddings layer 0 -> 0.5**3, block i -> 0.5**(2-i), rest -> 1
    assert float(m["backbone"]["pos_embed"]) == pytest.approx(0.125)
    assert float(m["backbone"]["cls_token"]) == pytest.approx(0.125)
    assert float(m["backbone"]["patch_embed"]["kernel"]) == pytest.approx(0.125 * 0.2)
    assert float(m["backbone"]["block_0"]["attn"]["qkv_kernel"]) == pytest.approx(0.25)
    assert float(m["backbone"]["block_1"]["mlp"]["fc1"]["kernel"]) == pytest.approx(0.5)
    assert float(m["backbone"]["norm"]["scale"]) == 1.0
    assert float(m["dino_head"]["last_layer"]["kernel"]) == 1.0
    ms = optim.lr_multipliers(cfg, _params(scan=True), depth=2)
    np.testing.assert_allclose(ms["backbone"]["blocks"]["attn"]["qkv_kernel"].ravel(), [0.25, 0.5])


def test_weight_decay_mask(cfg):
    wd = optim.decay_mask(_params())
    b = wd["backbone"]
    for no in (b["cls_token"], b["reg_tokens"], b["pos_embed"], b["mask_token"],
               b["block_0"]["ls1"]["gamma"], b["block_0"]["norm1"]["scale"],
               b["block_0"]["attn"]["qkv_bias"], b["block_0"]["mlp"]["fc1"]["bias"],
               b["norm"]["bias"], wd["dino_head"]["mlp_0"]["bias"]):
        assert float(no) == 0.0
    for yes in (b["patch_embed"]["kernel"], b["block_0"]["attn"]["qkv_kernel"],
                b["block_1"]["mlp"]["fc2"]["kernel"], wd["dino_head"]["last_layer"]["kernel"]):
        assert float(yes) == 1.0


def test_update_matches_adamw_formula_and_freezes_prototypes(cfg):
    cfg.optim.clip_grad = 0.0
    p = _params()
    tx = optim.adamw(cfg, p, depth=2)
    state = tx.init(p)
    g = jax.tree.map(lambda x: jnp.full_like(x, 0.5), p)
    step = 13  # inside warmup (1 epoch of 10 steps) is over: lr ~ peak; freeze epoch is over too
    state = state._replace(count=jnp.int32(step))
    upd, _ = tx.update(g, state, p)
    from cfm import schedules
    s = schedules.optimizer_schedules(cfg, step)
    # first Adam step with bias correction: adam(g) = g/|g| = 1 (eps aside)
    expect = -s["lr"] * 0.5 * (1.0 + s["wd"] * 1.0)  # block_1 kernel: lr_mult 0.5, decayed
    assert float(upd["backbone"]["block_1"]["mlp"]["fc1"]["kernel"][0, 0]) == pytest.approx(
        float(expect), rel=1e-4)
    frozen, _ = tx.update(g, tx.init(p), p)  # step 0: prototypes frozen
    assert float(jnp.abs(frozen["dino_head"]["last_layer"]["kernel"]).max()) == 0.0
    assert float(jnp.abs(frozen["dino_head"]["mlp_0"]["kernel"]).max()) == 0.0  # lr(0) = 0
    later, _ = tx.update(g, tx.init(p)._replace(count=jnp.int32(step)), p)
    assert float(jnp.abs(later["dino_head"]["last_layer"]["kernel"]).max()) > 0.0


def test_clipping_is_per_module(cfg):
    cfg.optim.clip_grad = 1.0
    p = _params()
    tx = optim.adamw(cfg, p, depth=2)
    # huge backbone gradient must not shrink the head's gradient (clipped separately)
    g = jax.tree.map(jnp.zeros_like, p)
    g["backbone"]["norm"]["scale"] = jnp.full_like(g["backbone"]["norm"]["scale"], 1e6)
    g["dino_head"]["mlp_0"]["bias"] = jnp.full_like(g["dino_head"]["mlp_0"]["bias"], 1e-3)
    st = tx.init(p)._replace(count=jnp.int32(15))
    _, new = tx.update(g, st, p)
    mu = new.adam.mu
    np.testing.assert_allclose(mu["dino_head"]["mlp_0"]["bias"], 0.1 * 1e-3, rtol=1e-5)
    assert float(optax.tree.norm(mu["backbone"])) == pytest.approx(0.1, rel=1e-4)
