"""Tissue segmentation on a low-resolution slide thumbnail, and tissue fractions of rectangles.

Pipeline (the usual CLAM-style recipe, written from scratch here): HSV saturation of the
thumbnail -> median blur (removes speckle) -> threshold (Otsu, floored so a blank slide stays
blank, or a fixed value) -> morphological closing (bridges thin gaps between nuclei/stroma) ->
removal of connected components below a minimum area -> filling of holes below a maximum area
(keeps large lumina as background). Stained tissue is saturated; glass and background are not.

Sizes are in microns and areas in square microns, so presets behave the same at any thumbnail
resolution; `TissueMask.fraction` answers queries in level-0 slide pixels.
"""

import dataclasses
import functools

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage


@dataclasses.dataclass(frozen=True)
class TissuePreset:
    """Segmentation parameters. Saturation values are on PIL's 0-255 HSV scale."""

    threshold: int | None  # fixed saturation threshold, or None for Otsu
    min_threshold: int  # floor under Otsu, so faint noise on blank glass is not called tissue
    median_um: float  # median blur window side, microns
    close_um: float  # closing disk radius, microns
    min_area_um2: float  # tissue components smaller than this are dropped, square microns
    max_hole_um2: float  # holes smaller than this are filled, square microns


PRESETS: dict[str, TissuePreset] = {
    # Typical H&E: Otsu on saturation; drops dust and fragments below 0.01 mm^2.
    "default": TissuePreset(None, 20, 16.0, 16.0, 10_000.0, 40_000.0),
    # Pale or faded stains, small biopsies: low fixed threshold, keeps small fragments.
    "lenient": TissuePreset(8, 8, 8.0, 24.0, 1_000.0, 100_000.0),
    # Dirty slides: higher floor, larger minimum component.
    "strict": TissuePreset(None, 40, 24.0, 16.0, 50_000.0, 20_000.0),
}


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the t maximising between-class variance (>= t is fg)."""
    hist = np.bincount(np.asarray(values, np.uint8).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(256, dtype=np.float64)
    weight_bg = np.cumsum(hist)  # pixels with value <= t
    sum_bg = np.cumsum(hist * levels)
    weight_fg = total - weight_bg
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_bg = sum_bg / weight_bg
        mean_fg = (sum_bg[-1] - sum_bg) / weight_fg
        between = weight_bg * weight_fg * (mean_bg - mean_fg) ** 2
    between = np.nan_to_num(between, nan=-1.0)
    return int(np.argmax(between)) + 1


MAX_NETWORK_WINDOW = 7  # median windows up to 7 x 7 use the min/max network; larger ones PIL


@functools.lru_cache(maxsize=None)
def _median_network(count: int) -> tuple[tuple[int, int], ...]:
    """Comparators (low wire, high wire) of Batcher's odd-even merge sort on the next power of
    two >= count wires, pruned to those that decide wire count // 2: the median of `count`
    values once the extra wires hold 255 (above or equal to every value)."""
    wires = 1 << (count - 1).bit_length()
    comparators, p = [], 1
    while p < wires:
        k = p
        while k >= 1:
            for j in range(k % p, wires - k, 2 * k):
                for i in range(min(k, wires - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        comparators.append((i + j, i + j + k))
            k //= 2
        p *= 2
    needed, kept = {count // 2}, []
    for low, high in reversed(comparators):
        if low in needed or high in needed:
            kept.append((low, high))
            needed |= {low, high}
    return tuple(reversed(kept))


def median_filter(values: np.ndarray, size: int) -> np.ndarray:
    """PIL's `ImageFilter.MedianFilter(size)` of a uint8 [H, W] array (edges replicated).

    Windows up to MAX_NETWORK_WINDOW run as a sorting network of whole-array minima and maxima
    (Batcher 1968, "Sorting networks and their applications"), ~8x faster than PIL's per-pixel
    sort with the same output; larger windows use PIL.
    """
    if size > MAX_NETWORK_WINDOW:
        return np.asarray(Image.fromarray(values).filter(ImageFilter.MedianFilter(size)))
    radius, (height, width) = size // 2, values.shape
    padded = np.pad(values, radius, mode="edge")
    count = size * size
    wires: list[np.ndarray | None] = [padded[dy:dy + height, dx:dx + width]
                                      for dy in range(size) for dx in range(size)]
    wires += [None] * ((1 << (count - 1).bit_length()) - count)  # None: the constant 255
    for low, high in _median_network(count):
        a, b = wires[low], wires[high]
        if b is None:
            continue
        if a is None:
            wires[low], wires[high] = b, None
        else:
            wires[low], wires[high] = np.minimum(a, b), np.maximum(a, b)
    return np.ascontiguousarray(wires[count // 2])


def _disk(radius: int) -> np.ndarray:
    """Boolean disk structuring element of the given radius in pixels."""
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return xx * xx + yy * yy <= radius * radius


def segment_tissue(thumbnail: np.ndarray | Image.Image, thumb_mpp: float,
                   preset: str | TissuePreset = "default") -> np.ndarray:
    """Bool mask [H, W] of tissue in an RGB thumbnail whose pixels are `thumb_mpp` microns."""
    params = PRESETS[preset] if isinstance(preset, str) else preset
    image = thumbnail if isinstance(thumbnail, Image.Image) else Image.fromarray(
        np.asarray(thumbnail, np.uint8))
    saturation = image.convert("RGB").convert("HSV").getchannel("S")
    median = int(round(params.median_um / thumb_mpp)) | 1  # odd window
    sat = median_filter(np.asarray(saturation), median) if median >= 3 else np.asarray(saturation)
    if params.threshold is None:
        threshold = max(otsu_threshold(sat), params.min_threshold)
    else:
        threshold = params.threshold
    mask = sat >= threshold
    radius = int(round(params.close_um / thumb_mpp))
    if radius >= 1 and mask.any():
        padded = np.pad(mask, radius)  # so closing does not erode at the thumbnail border
        mask = ndimage.binary_closing(padded, _disk(radius))[radius:-radius, radius:-radius]
    pixel_area = thumb_mpp * thumb_mpp
    labels, count = ndimage.label(mask)
    if count:
        areas = np.bincount(labels.ravel())[1:] * pixel_area
        keep = np.concatenate([[False], areas >= params.min_area_um2])
        mask = keep[labels]
    holes, count = ndimage.label(~mask)
    if count:
        areas = np.bincount(holes.ravel()) * pixel_area
        border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
        fill = areas < params.max_hole_um2
        fill[0] = False
        fill[border] = False  # background touching the border is not a hole
        mask = mask | fill[holes]
    return mask


@dataclasses.dataclass
class TissueMask:
    """A tissue mask whose pixels each cover `scale_x` x `scale_y` level-0 slide pixels."""

    mask: np.ndarray
    scale_x: float
    scale_y: float

    def fraction(self, x: float, y: float, width: float, height: float) -> float:
        """Tissue fraction (0-1) of the level-0 rectangle [x, x+width) x [y, y+height).

        Area-weighted: mask pixels partly inside the rectangle count with their overlap, so the
        answer does not jump with sub-pixel shifts. Parts outside the mask count as background.
        """
        if width <= 0 or height <= 0:
            return 0.0
        wx = _overlaps(x / self.scale_x, (x + width) / self.scale_x, self.mask.shape[1])
        wy = _overlaps(y / self.scale_y, (y + height) / self.scale_y, self.mask.shape[0])
        if wx is None or wy is None:
            return 0.0
        (c0, col_w), (r0, row_w) = wx, wy
        block = self.mask[r0:r0 + len(row_w), c0:c0 + len(col_w)].astype(np.float64)
        covered = row_w @ block @ col_w
        return float(covered / ((width / self.scale_x) * (height / self.scale_y)))


def _overlaps(start: float, stop: float, size: int):
    """(first index, per-pixel overlap lengths) of [start, stop) with pixels 0..size-1."""
    first, last = max(int(np.floor(start)), 0), min(int(np.ceil(stop)), size)
    if last <= first:
        return None
    edges = np.arange(first, last + 1, dtype=np.float64)
    lo = np.maximum(edges[:-1], start)
    hi = np.minimum(edges[1:], stop)
    return first, np.clip(hi - lo, 0.0, None)
