"""Multi-crop augmentation: shapes, determinism, and that each forced augmentation does its job."""

import hashlib

import numpy as np
import PIL
import pytest
from PIL import Image

from cfm.data import augment
from cfm.data.augment import _N_DRAWS, _N_HED_DRAWS, MultiCrop, hed_jitter, hed_to_rgb, rgb_to_hed
from cfm.data.sources import SyntheticSource
from tests.conftest import load_config

def _preset(name):
    return load_config("dino_vit.py", name)


def _config():
    return _preset("test")


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


# SHA-256 of the crops below as the code produced them before the stain jitter, extended context
# and table hue shift existed (Pillow 13.0.0, numpy 2.4.6). Pillow's resampling/blur rounding is
# not promised across major versions, hence the skip; a mismatch on the same version means the
# default recipe's random choices or outputs changed.
_GOLDEN_SHA256 = "9d00b84bbb6dbf822eab670cf2f767d126d6d60219d19387f6ac7da63c664998"


def _pattern(height: int, width: int, k: int) -> np.ndarray:
    """A textured uint8 RGB test image from integer arithmetic only (no RNG, no libm)."""
    y, x, c = np.indices((height, width, 3))
    value = x * x * 7 + y * y * 3 + 13 * (c + 1) * y + 5 * x * y + 41 * k * (c + 2)
    return (value % 256).astype(np.uint8)


def test_default_outputs_are_unchanged():
    if PIL.__version__.split(".")[0] != "13":
        pytest.skip(f"golden digest computed with Pillow 13, this is {PIL.__version__}")
    digest = hashlib.sha256()
    for preset, size, n in (("test", 48, 6), ("vit_l16", 256, 2)):  # vit_l16: table hue path
        c = _preset(preset)
        c.augment.hed_jitter = 0.0
        assert not c.crops.extended_context
        multicrop = MultiCrop(c.crops, c.augment)
        for i in range(n):
            out = multicrop(_pattern(size, size + 8, i), np.random.default_rng([7, i]))
            digest.update(out["global_crops"].tobytes())
            digest.update(out["local_crops"].tobytes())
    assert digest.hexdigest() == _GOLDEN_SHA256


