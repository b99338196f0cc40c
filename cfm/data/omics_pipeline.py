"""The grain input pipeline for masked gene modelling: host-local batches of padded token sets.

Graph (grain MapDataset): source (prepared ArrayRecord shards or synthetic samples) -> seeded
shuffle -> repeat -> per-record random gene subset of at most `data.max_tokens` tokens, padded
-> batch of b = batch_size / process_count -> every process_count-th batch from this host's slot.

Determinism as in `cfm.data.pipeline`: record g of the global stream (g = step * batch_size +
position) draws its gene subset from a generator seeded by (seed, g); host p gets positions
p*b:(p+1)*b of every global batch; batches depend only on (config, step), so `start_step=k`
resumes at step k without replay. Value masks are drawn on device (`cfm.ssl.mgm`).
"""

from __future__ import annotations

from collections.abc import Iterator

import ml_collections
import numpy as np
from scipy.special import ndtri

from cfm.data import host_stream, omics_source
from cfm.data.omics_records import MODALITIES, PAD_ID

_SUBSET = 0x6E5  # the gene-subset stream (the shuffle's is host_stream.SHUFFLE_STREAM)


class SyntheticOmicsSource:
    """`size` samples of `n_genes` genes in co-expression modules, sample i seeded by (seed, i).

    Each gene belongs to one of 8 modules (fixed); a sample draws one activity per module, and a
    gene's expression is its module's activity times a fixed loading in [0.6, 1] plus noise,
    scaled to unit variance (so it looks like z-scored data): co-expressed genes, as in real
    tissue. The last genes also carry a mutation (Bernoulli, logit from the module signal) and a
    copy-number token (the signal rounded and clipped to -2..2). A masked value is predictable
    from its module's visible genes, which is what lets the tests and the demo see the loss fall.
    """

    def __init__(self, size: int, n_genes: int, seed: int, n_bins: int = 51, n_mut: int = 0,
                 n_cnv: int = 0):
        if size < 1 or n_genes < 4 or n_bins < 2 or not 0 <= n_mut + n_cnv <= n_genes:
            raise ValueError(f"SyntheticOmicsSource needs size >= 1, n_genes >= 4, n_bins >= 2, "
                             f"n_mut + n_cnv <= n_genes; got {size}, {n_genes}, {n_bins}, "
                             f"{n_mut}, {n_cnv} (data.synthetic_*)")
        self.size, self.n_genes, self.seed = int(size), int(n_genes), int(seed)
        self.n_mut, self.n_cnv, self.n_bins = int(n_mut), int(n_cnv), int(n_bins)
        rng = np.random.default_rng([self.seed, 0xFAC])
        self.module = rng.integers(0, 8, self.n_genes)
        self.loading = rng.uniform(0.6, 1.0, self.n_genes)
        # Standard-normal quantiles: the bin edges of z-scored values.
        self.edges = ndtri(np.arange(1, n_bins) / n_bins)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[dict, dict[str, np.ndarray]]:
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"SyntheticOmicsSource index {index} out of range [0, {self.size})")
        rng = np.random.default_rng([self.seed, index])
        z = rng.normal(0, 1, 8)
        signal = self.loading * z[self.module]
        expr = (signal + 0.5 * rng.normal(0, 1, self.n_genes)) / np.sqrt(
            self.loading ** 2 + 0.25)
        genes = np.arange(2, 2 + self.n_genes, dtype=np.int32)
        mod = np.zeros(self.n_genes, np.uint8)
        values = expr.astype(np.float32)
        classes = np.searchsorted(self.edges, values, "right").astype(np.uint8)
        parts = [(genes, mod, values, classes)]
        if self.n_mut:
            g = genes[-self.n_mut:]
            mut = (rng.random(self.n_mut) < 1 / (1 + np.exp(-(2 * signal[-self.n_mut:] - 1.5))))
            parts.append((g, np.full(self.n_mut, 1, np.uint8), mut.astype(np.float32),
                          mut.astype(np.uint8)))
        if self.n_cnv:
            g = genes[-self.n_cnv:]
            call = np.clip(np.round(1.5 * signal[-self.n_cnv:]), -2, 2)
            parts.append((g, np.full(self.n_cnv, 2, np.uint8), call.astype(np.float32),
                          (call + 2).astype(np.uint8)))
        arrays = dict(zip(("gene_ids", "modality", "values", "classes"),
                          (np.concatenate(a) for a in zip(*parts))))
        meta = {"sample_id": f"synthetic-{index}", "patient_id": f"synthetic-{index}",
                "split": "train"}
        return meta, arrays


