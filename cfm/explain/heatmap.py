"""Heatmaps over a slide thumbnail: attention (MIL), class maps and densities (TME).

A thumbnail is an RGB image plus where it sits in level-0 pixels (`Thumb`): either read from the
slide with OpenSlide (`thumbnail_from_slide`) or assembled from the tiles themselves
(`thumbnail_from_tiles`, which needs nothing but the tile shards and works for any slide that
was tiled, including after the slide file is gone). Per-tile values are painted onto the tile's
footprint (x, y, x + fx, y + fy in level-0 px) with a colour map and blended over the
thumbnail; the PNG has exactly the thumbnail's shape, so it lines up pixel for pixel.

Tile footprints: `data_prep.tile_wsi` places tiles on a grid whose step is the footprint, so the
footprint is the smallest positive step between tile corners (`infer_footprint`); an axis with
a single coordinate takes the other axis's step, and a slide with a single tile the caller's
fallback (cfm.finetune.tme: the tiles' `tile_size`).
"""

from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

# Colours of the TME classes (RGB), shared by maps, legends and data_prep.synthetic_tme truth.
CLASS_COLOURS = {"tumour": (214, 39, 40), "stroma": (247, 182, 210), "immune": (31, 119, 180),
                 "background": (240, 240, 240), "other": (150, 150, 150)}


class Thumb(NamedTuple):
    """A slide thumbnail and where it sits in level-0 pixels."""

    image: np.ndarray  # uint8 [H, W, 3]
    origin: tuple[float, float]  # level-0 (x, y) of the thumbnail's top-left pixel
    scale: tuple[float, float]  # level-0 px per thumbnail px in x and y


def infer_footprint(xs: Sequence[int], ys: Sequence[int], fallback: float
                    ) -> tuple[float, float]:
    """Level-0 footprint (fx, fy) of grid tiles: the smallest positive step between distinct
    corner coordinates along each axis, or `fallback` where an axis has one value only."""
    out = []
    for v in (xs, ys):
        u = np.unique(np.asarray(v, np.float64))
        steps = np.diff(u)
        out.append(float(steps[steps > 0].min()) if (steps > 0).any() else float(fallback))
    if len(np.unique(xs)) < 2 and len(np.unique(ys)) >= 2:
        out[0] = out[1]
    if len(np.unique(ys)) < 2 and len(np.unique(xs)) >= 2:
        out[1] = out[0]
    return out[0], out[1]


def thumbnail_from_tiles(images: Sequence[np.ndarray], xs: Sequence[int], ys: Sequence[int],
                         footprint: tuple[float, float], px: int = 16) -> Thumb:
    """A thumbnail of `px` pixels per tile footprint, white where there is no tile."""
    xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    fx, fy = footprint
    x0, y0 = float(xs.min()), float(ys.min())
    cols, rows = np.round((xs - x0) / fx).astype(int), np.round((ys - y0) / fy).astype(int)
    canvas = np.full(((rows.max() + 1) * px, (cols.max() + 1) * px, 3), 255, np.uint8)
    for img, c, r in zip(images, cols, rows):
        small = np.asarray(Image.fromarray(np.asarray(img, np.uint8)).resize((px, px),
                                                                            Image.BILINEAR))
        canvas[r * px:(r + 1) * px, c * px:(c + 1) * px] = small[..., :3]
    return Thumb(canvas, (x0, y0), (fx / px, fy / px))


def thumbnail_from_slide(path: str, max_side: int = 1024) -> Thumb:
    """The slide's thumbnail (longest side `max_side`) read with OpenSlide."""
    import openslide  # optional: openslide-python (extra "slides")

    with openslide.OpenSlide(path) as slide:
        w, h = slide.dimensions
        img = slide.get_thumbnail((max_side, max_side)).convert("RGB")
    image = np.asarray(img)
    return Thumb(image, (0.0, 0.0), (w / image.shape[1], h / image.shape[0]))