def test_hue_lookup_tables_reproduce_pil():
    """The table path of the hue shift (crops >= 96 x 96) is PIL's HSV round trip, exactly."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (96, 100, 3), dtype=np.uint8), "RGB")
    assert img.width * img.height >= augment._HUE_LUT_MIN_PIXELS
    for shift in (0, 1, 26, 128, 230, 255):
        h, s, v = img.convert("HSV").split()
        h = h.point([(i + shift) % 256 for i in range(256)])
        expected = np.asarray(Image.merge("HSV", (h, s, v)).convert("RGB"))
        assert np.array_equal(np.asarray(augment._hue_shift(img, shift)), expected)


# HED stain jitter (Tellez et al. 2018, 2019) -----------------------------------------------------

def _all_colours(step: int) -> np.ndarray:
    """Every `step`-th level of each channel, as uint8 [n, 3]."""
    levels = np.arange(0, 256, step)
    return np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3).astype(
            np.uint8)


def test_hed_conversion_matches_skimage_and_round_trips():
    skcolor = pytest.importorskip("skimage.color")
    rgb = _all_colours(3)
    hed = rgb_to_hed(rgb)
    # skimage clips negative concentrations at 0; cfm keeps them so that the inverse is exact.
    np.testing.assert_allclose(np.maximum(hed, 0), skcolor.rgb2hed(rgb), atol=1e-5)
    stains = np.random.default_rng(0).normal(0.0, 0.3, (4096, 3))
    np.testing.assert_allclose(hed_to_rgb(stains), skcolor.hed2rgb(stains), atol=1e-5)
    back = np.clip(np.rint(hed_to_rgb(hed) * 255), 0, 255).astype(np.uint8)
    assert np.array_equal(back, rgb)
    # The fused jitter with alpha = 1, beta = 0 is the identity on every colour.
    assert np.array_equal(hed_jitter(rgb, np.full(6, 0.5), 0.05), rgb)


def test_hed_jitter_matches_the_skimage_round_trip():
    skcolor = pytest.importorskip("skimage.color")
    rgb = _all_colours(5)
    u = np.random.default_rng(1).random(6)
    sigma = 0.1
    alpha, beta = 1 - sigma + 2 * sigma * u[:3], -sigma + 2 * sigma * u[3:]
    expected = skcolor.hed2rgb(rgb_to_hed(rgb).astype(np.float64) * alpha + beta)
    expected = np.clip(np.floor(expected * 255 + 0.5), 0, 255)
    assert np.abs(hed_jitter(rgb, u, sigma).astype(int) - expected).max() <= 1  # float32


def test_hed_jitter_changes_default_crops(image):
    """On the default recipe the stain jitter recolours every sample, in range."""
    base = _config()
    jit = _config()
    jit.augment.hed_jitter = 0.05
    for seed in range(3):
        g0, l0 = _crops(base, seed, image)
        g1, l1 = _crops(jit, seed, image)
        assert g1.dtype == np.uint8 and g1.shape == g0.shape and l1.shape == l0.shape
        assert not np.array_equal(g0, g1) and not np.array_equal(l0, l1)
    # Exact form of 'only colours': test_hed_jitter_is_the_jitter_of_the_unjittered_crop.


def test_hed_jitter_is_the_jitter_of_the_unjittered_crop(image):
    """With the other photometric ops off, the jittered crop is hed_jitter(crop, its draws)."""
    plain, plain_jit = _plain_config(), _plain_config()
    for c in (plain, plain_jit):  # geometric ops on: the stain jitter must not move them
        c.augment.hflip = c.augment.vflip = 0.5
        c.augment.rot90 = True
    plain_jit.augment.hed_jitter = 0.08
    n = 2 + plain.crops.n_local
    rng = np.random.default_rng(4)
    rng.random((n, _N_DRAWS))
    u_hed = rng.random((n, _N_HED_DRAWS))
    g0, l0 = _crops(plain, 4, image)
    g1, l1 = _crops(plain_jit, 4, image)
    for i, (a, b) in enumerate(list(zip(g0, g1)) + list(zip(l0, l1))):
        assert np.array_equal(b, hed_jitter(a, u_hed[i], 0.08))


def test_hed_jitter_stays_in_range_on_extreme_colours():
    rgb = _all_colours(15)
    for u in (np.zeros(6), np.ones(6) - 1e-9, np.random.default_rng(2).random(6)):
        out = hed_jitter(rgb, u, 0.5)
        assert out.dtype == np.uint8 and out.shape == rgb.shape
    # Values past the ends clip rather than wrap round: lowering every concentration of white
    # would ask for more than 255, raising them darkens it.
    white = np.full((4, 3), 255, np.uint8)
    assert np.array_equal(hed_jitter(white, np.array([0.5] * 3 + [0.0] * 3), 0.5), white)
    assert hed_jitter(white, np.array([0.5] * 3 + [1 - 1e-9] * 3), 0.5).max() < 128
    black = np.zeros((4, 3), np.uint8)
    assert np.array_equal(hed_jitter(black, np.array([1 - 1e-9] * 3 + [0.5] * 3), 0.5), black)


def test_rejects_bad_hed_sigma():
    c = _config()
    c.augment.hed_jitter = 1.5
    with pytest.raises(ValueError, match="hed_jitter"):
        MultiCrop(c.crops, c.augment)


# Virchow2 extended-context translation (Zimmermann et al. 2024) ---------------------------------

def _is_window(crop: np.ndarray, image: np.ndarray) -> bool:
    g = crop.shape[0]
    for top in range(image.shape[0] - g + 1):
        for left in range(image.shape[1] - g + 1):
            if np.array_equal(image[top:top + g, left:left + g], crop):
                return True
    return False


def test_extended_context_global_crops_are_exact_windows():
    c = _plain_config()
    c.crops.extended_context = True
    img = SyntheticSource(2, 45, seed=1)[0][:, :40]  # non-square, larger than global_size=32
    offsets = set()
    for seed in range(6):
        g, loc = _crops(c, seed, img)
        assert g.shape == (2, 32, 32, 3) and loc.shape == (c.crops.n_local, 16, 16, 3)
        for crop in g:
            assert _is_window(crop, img)  # never resized
            offsets.add(crop.tobytes())
    assert len(offsets) > 6  # the windows move
    # Local crops keep their random-resized-crop behaviour: same as without extended context.
    base = _plain_config()
    for seed in range(3):
        assert np.array_equal(_crops(c, seed, img)[1], _crops(base, seed, img)[1])


def test_extended_context_still_flips_and_recolours():
    c = _config()
    c.crops.extended_context = True
    c.augment.hflip = 1.0
    img = SyntheticSource(2, 40, seed=1)[0]
    plain = _plain_config()
    plain.crops.extended_context = True
    plain.augment.hflip = 1.0
    g, _ = _crops(plain, 0, img)
    assert all(_is_window(np.flip(x, 1), img) for x in g)
    g_full, _ = _crops(c, 3, img)
    assert not any(_is_window(np.flip(x, 1), img) for x in g_full[:1])  # blur p=1 on crop 1


def test_extended_context_rejects_small_tiles():
    c = _config()
    c.crops.extended_context = True
    img = np.zeros((40, 31, 3), np.uint8)
    with pytest.raises(ValueError, match="crops.extended_context"):
        _crops(c, 0, img)
    _crops(c, 0, np.zeros((32, 32, 3), np.uint8))  # exactly global_size is fine
