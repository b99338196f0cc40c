"""The slide–omics pair record: one slide's tile-embedding bag and its patient's omics tokens.

`data_prep.paired` writes them (ArrayRecord, `pairs-NNNNN.array_record` per split);
`cfm.data.paired_pipeline` reads them. Layout of one record:

    b"CFMP" | uint32 LE J | J bytes of UTF-8 JSON | uint32 LE T | uint32 LE D |
    float32 bag[T, D] | float32 coords[T, 2] | one omics record (cfm.data.omics_records)

The JSON carries only `pair` (the row's index in the folder), `split` and, for synthetic sets,
the truth (class fractions); patient and slide names live in the folder's `private/` and never
in a record. `coords` are the tiles' level-0 (x, y) in tile units.
"""

from __future__ import annotations

import struct

import numpy as np

from cfm.data.omics_records import decode_sample, encode_sample
from cfm.data.records import pack_header, unpack_header

MAGIC = b"CFMP"
_SIZES = struct.Struct("<II")


def encode_pair(meta: dict, bag: np.ndarray, coords: np.ndarray, omics: dict) -> bytes:
    """One record: bag float [T, D] (T >= 1), coords [T, 2], omics {gene_ids, modality, values,
    classes}; ValueError for an empty bag or mismatched shapes."""
    bag = np.ascontiguousarray(bag, "<f4")
    coords = np.ascontiguousarray(coords, "<f4")
    if bag.ndim != 2 or bag.shape[0] < 1:
        raise ValueError(f"pair {meta.get('pair')!r}: empty or malformed tile bag {bag.shape}")
    if coords.shape != (bag.shape[0], 2):
        raise ValueError(f"pair {meta.get('pair')!r}: coords {coords.shape} do not match bag "
                         f"{bag.shape}")
    if not np.all(np.isfinite(bag)):
        raise ValueError(f"pair {meta.get('pair')!r}: tile embeddings must be finite")
    om = encode_sample({"sample_id": str(meta.get("pair"))},
                       *(omics[k] for k in ("gene_ids", "modality", "values", "classes")))
    return b"".join([pack_header(MAGIC, meta), _SIZES.pack(*bag.shape), bag.tobytes(),
                     coords.tobytes(), om])


def decode_pair(record: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, {bag, coords, gene_ids, modality, values, classes}); ValueError if bad."""
    record = bytes(record)
    meta, start = unpack_header(record, MAGIC, "pair")
    if len(record) < start + _SIZES.size:
        raise ValueError(f"pair record {meta.get('pair')!r} truncated in its bag size")
    t, d = _SIZES.unpack_from(record, start)
    offset = start + _SIZES.size
    end = offset + 4 * t * d + 8 * t
    if len(record) < end:
        raise ValueError(f"pair record {meta.get('pair')!r} truncated in its bag")
    bag = np.frombuffer(record, "<f4", t * d, offset).reshape(t, d).astype(np.float32)
    coords = np.frombuffer(record, "<f4", 2 * t, offset + 4 * t * d).reshape(t, 2)
    _, omics = decode_sample(record[end:])
    return meta, dict(bag=bag, coords=coords.astype(np.float32), **omics)
