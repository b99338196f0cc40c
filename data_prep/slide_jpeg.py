"""Direct decoding of tiled-JPEG TIFF pyramid levels (Aperio SVS, generic tiled TIFF): each
stored tile is read with one file read and decoded once by PIL's libjpeg-turbo, 3-4x faster than
OpenSlide's `read_region` (which converts every pixel to premultiplied ARGB and back).

Only used where it gives OpenSlide's pixels exactly: vendors `aperio` and `generic-tiff`, levels
that are tiled 8-bit RGB/YCbCr JPEG pages of the level's size, with an integral downsample, and
checked at open by decoding one tile both ways (a level that differs is left to OpenSlide).
"""

from __future__ import annotations

import collections
import io
import threading

import numpy as np
from PIL import Image, ImageFile

FAST_VENDORS = ("aperio", "generic-tiff")
CACHE_BYTES = 96 << 20  # decoded tiles kept per slide, so a tile shared by two blocks decodes once
JPEG, RGB, YCBCR = 7, 2, 6  # TIFF Compression and PhotometricInterpretation values


class JpegLevel:
    """One tiled-JPEG TIFF page: `read(x, y, w, h)` in this level's pixels, as uint8 RGB."""

    def __init__(self, path: str, page):
        self.width, self.height = page.imagewidth, page.imagelength
        self.tile_w, self.tile_h = page.tilewidth, page.tilelength
        self.cols = -(-self.width // self.tile_w)
        self.offsets, self.counts = page.dataoffsets, page.databytecounts
        tables = page.jpegtables
        self.tables = bytes(tables[:-2]) if tables else b""  # without its end-of-image marker
        self.mode = "RGB" if page.photometric == RGB else ""  # Aperio: RGB, no colour transform
        self._path = path
        self._local = threading.local()
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._limit = max(4, CACHE_BYTES // (self.tile_w * self.tile_h * 3))
        self._lock = threading.Lock()
        self._handles: list = []

    def _file(self):
        handle = getattr(self._local, "handle", None)
        if handle is None:  # one handle per thread: seek + read is not atomic
            handle = self._local.handle = open(self._path, "rb")
            with self._lock:
                self._handles.append(handle)
        return handle

    def close(self) -> None:
        """Close the file handles of every thread that read."""
        with self._lock:
            for handle in self._handles:
                handle.close()
            self._handles.clear()
            self._cache.clear()

    def tile(self, index: int) -> np.ndarray:
        """Stored tile `index` (row-major) decoded to [tile_h, tile_w, 3] uint8."""
        return self._tile(index)[0]

    def _tile(self, index: int) -> tuple[np.ndarray, Image.Image | None]:
        """(pixels, the PIL image they came from, or None when they came from the cache)."""
        with self._lock:
            if index in self._cache:
                self._cache.move_to_end(index)
                return self._cache[index], None
        if self.counts[index] == 0:  # sparse file: no data is glass
            image = None
            pixels = np.full((self.tile_h, self.tile_w, 3), 255, np.uint8)
        else:
            handle = self._file()
            handle.seek(self.offsets[index])
            data = handle.read(self.counts[index])
            if self.tables:
                data = self.tables + data[2:]  # shared tables + the tile without its SOI marker
            image = Image.open(io.BytesIO(data), formats=("JPEG",))
            if self.mode:  # say which colour space the components are in (TIFF knows; JPEG not)
                codec, extents, offset, args = image.tile[0]
                image.tile = [ImageFile._Tile(codec, extents, offset, (args[0], self.mode))]
            image.load()
            if image.mode != "RGB":
                image = image.convert("RGB")
            pixels = np.asarray(image)
        with self._lock:
            self._cache[index] = pixels
            while len(self._cache) > self._limit:
                self._cache.popitem(last=False)
        return pixels, image

    def _reduced(self, index: int, box: tuple[int, int, int, int], factor: int
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(tile pixels, the tile's `box` (x0, y0, x1, y1, tile px) box-reduced by `factor`)."""
        pixels, image = self._tile(index)
        if image is None:
            image = Image.fromarray(pixels)
        return pixels, np.asarray(image.crop(box).reduce(factor))

    def read(self, x: int, y: int, width: int, height: int, pool=None) -> np.ndarray:
        """[height, width, 3] uint8 RGB from level pixel (x, y); outside the level is white.

        With `pool` (an executor not running this call) the stored tiles decode in parallel.
        """
        out = np.full((height, width, 3), 255, np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, self.width), min(y + height, self.height)
        rows = range(y0 // self.tile_h, (y1 - 1) // self.tile_h + 1 if y1 > y0 else 0)
        cols = range(x0 // self.tile_w, (x1 - 1) // self.tile_w + 1 if x1 > x0 else 0)
        tiles = _each(pool, [(r, c) for r in rows for c in cols],
                      lambda key: self.tile(key[0] * self.cols + key[1]))
        for row in rows:
            ty = row * self.tile_h
            for col in cols:
                tx = col * self.tile_w
                pixels = tiles[row, col]
                sx0, sy0 = max(x0, tx), max(y0, ty)
                sx1, sy1 = min(x1, tx + self.tile_w), min(y1, ty + self.tile_h)
                out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = pixels[sy0 - ty:sy1 - ty, sx0 - tx:sx1 - tx]
        return out

    def read_reduced(self, x: int, y: int, width: int, height: int, factor: int, pool=None,
                     full: bool = False) -> tuple[np.ndarray | None, np.ndarray]:
        """(the region as `read` gives it when `full`, else None; the region box-reduced by
        `factor`, [ceil(height / factor), ceil(width / factor), 3] uint8).

        The reduction is PIL's `Image.reduce` (the mean of each factor x factor box, the last
        row and column of boxes cut by the region's edge), done on each stored tile as it is
        decoded, so the whole region never passes through a PIL image. That equals reducing the
        region read whole when `factor` divides the tile size and `x` and `y`, and the region
        ends on a multiple of `factor` or on the level's edge (it lies within the level).
        """
        if not self.reducible(x, y, width, height, factor):
            raise ValueError("read_reduced: region not aligned to the reduction factor")
        out = np.empty((height, width, 3), np.uint8) if full else None  # tiles cover it all
        small = np.empty((-(-height // factor), -(-width // factor), 3), np.uint8)
        keys = [(r, c) for r in range(y // self.tile_h, (y + height - 1) // self.tile_h + 1)
                for c in range(x // self.tile_w, (x + width - 1) // self.tile_w + 1)]

        def one(key):
            r, c = key
            tx, ty = c * self.tile_w, r * self.tile_h
            sx0, sy0 = max(x, tx), max(y, ty)
            sx1, sy1 = min(x + width, tx + self.tile_w), min(y + height, ty + self.tile_h)
            box = (sx0 - tx, sy0 - ty, sx1 - tx, sy1 - ty)
            pixels, reduced = self._reduced(r * self.cols + c, box, factor)
            if out is not None:
                out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = pixels[box[1]:box[3], box[0]:box[2]]
            oy, ox = (sy0 - y) // factor, (sx0 - x) // factor
            small[oy:oy + reduced.shape[0], ox:ox + reduced.shape[1]] = reduced

        _each(pool, keys, one)
        return out, small

    def reducible(self, x: int, y: int, width: int, height: int, factor: int) -> bool:
        """Whether `read_reduced` takes this region: within the level, `factor` dividing the
        tile size, `x` and `y`."""
        return not (self.tile_w % factor or self.tile_h % factor or x % factor or y % factor
                    or x < 0 or y < 0 or x + width > self.width or y + height > self.height)


def _each(pool, keys: list, fn) -> dict:
    """{key: fn(key)} for every key: on `pool`'s threads (an executor not running this call) in
    one task per thread, not per key, for fewer GIL hand-overs between short decodes; here,
    in order, without a pool or with one key."""
    if pool is None or len(keys) < 2:
        return {key: fn(key) for key in keys}
    parts = pool._max_workers
    chunks = [keys[i::parts] for i in range(parts)]
    done = pool.map(lambda chunk: [fn(key) for key in chunk], chunks)
    return {key: value for chunk, part in zip(chunks, done) for key, value in zip(chunk, part)}


def jpeg_levels(path: str, reader) -> dict[int, JpegLevel]:
    """{OpenSlide level: JpegLevel} for the levels of `reader` that decode exactly here."""
    vendor = getattr(reader, "vendor", None)
    if vendor not in FAST_VENDORS:
        return {}
    try:
        import tifffile
        with tifffile.TiffFile(path) as tif:
            pages = [p for p in tif.pages if p.is_tiled]
            found = {}
            for level, (width, height) in enumerate(reader.level_dimensions):
                down = reader.level_downsamples[level]
                if abs(down - round(down)) > 1e-9:
                    continue
                match = [p for p in pages if (p.imagewidth, p.imagelength) == (width, height)]
                page = match[0] if len(match) == 1 else None
                if (page is not None and page.compression == JPEG and page.samplesperpixel == 3
                        and page.bitspersample == 8 and page.planarconfig == 1
                        and page.photometric in (RGB, YCBCR) and page.imagedepth == 1):
                    found[level] = JpegLevel(path, page)
    except Exception:  # noqa: BLE001 - anything odd: OpenSlide reads it as before
        return {}
    return {level: fast for level, fast in found.items() if _agrees(reader, level, fast)}


def _agrees(reader, level: int, fast: JpegLevel) -> bool:
    """Whether one tile near the level's centre decodes to OpenSlide's pixels."""
    col = min(fast.width // 2 // fast.tile_w, fast.cols - 1)
    row = min(fast.height // 2 // fast.tile_h, -(-fast.height // fast.tile_h) - 1)
    x, y = col * fast.tile_w, row * fast.tile_h
    w, h = min(fast.tile_w, fast.width - x), min(fast.tile_h, fast.height - y)
    down = int(round(reader.level_downsamples[level]))
    try:
        expected = np.asarray(reader.read(x * down, y * down, level, w, h))
        return bool(np.array_equal(fast.read(x, y, w, h), expected))
    except Exception:  # noqa: BLE001
        return False
