"""Each schedule of the DINOv2 recipe at its key steps (values from dinov2's CosineScheduler)."""

import numpy as np
import pytest

from cfm import schedules
from tests.conftest import load_config


@pytest.fixture
def cfg():
    c = load_config(arg="vit_l16")  # DINOv2 defaults: 100 epochs of 1250 steps, batch 1024
    return c


def test_peak_lr_sqrt_scaling(cfg):
    assert schedules.peak_lr(cfg) == pytest.approx(0.004)
    cfg.batch_size = 256
    assert schedules.peak_lr(cfg) == pytest.approx(0.004 * 0.5)
    cfg.optim.lr_scaling = "bogus"
    with pytest.raises(ValueError, match="optim.lr_scaling"):
        schedules.peak_lr(cfg)


def test_learning_rate_key_steps(cfg):
    warm = 10 * 1250
    total = 100 * 1250
    lr = lambda s: float(schedules.learning_rate(cfg, s))  # noqa: E731
    assert lr(0) == 0.0
    assert lr(warm - 1) == pytest.approx(0.004)  # linspace includes its end point
    assert lr(warm // 2) == pytest.approx(0.004 * (warm // 2) / (warm - 1), rel=1e-5)
    assert lr(warm) == pytest.approx(0.004)
    mid = warm + (total - warm) // 2
    assert lr(mid) == pytest.approx(1e-6 + 0.5 * (0.004 - 1e-6), rel=1e-4)
    assert lr(total) == pytest.approx(1e-6)
    assert lr(total + 100) == pytest.approx(1e-6)


def test_weight_decay_momentum_cosine(cfg):
    total = 100 * 1250
    assert float(schedules.weight_decay(cfg, 0)) == pytest.approx(0.04)
    assert float(schedules.weight_decay(cfg, total // 2)) == pytest.approx(0.22, rel=1e-4)
    assert float(schedules.weight_decay(cfg, total)) == pytest.approx(0.4)
    assert float(schedules.teacher_momentum(cfg, 0)) == pytest.approx(0.992)
    assert float(schedules.teacher_momentum(cfg, total // 2)) == pytest.approx(0.996, rel=1e-6)
    assert float(schedules.teacher_momentum(cfg, total)) == pytest.approx(1.0)


def test_teacher_temperature_warmup(cfg):
    warm = 30 * 1250
    tt = lambda s: float(schedules.teacher_temperature(cfg, s))  # noqa: E731
    assert tt(0) == pytest.approx(0.04)
    assert tt(warm - 1) == pytest.approx(0.07)
    assert tt((warm - 1) / 2) == pytest.approx(0.055, rel=1e-5)
    assert tt(warm) == pytest.approx(0.07)
    assert tt(10 * warm) == pytest.approx(0.07)


def test_last_layer_frozen_first_epoch(cfg):
    assert float(schedules.last_layer_trainable(cfg, 0)) == 0.0
    assert float(schedules.last_layer_trainable(cfg, 1249)) == 0.0
    assert float(schedules.last_layer_trainable(cfg, 1250)) == 1.0


def test_schedules_match_numpy_cosine(cfg):
    """The whole lr curve against an independent numpy build of DINOv2's schedule."""
    total, warm = 100 * 1250, 10 * 1250
    steps = np.arange(0, total + 10, 997)
    warmup = np.linspace(0, 0.004, warm)
    iters = np.arange(total - warm)
    cos = 1e-6 + 0.5 * (0.004 - 1e-6) * (1 + np.cos(np.pi * iters / len(iters)))
    ref = np.concatenate([warmup, cos])
    expect = np.array([ref[s] if s < total else 1e-6 for s in steps])
    got = np.array([float(schedules.learning_rate(cfg, s)) for s in steps])
    np.testing.assert_allclose(got, expect, rtol=2e-5, atol=1e-9)
