"""Slide–omics pairs: a slide's tile-embedding bag joined to its patient's omics record.

    python -m data_prep.paired --embeddings EMB --omics PREPARED --slides SLIDES.csv --out DIR
        [--skip-bad]

EMB is a `python -m cfm.embed` output (index.csv + embeddings-*.npy, one row per tile with its
slide_id, x, y), PREPARED a `data_prep.prepare_omics` folder, SLIDES.csv a table with columns
`slide_id` and `patient_id` (for TCGA, the multi-omics tables' `slide_id` column names the
slides whose tile shards to use). Each slide becomes one pair; its split is its patient's split
in PREPARED, so no patient is in two splits.

Bad pairs: a slide whose patient has no omics record, a patient with omics but no slide, a
slide with no tiles (empty bag) and an omics record with gene ids outside PREPARED's vocabulary
stop the run with a one-line error naming the row, or, with `--skip-bad`, are skipped and
counted (manifest.json `skipped`).

Output (written to a temporary folder and renamed): `pairs-<split>-00000.array_record`
(`cfm.data.paired_records`), `manifest.json` (splits, counts, embedding width, vocabulary size,
bins), the omics `vocab.tsv`, and `private/pairs.csv` (pair index -> slide and patient id),
which, like the tile shards' `private/`, never leaves the machine: records carry only the index.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
from collections import Counter, defaultdict

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from cfm import atomic, cli_help
from cfm.data import omics_source
from cfm.data.paired_records import encode_pair

FORMAT = "cfm-pairs-v1"


class PairError(ValueError):
    """A bad pair or input file (one line, naming the row)."""


def write_pairs(out: str, pairs: list[dict], vocab_tsv: str, n_bins: int,
                vocab_size: int, skipped: dict | None = None, extra: dict | None = None) -> dict:
    """Write `pairs` ({split, meta, bag, coords, omics, private}) as a pairs folder; returns
    the manifest. `vocab_tsv` is the text of vocab.tsv; `private` ({slide_id, patient_id})
    goes only to private/pairs.csv."""
    if not pairs:
        raise PairError("no pairs to write")
    by_split: dict[str, list[dict]] = defaultdict(list)
    for p in pairs:
        by_split[p["split"]].append(p)
    dims = {int(p["bag"].shape[1]) for p in pairs}
    if len(dims) != 1:
        raise PairError(f"tile embeddings of different widths {sorted(dims)}")
    manifest = {"format": FORMAT, "dim": dims.pop(), "vocab_size": int(vocab_size),
                "n_bins": int(n_bins), "max_tiles": max(len(p["bag"]) for p in pairs),
                "splits": {}, "skipped": dict(skipped or {}), **(extra or {})}
    with atomic.atomic_folder(out) as tmp:
        os.makedirs(os.path.join(tmp, "private"))
        rows, index = [], 0
        for split in sorted(by_split):
            name = f"pairs-{split}-00000.array_record"
            writer = ArrayRecordWriter(os.path.join(tmp, name), "group_size:1")
            for p in by_split[split]:
                meta = dict(p.get("meta", {}), pair=index, split=split)
                writer.write(encode_pair(meta, p["bag"], p["coords"], p["omics"]))
                rows.append({"pair": index, "split": split, **p.get("private", {})})
                index += 1
            writer.close()
            manifest["splits"][split] = {"files": [name], "pairs": len(by_split[split])}
        with open(os.path.join(tmp, "private", "pairs.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            w.writeheader()
            w.writerows(rows)
        with open(os.path.join(tmp, "vocab.tsv"), "w") as f:
            f.write(vocab_tsv)
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
    return manifest


def _read_bags(emb: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """slide_id -> (bag [T, D], coords [T, 2] in tile units) from a cfm.embed folder."""
    index = os.path.join(emb, "index.csv")
    if not os.path.isfile(index):
        raise PairError(f"--embeddings {emb}: no index.csv (run python -m cfm.embed first)")
    arrays = {os.path.basename(p): np.load(p, allow_pickle=False)
              for p in sorted(glob.glob(os.path.join(emb, "embeddings-*.npy")))}
    rows: dict[str, list] = defaultdict(list)
    with open(index, newline="") as f:
        for i, r in enumerate(csv.DictReader(f), start=2):
            try:
                vec = arrays[r["file"]][int(r["row"])]
                rows[r["slide_id"]].append((vec, float(r["x"]), float(r["y"])))
            except (KeyError, IndexError, ValueError) as e:
                raise PairError(f"{index} line {i}: bad row ({e!r})") from None
    out = {}
    for slide, items in rows.items():
        xy = np.array([(x, y) for _, x, y in items], np.float32)
        step = np.min(np.diff(np.unique(xy[:, 0]))) if len(np.unique(xy[:, 0])) > 1 else 1.0
        out[slide] = (np.stack([v for v, _, _ in items]).astype(np.float32),
                      (xy - xy.min(0)) / max(float(step), 1.0))
    return out


def join(emb: str, omics: str, slides_csv: str, out: str, skip_bad: bool = False) -> dict:
    """Pairs of (slide bag, patient omics) by patient id; see the module doc for bad pairs."""
    bags = _read_bags(emb)
    manifest = omics_source.read_manifest(omics)
    vocab_size = int(manifest["vocab_size"])
    records = {}
    for split in manifest["splits"]:
        src = omics_source.OmicsShardSource(omics, split)
        for i in range(len(src)):
            meta, arrays = src[i]
            records[str(meta["patient_id"])] = (split, arrays, i)
    with open(slides_csv, newline="") as f:
        table = list(csv.DictReader(f))
    if not table or not {"slide_id", "patient_id"} <= set(table[0]):
        raise PairError(f"--slides {slides_csv}: needs columns slide_id and patient_id")
    skipped: Counter = Counter()
    pairs, used = [], set()

    def bad(kind: str, msg: str) -> None:
        if not skip_bad:
            raise PairError(f"{msg} (pass --skip-bad to skip and count such pairs)")
        skipped[kind] += 1

    for line, row in enumerate(table, start=2):
        slide, patient = row["slide_id"], row["patient_id"]
        if patient not in records:
            bad("no_omics", f"{slides_csv} line {line}: patient has no omics record in {omics}")
            continue
        if slide not in bags or len(bags[slide][0]) == 0:
            bad("empty_bag", f"{slides_csv} line {line}: slide has no tiles in {emb}")
            continue
        split, arrays, i = records[patient]
        if arrays["gene_ids"].max() >= vocab_size:
            bad("unknown_genes", f"{omics} {split} record {i}: gene ids beyond the vocabulary "
                                 f"({vocab_size})")
            continue
        used.add(patient)
        pairs.append({"split": split, "bag": bags[slide][0], "coords": bags[slide][1],
                      "omics": arrays, "private": {"slide_id": slide, "patient_id": patient}})
    in_table = {r["patient_id"] for r in table}
    for patient in sorted(set(records) - used):
        if patient not in in_table:
            bad("no_slide", f"{omics}: a patient has omics but no slide in {slides_csv}")
    with open(os.path.join(omics, "vocab.tsv")) as f:
        vocab = f.read()
    return write_pairs(out, pairs, vocab, int(manifest["n_bins"]),
                       vocab_size, dict(skipped))


def main(argv: list[str] | None = None) -> int:
    ap = cli_help.parser("data_prep.paired", __doc__,
                         "python -m data_prep.paired --embeddings EMB --omics OMICS "
                         "--slides slides.csv --out /tmp/pairs")
    ap.add_argument("--embeddings", required=True,
                    help="a python -m cfm.embed output folder (index.csv + embeddings-*.npy)")
    ap.add_argument("--omics", required=True, help="a data_prep.prepare_omics folder")
    ap.add_argument("--slides", required=True,
                    help="CSV with columns slide_id and patient_id")
    ap.add_argument("--out", required=True, help="new pairs folder")
    ap.add_argument("--skip-bad", action="store_true",
                    help="skip and count bad pairs (default: stop at the first)")
    args = ap.parse_args(argv)
    try:
        m = join(args.embeddings, args.omics, args.slides, args.out, args.skip_bad)
    except (PairError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: m[k] for k in ("splits", "skipped", "dim")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
