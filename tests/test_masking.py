"""Block masking (BEiT / DINOv2): budgets, block shapes, batch statistics, static buffer bound."""

import numpy as np
import pytest

from cfm.data.masking import BlockMaskGenerator, mask_buffer_size, sample_batch_masks


@pytest.mark.parametrize("grid", [(4, 4), (5, 7), (14, 14)])
def test_one_block_is_a_rectangle_strictly_inside_the_grid(grid):
    gen = BlockMaskGenerator(grid, max_num_patches=0.5 * grid[0] * grid[1])
    rng = np.random.default_rng(0)
    placed = 0
    for _ in range(200):
        mask = np.zeros(grid, bool)
        budget = int(rng.integers(1, grid[0] * grid[1] // 2 + 1))
        added = gen._add_block(rng, mask, budget)
        assert added == mask.sum() <= budget
        if added:
            placed += 1
            rows, cols = np.nonzero(mask)
            box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert box.all(), "a block must be a filled rectangle"
            assert box.shape[0] < grid[0] and box.shape[1] < grid[1]
    assert placed > 100


def test_mask_never_exceeds_target_and_gets_close_to_it():
    gen = BlockMaskGenerator((14, 14), max_num_patches=98)
    rng = np.random.default_rng(1)
    ratios = []
    for target in rng.integers(10, 99, size=300):
        mask = gen(rng, int(target))
        assert mask.shape == (14, 14) and mask.dtype == bool
        assert mask.sum() <= target
        ratios.append(mask.sum() / target)
    assert np.mean(ratios) > 0.8  # BEiT keeps adding blocks until the budget is nearly spent
    assert gen(rng, 0).sum() == 0


def test_masks_are_deterministic_per_generator_state():
    gen = BlockMaskGenerator((8, 8))
    a = gen(np.random.default_rng(7), 20)
    assert np.array_equal(a, gen(np.random.default_rng(7), 20))
    assert any(not np.array_equal(a, gen(np.random.default_rng(s), 20)) for s in range(8, 12))
    b1 = sample_batch_masks(np.random.default_rng(3), 16, (8, 8), 0.5, (0.1, 0.5))
    b2 = sample_batch_masks(np.random.default_rng(3), 16, (8, 8), 0.5, (0.1, 0.5))
    b3 = sample_batch_masks(np.random.default_rng(4), 16, (8, 8), 0.5, (0.1, 0.5))
    assert np.array_equal(b1, b2) and not np.array_equal(b1, b3)


@pytest.mark.parametrize("n_crops,prob", [(16, 0.5), (10, 0.3), (6, 1.0)])
def test_batch_masks_follow_dinov2_collate_rule(n_crops, prob):
    grid, ratio = (14, 14), (0.1, 0.5)
    n = grid[0] * grid[1]
    n_masked = int(n_crops * prob)
    bounds = [int(n * p) for p in np.linspace(*ratio, n_masked + 1)[1:]]  # per-crop caps
    rng = np.random.default_rng(0)
    seen_positions = set()
    for _ in range(50):
        masks = sample_batch_masks(rng, n_crops, grid, prob, ratio, 4, 0.3, 0.5)
        assert masks.shape == (n_crops, n) and masks.dtype == bool
        counts = masks.sum(axis=1)
        assert (counts > 0).sum() == n_masked  # targets >= 0.1 * 196 always place blocks
        # The k-th smallest count is at most the k-th interval's cap int(N * p_{k+1}).
        assert np.all(np.sort(counts[counts > 0]) <= bounds)
        seen_positions |= set(np.nonzero(counts)[0].tolist())
    if n_masked < n_crops:  # rows are shuffled, not always the first n_masked
        assert len(seen_positions) > n_masked


def test_buffer_size_matches_dinov2_upperbound_by_hand():
    # 4 crops, p=0.5 -> 2 masked; edges linspace(0.1, 0.5, 3) = 0.1, 0.3, 0.5 on 16 patches.
    assert mask_buffer_size(4, 16, 0.5, (0.1, 0.5)) == int(16 * 0.3) + int(16 * 0.5) == 12
    assert mask_buffer_size(1, 16, 0.5, (0.1, 0.5)) == 0  # no crop masked
    assert sample_batch_masks(np.random.default_rng(0), 1, (4, 4), 0.5, (0.1, 0.5)).sum() == 0


@pytest.mark.parametrize("n_crops,grid,prob,ratio", [
    (16, (4, 4), 0.5, (0.1, 0.5)), (64, (8, 8), 0.5, (0.1, 0.5)),
    (8, (14, 14), 1.0, (0.3, 0.7)), (12, (6, 6), 0.25, (0.0, 1.0))])
def test_buffer_bound_never_exceeded(n_crops, grid, prob, ratio):
    bound = mask_buffer_size(n_crops, grid[0] * grid[1], prob, ratio)
    totals = [sample_batch_masks(np.random.default_rng(seed), n_crops, grid, prob, ratio).sum()
              for seed in range(300)]
    assert max(totals) <= bound
    assert max(totals) > 0.6 * bound  # the bound is tight, not a loose overestimate


def test_stops_when_no_block_fits():
    # Blocks must be strictly smaller than the grid, so nothing fits on 1 x 1 or 1 x 5 grids;
    # the generator must give up after a round of failed attempts instead of looping.
    rng = np.random.default_rng(0)
    assert BlockMaskGenerator((1, 1))(rng, 1).sum() == 0
    assert BlockMaskGenerator((1, 5), min_num_patches=1)(rng, 3).sum() == 0
