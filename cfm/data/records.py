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
    return pack_header(MAGIC, meta) + bytes(jpeg)


def pack_header(magic: bytes, meta: dict) -> bytes:
    """magic | uint32 N | N bytes of JSON (keys sorted, compact, no NaN): the head of every cfm
    record kind (tiles here, omics samples, slide-omics pairs)."""
    payload = json.dumps(meta, sort_keys=True, separators=(",", ":"),
                         allow_nan=False).encode("utf-8")
    return _HEADER.pack(magic, len(payload)) + payload


def decode_tile(record: bytes) -> tuple[bytes, dict]:
    """(jpeg bytes, metadata dict) from one record; ValueError on a bad magic or a short record."""
    record = bytes(record)
    meta, end = unpack_header(record, MAGIC, "tile")
    return record[end:], meta


def unpack_header(record: bytes, magic: bytes, kind: str) -> tuple[dict, int]:
    """(the JSON object, the offset where the record's body starts) of a `pack_header` head;
    ValueError, naming the record `kind`, for another magic, a short record or bad JSON."""
    if len(record) < _HEADER.size:
        raise ValueError(f"{kind} record truncated: {len(record)} bytes, header needs "
                         f"{_HEADER.size}")
    found, length = _HEADER.unpack_from(record)
    if found != magic:
        article = "an" if kind[0] in "aeiou" else "a"
        raise ValueError(f"not {article} {kind} record: magic {found!r}, expected {magic!r}")
    end = _HEADER.size + length
    if len(record) < end:
        raise ValueError(f"{kind} record truncated: metadata needs {length} bytes, only "
                         f"{len(record) - _HEADER.size} present")
    try:
        meta = json.loads(record[_HEADER.size:end].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{kind} record metadata is not valid UTF-8 JSON: {err}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{kind} record metadata must be a JSON object, got "
                         f"{type(meta).__name__}")
    return meta, end
