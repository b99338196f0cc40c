"""Labelled synthetic H&E tiles, slides and spots for the downstream (fine-tuning) tasks.

    python -m data_prep.synthetic_tme --out DIR [--seed 0] [--tile-size 64] [--mpp 1.0]
        [--patients 16] [--tiles-per-class 12] [--slides 40] [--grid 10] [--overwrite]

There are no labelled slides in the shared data, so every fine-tuning task (tile probe, MIL,
spatial expression, TME maps) runs on what this writes. Tiles are drawn procedurally, in the
H&E palette of `cfm.data.sources.SyntheticSource`, as four tissue classes whose look follows
their histology (at 1 um/px a lymphocyte nucleus is ~7 um across, a carcinoma nucleus 12-20 um):

    tumour      pale purple cytoplasm, 6-14 large pleomorphic nuclei (radius 6-11 um), nucleoli
    stroma      pink wavy collagen streaks with 2-6 thin elongated nuclei along them
    immune      pale background crowded with 25-60 small round dark nuclei (radius 3-4 um)
    background  near-white glass with a few faint pink specks

A third of the tissue tiles also hold a few nuclei of another class, and every pseudo-patient
and slide has its own stain (per-channel optical-density factors 0.75-1.25), so the classes
are separable but not trivially, and only across stains for patient-level splits.

Output in --out (every shard folder in `data_prep.tile_wsi`'s format: `cfm.data.records`
records in `tiles-NNNNN.array_record`, `manifest.csv`, `config.json` with mpp and tile size, so
`cfm.embed`, `cfm.train --config.data.source=shards` and `cfm.export` read them as they read
real tiles; every tile's metadata also carries `label` (its class) and `n_nuclei`):

    tiles/            labelled tile set: --patients pseudo-patients (slide_id p000 ...), each
                      --tiles-per-class tiles of every class, on no grid (x = index)
    slides/           --slides mosaic slides of --grid x --grid tiles (slide_id s000 ...), with
                      a tumour nest, stroma around it, background outside the tissue outline and
                      lymphocyte clusters at and inside the tumour margin; half the slides are
                      immune-rich (4-7 clusters), half immune-poor (0-1)
    slide_labels.csv  slide_id, patient_id, immune_rich (0/1), the true class fractions of the
                      tissue, tumour area in mm^2 and TIL density (immune tiles in or next to
                      tumour per mm^2 of tumour; `cfm.finetune.tme` computes the same figure from
                      predicted classes)
    truth/<id>.png    each slide's true class map (one pixel per tile, colours as in cfm.explain)
    spatial/expression.csv
                      one spot per tissue tile of the slides (slide_id, x, y and counts of 20
                      genes): marker genes whose mean follows the tile's class and its nuclei
                      count (e.g. PTPRC, CD3E with the number of lymphocytes), drawn Poisson

Deterministic for a given --seed. Written to a temporary folder and renamed; an existing
non-empty --out is refused unless --overwrite. Takes ~10 s for the defaults on one core.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image, ImageDraw, ImageFilter

from cfm import cli_help
from cfm.atomic import atomic_folder
from cfm.data.records import encode_tile
from cfm.explain.heatmap import CLASS_COLOURS
from cfm.finetune.tme import tme_scores

CLASSES = ("tumour", "stroma", "immune", "background")
# RGB of the H&E stains (as cfm.data.sources), per class.
_EOSIN = np.array([236.0, 178.0, 206.0], np.float32)
_STROMA = np.array([214.0, 110.0, 165.0], np.float32)
_TUMOUR_CYTO = np.array([205.0, 160.0, 200.0], np.float32)
_GLASS = np.array([243.0, 240.0, 245.0], np.float32)
_LYMPH = np.array([55.0, 35.0, 105.0], np.float32)
_TUMOUR_NUC = np.array([110.0, 70.0, 150.0], np.float32)
_FIBRO_NUC = np.array([85.0, 50.0, 125.0], np.float32)

GENES = {  # gene -> (baseline log-mean, class effects on the log scale, per-nucleus effect)
    "EPCAM": (0.5, {"tumour": 2.5}, 0.0), "KRT8": (0.8, {"tumour": 2.2}, 0.0),
    "KRT18": (0.8, {"tumour": 2.0}, 0.0), "CDH1": (0.3, {"tumour": 1.8}, 0.0),
    "MKI67": (0.0, {"tumour": 1.0}, 0.08),
    "PTPRC": (0.3, {"immune": 1.2}, 0.04), "CD3E": (0.0, {"immune": 1.0}, 0.04),
    "CD8A": (-0.3, {"immune": 0.9}, 0.035), "MS4A1": (-0.3, {"immune": 0.8}, 0.03),
    "CD74": (1.0, {"immune": 1.2, "tumour": 0.4}, 0.0),
    "COL1A1": (0.8, {"stroma": 2.2}, 0.0), "COL1A2": (0.8, {"stroma": 2.0}, 0.0),
    "COL3A1": (0.6, {"stroma": 2.0}, 0.0), "DCN": (0.5, {"stroma": 1.6}, 0.0),
    "ACTA2": (0.2, {"stroma": 1.2}, 0.1),
    "ACTB": (2.5, {"background": -2.0}, 0.0), "GAPDH": (2.2, {"background": -2.0}, 0.0),
    "B2M": (2.0, {"immune": 0.6, "background": -2.0}, 0.0),
    "MALAT1": (2.0, {"background": -1.5}, 0.0), "NOISE1": (1.0, {}, 0.0),
}


# ============================================================================ drawing =========
def _shade(rng: np.random.Generator, s: int) -> np.ndarray:
    """Low-frequency shading in [0, 1], [s, s]."""
    coarse = Image.fromarray((rng.random((5, 5)) * 255).astype(np.uint8), "L")
    return np.asarray(coarse.resize((s, s), Image.Resampling.BICUBIC), np.float32) / 255.0


def _ellipse(draw: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float,
             angle: float, fill: int) -> None:
    """A filled ellipse rotated by `angle` (radians), as a 24-point polygon."""
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    ca, sa = np.cos(angle), np.sin(angle)
    draw.polygon(list(zip(cx + ca * x - sa * y, cy + sa * x + ca * y)), fill=fill)


def _nuclei(img: np.ndarray, colour: np.ndarray, ellipses, blur: float = 0.6) -> np.ndarray:
    """`img` with nuclei (cx, cy, rx, ry, angle, tone 0-255) painted in `colour`."""
    s = img.shape[0]
    mask = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(mask)
    for cx, cy, rx, ry, angle, tone in ellipses:
        _ellipse(draw, cx, cy, rx, ry, angle, int(tone))
    m = np.asarray(mask.filter(ImageFilter.GaussianBlur(blur)), np.float32)[..., None] / 255.0
    return img * (1 - m) + colour * m


def stain(rng: np.random.Generator, spread: float = 0.25) -> np.ndarray:
    """A patient's / slide's stain: per-channel optical-density factors drawn from
    U(1 - spread, 1 + spread) (staining and scanner differences between sites, the main nuisance
    of pathology models). With spread 0.6 the stain shifts hue enough that tile colour alone
    no longer tells the classes apart."""
    if not 0.0 <= spread < 1.0:
        raise ValueError(f"stain spread must be in [0, 1), got {spread}")
    return rng.uniform(1.0 - spread, 1.0 + spread, 3).astype(np.float32)


def draw_tile(label: str, size: int, mpp: float, rng: np.random.Generator,
              od_scale: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """(uint8 RGB [size, size, 3], number of nuclei drawn) of one tile of class `label` at
    `mpp` microns per pixel; `od_scale` (see `stain`) scales each channel's optical density.
    A third of the tissue tiles also hold a few nuclei of another class (lymphocytes in
    tumour or stroma, a stray tumour cell among lymphocytes), so classes are not trivially
    separable."""
    img, n = _draw(label, size, mpp, rng)
    if label != "background" and rng.random() < 1 / 3:
        um, k = 1.0 / mpp, int(rng.integers(2, 6))
        if label == "immune":
            extra = [(*rng.random(2) * size, rng.uniform(6, 9) * um, rng.uniform(5, 8) * um,
                      rng.uniform(0, np.pi), 200) for _ in range(max(1, k // 3))]
            img = _nuclei(img.astype(np.float32), _TUMOUR_NUC, extra, blur=0.8)
        else:
            extra = [(*rng.random(2) * size, r, r, 0.0, 240)
                     for r in rng.uniform(3.0, 4.0, k) * um]
            img = _nuclei(img.astype(np.float32), _LYMPH, extra, blur=0.5)
        img = np.clip(img, 0, 255).astype(np.uint8)
    if od_scale is not None:  # Beer-Lambert: scale optical density -log(I / 255) per channel
        od = -np.log(np.maximum(img.astype(np.float32), 1.0) / 255.0) * od_scale
        img = np.clip(255.0 * np.exp(-od), 0, 255).astype(np.uint8)
    return img, n


def _draw(label: str, size: int, mpp: float, rng: np.random.Generator
          ) -> tuple[np.ndarray, int]:
    s = size
    um = 1.0 / mpp  # pixels per micron
    area = (s * mpp / 64.0) ** 2  # nuclei counts below are per 64 x 64 um
    shade = _shade(rng, s)[..., None]
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    if label == "background":
        img = _GLASS * (0.97 + 0.03 * shade) + np.zeros((s, s, 3), np.float32)
        n = int(rng.integers(0, 4))
        specks = [(*rng.random(2) * s, *(rng.uniform(1, 3, 2) * um), rng.uniform(0, 3), 60)
                  for _ in range(n)]
        img = _nuclei(img, _EOSIN, specks, blur=1.0)
        return _finish(img, rng, 2.0), 0
    if label == "stroma":
        theta, period = rng.uniform(0, np.pi), rng.uniform(10, 20) * um
        along = xx * np.cos(theta) + yy * np.sin(theta)
        across = -xx * np.sin(theta) + yy * np.cos(theta)
        wave = np.sin(2 * np.pi * across / period + 1.5 * np.sin(2 * np.pi * along / (3 * period)))
        streak = np.clip((wave + 0.2) * 1.5, 0.0, 1.0)[..., None].astype(np.float32)
        img = _EOSIN * (0.9 + 0.1 * shade)
        img = img * (1 - 0.8 * streak) + _STROMA * 0.8 * streak
        n = int(round(rng.integers(2, 7) * area))
        nuc = [(*rng.random(2) * s, rng.uniform(5, 8) * um, rng.uniform(1.2, 2.0) * um,
                theta + rng.normal(0, 0.15), rng.uniform(190, 255)) for _ in range(n)]
        return _finish(_nuclei(img, _FIBRO_NUC, nuc), rng), n
    if label == "immune":
        img = _EOSIN * (0.92 + 0.08 * shade) * 0.5 + _GLASS * 0.5
        n = int(round(rng.integers(25, 61) * area))
        centre = rng.random(2) * s
        pos = np.where(rng.random((n, 1)) < 0.6, centre + rng.normal(0, 0.25 * s, (n, 2)),
                       rng.random((n, 2)) * s)
        nuc = [(x, y, r, r * rng.uniform(0.85, 1.0), 0.0, rng.uniform(215, 255))
               for (x, y), r in zip(pos, rng.uniform(3.0, 4.0, n) * um)]
        return _finish(_nuclei(img, _LYMPH, nuc, blur=0.5), rng), n
    if label == "tumour":
        img = _TUMOUR_CYTO * (0.85 + 0.15 * shade)
        n = int(round(rng.integers(6, 15) * area))
        nuc = [(*rng.random(2) * s, rng.uniform(6, 11) * um, rng.uniform(4.5, 9) * um,
                rng.uniform(0, np.pi), rng.uniform(150, 230)) for _ in range(n)]
        img = _nuclei(img, _TUMOUR_NUC, nuc, blur=0.8)
        nucleoli = [(cx + rng.normal(0, 1), cy + rng.normal(0, 1), 1.2 * um, 1.2 * um, 0.0, 255)
                    for cx, cy, *_ in nuc]
        return _finish(_nuclei(img, _LYMPH, nucleoli, blur=0.4), rng), n
    raise ValueError(f"unknown class {label!r}; choose one of {CLASSES}")


def _finish(img: np.ndarray, rng: np.random.Generator, noise: float = 4.0) -> np.ndarray:
    img = img + noise * rng.standard_normal(img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ============================================================================ slides ==========
def slide_class_map(grid: int, rich: bool, rng: np.random.Generator) -> np.ndarray:
    """[grid, grid] class indices (into CLASSES) of one mosaic slide: tissue outline (else
    background), a tumour nest, stroma, lymphocyte clusters at and inside the tumour margin."""
    yy, xx = np.mgrid[0:grid, 0:grid].astype(np.float32) + 0.5
    c = grid / 2.0
    wobble = rng.normal(0, 0.05, (grid, grid))
    tissue = ((xx - c) / (0.52 * grid)) ** 2 + ((yy - c) / (0.5 * grid)) ** 2 + wobble < 1.0
    tc = c + rng.uniform(-0.12, 0.12, 2) * grid
    ax, ay = rng.uniform(0.2, 0.32, 2) * grid
    d_tumour = np.sqrt(((xx - tc[0]) / ax) ** 2 + ((yy - tc[1]) / ay) ** 2) + wobble
    out = np.full((grid, grid), CLASSES.index("stroma"), np.int32)
    out[d_tumour < 1.0] = CLASSES.index("tumour")
    n_clusters = int(rng.integers(4, 8)) if rich else int(rng.integers(0, 2))
    for _ in range(n_clusters):
        angle, radial = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.3)
        cx, cy = tc[0] + radial * ax * np.cos(angle), tc[1] + radial * ay * np.sin(angle)
        r = rng.uniform(0.9, 1.6) if rich else rng.uniform(0.6, 1.0)
        out[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = CLASSES.index("immune")
    out[~tissue] = CLASSES.index("background")
    return out


def tme_truth(class_map: np.ndarray, tile_size: int, mpp: float) -> dict:
    """True TME figures of a class map, defined as `cfm.finetune.tme.tme_scores` defines them."""
    return tme_scores(class_map, tile_size, mpp, CLASSES)


# ============================================================================ writing =========
class _ShardWriter:
    """Tile records into one ArrayRecord shard + manifest.csv + config.json, as tile_wsi writes."""

    def __init__(self, folder: str, tile_size: int, mpp: float, cohort: str):
        os.makedirs(folder)
        self.folder, self.name = folder, "tiles-00000.array_record"
        self.writer = ArrayRecordWriter(os.path.join(folder, self.name), "group_size:1")
        self.rows: list[dict] = []
        self.tile_size, self.mpp, self.cohort = tile_size, mpp, cohort

    def write(self, rgb: np.ndarray, slide_id: str, x: int, y: int, label: str,
              n_nuclei: int) -> None:
        meta = {"slide_id": slide_id, "x": int(x), "y": int(y), "level": 0, "mpp": self.mpp,
                "tile_size": self.tile_size, "tissue_fraction": 1.0, "cohort": self.cohort,
                "label": label, "n_nuclei": int(n_nuclei)}
        self.writer.write(encode_tile(_jpeg(rgb), meta))
        self.rows.append({"shard": self.name, "index": len(self.rows), **{
            k: meta[k] for k in ("slide_id", "x", "y", "level", "mpp", "tissue_fraction",
                                 "cohort", "label")}})

    def close(self) -> None:
        self.writer.close()
        _write_csv(os.path.join(self.folder, "manifest.csv"), self.rows)
        with open(os.path.join(self.folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump({"mpp": [self.mpp], "tile_size": self.tile_size, "cohort": self.cohort,
                       "synthetic": True, "classes": list(CLASSES)}, f, indent=1)


def _write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _spot_counts(label: str, n_nuclei: int, rng: np.random.Generator) -> dict:
    """Poisson counts of GENES for one spot of class `label` with `n_nuclei` nuclei."""
    out = {}
    for gene, (base, effects, per_nucleus) in GENES.items():
        mu = base + effects.get(label, 0.0) + per_nucleus * n_nuclei + rng.normal(0, 0.25)
        out[gene] = int(rng.poisson(np.exp(mu)))
    return out


def generate(out: str, seed: int = 0, tile_size: int = 64, mpp: float = 1.0, patients: int = 16,
             tiles_per_class: int = 12, slides: int = 40, grid: int = 10,
             overwrite: bool = False) -> dict:
    """Write the labelled tiles, slides, labels, truth maps and spots to `out`; returns counts."""
    if min(tile_size, patients, tiles_per_class, slides, grid) < 1 or mpp <= 0:
        raise ValueError("--tile-size, --patients, --tiles-per-class, --slides, --grid and --mpp "
                         "must be positive")
    if slides < 2:
        raise ValueError("--slides must be at least 2 (one immune-rich, one immune-poor)")
    out = os.path.abspath(out)
    if os.path.exists(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; choose a new folder or "
                              "pass --overwrite")
    with atomic_folder(out) as tmp:  # the whole folder or nothing; --overwrite swaps it in
        return _generate(tmp, seed, tile_size, mpp, patients, tiles_per_class, slides, grid)


def _generate(tmp: str, seed: int, tile_size: int, mpp: float, patients: int,
              tiles_per_class: int, slides: int, grid: int) -> dict:
    # Labelled tile set: every pseudo-patient has tiles of every class.
    tiles = _ShardWriter(os.path.join(tmp, "tiles"), tile_size, mpp, "synthetic_tiles")
    for p in range(patients):
        od = stain(np.random.default_rng([seed, 4, p]))
        for k, label in enumerate(CLASSES):
            for j in range(tiles_per_class):
                rng = np.random.default_rng([seed, 1, p, k, j])
                rgb, n = draw_tile(label, tile_size, mpp, rng, od)
                tiles.write(rgb, f"p{p:03d}", (k * tiles_per_class + j) * tile_size, 0, label, n)
    tiles.close()
    # Mosaic slides, their labels, truth maps and spots.
    writer = _ShardWriter(os.path.join(tmp, "slides"), tile_size, mpp, "synthetic_slides")
    os.makedirs(os.path.join(tmp, "truth"))
    os.makedirs(os.path.join(tmp, "spatial"))

    labels, spots = [], []
    for s in range(slides):
        rich = s % 2 == 0
        rng = np.random.default_rng([seed, 2, s])
        cmap = slide_class_map(grid, rich, rng)
        od = stain(np.random.default_rng([seed, 5, s]))
        slide_id = f"s{s:03d}"
        for r in range(grid):
            for c in range(grid):
                label = CLASSES[cmap[r, c]]
                rgb, n = draw_tile(label, tile_size, mpp,
                                   np.random.default_rng([seed, 3, s, r, c]), od)
                x, y = c * tile_size, r * tile_size  # level 0 is at `mpp`
                writer.write(rgb, slide_id, x, y, label, n)
                if label != "background":
                    spots.append({"slide_id": slide_id, "x": x, "y": y,
                                  **_spot_counts(label, n, rng)})
        truth = tme_truth(cmap, tile_size, mpp)
        labels.append({"slide_id": slide_id, "patient_id": f"pt{s:03d}", "immune_rich": int(rich),
                       **{k: v if isinstance(v, int) else round(float(v), 6)
                          for k, v in truth.items() if isinstance(v, (int, float))}})
        palette = np.array([CLASS_COLOURS[c] for c in CLASSES], np.uint8)
        Image.fromarray(palette[cmap]).resize((grid * 8, grid * 8), Image.NEAREST).save(
            os.path.join(tmp, "truth", f"{slide_id}.png"))
    writer.close()
    _write_csv(os.path.join(tmp, "slide_labels.csv"), labels)
    _write_csv(os.path.join(tmp, "spatial", "expression.csv"), spots)
    return {"tiles": len(tiles.rows), "slide_tiles": len(writer.rows), "slides": slides,
            "spots": len(spots)}


def main(argv: list[str] | None = None) -> int:
    ap = cli_help.parser("data_prep.synthetic_tme", __doc__,
                         "python -m data_prep.synthetic_tme --out /tmp/cfm_tme")
    ap.add_argument("--out", required=True, help="new folder for tiles/, slides/, labels, spots")
    ap.add_argument("--seed", type=int, default=0, help="seed of everything drawn")
    ap.add_argument("--tile-size", type=int, default=64, help="tile side in pixels")
    ap.add_argument("--mpp", type=float, default=1.0, help="microns per pixel of every tile")
    ap.add_argument("--patients", type=int, default=16, help="pseudo-patients of the tile set")
    ap.add_argument("--tiles-per-class", type=int, default=12, help="per patient and class")
    ap.add_argument("--slides", type=int, default=40, help="mosaic slides (half immune-rich)")
    ap.add_argument("--grid", type=int, default=10, help="tiles per side of a mosaic slide")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = ap.parse_args(argv)
    try:
        counts = generate(args.out, args.seed, args.tile_size, args.mpp, args.patients,
                          args.tiles_per_class, args.slides, args.grid, args.overwrite)
    except (FileExistsError, ValueError) as e:
        print(f"data_prep.synthetic_tme: {e}", file=sys.stderr)
        return 2
    print(f"data_prep.synthetic_tme: wrote {counts['tiles']} labelled tiles, {counts['slides']} "
          f"slides ({counts['slide_tiles']} tiles) and {counts['spots']} spots to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
