"""Files of a tiling run: atomic writes, CSV helpers, content hashes and salted slide ids, and
packing staged tiles into size-balanced ArrayRecord shards (the storage half of
`data_prep.tile_wsi`); `ShardWriter`, the size-balanced ArrayRecord shard writer, also writes the
shards of `data_prep.prepare_omics`."""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
from typing import Callable

from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from cfm.atomic import fsync_dir
from cfm.data.records import decode_tile

ID_HEX_DIGITS = 16
HASH_CHUNK = 1 << 22
MANIFEST_FIELDS = ("shard", "index", "slide_id", "x", "y", "level", "mpp", "tissue_fraction",
                   "cohort")


# ----------------------------------------------------------------------------- files
def _fsync_file(path: str) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def atomic_write(path: str, data: bytes) -> None:
    """Write bytes to path.<pid>.tmp, fsync, rename over path, fsync the folder."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def _csv_bytes(fields, rows) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def _read_csv(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def salted_id(salt: str, basis: str) -> str:
    """slide_id: first ID_HEX_DIGITS hex digits of sha256(salt + basis)."""
    return hashlib.sha256((salt + basis).encode("utf-8")).hexdigest()[:ID_HEX_DIGITS]


def _scrub(text: str, path: str) -> str:
    """text with the slide's path, folder, name and stem (3+ characters) replaced by <slide>."""
    absolute = os.path.abspath(path)
    name = os.path.basename(absolute)
    parts = [absolute, path, os.path.dirname(absolute), name, os.path.splitext(name)[0]]
    for part in sorted({p for p in parts if len(p) >= 3}, key=len, reverse=True):
        lowered = text.lower()
        start = lowered.find(part.lower())
        while start >= 0:
            text = text[:start] + "<slide>" + text[start + len(part):]
            lowered = text.lower()
            start = lowered.find(part.lower(), start + len("<slide>"))
    return text


# ----------------------------------------------------------------------------- shards
def balanced_sizes(total: int, n: int) -> list[int]:
    """n shard sizes that add up to total and differ by at most one (the larger ones first)."""
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


class ShardWriter:
    """Streams records into the ArrayRecord shards folder/files[i], sizes[i] records each, in
    order. A shard is opened at its first record; once full it is closed and fsynced (written as
    `<name>.tmp` and then renamed into place when `staged`) and `on_shard(self)` runs."""

    def __init__(self, folder: str, files: list[str], sizes: list[int], staged: bool = False,
                 on_shard: Callable[[ShardWriter], None] | None = None):
        self.folder, self.files, self.sizes, self.total = folder, files, sizes, sum(sizes)
        self.staged, self.on_shard = staged, on_shard
        self.shard, self.in_shard, self.written, self._writer = 0, 0, 0, None

    def _path(self) -> str:
        path = os.path.join(self.folder, self.files[self.shard])
        return path + ".tmp" if self.staged else path

    def write(self, record: bytes) -> None:
        """Append one record to the current shard (shard `self.shard`, index `self.in_shard`)."""
        if self._writer is None:
            self._writer = ArrayRecordWriter(self._path(), "group_size:1")
        self._writer.write(record)
        self.in_shard += 1
        self.written += 1
        if self.in_shard == self.sizes[self.shard]:
            self._writer.close()
            _fsync_file(self._path())
            if self.staged:
                os.replace(self._path(), os.path.join(self.folder, self.files[self.shard]))
            self._writer, self.shard, self.in_shard = None, self.shard + 1, 0
            if self.on_shard is not None:
                self.on_shard(self)

    def close(self) -> int:
        """Close a shard left short of its size (a caller's bug); returns the records written."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.written


# ----------------------------------------------------------------------------- packing
def pack_shards(out: str, tiles_per_shard: int) -> int:
    """Move staged slides into size-balanced shards; manifest.csv commits them. Returns tiles.

    Shards not listed in manifest.csv (a crashed pack) are deleted first; staged slides already
    in the manifest are dropped. New shards continue the numbering of the committed ones.
    """
    manifest_path = os.path.join(out, "manifest.csv")
    rows = _read_csv(manifest_path)
    committed = {row["shard"] for row in rows}
    packed = {row["slide_id"] for row in rows}
    for name in os.listdir(out):
        if name.startswith("tiles-") and name not in committed:
            os.remove(os.path.join(out, name))
    staging_dir = os.path.join(out, "staging")
    pending = []
    for name in sorted(os.listdir(staging_dir)):
        slide_id, path = name.split(".")[0], os.path.join(staging_dir, name)
        if name.endswith(".tmp"):  # a worker that crashed mid-slide
            os.remove(path)
            continue
        if slide_id in packed or not os.path.exists(os.path.join(out, "done", slide_id + ".json")):
            os.remove(path)
            continue
        pending.append(path)
    if not pending:
        return 0
    counts = []
    for path in pending:
        reader = ArrayRecordReader(path)
        counts.append(reader.num_records())
        reader.close()
    total = sum(counts)
    n_shards = max(1, math.ceil(total / tiles_per_shard))
    first = 1 + max([int(name[6:11]) for name in committed] or [-1])
    names = [f"tiles-{first + i:05d}.array_record" for i in range(n_shards)]
    writer = ShardWriter(out, names, balanced_sizes(total, n_shards), staged=True)
    new_rows = []
    for path, count in zip(pending, counts):
        reader = ArrayRecordReader(path)
        for begin in range(0, count, 1024):
            for record in reader.read(list(range(begin, min(begin + 1024, count)))):
                _, meta = decode_tile(record)
                new_rows.append({"shard": names[writer.shard], "index": writer.in_shard,
                                 **{k: meta[k] for k in MANIFEST_FIELDS[2:]}})
                writer.write(record)
        reader.close()
    writer.close()
    fsync_dir(out)
    atomic_write(manifest_path, _csv_bytes(MANIFEST_FIELDS, rows + new_rows))
    for path in pending:
        os.remove(path)
    return total
