"""The grain input pipeline of slide–omics alignment: host-local batches of padded pairs.

Graph as `cfm.data.omics_pipeline`: pairs folder (`data_prep.paired`) -> seeded shuffle ->
repeat -> per-record padding (a random subset of at most `data.max_tiles` tiles and of
`data.max_tokens` omics tokens, drawn from a generator seeded by (seed, g)) -> batch of
batch_size / process_count -> this host's slot of every global batch. Batches depend only on
(config, step), so `start_step=k` resumes at step k without replay.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import ml_collections
import numpy as np

from cfm.data import host_stream
from cfm.data.omics_pipeline import pad_sample
from cfm.data.paired_records import decode_pair

_SUBSET = 0x9A1  # the tile / gene subset stream


def read_manifest(folder: str) -> dict:
    """manifest.json of a pairs folder; ValueError naming the folder if missing or foreign."""
    path = os.path.join(folder, "manifest.json")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder!r} is not a pairs folder (data_prep.paired or "
                         f"data_prep.paired_synthetic writes one): {e}") from None
    if manifest.get("format") != "cfm-pairs-v1":
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected 'cfm-pairs-v1'")
    return manifest


class PairSource:
    """The pairs of one split of a pairs folder, in file order."""

    def __init__(self, folder: str, split: str):
        manifest = read_manifest(folder)
        if split not in manifest["splits"]:
            raise ValueError(f"{folder!r} has no split {split!r} (has "
                             f"{sorted(manifest['splits'])})")
        entry = manifest["splits"][split]
        self.files = [os.path.join(folder, f) for f in entry["files"]]
        self.size, self._records = int(entry["pairs"]), None

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[dict, dict]:
        if self._records is None:  # optional dependency, opened lazily (and per process)
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            self._records = ArrayRecordDataSource(self.files)
        return decode_pair(self._records[int(index)])

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _records=None)


def pad_pair(arrays: dict[str, np.ndarray], max_tiles: int, max_tokens: int,
             rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    """Fixed-size arrays of one pair: bag [max_tiles, D], coords [max_tiles, 2], bag_mask
    [max_tiles] (True on real tiles) and the omics tokens of `pad_sample`. A bag with more
    tiles keeps a random subset (`rng`), or its first max_tiles without one."""
    bag, coords = arrays["bag"], arrays["coords"]
    t = len(bag)
    keep = np.arange(min(t, max_tiles))
    if t > max_tiles and rng is not None:
        keep = np.sort(rng.choice(t, max_tiles, replace=False))
    out = {"bag": np.zeros((max_tiles, bag.shape[1]), np.float32),
           "coords": np.zeros((max_tiles, 2), np.float32), "bag_mask": np.zeros(max_tiles, bool)}
    out["bag"][:len(keep)], out["coords"][:len(keep)] = bag[keep], coords[keep]
    out["bag_mask"][:len(keep)] = True
    out.update(pad_sample(arrays, max_tokens, rng))
    return out


class _Pad:
    def __init__(self, data: ml_collections.ConfigDict, seed: int):
        self.max_tiles, self.max_tokens = int(data.max_tiles), int(data.max_tokens)
        self.seed = int(seed)

    def __call__(self, g: int, record) -> dict[str, np.ndarray]:
        return pad_pair(record[1], self.max_tiles, self.max_tokens,
                        np.random.default_rng([self.seed, _SUBSET, int(g)]))


def make_train_iterator(config: ml_collections.ConfigDict, *, process_index: int = 0,
                        process_count: int = 1, start_step: int = 0
                        ) -> Iterator[dict[str, np.ndarray]]:
    """Endless iterator of this host's batches from step `start_step` (see the module doc)."""
    b = host_stream.host_batch_size(config.batch_size, process_index, process_count)
    seed = int(config.seed)
    ds = host_stream.shuffled_repeat(PairSource(config.data.path, config.data.split), seed)
    ds = ds.map_with_index(_Pad(config.data, seed)).batch(b, drop_remainder=True)
    ds = host_stream.host_slice(ds, process_index, process_count, start_step)
    return iter(host_stream.read_ahead(ds, config.data.prefetch))


def read_split(folder: str, split: str, max_tiles: int, max_tokens: int
               ) -> tuple[list[dict], dict[str, np.ndarray]]:
    """(metadata per pair, stacked padded arrays) of a whole split (evaluation): larger bags
    and token sets keep a subset fixed per pair (seeded by its index)."""
    src = PairSource(folder, split)
    metas, rows = [], []
    for i in range(len(src)):
        meta, arrays = src[i]
        metas.append(meta)
        rows.append(pad_pair(arrays, max_tiles, max_tokens, np.random.default_rng([0, i])))
    return metas, {k: np.stack([r[k] for r in rows]) for k in rows[0]}
