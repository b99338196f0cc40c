"""Files of a tiling run: atomic writes, CSV helpers, content hashes and salted slide ids, and
packing staged tiles into size-balanced ArrayRecord shards (the storage half of
`data_prep.tile_wsi`)."""

import csv
import hashlib
import io
import math
import os

from cfm.data.records import decode_tile

ID_HEX_DIGITS = 16
HASH_CHUNK = 1 << 22
MANIFEST_FIELDS = ("shard", "index", "slide_id", "x", "y", "level", "mpp", "tissue_fraction",
                   "cohort")


# ----------------------------------------------------------------------------- files
def _fsync_dir(folder: str) -> None:
    """fsync a folder so a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    _fsync_dir(os.path.dirname(path) or ".")


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


# ----------------------------------------------------------------------------- packing
def pack_shards(out: str, tiles_per_shard: int) -> int:
    """Move staged slides into size-balanced shards; manifest.csv commits them. Returns tiles.

    Shards not listed in manifest.csv (a crashed pack) are deleted first; staged slides already
    in the manifest are dropped. New shards continue the numbering of the committed ones.
    """
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

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
    sizes = [total // n_shards + (1 if i < total % n_shards else 0) for i in range(n_shards)]
    first = 1 + max([int(name[6:11]) for name in committed] or [-1])
    names = [f"tiles-{first + i:05d}.array_record" for i in range(n_shards)]
    shard, index, writer, new_rows = 0, 0, None, []

    def finish(writer, name):
        writer.close()
        tmp = os.path.join(out, name + ".tmp")
        _fsync_file(tmp)
        os.replace(tmp, os.path.join(out, name))

    for path, count in zip(pending, counts):
        reader = ArrayRecordReader(path)
        for begin in range(0, count, 1024):
            for record in reader.read(list(range(begin, min(begin + 1024, count)))):
                if writer is None:
                    writer = ArrayRecordWriter(os.path.join(out, names[shard] + ".tmp"),
                                               "group_size:1")
                writer.write(record)
                _, meta = decode_tile(record)
                new_rows.append({"shard": names[shard], "index": index,
                                 **{k: meta[k] for k in MANIFEST_FIELDS[2:]}})
                index += 1
                if index == sizes[shard]:
                    finish(writer, names[shard])
                    writer, shard, index = None, shard + 1, 0
        reader.close()
    _fsync_dir(out)
    atomic_write(manifest_path, _csv_bytes(MANIFEST_FIELDS, rows + new_rows))
    for path in pending:
        os.remove(path)
    return total
