"""Random-access image sources for grain: `len(source)` and `source[i]` -> uint8 RGB [H, W, 3].

`SyntheticSource` draws H&E-like tiles procedurally (tests, smoke runs, no data needed);
`FolderSource` reads a folder of tile images; `ShardSource` reads the ArrayRecord tile shards
that `data_prep.tile_wsi` writes. All are cheap to send to grain's worker processes: they hold
only sizes, seeds and file names (the ArrayRecord reader reopens its files there).
"""

import io
import os

import grain
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cfm.data.records import decode_tile

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

# Approximate RGB of H&E stains: eosin-pink cytoplasm/stroma, haematoxylin-purple nuclei.
_EOSIN = np.array([236.0, 178.0, 206.0], np.float32)
_STROMA = np.array([214.0, 120.0, 170.0], np.float32)
_NUCLEUS = np.array([92.0, 58.0, 140.0], np.float32)


def _find_files(path: str, suffixes: tuple[str, ...], folder_hint: str, empty_hint: str
                ) -> list[str]:
    """Files under `path` (recursively, sorted) whose names end in `suffixes`; clear errors
    naming `data.path` for a missing folder or one without such files."""
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"data.path={path!r} is not a folder; point --config.data.path "
                                f"at {folder_hint}")
    files = sorted(os.path.join(root, n) for root, _, names in os.walk(path)
                   for n in names if n.lower().endswith(suffixes))
    if not files:
        raise ValueError(f"data.path={path!r} holds no {'/'.join(suffixes)} files (searched "
                         f"recursively); {empty_hint}")
    return files


class SyntheticSource:
    """`size` deterministic H&E-like RGB images of `image_size` pixels, image i seeded by (seed, i).

    Each image has a smoothly varying pink background, a few wavy stroma streaks and elliptical
    purple nuclei whose number, size and clustering vary per image, so crops of one image share
    texture and colour statistics that self-supervised learning can pick up.
    """

    def __init__(self, size: int, image_size: int, seed: int):
        if size < 1 or image_size < 8:
            raise ValueError(f"SyntheticSource needs size >= 1 and image_size >= 8, got "
                             f"{size}, {image_size} (data.synthetic_size / synthetic_image_size)")
        self.size, self.image_size, self.seed = int(size), int(image_size), int(seed)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"SyntheticSource index {index} out of range [0, {self.size})")
        rng = np.random.default_rng([self.seed, index])
        s = self.image_size
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
        # Background: eosin with low-frequency shading (coarse noise, bicubic-upsampled).
        coarse = Image.fromarray((rng.random((6, 6)) * 255).astype(np.uint8), "L")
        shade = np.asarray(coarse.resize((s, s), Image.Resampling.BICUBIC), np.float32) / 255.0
        img = _EOSIN * (0.85 + 0.15 * shade[..., None])
        # Stroma: a few wavy bands along a random direction.
        theta, period, phase = rng.uniform(0, np.pi), rng.uniform(0.15, 0.5), rng.uniform(0, 6.3)
        along = xx * np.cos(theta) + yy * np.sin(theta)
        across = -xx * np.sin(theta) + yy * np.cos(theta)
        wave = np.sin(2 * np.pi * (along / period) + 3.0 * np.sin(2 * np.pi * across) + phase)
        streak = np.clip((wave - rng.uniform(0.3, 0.8)) * 3.0, 0.0, 1.0)[..., None]
        streak = streak.astype(np.float32)
        img = img * (1 - 0.7 * streak) + _STROMA * 0.7 * streak
        # Nuclei: ellipses drawn on a coverage mask, half clustered around a few centres.
        n = int(rng.integers(5, 45) * (s / 64) ** 2 * rng.uniform(0.5, 1.5))
        radius = s * rng.uniform(0.015, 0.04)
        centres = rng.random((int(rng.integers(1, 4)), 2))
        pos = np.where(rng.random((n, 1)) < 0.5,
                       centres[rng.integers(0, len(centres), n)] + rng.normal(0, 0.12, (n, 2)),
                       rng.random((n, 2))) * s
        radii = radius * rng.uniform(0.6, 1.4, (n, 2))
        mask = Image.new("L", (s, s), 0)
        draw = ImageDraw.Draw(mask)
        for (x, y), (rx, ry), tone in zip(pos, radii, rng.uniform(150, 255, n)):
            draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=int(tone))
        nuclei = np.asarray(mask.filter(ImageFilter.GaussianBlur(0.6)), np.float32)[..., None] / 255
        img = img * (1 - nuclei) + _NUCLEUS * nuclei
        img += 4.0 * rng.standard_normal(img.shape, np.float32)  # sensor noise, ~4 grey levels
        return np.clip(img, 0, 255).astype(np.uint8)


