"""The omics sample record: one sample's tokens (gene, modality, value, class) in ArrayRecord
shards.

`data_prep.prepare_omics` writes them; `cfm.data.omics_pipeline` reads them. Layout of one record:

    b"CFMO" | uint32 LE J | J bytes of UTF-8 JSON (an object) | uint32 LE n |
    int32 gene_ids[n] | uint8 modality[n] | float32 values[n] | uint8 classes[n]

all arrays little-endian. The JSON carries `sample_id`, `patient_id` and `split`.
For each token:
  * gene_ids: index into the prepared folder's `vocab.tsv` (ids 0 and 1 are reserved: PAD, CLS);
  * modality: index into MODALITIES;
  * values: the model's continuous input: normalised expression (log1p / CPM / z-scored per
    gene with training-split statistics), mutation 0/1, copy number as its call (-2..2);
  * classes: the token's class target: expression bin (0..n_bins-1), mutation 0/1, copy number
    call + 2 (0..4).
A fixed magic and explicit lengths keep the format readable without pickle, in any language.
"""

from __future__ import annotations

import struct

import numpy as np

from cfm.data.records import pack_header, unpack_header

MAGIC = b"CFMO"
MODALITIES = ("expression", "mutation", "cnv")
N_CLASSES = {"mutation": 2, "cnv": 5}  # expression: the prepared folder's n_bins
PAD_ID, CLS_ID = 0, 1  # reserved gene ids; genes start at 2
_N = struct.Struct("<I")
_FIELDS = (("gene_ids", "<i4"), ("modality", "u1"), ("values", "<f4"), ("classes", "u1"))


def encode_sample(meta: dict, gene_ids, modality, values, classes) -> bytes:
    """One record; the four arrays must have the same length n >= 1."""
    arrays = [np.ascontiguousarray(a, dtype=np.dtype(dt)) for a, (_, dt) in
              zip((gene_ids, modality, values, classes), _FIELDS)]
    n = len(arrays[0])
    if n < 1 or any(a.ndim != 1 or len(a) != n for a in arrays):
        raise ValueError(f"omics record arrays must be 1-D of one length >= 1, got "
                         f"{[a.shape for a in arrays]}")
    if not np.all(np.isfinite(arrays[2])):
        raise ValueError(f"omics record {meta.get('sample_id')!r}: values must be finite")
    return b"".join([pack_header(MAGIC, meta), _N.pack(n)] + [a.tobytes() for a in arrays])


def decode_sample(record: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, {gene_ids, modality, values, classes}) from one record; ValueError if bad."""
    record = bytes(record)
    meta, start = unpack_header(record, MAGIC, "omics")
    if len(record) < start + _N.size:
        raise ValueError("omics record truncated in its header")
    (n,) = _N.unpack_from(record, start)
    offset = start + _N.size
    out = {}
    for name, dt in _FIELDS:
        size = n * np.dtype(dt).itemsize
        if len(record) < offset + size:
            raise ValueError(f"omics record {meta.get('sample_id')!r} truncated in {name}")
        arr = np.frombuffer(record, np.dtype(dt), n, offset)
        out[name] = arr.astype(arr.dtype.newbyteorder("="))  # native order, writable copy
        offset += size
    if offset != len(record):
        raise ValueError(f"omics record {meta.get('sample_id')!r}: {len(record) - offset} "
                         "trailing bytes")
    return meta, out
