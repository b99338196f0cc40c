"""Slide tiling throughput on the real CMU-1-Small-Region.svs crop, one worker (one core).

    python benchmarks/tile_wsi.py [--repeats 3] [--mpp 0.5] [--tile-size 224]

Runs the whole `python -m data_prep.tile_wsi` job (content hash, thumbnail, tissue mask, tile
reads, filters, JPEG encoding, QC image, shard packing) into a fresh temporary folder per repeat
and reports the fastest repeat: tiles/s (kept tiles per wall-clock second) and slides/hour per
core for this 2220 x 2967 px slide (not scaled to a full-size slide).
Last line: `tiles_per_s=<x> slides_per_hour_per_core=<y>`.
"""

import contextlib
import io
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SLIDE = ROOT.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
sys.path.insert(0, str(ROOT))

from cfm import cli_help  # noqa: E402


def main() -> int:
    """Prints per-repeat timings and the summary line; 1 when the slide is missing."""
    parser = cli_help.parser("benchmarks.tile_wsi", __doc__,
                             "python -m benchmarks.tile_wsi --repeats 3")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repeats; the fastest is reported")
    parser.add_argument("--mpp", type=float, default=0.5, help="target microns per pixel")
    parser.add_argument("--tile-size", type=int, default=224, help="tile side in pixels")
    args = parser.parse_args()
    if not SLIDE.is_file():
        print(f"benchmark: {SLIDE} is missing; it comes with the shared data folder "
              "(../shared/data/wsi next to the repository)", file=sys.stderr)
        return 1
    from data_prep import tile_wsi

    best = None
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out")
            argv = ["--slides", str(SLIDE), "--out", out, "--mpp", str(args.mpp),
                    "--tile-size", str(args.tile_size)]
            start = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):
                status = tile_wsi.main(argv)
            seconds = time.perf_counter() - start
            with open(os.path.join(out, "manifest.csv"), encoding="utf-8") as handle:
                tiles = sum(1 for _ in handle) - 1
        if status != 0:
            print(f"benchmark: tiling failed with status {status}", file=sys.stderr)
            return 1
        print(f"repeat {repeat}: {tiles} tiles in {seconds:.3f} s")
        best = seconds if best is None else min(best, seconds)
    print(f"slide: {SLIDE.name}, {args.mpp} um/px, {args.tile_size} px tiles, 1 worker")
    print(f"tiles_per_s={tiles / best:.1f} slides_per_hour_per_core={3600.0 / best:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