class FolderSource:
    """Every .png/.jpg/.jpeg/.tif/.tiff under `path` (recursively, sorted), read as uint8 RGB.

    Grayscale and palette images are converted to RGB; transparent ones are composited on white.
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.files = _find_files(
            self.path, IMAGE_SUFFIXES,
            "image tiles (for the demo: python -m data_prep.demo_tiles --out THAT_FOLDER)",
            "put image tiles there or point --config.data.path elsewhere")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> np.ndarray:
        name = self.files[int(index)]
        try:
            with Image.open(name) as img:
                img.load()
                if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                    rgba = img.convert("RGBA")
                    img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    img.alpha_composite(rgba)
                return np.asarray(img.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for corrupt files
            raise ValueError(f"cannot read image {name!r} ({e}); delete or re-export it") from e


class ShardSource:
    """Every tile in the `*.array_record` shards under `path` (recursively, sorted by path), as
    written by `data_prep.tile_wsi`: record i -> its JPEG decoded to uint8 RGB."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.files = _find_files(self.path, (".array_record",),
                                 "the --out folder of `python -m data_prep.tile_wsi`",
                                 "tile slides into it with `python -m data_prep.tile_wsi` first")
        self._records = grain.sources.ArrayRecordDataSource(self.files)
        if len(self._records) == 0:
            raise ValueError(f"data.path={self.path!r}: its shards hold no tiles")

    def __len__(self) -> int:
        return len(self._records)

    def record(self, index: int) -> tuple[bytes, dict]:
        """(JPEG bytes, metadata) of tile `index`."""
        return decode_tile(self._records[int(index)])

    def tile(self, index: int) -> tuple[np.ndarray, dict]:
        """(uint8 RGB [H, W, 3], metadata) of tile `index`."""
        jpeg, meta = self.record(index)
        try:
            with Image.open(io.BytesIO(jpeg)) as img:
                return np.asarray(img.convert("RGB"), dtype=np.uint8), meta
        except (OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"tile {index} in {self.path!r} (slide {meta.get('slide_id')}) does "
                             f"not decode: {e}") from e

    def __getitem__(self, index: int) -> np.ndarray:
        return self.tile(index)[0]


def _omics_hint(path: str) -> str:
    """" (a data_prep.prepare_omics folder: ...)" when `path` holds an omics manifest."""
    try:
        with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
            omics = '"cfm-omics/' in f.read(4096)
    except OSError:
        return ""
    return (" (it is a data_prep.prepare_omics folder: train on it with "
            "configs/omics_mgm.py and --config.data.source=prepared)") if omics else ""


def check_source(data_cfg) -> None:
    """Fail now, naming `data.path`, if the source `data_cfg` names cannot give tiles: a missing
    folder, one without image files (folder) or shards (shards), a first image or tile record
    that does not decode. Reads the file list, the shards' indices and one item, not the
    data; FileNotFoundError or ValueError."""
    if data_cfg.source == "folder":
        source = FolderSource(data_cfg.path)
        source[0]  # ValueError naming the file if it is not an image
    elif data_cfg.source == "shards":
        path, hint = data_cfg.path, _omics_hint(data_cfg.path)
        try:
            source = ShardSource(path)
        except (FileNotFoundError, ValueError) as e:  # the message names data.path
            raise ValueError(f"{e}{hint}") from None
        except (RuntimeError, OSError) as e:  # array_record refuses a file that is not one
            raise ValueError(f"data.path={path!r}: its .array_record files do not read as "
                             f"shards ({e}); write them with python -m data_prep.tile_wsi"
                             ) from None
        try:
            source.tile(0)
        except ValueError as e:
            raise ValueError(f"data.path={path!r}: its first tile does not read ({e}){hint}"
                             ) from None


def make_source(data_cfg, seed: int):
    """The source `data_cfg.source` names: "synthetic", "folder" or "shards" (the last two read
    `data_cfg.path`)."""
    if data_cfg.source == "synthetic":
        return SyntheticSource(data_cfg.synthetic_size, data_cfg.synthetic_image_size, seed)
    if data_cfg.source == "folder":
        return FolderSource(data_cfg.path)
    if data_cfg.source == "shards":
        return ShardSource(data_cfg.path)
    raise ValueError(f"data.source={data_cfg.source!r} is not supported; use 'synthetic', "
                     "'folder' or 'shards'")
