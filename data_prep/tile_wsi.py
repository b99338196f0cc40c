"""Tile whole-slide images into de-identified JPEG tiles in ArrayRecord shards.

    python -m data_prep.tile_wsi --slides DIR|LISTFILE --out DIR --mpp 0.5 [--mpp 1.0 ...]
        [--tile-size 224] [--workers N] [--threads N] [--default-mpp X] [--min-tissue 0.5]
        [--jpeg-quality 90] [--tiles-per-shard 10000] [--num-shards N --shard-index I]
        [--salt S] [--cohort NAME] [--tissue-preset default]

Reads every format OpenSlide reads (SVS, NDPI, MRXS, SCN, generic tiled TIFF, ...) and plain
PNG/JPEG/TIFF images through PIL (those carry no microns-per-pixel, so they need --default-mpp).
Each slide is tiled on a non-overlapping grid at every --mpp: a tile covers
tile_size * mpp / slide_mpp level-0 pixels, is read from the coarsest pyramid level that is still
at least as fine as the target, and is resized to tile_size x tile_size with PIL. Tiles are kept
when the thumbnail tissue mask (data_prep.tissue) covers >= --min-tissue of them and they are not
background, blurred or pen-marked (constants in data_prep.tile_blocks). Tiles are read in blocks
and filtered and encoded on --threads threads per slide (data_prep.tile_blocks); the output is
the same for any thread count.

Output in --out (or in --out/part-IIIII-of-NNNNN with --num-shards N > 1, so array jobs never
collide):
    tiles-00000.array_record ...   size-balanced shards of cfm.data.records tile records
    manifest.csv                   shard, index, slide_id, x, y, level, mpp, tissue_fraction, cohort
    failures.csv                   slide_id, reason for every slide of this run that failed
    qc/<slide_id>.png              thumbnail with tissue overlay (green) and kept tiles (boxes)
    private/slide_ids.csv          slide_id -> original path, salt, content sha256:
                                   KEEP THIS FILE; NEVER SHARE IT (nor private/salt.txt)
    done/, staging/, config.json   restart bookkeeping

Privacy: associated images (label, macro) are never read; only pyramid levels are. slide_id is
the first 16 hex digits of sha256(salt + sha256(file content)): content-based, so renaming or
moving a slide keeps its id and a duplicate file is tiled once; the secret salt (--salt, or a
random one kept in private/) stops anyone from confirming a guessed slide by hashing it. No file
name, path or slide metadata reaches shards, manifest, failures or thumbnails; error messages
are scrubbed of the file's name and folder.

Restart: a slide is finished once done/<slide_id>.json exists (written last, after its tiles).
Tiles are staged per slide and packed into shards at the end of each run; every file is written
under a .tmp name, fsynced and renamed, and manifest.csv (the commit point of a pack) is written
after its shards, so no partial shard is ever listed. Exit status: 0 all slides tiled or already
done, 1 some slide failed (see failures.csv), 2 bad usage.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import secrets
import sys
import time

from array_record.python.array_record_module import ArrayRecordWriter

from cfm import cli_help, preemption
from cfm.atomic import fsync_dir
from cfm.data.records import encode_tile
from data_prep import shard_io, tissue
from data_prep.cli import parse_args
from data_prep.shard_io import (_csv_bytes, _file_sha256, _fsync_file, _read_csv, _scrub,
                                atomic_write, pack_shards, salted_id)
from data_prep.slide_io import (OPENSLIDE_SUFFIXES, PIL_SUFFIXES, SlideError, best_level,
                                open_slide, read_thumbnail, tile_grid)
from data_prep.tile_blocks import BlockReader, TileJob, cut_tiles, plan_blocks, tile_rejection
from data_prep.tile_qc import format_eta, write_qc

MANIFEST_FIELDS = shard_io.MANIFEST_FIELDS  # part of this module's interface (tests read it)
__all__ = ["MANIFEST_FIELDS", "TileSettings", "best_level", "find_slides", "main", "tile_grid",
           "tile_rejection", "tile_slide"]  # tile_rejection, best_level, tile_grid: re-exported

# A target mpp finer than the slide's by more than this (relative) is skipped for that slide:
# tiles would be upsampled blur (and a 352 um/px image would give millions of sub-pixel tiles).
MAX_UPSAMPLE = 0.10
MAPPING_FIELDS = ("slide_id", "salt", "source_path", "size_bytes", "mtime_ns",
                  "content_sha256")
# Settings that must match when a run is restarted on the same --out.
CONFIG_KEYS = ("mpp", "tile_size", "min_tissue", "jpeg_quality", "tissue_preset", "cohort",
               "default_mpp")


# ----------------------------------------------------------------------------- one slide
@dataclasses.dataclass(frozen=True)
class TileSettings:
    """What every worker needs: target mpps (um/px), tile side (px) and filters."""

    mpps: tuple[float, ...]
    tile_size: int
    min_tissue: float
    jpeg_quality: int
    tissue_preset: str
    cohort: str
    default_mpp: float | None
    salt: str
    out: str
    threads: int = 1  # threads within one slide (data_prep.tile_blocks)


def tile_slide(path: str, settings: TileSettings, known: tuple[str, str] | None = None) -> dict:
    """Tile one slide into staging/<id>.array_record, qc/<id>.png, then done/<id>.json.

    Returns a dict: path, slide_id, content_sha256, size_bytes, mtime_ns, status ('done',
    'skipped' or 'failed'), reason, tiles, seconds. Never raises for a bad slide.
    """
    start = time.time()
    result = {"path": path, "slide_id": "", "content_sha256": "", "size_bytes": "",
              "mtime_ns": "", "status": "failed", "reason": "", "tiles": 0}
    try:
        stat = os.stat(path)
        result["size_bytes"], result["mtime_ns"] = stat.st_size, stat.st_mtime_ns
        sha = known[1] if known else _file_sha256(path)
        result["content_sha256"], result["slide_id"] = sha, salted_id(settings.salt, sha)
    except OSError as err:
        result["slide_id"] = salted_id(settings.salt, "path:" + os.path.abspath(path))
        result["reason"] = "unreadable: " + _scrub(f"{type(err).__name__}: {err}", path)
        return result
    slide_id = result["slide_id"]
    if os.path.exists(os.path.join(settings.out, "done", slide_id + ".json")):
        result["status"] = "skipped"
        return result
    try:
        result["tiles"] = _tile_opened(path, slide_id, settings)
        result["status"] = "done"
    except SlideError as err:  # "category: detail"; only the detail can quote the file
        category, _, detail = str(err).partition(": ")
        result["reason"] = f"{category}: {_scrub(detail, path)}"
    except Exception as err:  # noqa: BLE001 - one bad slide must not stop the others
        result["reason"] = "unreadable: " + _scrub(f"{type(err).__name__}: {err}", path)
    result["seconds"] = round(time.time() - start, 3)
    return result


def _tile_opened(path: str, slide_id: str, settings: TileSettings) -> int:
    """Tiles of one slide (see tile_slide); raises SlideError with the reason on failure."""
    reader = open_slide(path)
    staging = os.path.join(settings.out, "staging", slide_id + ".array_record")
    tmp = f"{staging}.{os.getpid()}.tmp"
    writer = blocks = None
    try:
        mpp = reader.mpp
        if mpp is None:
            if settings.default_mpp is None:
                raise SlideError("no mpp: the slide has no microns-per-pixel (openslide.mpp-x); "
                                 "pass --default-mpp")
            mpp = (settings.default_mpp, settings.default_mpp)
        blocks = BlockReader(reader, path, settings.threads)
        try:
            thumb, thumb_mpp, scale_x, scale_y = read_thumbnail(reader, mpp, blocks)
        except Exception as err:  # noqa: BLE001
            raise SlideError(f"unreadable: {type(err).__name__}: {err}") from None
        mask = tissue.TissueMask(tissue.segment_tissue(thumb, thumb_mpp, settings.tissue_preset),
                                 scale_x, scale_y)
        if not mask.mask.any():
            raise SlideError("empty: no tissue found on the thumbnail")
        width, height = reader.level_dimensions[0]
        targets = [t for t in settings.mpps if t * (1.0 + MAX_UPSAMPLE) >= max(mpp)]
        if not targets:
            raise SlideError(f"empty: the slide ({max(mpp):.4g} um/px) is coarser than every "
                             "--mpp")
        writer = ArrayRecordWriter(tmp, "group_size:1")
        kept, rejected, boxes = 0, {}, []
        for target in targets:
            foot_x = settings.tile_size * target / mpp[0]
            foot_y = settings.tile_size * target / mpp[1]
            level = best_level(reader.level_downsamples, max(mpp), target)
            down = reader.level_downsamples[level]
            job = TileJob(level, max(1, int(round(foot_x / down))),
                          max(1, int(round(foot_y / down))), settings.tile_size,
                          settings.jpeg_quality)
            tiles = []
            for x, y in tile_grid(width, height, foot_x, foot_y):
                fraction = mask.fraction(x, y, foot_x, foot_y)
                if fraction >= settings.min_tissue and fraction > 0.0:
                    tiles.append((x, y, fraction))
            aligned = blocks.aligned(level, [t[0] for t in tiles], [t[1] for t in tiles])
            plan = plan_blocks(tiles, foot_x, aligned)
            try:
                for x, y, fraction, jpeg, why in cut_tiles(blocks, job, plan):
                    if why:
                        rejected[why] = rejected.get(why, 0) + 1
                        continue
                    meta = {"slide_id": slide_id, "x": x, "y": y, "level": level, "mpp": target,
                            "tile_size": settings.tile_size,
                            "tissue_fraction": round(fraction, 4), "cohort": settings.cohort}
                    writer.write(encode_tile(jpeg, meta))
                    kept += 1
                    boxes.append((target, x, y, foot_x, foot_y))
            except Exception as err:  # noqa: BLE001
                raise SlideError(f"unreadable: {type(err).__name__}: {err}") from None
        writer.close()
        writer = None
        if kept == 0:
            detail = ", ".join(f"{k} {v}" for k, v in sorted(rejected.items())) or "none"
            raise SlideError(f"empty: no tile reached --min-tissue {settings.min_tissue} and "
                             f"passed the filters (dropped: {detail})")
        _fsync_file(tmp)
        os.replace(tmp, staging)
        fsync_dir(os.path.dirname(staging))
        write_qc(os.path.join(settings.out, "qc", slide_id + ".png"), thumb, mask, boxes,
                 settings.mpps)
        record = {"slide_id": slide_id, "tiles": kept, "rejected": rejected}
        atomic_write(os.path.join(settings.out, "done", slide_id + ".json"),
                     json.dumps(record, sort_keys=True).encode("utf-8"))
        return kept
    finally:
        if writer is not None:
            writer.close()
        if blocks is not None:
            blocks.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        reader.close()


# ----------------------------------------------------------------------------- CLI
def find_slides(spec: str, exclude: str | None = None) -> list[str]:
    """Sorted absolute slide paths: a folder (recursive), a list file, or one slide file.

    Hidden files and folders, and the folder `exclude` (the output, whose QC PNGs would
    otherwise be found as slides on a rerun), are skipped when walking a folder.
    """
    if os.path.isdir(spec):
        found = []
        for root, dirs, files in os.walk(spec):
            dirs[:] = [d for d in dirs if not d.startswith(".")
                       and os.path.abspath(os.path.join(root, d)) != exclude]
            found += [os.path.join(root, f) for f in files if not f.startswith(".")
                      and f.lower().endswith(OPENSLIDE_SUFFIXES + PIL_SUFFIXES)]
    elif spec.lower().endswith(OPENSLIDE_SUFFIXES + PIL_SUFFIXES):
        found = [spec]
    else:
        base = os.path.dirname(os.path.abspath(spec))
        with open(spec, encoding="utf-8") as handle:
            lines = [line.strip() for line in handle]
        found = [os.path.join(base, line) for line in lines if line and not line.startswith("#")]
    return sorted({os.path.abspath(p) for p in found})


def _parser() -> argparse.ArgumentParser:
    parser = cli_help.parser("data_prep.tile_wsi", __doc__, "python -m data_prep.tile_wsi "
                             "--slides /data/slides --out /tmp/cfm_tiles --mpp 0.5")
    parser.add_argument("--slides", required=True,
                        help="folder (searched recursively), list file (one path a line), "
                             "or one slide")
    parser.add_argument("--out", required=True, help="output folder (created; reused on restart)")
    parser.add_argument("--mpp", type=float, action="append", required=True,
                        help="target microns per pixel; repeat for several magnifications")
    parser.add_argument("--tile-size", type=int, default=224, help="tile side in output pixels")
    parser.add_argument("--workers", type=int, default=1, help="slides tiled in parallel")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads within each slide (reads, filters, JPEG encoding); 0: the "
                             "available cores / --workers. For a few large slides on idle cores; "
                             "on a busy machine one thread was faster")
    parser.add_argument("--default-mpp", type=float, default=None,
                        help="um/px for slides without it (plain images; default: none, such "
                             "a slide fails)")
    parser.add_argument("--min-tissue", type=float, default=0.5,
                        help="minimum tissue fraction of a tile (0-1)")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1-95")
    parser.add_argument("--tiles-per-shard", type=int, default=10000,
                        help="target tiles per ArrayRecord shard")
    parser.add_argument("--num-shards", type=int, default=1,
                        help="split the sorted slide list into this many parts")
    parser.add_argument("--shard-index", type=int, default=0,
                        help="this job's part: slide i is tiled when i %% num-shards == index")
    parser.add_argument("--salt", default=None,
                        help="secret salt of slide ids (default: random, kept in private/)")
    parser.add_argument("--cohort", default="",
                        help="cohort name stored with every tile (default: none)")
    parser.add_argument("--tissue-preset", default="default", choices=sorted(tissue.PRESETS),
                        help="tissue mask and tile filter thresholds (data_prep.tissue)")
    return parser


def _usage_error(args) -> str | None:
    if any(m <= 0 for m in args.mpp) or (args.default_mpp is not None and args.default_mpp <= 0):
        return "--mpp and --default-mpp must be > 0"
    if args.tile_size < 8:
        return "--tile-size must be >= 8"
    if not 0.0 <= args.min_tissue <= 1.0:
        return "--min-tissue must be in [0, 1]"
    if not 1 <= args.jpeg_quality <= 95:
        return "--jpeg-quality must be in [1, 95]"
    if args.workers < 1 or args.tiles_per_shard < 1 or args.threads < 0:
        return "--workers and --tiles-per-shard must be >= 1, --threads >= 0"
    if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
        return "need --num-shards >= 1 and 0 <= --shard-index < --num-shards"
    if not os.path.exists(args.slides):
        return f"--slides {args.slides} does not exist"
    return None


def _resolve_salt(private: str, given: str | None) -> str:
    """--salt, else the salt stored in private/salt.txt, else a new random one (stored)."""
    salt_path = os.path.join(private, "salt.txt")
    stored = open(salt_path, encoding="utf-8").read().strip() if os.path.exists(salt_path) else None
    if given is not None and stored is not None and given != stored:
        raise SlideError(f"--salt differs from the salt this --out was made with ({salt_path})")
    salt = given or stored or secrets.token_hex(16)
    if stored is None:
        atomic_write(salt_path, salt.encode("utf-8") + b"\n")
    return salt


def _check_config(out: str, config: dict) -> None:
    path = os.path.join(out, "config.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            previous = json.load(handle)
        if previous != config:
            raise SlideError(f"{path} records other settings ({previous}); use a new --out")
    else:
        atomic_write(path, json.dumps(config, sort_keys=True).encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns 0 (all slides ok), 1 (some slide failed) or 2 (bad usage)."""
    args, status = parse_args(_parser(), argv, _usage_error, "tile_wsi")
    if args is None:
        return status
    slides = find_slides(args.slides, os.path.abspath(args.out))
    slides = slides[args.shard_index::args.num_shards]
    if not slides:
        print(f"tile_wsi: no slides found in {args.slides} for part {args.shard_index}",
              file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    if args.num_shards > 1:
        out = os.path.join(out, f"part-{args.shard_index:05d}-of-{args.num_shards:05d}")
        if args.salt is None:
            print("tile_wsi: note: without --salt each part gets its own random salt, so the "
                  "same slide in two parts gets two ids", file=sys.stderr)
    for sub in ("qc", "private", "done", "staging"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    for folder in (out, *(os.path.join(out, s) for s in ("qc", "private", "done", "staging"))):
        for name in os.listdir(folder):  # leftovers of a crashed run; never listed anywhere
            if name.endswith(".tmp"):
                os.remove(os.path.join(folder, name))
    private = os.path.join(out, "private")
    config = {"mpp": list(args.mpp), "tile_size": args.tile_size, "min_tissue": args.min_tissue,
              "jpeg_quality": args.jpeg_quality, "tissue_preset": args.tissue_preset,
              "cohort": args.cohort, "default_mpp": args.default_mpp}
    try:
        _check_config(out, config)
        salt = _resolve_salt(private, args.salt)
    except SlideError as err:
        print(f"tile_wsi: {err}", file=sys.stderr)
        return 2
    threads = args.threads or max(1, len(os.sched_getaffinity(0)) // args.workers)
    settings = TileSettings(tuple(args.mpp), args.tile_size, args.min_tissue, args.jpeg_quality,
                            args.tissue_preset, args.cohort, args.default_mpp, salt, out, threads)
    mapping_path = os.path.join(private, "slide_ids.csv")
    mapping = {(r["slide_id"], r["source_path"]): r for r in _read_csv(mapping_path)}
    known = {(r["source_path"], r["size_bytes"], r["mtime_ns"]): (r["slide_id"],
                                                                  r["content_sha256"])
             for r in mapping.values() if r["salt"] == salt and r["content_sha256"]}

    def known_for(path):
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return known.get((path, str(stat.st_size), str(stat.st_mtime_ns)))

    failures, seen, tiles, done = [], set(), 0, 0
    start = time.time()

    def record(result):
        nonlocal tiles, done
        done += 1
        key = (result["slide_id"], result["path"])
        mapping[key] = {"slide_id": result["slide_id"], "salt": salt,
                        "source_path": result["path"], "size_bytes": result["size_bytes"],
                        "mtime_ns": result["mtime_ns"],
                        "content_sha256": result["content_sha256"]}
        atomic_write(mapping_path, _csv_bytes(MAPPING_FIELDS, sorted(
            mapping.values(), key=lambda r: (r["slide_id"], r["source_path"]))))
        if result["status"] == "failed":
            failures.append({"slide_id": result["slide_id"], "reason": result["reason"]})
            note = f"failed ({result['reason']})"
        elif result["slide_id"] in seen:
            note = "duplicate of another slide in this run"
        else:
            tiles += result["tiles"]
            note = "already done" if result["status"] == "skipped" else f"{result['tiles']} tiles"
        seen.add(result["slide_id"])
        elapsed = max(time.time() - start, 1e-9)
        eta = elapsed / done * (len(slides) - done)
        print(f"tile_wsi: {done}/{len(slides)} slides ({len(failures)} failed), "
              f"{result['slide_id']}: {note}; {tiles / elapsed:.1f} tiles/s, "
              f"ETA {format_eta(eta)}", file=sys.stderr, flush=True)

    # SIGTERM / SIGINT: workers ended, finished slides kept, one line, exit 143 / 130
    def kept() -> str:
        return (f"after {done} of {len(slides)} slides: the finished ones stay in {out}; run "
                "the same command to go on (it skips them and clears unfinished .tmp files)")

    with preemption.stop_on_signals("tile_wsi", kept):
        if args.workers == 1:
            for path in slides:
                record(tile_slide(path, settings, known_for(path)))
        else:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(
                    args.workers, mp_context=context, initializer=preemption.ignore_sigint) as pool:
                futures = {pool.submit(tile_slide, p, settings, known_for(p)): p for p in slides}
                for future in concurrent.futures.as_completed(futures):
                    try:
                        record(future.result())
                    except Exception as err:  # noqa: BLE001 - e.g. a reader crashed the worker
                        path = futures[future]
                        record({"path": path, "status": "failed", "tiles": 0, "size_bytes": "",
                                "mtime_ns": "", "content_sha256": "",
                                "slide_id": salted_id(salt, "path:" + path),
                                "reason": "crashed: " + _scrub(f"{type(err).__name__}: {err}",
                                                               path)})
        packed = pack_shards(out, args.tiles_per_shard)
        atomic_write(os.path.join(out, "failures.csv"),
                     _csv_bytes(("slide_id", "reason"), failures))
        print(f"tile_wsi: {len(slides) - len(failures)}/{len(slides)} slides ok, {packed} tiles "
              f"packed into {out}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