def _boxes(thumb: Thumb, xs, ys, footprint) -> np.ndarray:
    """[N, 4] integer thumbnail boxes (x0, y0, x1, y1), x1/y1 exclusive, at least 1 px."""
    (ox, oy), (sx, sy) = thumb.origin, thumb.scale
    x0 = (np.asarray(xs, np.float64) - ox) / sx
    y0 = (np.asarray(ys, np.float64) - oy) / sy
    x1, y1 = x0 + footprint[0] / sx, y0 + footprint[1] / sy
    b = np.stack([np.floor(x0), np.floor(y0), np.ceil(x1), np.ceil(y1)], 1).astype(int)
    b[:, 2] = np.maximum(b[:, 2], b[:, 0] + 1)
    b[:, 3] = np.maximum(b[:, 3], b[:, 1] + 1)
    h, w = thumb.image.shape[:2]
    b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, w)
    b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, h)
    return b


def paint(thumb: Thumb, xs, ys, footprint, colours: np.ndarray, alpha: float = 0.5
          ) -> np.ndarray:
    """The thumbnail with each tile's footprint blended with its RGB colour ([N, 3]; rows with
    NaN are left unpainted). uint8 [H, W, 3], the thumbnail's shape."""
    base = thumb.image.astype(np.float32)
    layer = base.copy()
    cover = np.zeros(base.shape[:2], bool)
    for (x0, y0, x1, y1), c in zip(_boxes(thumb, xs, ys, footprint), colours):
        if np.any(np.isnan(c)):
            continue
        layer[y0:y1, x0:x1] = c
        cover[y0:y1, x0:x1] = True
    out = base.copy()
    out[cover] = (1 - alpha) * base[cover] + alpha * layer[cover]
    return np.clip(out, 0, 255).astype(np.uint8)


def value_colours(values, cmap: str = "inferno", vmin: float | None = None,
                  vmax: float | None = None) -> np.ndarray:
    """[N, 3] RGB (0-255) of `values` under a matplotlib colour map; NaN stays NaN."""
    v = np.asarray(values, np.float64)
    ok = np.isfinite(v)
    lo = np.nanmin(v[ok]) if vmin is None and ok.any() else (vmin or 0.0)
    hi = np.nanmax(v[ok]) if vmax is None and ok.any() else (vmax if vmax is not None else 1.0)
    t = np.clip((v - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    rgb = colormaps[cmap](np.where(ok, t, 0.0))[:, :3] * 255.0
    rgb[~ok] = np.nan
    return rgb


def save_png(image: np.ndarray, path: str) -> str:
    """Write a uint8 RGB array as PNG (parent folders made); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.asarray(image, np.uint8)).save(path, format="PNG")
    return path


def heatmap_png(thumb: Thumb, xs, ys, footprint, values, path: str, cmap: str = "inferno",
                alpha: float = 0.55, vmin: float | None = None, vmax: float | None = None
                ) -> str:
    """Per-tile `values` (e.g. MIL attention) as a colour-mapped overlay on the thumbnail,
    written as a PNG of exactly the thumbnail's shape."""
    return save_png(paint(thumb, xs, ys, footprint, value_colours(values, cmap, vmin, vmax),
                          alpha), path)


def class_map_png(thumb: Thumb, xs, ys, footprint, labels: Sequence[str], path: str,
                  alpha: float = 0.6) -> str:
    """Per-tile class names painted in CLASS_COLOURS over the thumbnail (thumbnail's shape)."""
    colours = np.array([CLASS_COLOURS.get(c, CLASS_COLOURS["other"]) for c in labels],
                       np.float64)
    return save_png(paint(thumb, xs, ys, footprint, colours, alpha), path)


def panel_png(images: Sequence[np.ndarray], titles: Sequence[str], path: str,
              legend: dict | None = None, colorbar: tuple | None = None) -> str:
    """Side-by-side figure for reports: images with titles, an optional class legend
    ({name: rgb}) and an optional colour bar (cmap, vmin, vmax, label)."""
    fig = Figure(figsize=(4 * len(images), 4.2))
    axes = fig.subplots(1, len(images))
    axes = np.atleast_1d(axes)
    for ax, img, title in zip(axes, images, titles):
        ax.imshow(img)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    if legend:
        axes[-1].legend(handles=[Patch(color=np.array(c) / 255, label=n)
                                 for n, c in legend.items()], loc="lower right", fontsize=7)
    if colorbar:
        cmap, lo, hi, label = colorbar
        sm = ScalarMappable(cmap=cmap, norm=Normalize(lo, hi))
        fig.colorbar(sm, ax=axes[-1], fraction=0.046, pad=0.02, label=label)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
