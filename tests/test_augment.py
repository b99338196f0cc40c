"""Multi-crop augmentation: shapes, determinism, and that each forced augmentation does its job."""

import importlib.util
import pathlib

import numpy as np
import pytest

from cfm.data.augment import MultiCrop
from cfm.data.sources import SyntheticSource

_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "dino_vit.py"


def _config():
    spec = importlib.util.spec_from_file_location("dino_vit_config", _CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("test")


def _plain_config():
    """Test config with every augmentation off except the random-resized crop."""
    c = _config()
    a = c.augment
    a.hflip = a.vflip = a.color_jitter = a.grayscale = a.solarize = 0.0
    a.rot90 = False
    a.blur = (0.0, 0.0, 0.0)
    return c


def _crops(config, seed, image):
    out = MultiCrop(config.crops, config.augment)(image, np.random.default_rng(seed))
    return out["global_crops"], out["local_crops"]


@pytest.fixture(scope="module")
def image():
    return SyntheticSource(4, 48, seed=0)[1]


def test_shapes_and_dtypes_on_a_non_square_image():
    c = _config()
    img = np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    g, loc = _crops(c, 0, img)
    assert g.shape == (2, 32, 32, 3) and g.dtype == np.uint8
    assert loc.shape == (c.crops.n_local, 16, 16, 3) and loc.dtype == np.uint8


def test_deterministic_per_generator(image):
    c = _config()
    a, b, other = _crops(c, 5, image), _crops(c, 5, image), _crops(c, 6, image)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], other[0])


@pytest.mark.parametrize("key,axis", [("hflip", 2), ("vflip", 1)])
def test_forced_flip_flips_every_crop(image, key, axis):
    base = _plain_config()
    flipped = _plain_config()
    setattr(flipped.augment, key, 1.0)
    for seed in range(3):
        for x, y in zip(_crops(base, seed, image), _crops(flipped, seed, image)):
            assert not np.array_equal(x, y)
            assert np.array_equal(np.flip(x, axis=axis), y)


def test_forced_rot90_rotates_by_multiples_of_90(image):
    base = _plain_config()
    rotated = _plain_config()
    rotated.augment.rot90 = True
    ks = []
    for seed in range(4):
        for xs, ys in zip(_crops(base, seed, image), _crops(rotated, seed, image)):
            for x, y in zip(xs, ys):
                k = [k for k in range(4) if np.array_equal(np.rot90(x, k, axes=(0, 1)), y)]
                assert k, "each crop must be a 90-degree rotation of the unrotated crop"
                ks.append(k[0])
    assert len(set(ks)) == 4  # all four rotations occur


def test_solarize_only_touches_the_second_global_crop(image):
    base = _plain_config()
    sol = _plain_config()
    sol.augment.solarize = 1.0
    (g0, l0), (g1, l1) = _crops(base, 0, image), _crops(sol, 0, image)
    assert np.array_equal(g0[0], g1[0]) and np.array_equal(l0, l1)
    expected = np.where(g0[1] >= 128, 255 - g0[1], g0[1])
    assert np.array_equal(g1[1], expected) and not np.array_equal(g0[1], g1[1])


def test_colour_ops_and_blur_change_pixels(image):
    base = _plain_config()
    gray = _plain_config()
    gray.augment.grayscale = 1.0
    g, _ = _crops(gray, 0, image)
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 1], g[..., 2])
    jitter = _plain_config()
    jitter.augment.color_jitter = 1.0
    blur = _plain_config()
    blur.augment.blur = (1.0, 1.0, 1.0)
    g0, _ = _crops(base, 0, image)
    gj, _ = _crops(jitter, 0, image)
    gb, _ = _crops(blur, 0, image)
    assert not np.array_equal(g0, gj)
    # A blur lowers the energy of horizontal pixel differences.
    diff = lambda x: np.abs(np.diff(x.astype(np.float32), axis=2)).mean()  # noqa: E731
    assert diff(gb) < diff(g0)


def test_rejects_non_uint8_rgb():
    c = _config()
    with pytest.raises(ValueError, match="uint8"):
        _crops(c, 0, np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        _crops(c, 0, np.zeros((32, 32), np.uint8))
