"""Host input throughput: JPEG decode + DINOv2 multi-crop augmentation, per CPU core.

    python benchmarks/input_pipeline.py [--samples 200] [--tile-size 256] [--preset vit_l16]

Encodes `SyntheticSource` H&E-like tiles (256 x 256 by default) to JPEG quality 90 beforehand,
as the shard pipeline stores them, then times, in one process pinned to one core with one
numpy/BLAS thread, what every training sample costs on the host: the PIL JPEG decode and
`MultiCrop` with 2 x 224 global + 8 x 96 local crops and DINOv2's default augmentations (the
`vit_l16` preset: Oquab et al. 2023, arXiv:2304.07193), once with HED stain jitter off and once
with `augment.hed_jitter=0.05` (Tellez et al. 2019, MedIA 58:101544; off in every preset).

Target (issue): at least 60 multi-crop samples/s per core, so that a TPU v5p host's ~200 cores
keep up with a ViT-L/16 step. The per-sample breakdown splits the time into decode, the crops
alone (resize + flips; every photometric probability set to 0) and the photometric rest (full
augmentation minus crops alone); HED is the extra time of the hed_jitter run.
Last line: `samples_per_s_per_core=<x> samples_per_s_per_core_hed=<y>`.

Measured 2026-11-29 on the 2-core x86_64 CI-class machine (shared, load ~1.5-2; best of 3 rounds
of 200 samples; ms per sample):

| code | decode | crops | photometric | HED | samples/s/core (HED off / 0.05) |
|---|---|---|---|---|---|
| before (PIL hue shift, no stain jitter) | 0.74 | 3.15 | 10.35 | - | 70 / - |
| after (table hue shift, identical outputs) | 0.68 | 3.16 | 8.31 | +3.45 | 82 / 64 |

Under heavier contention the same code measured as low as 45 (before) samples/s/core, so
compare runs made back to back.
"""

from __future__ import annotations

import os

# One thread everywhere, before numpy loads: the figure is per core.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import io  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cfm import cli_help, config_loader  # noqa: E402
from cfm.data.augment import MultiCrop  # noqa: E402
from cfm.data.sources import SyntheticSource  # noqa: E402

TARGET = 60.0  # multi-crop samples/s per core (issue: ~200-core v5p host vs a ViT-L/16 step)
JPEG_QUALITY = 90


def _config(preset: str):
    return config_loader.load_config(f"{ROOT}/configs/dino_vit.py:{preset}")


def _encode(images: list[np.ndarray]) -> list[bytes]:
    """JPEG quality-90 bytes of each uint8 RGB tile (4:2:0 chroma, PIL's default)."""
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
        out.append(buf.getvalue())
    return out


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _time(blobs: list[bytes], multicrop: MultiCrop | None, n: int, rounds: int
          ) -> tuple[float, float]:
    """Best-of-`rounds` mean seconds per sample of (decode, multicrop) over `n` samples.

    Best-of rather than mean over rounds: other processes on a shared machine only ever add time.
    """
    best_dec, best_aug = float("inf"), float("inf")
    for r in range(rounds):
        t_dec = t_aug = 0.0
        for i in range(n):
            t0 = time.perf_counter()
            img = _decode(blobs[i % len(blobs)])
            t1 = time.perf_counter()
            if multicrop is not None:
                multicrop(img, np.random.default_rng([r, i]))
            t2 = time.perf_counter()
            t_dec += t1 - t0
            t_aug += t2 - t1
        best_dec, best_aug = min(best_dec, t_dec / n), min(best_aug, t_aug / n)
    return best_dec, best_aug


def main() -> None:
    p = cli_help.parser("benchmarks.input_pipeline", __doc__,
                        "python -m benchmarks.input_pipeline --samples 200")
    p.add_argument("--samples", type=int, default=200, help="timed samples per round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; the best is reported")
    p.add_argument("--tiles", type=int, default=32, help="distinct tiles, reused cyclically")
    p.add_argument("--tile-size", type=int, default=256, help="tile side in pixels")
    p.add_argument("--preset", default="vit_l16", help="configs/dino_vit.py preset")
    args = p.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    config = _config(args.preset)
    c, a = config.crops, config.augment
    blobs = _encode([SyntheticSource(args.tiles, args.tile_size, seed=0)[i]
                     for i in range(args.tiles)])
    print(f"preset={args.preset}: {2} x {c.global_size} + {c.n_local} x {c.local_size} crops "
          f"from {args.tile_size}px JPEG q{JPEG_QUALITY} tiles "
          f"({np.mean([len(b) for b in blobs]) / 1024:.1f} KiB mean)")

    a.hed_jitter = 0.0
    full = MultiCrop(c, a)
    a.hed_jitter = 0.05
    hed = MultiCrop(c, a)
    a.hed_jitter = 0.0
    geo = config.augment.copy_and_resolve_references()
    geo.color_jitter = geo.grayscale = geo.solarize = 0.0
    geo.blur = (0.0, 0.0, 0.0)
    crops_only = MultiCrop(c, geo)

    _time(blobs, full, min(args.samples, 20), 1)  # warm-up: caches, lazy imports
    dec, t_full = _time(blobs, full, args.samples, args.rounds)
    _, t_hed = _time(blobs, hed, args.samples, args.rounds)
    _, t_geo = _time(blobs, crops_only, args.samples, args.rounds)

    ms = 1e3
    print(f"per sample: decode {dec * ms:.2f} ms | crops {t_geo * ms:.2f} ms | photometric "
          f"{(t_full - t_geo) * ms:.2f} ms | HED jitter +{(t_hed - t_full) * ms:.2f} ms")
    rate, rate_hed = 1.0 / (dec + t_full), 1.0 / (dec + t_hed)
    for name, r in (("hed_jitter=0", rate), ("hed_jitter=0.05", rate_hed)):
        verdict = "meets" if r >= TARGET else "BELOW"
        print(f"{name}: {r:.1f} samples/s/core ({verdict} the {TARGET:.0f}/s target)")
    print(f"samples_per_s_per_core={rate:.1f} samples_per_s_per_core_hed={rate_hed:.1f}")


if __name__ == "__main__":
    main()
