"""What the tile (`cfm.data.pipeline`) and omics (`cfm.data.omics_pipeline`) input pipelines
share: the split of a global batch over processes, the seeded shuffle-and-repeat of a source,
this host's slice of the batch stream and the threaded read-ahead.

A pipeline builds source -> `shuffled_repeat` -> its per-record map -> batch of
`host_batch_size` -> `host_slice`, so host p gets positions p*b:(p+1)*b of every global batch and
batches depend only on (config, step).
"""

from __future__ import annotations

import grain
import numpy as np

# The random stream of the shuffle, derived from the config seed; each pipeline's other streams
# (augmentation, masks, gene subsets) use other constants.
SHUFFLE_STREAM = 0x5F1


def host_batch_size(batch_size: int, process_index: int, process_count: int) -> int:
    """This host's share b = batch_size / process_count of a global batch; ValueError for a
    process index outside [0, process_count) or a batch that does not split evenly."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, "
                         f"{process_count}")
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} must be divisible by the number of "
                         f"processes ({process_count}); change --config.batch_size")
    return batch_size // process_count


def shuffled_repeat(source, seed: int) -> grain.MapDataset:
    """`source` shuffled with a generator seeded by (seed, SHUFFLE_STREAM) and repeated without
    end, reshuffled every epoch (deterministically): record g of the result is position g of
    the global stream."""
    shuffle_seed = int(np.random.SeedSequence([seed, SHUFFLE_STREAM]).generate_state(1)[0])
    return grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat()


def host_slice(batches: grain.MapDataset, process_index: int, process_count: int,
               start_step: int) -> grain.MapDataset:
    """This host's batches from step `start_step` on: host-sized batch m of `batches` is slot
    m % process_count of step m // process_count."""
    return batches[process_index + start_step * process_count::process_count]


def read_ahead(ds: grain.MapDataset, prefetch: int) -> grain.IterDataset:
    """`ds` as an IterDataset read by max(1, prefetch) threads with as many records buffered."""
    prefetch = max(1, int(prefetch))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch,
                                                prefetch_buffer_size=prefetch))
