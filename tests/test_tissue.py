"""Tissue segmentation: Otsu, presets, component/hole clean-up, rectangle tissue fractions."""

import numpy as np
import pytest

from data_prep import tissue


def _slide(size=(200, 300), seed=0):
    """White 'glass' with a pink textured disk (tissue), a 2 px speck and a small hole."""
    rng = np.random.default_rng(seed)
    image = np.full(size + (3,), 245, np.uint8)
    yy, xx = np.mgrid[:size[0], :size[1]]
    disk = (yy - 100) ** 2 + (xx - 120) ** 2 < 60 ** 2
    pink = np.array([200, 110, 180]) + rng.integers(-30, 30, size + (3,))
    image[disk] = np.clip(pink, 0, 255)[disk]
    hole = (yy - 100) ** 2 + (xx - 120) ** 2 < 4 ** 2
    image[hole] = 245
    image[20:22, 250:252] = (200, 60, 150)  # dust: far below the minimum area
    return image, disk


def test_otsu_splits_two_modes():
    values = np.concatenate([np.full(500, 10), np.full(300, 200)]).astype(np.uint8)
    threshold = tissue.otsu_threshold(values)
    assert 10 < threshold <= 200


def test_default_mask_keeps_disk_drops_speck_fills_hole():
    image, disk = _slide()
    mask = tissue.segment_tissue(image, thumb_mpp=4.0)
    assert mask.dtype == bool and mask.shape == disk.shape
    assert (mask & disk).sum() / disk.sum() > 0.97  # the disk, hole filled
    assert mask[100, 120]  # the hole
    assert not mask[18:25, 247:255].any()  # the speck
    assert (mask & ~disk).sum() / disk.sum() < 0.05


def test_blank_slide_has_no_tissue():
    rng = np.random.default_rng(1)
    blank = np.clip(240 + rng.integers(-3, 4, (120, 160, 3)), 0, 255).astype(np.uint8)
    for preset in tissue.PRESETS:
        assert not tissue.segment_tissue(blank, 4.0, preset).any()


def test_lenient_keeps_more_than_strict():
    image, _ = _slide()
    image[150:170, 10:40] = (225, 200, 215)  # a faint, pale fragment (20 x 30 px)
    lenient = tissue.segment_tissue(image, 4.0, "lenient")
    strict = tissue.segment_tissue(image, 4.0, "strict")
    assert lenient[160, 25] and not strict[160, 25]


def test_fraction_is_area_weighted_in_level0_pixels():
    mask = np.zeros((4, 4), bool)
    mask[:, :2] = True  # left half is tissue
    tm = tissue.TissueMask(mask, scale_x=10.0, scale_y=10.0)  # 1 mask px = 10 level-0 px
    assert tm.fraction(0, 0, 20, 40) == pytest.approx(1.0)
    assert tm.fraction(20, 0, 20, 40) == pytest.approx(0.0)
    assert tm.fraction(0, 0, 40, 40) == pytest.approx(0.5)
    assert tm.fraction(15, 0, 10, 10) == pytest.approx(0.5)  # straddles the boundary
    assert tm.fraction(30, 30, 40, 40) == pytest.approx(0.0)  # mostly outside: background
    assert tm.fraction(0, 0, 0, 10) == 0.0


def test_real_slide_tissue_fraction(shared_data):
    openslide = pytest.importorskip("openslide", exc_type=ImportError)
    slide = openslide.OpenSlide(str(shared_data / "wsi" / "CMU-1-Small-Region.svs"))
    image = slide.read_region((0, 0), 0, slide.dimensions).convert("RGB")
    thumb = image.resize((image.width // 8, image.height // 8))
    mask = tissue.segment_tissue(thumb, 0.499 * 8)
    # The crop is roughly one third tissue (checked on the QC image); background corners empty.
    assert 0.2 < mask.mean() < 0.6
    assert not mask[:10, :10].any()
