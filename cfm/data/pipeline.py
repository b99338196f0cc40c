"""The grain input pipeline for DINOv2-style pretraining: host-local batches of uint8 crops + masks.

Graph (grain MapDataset): source -> seeded shuffle -> repeat (reshuffled each epoch) ->
per-record multi-crop augmentation -> batch of b = batch_size / process_count -> iBOT masks ->
every process_count-th batch from this host's slot -> IterDataset (threads, optionally worker
processes).

Determinism contract, which the tests check:
  * Record g of the global stream (g = step * batch_size + position) is augmented with a
    generator seeded by (seed, g), so its crops do not depend on the number of hosts or workers.
  * Host p gets positions p*b:(p+1)*b of every global batch, so the union of the host batches
    is the single-process batch.
  * The masks of step i are drawn for all 2 * batch_size global crops from a generator seeded by
    (seed, i) and each host keeps its samples' rows, so masks follow their samples.
  * Batches depend only on (config, step), so `start_step=k` resumes at step k without replay.
"""

from collections.abc import Iterator

import grain
import numpy as np
from absl import flags

from cfm.data import host_stream
from cfm.data.augment import MultiCrop
from cfm.data.masking import mask_buffer_size, sample_batch_masks
from cfm.data.sources import make_source

# Distinct streams derived from config.seed, so augmentation and masks share no random numbers
# with each other or with the shuffle (host_stream.SHUFFLE_STREAM).
_AUGMENT, _MASKS = 0xA06, 0x3A5


def _check_seed(seed: int) -> int:
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0 for the input pipeline, got {seed}")
    return int(seed)


class _Augment:
    """Maps (global stream position g, image) to its crops, seeded by (seed, g)."""

    def __init__(self, multicrop: MultiCrop, seed: int):
        self.multicrop, self.seed = multicrop, seed

    def __call__(self, g: int, image: np.ndarray) -> dict[str, np.ndarray]:
        return self.multicrop(image, np.random.default_rng([self.seed, _AUGMENT, int(g)]))


class _AttachMasks:
    """Adds `masks` bool [b, 2, N] to host-sized batch m (step m // P, host slot m % P).

    The masks of a step are sampled over all 2 * B global crops, row c * B + s being crop c of
    sample s (DINOv2's collate order), from a generator seeded by (seed, step).
    """

    def __init__(self, config, grid: tuple[int, int], process_count: int):
        self.seed = _check_seed(config.seed)
        self.global_batch = int(config.batch_size)
        self.process_count = process_count
        self.grid = grid
        ib = config.ibot
        self.kwargs = dict(mask_probability=ib.mask_sample_probability,
                           ratio_min_max=tuple(ib.mask_ratio_min_max),
                           min_num_patches=ib.min_block_patches, min_aspect=ib.min_aspect,
                           max_mask_fraction=ib.max_mask_fraction)

    def __call__(self, m: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        step, slot = divmod(int(m), self.process_count)
        rng = np.random.default_rng([self.seed, _MASKS, step])
        masks = sample_batch_masks(rng, 2 * self.global_batch, self.grid, **self.kwargs)
        masks = masks.reshape(2, self.global_batch, -1).transpose(1, 0, 2)
        b = self.global_batch // self.process_count
        return {**batch, "masks": np.ascontiguousarray(masks[slot * b:(slot + 1) * b])}


def _grid(config, patch_size: int) -> tuple[int, int]:
    size = int(config.crops.global_size)
    if patch_size < 1 or size % patch_size:
        raise ValueError(f"crops.global_size={size} must be a multiple of patch_size={patch_size}")
    return size // patch_size, size // patch_size


def mask_buffer_size_for(config, patch_size: int) -> int:
    """Static upper bound on masked patches in one global batch (2 * batch_size global crops).

    The jitted step gathers masked tokens into a buffer of this fixed size (DINOv2's
    `upperbound`), so its shapes never change from step to step.
    """
    h, w = _grid(config, patch_size)
    return mask_buffer_size(2 * int(config.batch_size), h * w, config.ibot.mask_sample_probability,
                            tuple(config.ibot.mask_ratio_min_max))


def make_train_iterator(config, *, patch_size: int, process_index: int = 0,
                        process_count: int = 1, start_step: int = 0, source=None
                        ) -> Iterator[dict[str, np.ndarray]]:
    """Endless iterator of this host's training batches, starting at step `start_step`.

    Each batch is a dict of numpy arrays with b = batch_size / process_count samples:
    global_crops uint8 [b, 2, G, G, 3], local_crops uint8 [b, n_local, L, L, 3] and masks
    bool [b, 2, (G / patch_size)**2] (True = patch hidden from the student, iBOT).
    `source`: a random-access image source to read instead of `config.data`'s (cfm.federated's
    DINOv2 sites pass their training tiles without the held-out ones).
    """
    b = host_stream.host_batch_size(config.batch_size, process_index, process_count)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    seed = _check_seed(config.seed)
    grid = _grid(config, patch_size)

    source = make_source(config.data, seed) if source is None else source
    ds = host_stream.shuffled_repeat(source, seed)
    ds = ds.map_with_index(_Augment(MultiCrop(config.crops, config.augment), seed))
    ds = ds.batch(b, drop_remainder=True)
    ds = ds.map_with_index(_AttachMasks(config, grid, process_count))
    ds = host_stream.host_slice(ds, process_index, process_count, start_step)

    prefetch = max(1, int(config.data.prefetch))
    it_ds = host_stream.read_ahead(ds, prefetch)
    if config.data.worker_count > 0:
        if not flags.FLAGS.is_parsed():
            # grain 0.2.18 reads an absl flag in mp_prefetch and fails when no absl app parsed
            # flags (google/grain issue 1355); the maintainers' workaround keeps the defaults.
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=int(config.data.worker_count), per_worker_buffer_size=prefetch))
    return iter(it_ds)
