"""The three record kinds (tiles, omics samples, slide-omics pairs) share one head: magic, JSON
length, JSON object (cfm.data.records.pack_header / unpack_header). Round trips, and one clear
ValueError for each way a record can be broken."""

import struct

import numpy as np
import pytest

from cfm.data import omics_records, paired_records, records

OMICS = {"gene_ids": [2, 3], "modality": [0, 1], "values": [1.5, 0.0], "classes": [0, 1]}


def _kinds():
    tile = records.encode_tile(b"\xff\xd8jpeg", {"slide_id": "s", "x": 3})
    sample = omics_records.encode_sample({"sample_id": "p1"}, *OMICS.values())
    pair = paired_records.encode_pair({"pair": "p1"}, np.ones((2, 3)), np.zeros((2, 2)), OMICS)
    return [("tile", tile, records.decode_tile), ("omics", sample, omics_records.decode_sample),
            ("pair", pair, paired_records.decode_pair)]


def test_round_trips():
    (_, tile, dec_tile), (_, sample, dec_sample), (_, pair, dec_pair) = _kinds()
    assert dec_tile(tile) == (b"\xff\xd8jpeg", {"slide_id": "s", "x": 3})
    meta, arrays = dec_sample(sample)
    assert meta == {"sample_id": "p1"}
    np.testing.assert_array_equal(arrays["values"], [1.5, 0.0])
    meta, arrays = dec_pair(pair)
    assert meta == {"pair": "p1"} and arrays["bag"].shape == (2, 3)
    np.testing.assert_array_equal(arrays["gene_ids"], [2, 3])


@pytest.mark.parametrize("kind", ["tile", "omics", "pair"])
def test_each_broken_head_is_one_value_error(kind):
    found = {k: (record, decode) for k, record, decode in _kinds()}
    record, decode = found[kind]
    other = found["tile" if kind != "tile" else "omics"][0]
    article = "an" if kind == "omics" else "a"
    head = struct.Struct("<4sI")
    cases = [
        (record[:5], f"{kind} record truncated: 5 bytes, header needs 8"),
        (other, f"not {article} {kind} record: magic"),
        (record[:12], f"{kind} record truncated: metadata needs"),
        (head.pack(record[:4], 3) + b"{x}", f"{kind} record metadata is not valid UTF-8 JSON"),
        (head.pack(record[:4], 2) + b"[]", f"{kind} record metadata must be a JSON object"),
    ]
    for broken, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            decode(broken)
