"""A 2-level JPEG 2000 Aperio slide without microns-per-pixel, built from CMU-1-Small-Region.

Stand-in for the TCGA slide of issue 19 (4443 x 3567 px, 2 levels, JPEG 2000, no MPP), which
is not in the shared data folder: same size, levels, codec (Aperio compression 33005, 240 px
tiles, OpenJPEG codestreams) and missing MPP, with CMU-1's H&E pixels mirrored to fill it.
`benchmarks/tile_wsi.py` tiles it with `--default-mpp 0.5`. Building it takes a few seconds
(OpenJPEG encoding), so it is cached under the system temp folder by content version.
"""

import io
import os
import tempfile

import numpy as np
from PIL import Image

SIZE = (4443, 3567)  # W x H of the TCGA slide it stands in for
TILE = 240  # Aperio's usual tile side
DOWNSAMPLE = 4
VERSION = 1  # bump when the construction changes (the cache key)
APERIO_J2K_RGB = 33005  # TIFF compression: Aperio JPEG 2000, RGB components


def _canvas(source: str) -> Image.Image:
    """CMU-1's pixels mirrored over a SIZE canvas of light-grey glass."""
    import openslide
    slide = openslide.OpenSlide(source)
    try:
        cmu = slide.read_region((0, 0), 0, slide.dimensions).convert("RGB")
    finally:
        slide.close()
    width, height = cmu.size
    canvas = Image.new("RGB", SIZE, (242, 242, 242))
    canvas.paste(cmu, (0, 0))
    canvas.paste(cmu.transpose(Image.FLIP_LEFT_RIGHT), (width, 0))
    rest = SIZE[1] - height
    canvas.paste(cmu.transpose(Image.ROTATE_180).crop((0, 0, width, rest)), (0, height))
    canvas.paste(cmu.transpose(Image.FLIP_TOP_BOTTOM).crop((0, 0, width, rest)), (width, height))
    return canvas


def _j2k_tiles(image: Image.Image):
    """Row-major JPEG 2000 codestreams of the TILE x TILE tiles (edge tiles padded white)."""
    pixels = np.asarray(image)
    for y in range(0, pixels.shape[0], TILE):
        for x in range(0, pixels.shape[1], TILE):
            tile = np.full((TILE, TILE, 3), 255, np.uint8)
            part = pixels[y:y + TILE, x:x + TILE]
            tile[:part.shape[0], :part.shape[1]] = part
            buffer = io.BytesIO()
            Image.fromarray(tile).save(buffer, "JPEG2000", no_jp2=True,
                                       quality_mode="rates", quality_layers=[20])
            yield buffer.getvalue()


def standin_slide(source: str) -> str:
    """Path of the stand-in slide (built from the CMU-1 file `source` on first use)."""
    import tifffile
    path = os.path.join(tempfile.gettempdir(), f"cfm_bench_jp2k_standin_v{VERSION}.svs")
    if os.path.exists(path):
        return path
    canvas = _canvas(source)
    levels = [canvas, canvas.resize((SIZE[0] // DOWNSAMPLE, SIZE[1] // DOWNSAMPLE),
                                    Image.LANCZOS)]
    # The tiles are already encoded: tifffile (without imagecodecs) is told to store them as
    # they are, for the length of this write.
    codecs = tifffile.TIFF.COMPRESSORS._codecs
    codecs[APERIO_J2K_RGB] = lambda data, *args, **kwargs: data
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with tifffile.TiffWriter(tmp) as writer:
            for index, level in enumerate(levels):
                head = f"Aperio Image Library v10.0.50\n{SIZE[0]}x{SIZE[1]} "
                desc = (head + f"[0,0 {SIZE[0]}x{SIZE[1]}] ({TILE}x{TILE}) J2K/KDU Q=70|"
                        "AppMag = 20" if index == 0
                        else head + f"-> {level.width}x{level.height} - |")
                writer.write(_j2k_tiles(level), shape=(level.height, level.width, 3),
                             dtype=np.uint8, tile=(TILE, TILE), compression=APERIO_J2K_RGB,
                             photometric="rgb", description=desc, metadata=None)
    finally:
        codecs.pop(APERIO_J2K_RGB, None)
    os.replace(tmp, path)
    return path
