"""The tile record: one JPEG-encoded tile plus its JSON metadata, as stored in ArrayRecord shards.

Layout of one record (all written by `encode_tile`, read back by `decode_tile`):

    b"CFMT" | uint32 little-endian N | N bytes of UTF-8 JSON (an object) | JPEG bytes

The JSON object carries the tile's metadata (slide_id, x, y in level-0 pixels, level, mpp in
microns per pixel, tile_size in pixels, tissue_fraction, cohort). A fixed magic and an explicit
length keep the format self-describing and readable without pickle, in any language.
"""

import json
import struct

MAGIC = b"CFMT"
_HEADER = struct.Struct("<4sI")  # magic, JSON length in bytes


def encode_tile(jpeg: bytes, meta: dict) -> bytes:
    """One record from JPEG bytes and a JSON-serialisable metadata dict (keys sorted, compact)."""
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    payload = json.dumps(meta, sort_keys=True, separators=(",", ":"),
                         allow_nan=False).encode("utf-8")
    return _HEADER.pack(MAGIC, len(payload)) + payload + bytes(jpeg)


def decode_tile(record: bytes) -> tuple[bytes, dict]:
    """(jpeg bytes, metadata dict) from one record; ValueError on a bad magic or a short record."""
    record = bytes(record)
    if len(record) < _HEADER.size:
        raise ValueError(f"tile record truncated: {len(record)} bytes, header needs "
                         f"{_HEADER.size}")
    magic, length = _HEADER.unpack_from(record)
    if magic != MAGIC:
        raise ValueError(f"not a tile record: magic {magic!r}, expected {MAGIC!r}")
    end = _HEADER.size + length
    if len(record) < end:
        raise ValueError(f"tile record truncated: metadata needs {length} bytes, only "
                         f"{len(record) - _HEADER.size} present")
    try:
        meta = json.loads(record[_HEADER.size:end].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"tile record metadata is not valid UTF-8 JSON: {err}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"tile record metadata must be a JSON object, got {type(meta).__name__}")
    return record[end:], meta