def make_source(data: ml_collections.ConfigDict, seed: int, split: str | None = None):
    """The configured sample source: `synthetic` or `prepared` (data_prep.prepare_omics)."""
    if data.source == "synthetic":
        return SyntheticOmicsSource(data.synthetic_size, data.synthetic_genes, seed,
                                    n_bins=data.synthetic_bins, n_mut=data.synthetic_mutations,
                                    n_cnv=data.synthetic_cnv)
    if data.source == "prepared":
        return omics_source.OmicsShardSource(data.path, split or data.split)
    raise ValueError(f"data.source={data.source!r}: use synthetic or prepared")


def data_sizes(data: ml_collections.ConfigDict) -> tuple[int, int]:
    """(vocab_size, n_bins) of the configured data, which size the model's tables."""
    if data.source == "synthetic":
        return data.synthetic_genes + 2, data.synthetic_bins
    manifest = omics_source.read_manifest(data.path)  # clear errors for a wrong folder
    return int(manifest["vocab_size"]), int(manifest["n_bins"])


def pad_sample(arrays: dict[str, np.ndarray], max_tokens: int, rng: np.random.Generator | None,
               shuffle: bool = False) -> dict[str, np.ndarray]:
    """One sample's tokens as fixed-length [max_tokens] arrays: a random subset (sorted, so the
    order carries no information) when it has more, padding (gene id 0) when it has fewer.
    `shuffle` (with `rng`): every kept token in random order instead, so that a model attending
    only to the first `model.attend_tokens` sees a random subset of them."""
    n = len(arrays["gene_ids"])
    keep = np.arange(n)
    if shuffle:
        keep = rng.permutation(n)[:max_tokens]
    elif n > max_tokens:
        if rng is None:
            raise ValueError(f"sample has {n} tokens > data.max_tokens={max_tokens}")
        keep = np.sort(rng.choice(n, max_tokens, replace=False))
    out = {}
    for k, dtype in (("gene_ids", np.int32), ("modality", np.int32), ("values", np.float32),
                     ("classes", np.int32)):
        a = np.zeros(max_tokens, dtype)
        a[:len(keep)] = arrays[k][keep]
        out[k] = a
    if np.any(out["modality"] >= len(MODALITIES)):
        raise ValueError(f"modality index >= {len(MODALITIES)} in a record")
    out["gene_ids"][len(keep):] = PAD_ID
    return out


class _Subset:
    def __init__(self, max_tokens: int, seed: int, shuffle: bool):
        self.max_tokens, self.seed, self.shuffle = int(max_tokens), int(seed), shuffle

    def __call__(self, g: int, record) -> dict[str, np.ndarray]:
        _, arrays = record
        return pad_sample(arrays, self.max_tokens,
                          np.random.default_rng([self.seed, _SUBSET, int(g)]), self.shuffle)


def make_train_iterator(config: ml_collections.ConfigDict, *, process_index: int = 0,
                        process_count: int = 1, start_step: int = 0
                        ) -> Iterator[dict[str, np.ndarray]]:
    """Endless iterator of this host's batches from step `start_step`: gene_ids, modality,
    classes int32 [b, max_tokens] and values float32 [b, max_tokens], b = batch / processes."""
    b = host_stream.host_batch_size(config.batch_size, process_index, process_count)
    if start_step < 0 or config.seed < 0:
        raise ValueError(f"need start_step >= 0 and seed >= 0, got {start_step}, {config.seed}")
    seed = int(config.seed)
    ds = host_stream.shuffled_repeat(make_source(config.data, seed), seed)
    shuffle = config.model.get("attend_tokens", 0) > 0
    ds = ds.map_with_index(_Subset(config.data.max_tokens, seed, shuffle))
    ds = ds.batch(b, drop_remainder=True)
    ds = host_stream.host_slice(ds, process_index, process_count, start_step)
    return iter(host_stream.read_ahead(ds, config.data.prefetch))
