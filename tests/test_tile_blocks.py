"""Block reads, direct JPEG decoding, fast filters and the median network give the per-tile
tiler's exact output (data_prep.tile_blocks, data_prep.slide_jpeg, data_prep.tissue)."""

import csv
import io
import os

import numpy as np
import pytest
from PIL import Image, ImageFilter

from data_prep import slide_io, tile_blocks, tile_wsi, tissue
from data_prep.slide_io import open_slide, read_thumbnail, reduce_region, tile_grid
from data_prep.slide_jpeg import _agrees

openslide = pytest.importorskip("openslide")
tifffile = pytest.importorskip("tifffile")
from array_record.python.array_record_module import ArrayRecordReader  # noqa: E402
from cfm.data.records import decode_tile  # noqa: E402
from tests.test_tile_wsi import _tissue_image  # noqa: E402


def _old_rejection(rgb):
    """tile_rejection as it was: PIL's HSV conversion on every tile that is not background/blur."""
    darkest = np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    if (darkest > 220).mean() > 0.75:
        return "background"
    grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    lap = (grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:]
           - 4.0 * grey[1:-1, 1:-1])
    if lap.var() < 40.0:
        return "blur"
    hsv = np.asarray(Image.fromarray(rgb).convert("HSV"))
    ink = (hsv[..., 1] >= 120) & (hsv[..., 0] >= 40) & (hsv[..., 0] <= 165)
    return "pen" if (ink | (hsv[..., 2] < 40)).mean() > 0.15 else None


