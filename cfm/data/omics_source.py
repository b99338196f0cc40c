"""Reading a folder prepared by `python -m data_prep.prepare_omics`.

`read_manifest(folder)` checks that the folder is one (format `cfm-omics/1`, listed shards
present) and returns manifest.json; `read_vocab(path)` parses vocab.tsv; `read_stats(folder)`
returns stats.json; `OmicsShardSource(folder, split)` is a random-access source for grain:
`len(source)` samples of that split and `source[i] -> (meta, arrays)` as
`cfm.data.omics_records.decode_sample` gives them. It holds only file names until first use,
so it is cheap to send to grain's worker processes (each reopens the shards).
"""

from __future__ import annotations

import json
import os

from cfm.data.omics_records import CLS_ID, PAD_ID, decode_sample

FORMAT = "cfm-omics/1"
SPLITS = ("train", "val", "test")
VOCAB_HEADER = "id\tsymbol\tensembl"
_HINT = "prepare it with `python -m data_prep.prepare_omics --input ... --out FOLDER`"


def read_manifest(folder: str) -> dict:
    """manifest.json of a prepared omics folder; ValueError/FileNotFoundError naming the folder
    if it is not one (no manifest, another format, a listed shard missing)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"omics data folder {folder!r} does not exist; {_HINT}")
    path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} is not a prepared omics folder (no manifest.json); "
                                f"{_HINT}")
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable manifest ({err}); prepare the folder again") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{folder!r} is not a prepared omics folder: manifest format {got!r}, "
                         f"expected {FORMAT!r} (a tile folder of data_prep.tile_wsi?); {_HINT}")
    for split in SPLITS:
        for name in manifest.get("splits", {}).get(split, {}).get("files", []):
            if not os.path.isfile(os.path.join(folder, name)):
                raise FileNotFoundError(f"{folder!r}: shard {name} listed in manifest.json is "
                                        "missing; copy the whole folder or prepare it again")
    return manifest


def read_vocab(path: str) -> list[tuple[str, str]]:
    """(symbol, ensembl) of genes 2, 3, ... from a vocab.tsv (ids 0 <pad>, 1 <cls> checked)."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as err:
        raise ValueError(f"vocab {path!r}: cannot read ({err})") from err
    if not lines or lines[0] != VOCAB_HEADER:
        raise ValueError(f"vocab {path!r}: first line must be {VOCAB_HEADER!r} (a vocab.tsv "
                         "written by data_prep.prepare_omics)")
    genes, seen = [], {}
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 3 or fields[0] != str(number - 2):
            raise ValueError(f"vocab {path!r} line {number}: expected 'id<TAB>symbol<TAB>"
                             f"ensembl' with id {number - 2}, got {line!r}")
        gene_id, symbol, ensembl = int(fields[0]), fields[1], fields[2]
        if gene_id in (PAD_ID, CLS_ID):
            if symbol != ("<pad>" if gene_id == PAD_ID else "<cls>"):
                raise ValueError(f"vocab {path!r} line {number}: id {gene_id} is reserved for "
                                 f"{'<pad>' if gene_id == PAD_ID else '<cls>'}")
            continue
        if not symbol and not ensembl:
            raise ValueError(f"vocab {path!r} line {number}: gene {gene_id} has no name")
        if ensembl and ensembl in seen:
            raise ValueError(f"vocab {path!r} line {number}: Ensembl id {ensembl} also on line "
                             f"{seen[ensembl]}")
        seen[ensembl] = number
        genes.append((symbol, ensembl))
    if len(lines) < 3:
        raise ValueError(f"vocab {path!r}: needs the <pad> and <cls> rows")
    return genes


def read_stats(folder: str) -> dict:
    """stats.json of a prepared folder (expression transform, per-gene mean/std, bin edges)."""
    read_manifest(folder)
    with open(os.path.join(folder, "stats.json"), encoding="utf-8") as handle:
        return json.load(handle)


class OmicsShardSource:
    """The samples of one split of a prepared folder, in shard order."""

    def __init__(self, folder: str, split: str):
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        self.folder, self.split = os.fspath(folder), split
        manifest = read_manifest(self.folder)
        entry = manifest["splits"][split]
        self.files = [os.path.join(self.folder, name) for name in entry["files"]]
        self.size = int(entry["samples"])
        self._records = None

    def _source(self):
        if self._records is None:
            # optional: array_record is not in install_requires (grain brings it, except on
            # Windows)
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            self._records = ArrayRecordDataSource(self.files)
            if len(self._records) != self.size:
                raise ValueError(f"{self.folder!r} {self.split}: shards hold "
                                 f"{len(self._records)} records, manifest.json says {self.size}")
        return self._records

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[dict, dict]:
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"{self.split} index {index} out of range [0, {self.size}) in "
                             f"{self.folder!r}")
        return decode_sample(self._source()[index])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_records"] = None  # reopened in the receiving process
        return state

    def __repr__(self) -> str:
        return f"OmicsShardSource({self.folder!r}, {self.split!r}, {self.size} samples)"
