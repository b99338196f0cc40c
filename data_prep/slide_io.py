"""Opening slides (OpenSlide formats and plain images), choosing pyramid levels, laying tile
grids and reading thumbnails: the geometry half of `data_prep.tile_wsi`."""

import math

import numpy as np
from PIL import Image

# Slide formats looked for when --slides is a folder (list files may name anything).
OPENSLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs",
                      ".svslide", ".bif", ".czi")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
# A level may be this much (relative) coarser than the target mpp and still be used, so e.g. an
# Aperio level at 1.008 um/px serves a 1.0 um/px target instead of a 4x larger read.
LEVEL_MPP_TOLERANCE = 0.02
# Thumbnail for tissue masks and QC: 4 um/px (about 16x below 0.25 um/px scans), <= 4096 px.
THUMB_MPP = 4.0
MAX_THUMB_SIDE = 4096
THUMB_BLOCK_PX = 4096  # level pixels per side of one thumbnail read (~64 MB of RGB)


class SlideError(Exception):
    """A slide that cannot be tiled; the message is the reason written to failures.csv."""


# ----------------------------------------------------------------------------- slide readers
class _OpenSlideReader:
    """Pyramid levels of an OpenSlide slide; associated images (label, macro) are never read."""

    def __init__(self, path: str):
        import openslide  # optional: openslide-python (extra "slides")
        self._slide = openslide.OpenSlide(path)
        self.level_dimensions = list(self._slide.level_dimensions)
        self.level_downsamples = [float(d) for d in self._slide.level_downsamples]
        props = self._slide.properties
        self.vendor = props.get("openslide.vendor")
        try:
            self.mpp = (float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"]))
        except (KeyError, ValueError):
            self.mpp = None

    def read(self, x: int, y: int, level: int, width: int, height: int) -> Image.Image:
        """RGB region of `width` x `height` level pixels whose top-left is level-0 (x, y)."""
        return _on_white(self._slide.read_region((x, y), level, (width, height)))

    def read_rgb(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """`read` as a [height, width, 3] uint8 array (a view; one pass fewer when opaque)."""
        region = self._slide.read_region((x, y), level, (width, height))
        rgba = np.asarray(region)
        if rgba[..., 3].min(initial=255) == 255:
            return rgba[..., :3]
        return np.asarray(_on_white(region))

    def close(self) -> None:
        self._slide.close()


def _on_white(region: Image.Image) -> Image.Image:
    """An RGBA region as RGB, transparent (no-data) areas composited onto white glass."""
    alpha = region.getchannel("A")
    if alpha.getextrema() == (255, 255):
        return region.convert("RGB")
    background = Image.new("RGB", region.size, (255, 255, 255))
    background.paste(region.convert("RGB"), mask=alpha)
    return background


class _PilReader:
    """A plain PNG/JPEG/TIFF image as a one-level slide without microns-per-pixel."""

    def __init__(self, path: str):
        Image.MAX_IMAGE_PIXELS = None  # the user asked for this file; scans are large
        with Image.open(path) as image:
            self._image = image.convert("RGB")
        self.level_dimensions = [self._image.size]
        self.level_downsamples = [1.0]
        self.mpp = None
        self.vendor = None

    def read(self, x: int, y: int, level: int, width: int, height: int) -> Image.Image:
        """RGB crop (level is always 0); parts outside the image are white."""
        inside = x + width <= self._image.width and y + height <= self._image.height
        if x >= 0 and y >= 0 and inside:
            return self._image.crop((x, y, x + width, y + height))
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        canvas.paste(self._image.crop((x, y, x + width, y + height)), (0, 0))
        return canvas

    def read_rgb(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """`read` as a [height, width, 3] uint8 array."""
        return np.asarray(self.read(x, y, level, width, height))

    def close(self) -> None:
        self._image.close()


def open_slide(path: str) -> "_OpenSlideReader | _PilReader":
    """A reader for `path`: OpenSlide when it recognises the file, else PIL for PNG/JPEG/TIFF.

    Without openslide-python installed (extra `slides`) only the PIL formats open.
    """
    try:
        import openslide  # optional: openslide-python (extra "slides")
    except ImportError:
        openslide = None
    try:
        vendor = openslide.OpenSlide.detect_format(path) if openslide else None
    except Exception as err:  # noqa: BLE001 - any failure to probe is an open failure
        raise SlideError(f"unopenable: {type(err).__name__}: {err}") from None
    try:
        if vendor is not None:
            return _OpenSlideReader(path)
        if path.lower().endswith(PIL_SUFFIXES):
            return _PilReader(path)
    except Exception as err:  # noqa: BLE001
        raise SlideError(f"unopenable: {type(err).__name__}: {err}") from None
    hint = "" if openslide else " (openslide-python is not installed)"
    raise SlideError(f"unopenable: neither OpenSlide nor PIL reads this format{hint}")


# ----------------------------------------------------------------------------- geometry
def best_level(downsamples: list[float], slide_mpp: float, target_mpp: float) -> int:
    """Coarsest level whose resolution (slide_mpp * downsample um/px) is still >= the target's,
    within LEVEL_MPP_TOLERANCE; level 0 when even level 0 is coarser than the target."""
    limit = target_mpp * (1.0 + LEVEL_MPP_TOLERANCE)
    fits = [i for i, d in enumerate(downsamples) if slide_mpp * d <= limit]
    return max(fits, key=lambda i: downsamples[i]) if fits else 0


def tile_grid(width: int, height: int, footprint_x: float,
              footprint_y: float) -> list[tuple[int, int]]:
    """Level-0 top-left corners (x, y) of the full tiles of a non-overlapping grid, row-major.

    Tile i of a row starts at round(i * footprint_x); only tiles lying wholly inside the slide
    are listed, so there are floor(width / footprint_x) x floor(height / footprint_y).
    """
    cols = int(math.floor(width / footprint_x + 1e-9))
    rows = int(math.floor(height / footprint_y + 1e-9))
    return [(int(round(c * footprint_x)), int(round(r * footprint_y)))
            for r in range(rows) for c in range(cols)]


def reduce_region(pixels: np.ndarray, factor: int) -> np.ndarray:
    """[ceil(h / factor), ceil(w / factor), 3] uint8: the mean of each factor x factor box of
    `pixels` (PIL's `Image.reduce`; the last row and column of boxes cut by the edge)."""
    return pixels if factor == 1 else np.asarray(Image.fromarray(pixels).reduce(factor))


def read_thumbnail(reader, mpp: tuple[float, float], blocks=None
                   ) -> tuple[Image.Image, float, float, float]:
    """(RGB thumbnail, its um/px, level-0 px per thumbnail px in x and y).

    Read block by block from the coarsest level at least as fine as the thumbnail, so memory
    stays bounded (about 64 MB per block) even for single-level gigapixel images. Each block is
    box-reduced by the largest power of two (<= 16) that leaves at least 2x to go, then
    resized bilinearly onto its exact part of the thumbnail (PIL's `reducing_gap` scheme, with
    the reduction done by `reduce_region`). With `blocks` (a data_prep.tile_blocks.BlockReader)
    the reads go through it, and the stored JPEG tiles of a direct level are reduced one by one
    as they decode (the same pixels, without building the whole block in PIL: the thumbnail of
    CMU-1's single 6.6-megapixel level takes 57-63 ms instead of 85-105); when the thumbnail
    comes from level 0 and that level has at most `blocks.keep_pixels` pixels, the level is
    kept in `blocks.level0` for the tiles (so it is decoded once).
    """
    width, height = reader.level_dimensions[0]
    thumb_mpp = max(THUMB_MPP, mpp[0], mpp[1], max(width * mpp[0], height * mpp[1])
                    / MAX_THUMB_SIDE)
    level = best_level(reader.level_downsamples, max(mpp), thumb_mpp)
    down = reader.level_downsamples[level]
    level_w, level_h = reader.level_dimensions[level]
    step_x, step_y = thumb_mpp / (mpp[0] * down), thumb_mpp / (mpp[1] * down)  # level px
    thumb_w = max(1, int(math.ceil(level_w / step_x - 1e-9)))
    thumb_h = max(1, int(math.ceil(level_h / step_y - 1e-9)))
    factor = 1
    while factor < 16 and 4 * factor <= min(step_x, step_y):
        factor *= 2
    thumb = Image.new("RGB", (thumb_w, thumb_h), (255, 255, 255))
    block = max(1, int(THUMB_BLOCK_PX / max(step_x, step_y)))  # thumbnail px
    keep = blocks is not None and level == 0 and level_w * level_h <= blocks.keep_pixels
    whole = block >= thumb_w and block >= thumb_h  # one read covers the level: keep it as is
    level0 = np.full((level_h, level_w, 3), 255, np.uint8) if keep and not whole else None
    for ty in range(0, thumb_h, block):
        for tx in range(0, thumb_w, block):
            tx1, ty1 = min(tx + block, thumb_w), min(ty + block, thumb_h)
            # The block's part of the level, exactly, and the factor-aligned region read for it.
            bx0, by0 = tx * step_x, ty * step_y
            bx1, by1 = min(tx1 * step_x, level_w), min(ty1 * step_y, level_h)
            lx0, ly0 = int(bx0 // factor) * factor, int(by0 // factor) * factor
            lx1 = min(level_w, -(-math.ceil(bx1 - 1e-9) // factor) * factor)
            ly1 = min(level_h, -(-math.ceil(by1 - 1e-9) // factor) * factor)
            where = (int(round(lx0 * down)), int(round(ly0 * down)), level, lx1 - lx0, ly1 - ly0)
            if blocks is None:
                region = reader.read(*where)
                region = region.reduce(factor) if factor > 1 else region
            else:
                pixels, small = blocks.read_reduced(*where, factor, full=keep)
                if keep and whole:
                    level0 = pixels
                elif level0 is not None:
                    level0[ly0:ly1, lx0:lx1] = pixels
                region = Image.fromarray(small)
            box = ((bx0 - lx0) / factor, (by0 - ly0) / factor, (bx1 - lx0) / factor,
                   (by1 - ly0) / factor)
            thumb.paste(region.resize((tx1 - tx, ty1 - ty), Image.BILINEAR, box=box), (tx, ty))
    if level0 is not None:
        blocks.level0 = level0
    return thumb, thumb_mpp, step_x * down, step_y * down