def _tissue(height, width, seed):
    """test_tile_wsi's pink ellipse on glass, crossed by a green pen stroke."""
    image = _tissue_image(height, width, seed)
    image[height // 3:height // 3 + 90, :] = (30, 160, 60)
    return image


def _jpeg_tiff(path, size=(900, 1300), levels=3, mpp=0.25, shrink=2.0):
    """Tiled YCbCr-JPEG generic TIFF with PIL-encoded tiles; level k is size / shrink**k."""
    base = _tissue(*size, seed=11)

    def tiles(image):
        for y in range(0, image.shape[0], 128):
            for x in range(0, image.shape[1], 128):
                tile = np.zeros((128, 128, 3), np.uint8)
                part = image[y:y + 128, x:x + 128]
                tile[:part.shape[0], :part.shape[1]] = part
                buffer = io.BytesIO()
                Image.fromarray(tile).save(buffer, "JPEG", quality=85, subsampling=2)
                yield buffer.getvalue()

    codecs = tifffile.TIFF.COMPRESSORS._codecs
    codecs[7] = lambda data, *args, **kwargs: data  # the tiles are encoded already
    try:
        with tifffile.TiffWriter(path) as tif:
            for k in range(levels):
                w, h = int(size[1] / shrink ** k), int(size[0] / shrink ** k)
                image = np.asarray(Image.fromarray(base).resize((w, h)))
                tif.write(tiles(image), shape=image.shape, dtype=np.uint8, tile=(128, 128),
                          photometric="ycbcr", subsampling=(2, 2), compression=7,
                          resolution=(1e4 / mpp, 1e4 / mpp) if k == 0 else None,
                          resolutionunit="CENTIMETER" if k == 0 else None,
                          subfiletype=1 if k else 0)
    finally:
        codecs.pop(7, None)
    return str(path)


def _reference(path, target, tile_size):
    """(JPEG bytes, x, y) of the old tiler: one read per tile, PIL resize, old filters."""
    reader = open_slide(path)
    mpp = reader.mpp
    thumb, thumb_mpp, sx, sy = read_thumbnail(reader, mpp)
    mask = tissue.TissueMask(tissue.segment_tissue(thumb, thumb_mpp), sx, sy)
    foot = tile_size * target / mpp[0]
    level = tile_wsi.best_level(reader.level_downsamples, max(mpp), target)
    read = max(1, int(round(foot / reader.level_downsamples[level])))
    out = []
    for x, y in tile_grid(*reader.level_dimensions[0], foot, foot):
        fraction = mask.fraction(x, y, foot, foot)
        if fraction < 0.5 or fraction == 0.0:
            continue
        tile = reader.read(x, y, level, read, read).resize((tile_size, tile_size), Image.BICUBIC)
        if _old_rejection(np.asarray(tile)) is None:
            buffer = io.BytesIO()
            tile.save(buffer, format="JPEG", quality=90)
            out.append((buffer.getvalue(), x, y))
    reader.close()
    return out


def _tiled(path, out, target, tile_size, threads):
    assert tile_wsi.main(["--slides", path, "--out", str(out), "--mpp", str(target),
                          "--tile-size", str(tile_size), "--threads", str(threads)]) == 0
    with open(os.path.join(out, "manifest.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    found = []
    for row in rows:
        reader = ArrayRecordReader(os.path.join(out, row["shard"]))
        jpeg, meta = decode_tile(reader.read([int(row["index"])])[0])
        reader.close()
        found.append((jpeg, meta["x"], meta["y"]))
    return found


# --------------------------------------------------------------------------- pure pieces
def test_median_network_matches_pil():
    rng = np.random.default_rng(0)
    for size in (3, 5, 7, 9):
        for shape in ((37, 23), (1, 1), (2, 9), (6, 4)):
            for values in (rng.integers(0, 256, shape), rng.integers(0, 3, shape) * 120,
                           np.full(shape, 255)):
                values = values.astype(np.uint8)
                expected = np.asarray(Image.fromarray(values).filter(
                    ImageFilter.MedianFilter(size)))
                np.testing.assert_array_equal(tissue.median_filter(values, size), expected)


def test_pen_precheck_is_a_superset_for_every_colour():
    r, g, b = np.meshgrid(*[np.arange(256, dtype=np.uint8)] * 3, indexing="ij")
    rgb = np.stack([r, g, b], -1).reshape(4096, 4096, 3)
    hsv = np.asarray(Image.fromarray(rgb).convert("HSV"))
    exact = ((hsv[..., 1] >= 120) & (hsv[..., 0] >= 40) & (hsv[..., 0] <= 165)
             | (hsv[..., 2] < 40))
    brightest = rgb.max(-1)
    darkest = rgb.min(-1)
    chroma = brightest - darkest
    sup = ((chroma.astype(np.uint16) * 255 >= brightest.astype(np.uint16) * 119)
           & ((g.reshape(4096, 4096).astype(np.int16) - r.reshape(4096, 4096)) * 15 + chroma
              >= 0)) | (brightest < 40)
    assert not np.any(exact & ~sup)  # every ink or black pixel is a candidate
    rng = np.random.default_rng(1)
    for i in range(200):  # and the filter answers as before
        tile = np.clip(rng.integers(0, 256, 3) + rng.integers(-60, 60, (64, 64, 3)), 0, 255)
        tile = tile.astype(np.uint8)
        if i % 2:
            tile[rng.random((64, 64)) < rng.random() * 0.4] = rng.integers(0, 256, 3)
        assert tile_blocks.tile_rejection(tile) == _old_rejection(tile)


# --------------------------------------------------------------------------- readers
def test_direct_jpeg_levels_match_openslide(tmp_path, shared_data):
    path = _jpeg_tiff(tmp_path / "jpeg.tiff")
    reader = open_slide(path)
    blocks = tile_blocks.BlockReader(reader, path, threads=2)
    assert sorted(blocks.fast) == [0, 1, 2]
    for level, (x, y, w, h) in [(0, (0, 0, 500, 300)), (0, (-20, 850, 300, 100)),
                                (1, (256, 128, 260, 200)), (2, (0, 0, 400, 300))]:
        down = int(reader.level_downsamples[level])
        expected = np.asarray(reader.read(x * down, y * down, level, w, h))
        got = blocks.read(x * down, y * down, level, w, h, parallel=level == 2)
        np.testing.assert_array_equal(got, expected)
    wrong = blocks.fast[0]
    wrong.mode = "RGB"  # components read in the wrong colour space: the check refuses it
    wrong._cache.clear()
    assert not _agrees(reader, 0, wrong)
    blocks.close()
    cmu = str(shared_data / "wsi" / "CMU-1-Small-Region.svs")  # real Aperio (RGB) JPEG tiles
    reader = open_slide(cmu)
    blocks = tile_blocks.BlockReader(reader, cmu)
    assert list(blocks.fast) == [0]
    np.testing.assert_array_equal(blocks.read(1000, 2900, 0, 400, 100),
                                  np.asarray(reader.read(1000, 2900, 0, 400, 100)))
    assert blocks.aligned(0, [3], [5]) and not tile_blocks.BlockReader(
        open_slide(path), path).aligned(1, [3], [4])
    blocks.close()


def test_reduced_reads_equal_reducing_the_read(tmp_path, shared_data, monkeypatch):
    # Reduced per stored tile as decoded == the region read whole, then reduced; edges of the
    # level (partial boxes), regions that start inside a stored tile, three levels.
    path = _jpeg_tiff(tmp_path / "jpeg.tiff")
    reader = open_slide(path)
    blocks = tile_blocks.BlockReader(reader, path, threads=2)
    for level, (x, y, w, h), factor in [(0, (0, 0, 1300, 900), 4), (0, (128, 64, 333, 517), 8),
                                        (1, (16, 0, 634, 450), 2), (2, (0, 0, 325, 225), 2)]:
        down = int(reader.level_downsamples[level])
        expected = np.asarray(reader.read(x * down, y * down, level, w, h))
        full, small = blocks.fast[level].read_reduced(x, y, w, h, factor, blocks.pool, True)
        np.testing.assert_array_equal(full, expected)
        np.testing.assert_array_equal(small, reduce_region(expected, factor))
        assert small.shape == (-(-h // factor), -(-w // factor), 3)
    with pytest.raises(ValueError, match="not aligned"):
        blocks.fast[0].read_reduced(3, 0, 8, 8, 2)
    # The thumbnail (level 2, reduced by 2 as decoded) is OpenSlide's, pixel for pixel.
    np.testing.assert_array_equal(np.asarray(read_thumbnail(reader, reader.mpp)[0]),
                                  np.asarray(read_thumbnail(reader, reader.mpp, blocks)[0]))
    blocks.close()
    cmu = str(shared_data / "wsi" / "CMU-1-Small-Region.svs")  # level 0 reduced by 4, kept
    reader = open_slide(cmu)
    blocks = tile_blocks.BlockReader(reader, cmu, threads=2)
    thumb = read_thumbnail(reader, reader.mpp, blocks)[0]
    assert thumb.size == (277, 371)
    np.testing.assert_array_equal(np.asarray(thumb),
                                  np.asarray(read_thumbnail(reader, reader.mpp)[0]))
    level0 = np.asarray(reader.read(0, 0, 0, 2220, 2967))
    np.testing.assert_array_equal(blocks.level0, level0)
    blocks.close()
    # In 9 x 12 blocks (their regions overlap by up to 3 px, to start on multiples of 4): the
    # same on both paths, and the kept level is whole.
    monkeypatch.setattr(slide_io, "THUMB_BLOCK_PX", 256)
    blocks = tile_blocks.BlockReader(reader, cmu, threads=2)
    thumb = read_thumbnail(reader, reader.mpp, blocks)[0]
    assert thumb.size == (277, 371)
    np.testing.assert_array_equal(np.asarray(thumb),
                                  np.asarray(read_thumbnail(reader, reader.mpp)[0]))
    np.testing.assert_array_equal(blocks.level0, level0)
    blocks.close()


@pytest.mark.parametrize("target,tile_size", [(0.5, 64), (1.0, 48)])
def test_block_tiling_equals_per_tile_reads(tmp_path, target, tile_size):
    # 0.5 um/px: level 1 (downsample 2, blocks, direct JPEG); 1.0: level 2 (downsample 4).
    path = _jpeg_tiff(tmp_path / "jpeg.tiff")
    expected = _reference(path, target, tile_size)
    assert len(expected) > 8
    for threads in (1, 3):
        got = _tiled(path, tmp_path / f"out{threads}", target, tile_size, threads)
        assert got == expected


def test_fractional_downsample_and_openslide_paths(tmp_path):
    # Levels 1300 -> 866 px (downsample 1.5): reads stay one per tile, through OpenSlide.
    path = _jpeg_tiff(tmp_path / "frac.tiff", levels=2, shrink=1.5)
    reader = open_slide(path)
    assert reader.level_downsamples[1] != int(reader.level_downsamples[1])
    assert list(tile_blocks.BlockReader(reader, path).fast) == [0]
    assert _tiled(path, tmp_path / "out", 0.375, 48, 2) == _reference(path, 0.375, 48)


def test_single_level_slide_decoded_once(tmp_path, shared_data):
    cmu = str(shared_data / "wsi" / "CMU-1-Small-Region.svs")
    expected = _reference(cmu, 0.5, 224)
    assert len(expected) == 46
    assert _tiled(cmu, tmp_path / "out", 0.5, 224, 2) == expected
