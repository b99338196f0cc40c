"""Tile embeddings for every tile in a set of tile shards, from a pretrained backbone.

    python -m cfm.embed --model WORKDIR|EXPORT [--step N] --shards DIR --out DIR [--batch 128]
    python -m cfm.embed --model WORKDIR|EXPORT --omics PREPARED --out DIR   (cfm/omics_embed.py)

`--model` is a cfm training workdir (its latest, or `--step`, checkpoint's teacher backbone, as
DINOv2 releases the teacher) or a `python -m cfm.export` folder in orbax or safetensors format.
Each tile is resized to the model's `img_size` (no crop) and normalised as in training; the
embedding is the final-norm CLS token (D floats), DINOv2's image feature.

Output in `--out`: `embeddings-XXXXX-of-YYYYY.npy` (float32 [n, D], `--per-file` rows each) and
`index.csv` (file, row and the tile's manifest keys: slide_id, x, y, level, mpp, ...), written
under temporary names and renamed, so a folder either holds a complete result or none.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time

from cfm import preemption

if __name__ == "__main__":  # before the imports below load JAX (seconds): a signal
    preemption.note_signals()  # meanwhile is noted, then acted on (cfm.preemption)

import jax
import ml_collections
import numpy as np
from PIL import Image

from cfm import atomic, cli_help, compat, errors, pretrained
from cfm.data.sources import ShardSource
from cfm.omics_embed import embed_omics


def load_backbone(model: str, step: int | None = None):
    """(training config, ViT module, teacher backbone params, step) from a cfm.train workdir
    (its latest or `step` checkpoint) or a cfm.export folder (orbax or safetensors format)."""
    p = pretrained.load(model, step)
    config = ml_collections.ConfigDict(p.info["provenance"]["training_config"])
    return config, p.module, p.params, p.step


def _prepare(tile: np.ndarray, size: int, mean, std) -> np.ndarray:
    if tile.shape[:2] != (size, size):
        tile = np.asarray(Image.fromarray(tile).resize((size, size), Image.BICUBIC))
    return ((tile.astype(np.float32) / 255.0 - np.asarray(mean, np.float32))
            / np.asarray(std, np.float32))


def embed(model: str, shards: str, out: str, step: int | None = None, batch: int = 128,
          per_file: int = 100_000, allow_scale_mismatch: bool = False) -> int:
    """Write the embeddings of every tile under `shards` to `out`; returns the tile count.
    First `cfm.compat.check_tiles`: CompatError (a ValueError) when the shards' tile size or
    mpp differ from the model's training tiles, unless `allow_scale_mismatch`."""
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"--out {out!r} exists and is not empty; choose a new folder")
    source = ShardSource(shards)
    agreed = compat.check_tiles(compat.model_spec(model, step), shards, allow_scale_mismatch)
    print(f"cfm.embed: {agreed}", file=sys.stderr)
    config, backbone, params, step = load_backbone(model, step)
    size = config.model.img_size
    mean, std = config.augment.mean, config.augment.std
    apply = jax.jit(lambda p, x: backbone.apply({"params": p}, x)["cls"])
    with atomic.atomic_folder(out) as tmp:  # the whole folder or nothing
        n = len(source)
        n_files = max(1, -(-n // per_file))  # files hold exactly per_file rows, the last the rest
        rows, chunk, file_idx, in_file, dim = [], [], 0, 0, 0
        meta_keys: list[str] = []
        start = time.perf_counter()

        def flush():
            nonlocal chunk, file_idx, in_file
            name = f"embeddings-{file_idx:05d}-of-{n_files:05d}.npy"
            np.save(os.path.join(tmp, name), np.concatenate(chunk).astype(np.float32))
            chunk, file_idx, in_file = [], file_idx + 1, 0

        for lo in range(0, n, batch):
            idx = range(lo, min(lo + batch, n))
            tiles, metas = [], []
            for i in idx:
                rgb, meta = source.tile(i)
                tiles.append(_prepare(rgb, size, mean, std))
                metas.append(meta)
            x = np.stack(tiles)
            pad = batch - len(x)  # one compiled shape for every batch
            feats = np.asarray(apply(params, np.pad(x, ((0, pad), (0, 0), (0, 0), (0, 0)))))
            dim = feats.shape[-1]
            for j, (i, meta) in enumerate(zip(idx, metas)):
                meta_keys = meta_keys or sorted(meta)
                chunk.append(feats[j:j + 1])
                rows.append({"file": file_idx, "row": in_file, "tile": i,
                             **{k: meta.get(k) for k in meta_keys}})
                in_file += 1
                if in_file == per_file:
                    flush()
            done = min(lo + batch, n)
            rate = done / max(time.perf_counter() - start, 1e-9)
            print(f"\rcfm.embed: {done}/{n} tiles, {rate:.1f} tiles/s, "
                  f"eta {(n - done) / rate:.0f} s", end="", file=sys.stderr, flush=True)
        if chunk:
            flush()
        print(file=sys.stderr)
        with open(os.path.join(tmp, "index.csv"), "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["file", "row", "tile"] + meta_keys)
            writer.writeheader()
            writer.writerows(rows)
        with open(os.path.join(tmp, "embed.json"), "w", encoding="utf-8") as f:
            json.dump({"checkpoint_step": step, "variant": config.model.variant,
                       "img_size": size, "dim": int(dim),
                       "tiles": n, "feature": "teacher final-norm CLS token"}, f, indent=1)
    return n


def main(argv: list[str] | None = None) -> int:
    ap = cli_help.parser("cfm.embed", __doc__, "python -m cfm.embed --model /tmp/cfm_export "
                         "--shards /tmp/cfm_tiles --out /tmp/cfm_embeddings")
    ap.add_argument("--model", required=True,
                    help="a cfm.train --workdir or a cfm.export folder (orbax/safetensors)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="tile_wsi --out folder (ArrayRecord shards); this or "
                     "--omics is required")
    src.add_argument("--omics", help="data_prep.prepare_omics --out folder (sample embeddings); "
                     "this or --shards is required")
    ap.add_argument("--out", required=True, help="new folder for embeddings + index.csv")
    ap.add_argument("--batch", type=int, default=128,
                    help="tiles per forward pass (at most 64 samples with --omics)")
    ap.add_argument("--per-file", type=int, default=100_000, help="embedding rows per .npy file")
    ap.add_argument("--trust-data", action="store_true", help="--omics: embed even where the "
                    "model's own vocab.tsv/stats.json cannot be found (sizes still checked)")
    ap.add_argument("--allow-scale-mismatch", action="store_true", help="--shards: embed tiles "
                    "whose size or microns per pixel differ from the model's training tiles")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.per_file < 1:
        ap.error("--batch and --per-file must be positive")
    done: list[int] = []

    def run() -> None:
        errors.check_workdir(args.out, "--out")  # a file, /proc, read-only: refused now
        if args.omics:
            done.append(embed_omics(args.model, args.omics, args.out, args.step,
                                    min(args.batch, 64), trust_data=args.trust_data))
        else:
            done.append(embed(args.model, args.shards, args.out, args.step, args.batch,
                              args.per_file, args.allow_scale_mismatch))

    # SIGTERM / SIGINT: one line saying what --out holds, exit 143 / 130 (cfm.preemption)
    with preemption.stop_on_signals("cfm.embed", preemption.folder_kept(args.out)):
        status = errors.run_cli("cfm.embed", run, {FileNotFoundError: "", FileExistsError: "",
                                                   ValueError: ""})
    if status:
        return status
    print(f"cfm.embed: wrote {done[0]} embeddings to {args.out}")
    return 0


if __name__ == "__main__":
    preemption.exit_now(main())  # no interpreter teardown under XLA's threads
