"""Reading, filtering and encoding the tiles of one slide in blocks, on threads (the pixel half of
`data_prep.tile_wsi`).

A block is a run of up to MAX_RUN neighbouring tissue tiles of one grid row, read with one call
and cut into tiles in numpy. That gives the same pixels as one read per tile wherever both land
on whole level pixels: at level 0, and at a coarser level with an integral downsample when every
tile starts on a multiple of it. OpenSlide interpolates between pixels at fractional level
coordinates (Aperio levels have downsamples like 4.003), so there each tile is read alone, as
before. Stored JPEG tiles of tiled-JPEG TIFF levels are decoded once each by PIL
(`data_prep.slide_jpeg`); the level-0 pixels read for the thumbnail of a single-level slide are
kept and cut again, so such a slide is decoded once. Blocks are read, filtered and encoded on
`threads` threads (OpenSlide, PIL and numpy release the GIL); tiles come back in grid order, so
the output does not depend on the thread count.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io

import numpy as np
from PIL import Image

from data_prep.slide_io import reduce_region
from data_prep.slide_jpeg import jpeg_levels

MAX_RUN = 8  # tiles per block: 8 x 224 px wide reads
KEEP_LEVEL_PIXELS = 48_000_000  # a single-level slide up to this size stays decoded (144 MB)
# Tile filters, on the resized uint8 RGB tile.
WHITE_LEVEL = 220  # a pixel with all of R, G, B above this is background
MAX_WHITE_FRACTION = 0.75  # more background than this -> dropped
BLUR_MIN_LAPLACIAN_VAR = 40.0
# Blur: variance of the 4-neighbour Laplacian of grey levels (0-255). Sharp H&E tissue tiles of
# CMU-1-Small-Region score 500-3800; a 3 px Gaussian blur brings them far below this.
# Pen: strongly saturated green-to-blue pixels or black ones. On CMU-1-Small-Region, H&E tissue
# tiles have at most ~5% such pixels (bluish haematoxylin); marker-covered tiles far more.
PEN_MIN_SATURATION = 120  # PIL HSV scale 0-255
PEN_HUE_RANGE = (40, 165)  # PIL hue 0-255 (~56-233 degrees): green through blue; eosin ~230-255
BLACK_MAX_VALUE = 40  # HSV value below this is black ink (or a fold)
MAX_PEN_FRACTION = 0.15  # more ink-coloured pixels than this -> dropped
_GREY = np.array([0.299, 0.587, 0.114], np.float32)


def tile_rejection(rgb: np.ndarray) -> str | None:
    """Why a uint8 RGB tile is dropped ('background', 'blur', 'pen'), or None to keep it."""
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    darkest = np.minimum(np.minimum(red, green), blue)
    if (darkest > WHITE_LEVEL).mean() > MAX_WHITE_FRACTION:
        return "background"
    grey = rgb.astype(np.float32) @ _GREY
    laplacian = (grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:]
                 - 4.0 * grey[1:-1, 1:-1])
    if laplacian.var() < BLUR_MIN_LAPLACIAN_VAR:
        return "blur"
    if not _may_be_pen(red, green, blue, darkest):
        return None
    hsv = np.asarray(Image.fromarray(rgb).convert("HSV"))
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    ink = (sat >= PEN_MIN_SATURATION) & (hue >= PEN_HUE_RANGE[0]) & (hue <= PEN_HUE_RANGE[1])
    if (ink | (val < BLACK_MAX_VALUE)).mean() > MAX_PEN_FRACTION:
        return "pen"
    return None


def _may_be_pen(red: np.ndarray, green: np.ndarray, blue: np.ndarray,
                darkest: np.ndarray) -> bool:
    """False when too few pixels can be ink or black for the pen test (PIL HSV) to fire.

    Integer superset of the test's pixels: saturation (max - min) / max >= 119/255 (the test
    asks 120/255, truncated), hue >= PEN_HUE_RANGE[0] (56.5 degrees) only where green >=
    red - (max - min) / 15 (56.5 degrees needs green >= red - 0.059 (max - min)), and value
    (max) < BLACK_MAX_VALUE exactly. H&E tissue is pink to purple (hue ~280-340 degrees), so
    this skips the HSV conversion, the costliest filter, for nearly every tissue tile.
    """
    brightest = np.maximum(np.maximum(red, green), blue)
    chroma = brightest - darkest
    saturated = chroma.astype(np.uint16) * 255 >= brightest.astype(np.uint16) * 119
    hue_ok = (green.astype(np.int16) - red.astype(np.int16)) * 15 + chroma >= 0
    candidates = np.count_nonzero((saturated & hue_ok) | (brightest < BLACK_MAX_VALUE))
    return candidates > MAX_PEN_FRACTION * brightest.size


class BlockReader:
    """Level regions of an open slide as uint8 RGB arrays, by the fastest exact route."""

    def __init__(self, reader, path: str, threads: int = 1):
        self.reader = reader
        self.fast = jpeg_levels(path, reader)
        self.level0: np.ndarray | None = None  # the whole level 0, when kept (see module doc)
        self.keep_pixels = KEEP_LEVEL_PIXELS
        self.pool = concurrent.futures.ThreadPoolExecutor(threads) if threads > 1 else None

    def aligned(self, level: int, xs, ys) -> bool:
        """Whether reads at `level` starting at these level-0 coordinates are whole-pixel."""
        if level == 0:
            return True
        down = self.reader.level_downsamples[level]
        step = int(round(down))
        return (abs(down - step) < 1e-9 and all(x % step == 0 for x in xs)
                and all(y % step == 0 for y in ys))

    def read(self, x: int, y: int, level: int, width: int, height: int,
             parallel: bool = False) -> np.ndarray:
        """[height, width, 3] uint8 RGB of `level` whose top-left is level-0 (x, y).

        `parallel`: decode stored tiles on the threads (only from outside them).
        """
        if level == 0 and self.level0 is not None:
            return _crop(self.level0, x, y, width, height)
        fast = self.fast.get(level)
        step = int(round(self.reader.level_downsamples[level]))
        if fast is not None and x % step == 0 and y % step == 0:
            return fast.read(x // step, y // step, width, height,
                             self.pool if parallel else None)
        return self.reader.read_rgb(x, y, level, width, height)

    def read_reduced(self, x: int, y: int, level: int, width: int, height: int, factor: int,
                     full: bool = False) -> tuple[np.ndarray | None, np.ndarray]:
        """`read`'s region (when `full`, else None) and that region box-reduced by `factor`
        (`data_prep.slide_io.reduce_region`: x, y in `level` pixels multiples of it, the region
        within the level), decoded on the threads: per stored tile on a direct JPEG level."""
        fast = self.fast.get(level)
        step = int(round(self.reader.level_downsamples[level]))
        kept = level == 0 and self.level0 is not None
        if (fast is not None and not kept and x % step == 0 and y % step == 0
                and fast.reducible(x // step, y // step, width, height, factor)):
            return fast.read_reduced(x // step, y // step, width, height, factor, self.pool, full)
        pixels = self.read(x, y, level, width, height, parallel=True)
        return (pixels if full else None), reduce_region(pixels, factor)

    def close(self) -> None:
        """Stop the threads and close the direct decoders' files."""
        if self.pool is not None:
            self.pool.shutdown()
        for fast in self.fast.values():
            fast.close()
        self.level0 = None


