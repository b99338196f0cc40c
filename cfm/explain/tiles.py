"""Top tiles as an image grid (PNG): the tiles a MIL model attends to most, or the most
confident tiles of a TME class, so a pathologist can check what the score rests on."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from cfm.data.sources import ShardSource


def read_tiles(shards: str, rows: Sequence[int]) -> list[np.ndarray]:
    """uint8 RGB tiles number `rows` of the shards under `shards` (ShardSource order)."""
    source = ShardSource(shards)
    return [source.tile(int(i))[0] for i in rows]


def top_indices(scores: Sequence[float], k: int) -> np.ndarray:
    """Indices of the k highest finite scores, highest first (ties by index)."""
    s = np.asarray(scores, np.float64)
    ok = np.flatnonzero(np.isfinite(s))
    order = ok[np.lexsort((ok, -s[ok]))]
    return order[:k]


def tile_grid_png(images: Sequence[np.ndarray], captions: Sequence[str], path: str,
                  ncols: int = 4, px: int = 96) -> str:
    """`images` resized to px x px in a grid of `ncols` columns, each with a caption strip
    under it; written as PNG. Returns the path."""
    if not len(images):
        raise ValueError("tile_grid_png: no tiles to draw")
    ncols = max(1, min(ncols, len(images)))
    nrows = -(-len(images) // ncols)
    cap = 14
    canvas = Image.new("RGB", (ncols * (px + 4) + 4, nrows * (px + cap + 4) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, text) in enumerate(zip(images, captions)):
        r, c = divmod(i, ncols)
        x, y = 4 + c * (px + 4), 4 + r * (px + cap + 4)
        tile = Image.fromarray(np.asarray(img, np.uint8)).convert("RGB").resize((px, px),
                                                                                Image.BILINEAR)
        canvas.paste(tile, (x, y))
        draw.text((x + 1, y + px + 1), str(text)[:18], fill=(0, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path, format="PNG")
    return path


def top_tiles_png(images: Sequence[np.ndarray], scores: Sequence[float], path: str, k: int = 16,
                  ncols: int = 4, label: str = "") -> str:
    """The k highest-scoring tiles as a grid, captioned with their score (and `label`)."""
    idx = top_indices(scores, k)
    return tile_grid_png([images[i] for i in idx],
                         [f"{label}{float(scores[i]):.3g}" for i in idx], path, ncols)