def _crop(pixels: np.ndarray, x: int, y: int, width: int, height: int) -> np.ndarray:
    """pixels[y:y+height, x:x+width], white where that leaves the array."""
    h, w = pixels.shape[:2]
    if 0 <= x and 0 <= y and x + width <= w and y + height <= h:
        return pixels[y:y + height, x:x + width]
    out = np.full((height, width, 3), 255, np.uint8)
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, w), min(y + height, h)
    if x1 > x0 and y1 > y0:
        out[y0 - y:y1 - y, x0 - x:x1 - x] = pixels[y0:y1, x0:x1]
    return out


@dataclasses.dataclass(frozen=True)
class TileJob:
    """Where to cut the tiles of one target mpp: level, read size in level px, output size."""

    level: int
    read_w: int
    read_h: int
    tile_size: int
    jpeg_quality: int


def plan_blocks(tiles: list[tuple[int, int, float]], step: float,
                aligned: bool) -> list[list[tuple[int, int, float]]]:
    """Tiles (x, y, tissue fraction; grid order) grouped into blocks of one read each.

    A block is a run of tiles of one row whose x advance is the grid's `step` (level-0 px), at
    most MAX_RUN long; without `aligned` every tile is its own block.
    """
    blocks: list[list[tuple[int, int, float]]] = []
    for tile in tiles:
        last = blocks[-1][-1] if blocks else None
        if (aligned and last is not None and last[1] == tile[1] and len(blocks[-1]) < MAX_RUN
                and abs(tile[0] - last[0] - step) <= 1.0):
            blocks[-1].append(tile)
        else:
            blocks.append([tile])
    return blocks


def _process(blocks: BlockReader, job: TileJob, block: list[tuple[int, int, float]]) -> list:
    """[(x, y, fraction, JPEG bytes or None, rejection or None)] of one block's tiles."""
    down = blocks.reader.level_downsamples[job.level]
    x0, y0 = block[0][0], block[0][1]
    offsets = [int(round((x - x0) / down)) for x, _, _ in block]
    width = offsets[-1] + job.read_w
    pixels = blocks.read(x0, y0, job.level, width, job.read_h)
    out = []
    for (x, y, fraction), offset in zip(block, offsets):
        rgb = np.ascontiguousarray(pixels[:, offset:offset + job.read_w])
        if rgb.shape[:2] != (job.tile_size, job.tile_size):
            rgb = np.asarray(Image.fromarray(rgb).resize((job.tile_size, job.tile_size),
                                                         Image.BICUBIC))
        why = tile_rejection(rgb)
        jpeg = None
        if why is None:
            buffer = io.BytesIO()
            Image.fromarray(rgb).save(buffer, format="JPEG", quality=job.jpeg_quality)
            jpeg = buffer.getvalue()
        out.append((x, y, fraction, jpeg, why))
    return out


def cut_tiles(blocks: BlockReader, job: TileJob, plan: list[list[tuple[int, int, float]]]):
    """Yields (x, y, fraction, JPEG bytes or None, rejection or None) in plan order."""
    if blocks.pool is None:
        for block in plan:
            yield from _process(blocks, job, block)
        return
    futures = [blocks.pool.submit(_process, blocks, job, block) for block in plan]
    try:
        for future in futures:
            yield from future.result()
    finally:
        for future in futures:
            future.cancel()
