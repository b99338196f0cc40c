"""Block masking of patch grids for iBOT's masked-image objective, in pure numpy.

The masks are rectangular blocks placed one after another until a patch budget is spent: the
BEiT scheme (Bao et al. 2021, "BEiT: BERT Pre-Training of Image Transformers",
arXiv:2106.08254, Sec. 2.5 / Algorithm 1) as DINOv2 uses it (Oquab et al. 2023,
arXiv:2304.07193; `MaskingGenerator` and `collate_data_and_cast` in facebookresearch/dinov2).
Every random draw comes from an explicit `np.random.Generator`, so the input pipeline
(`cfm.data.pipeline`) can seed masks per training step and reproduce them on any number of
hosts. The masks travel with each batch; the iBOT loss on them is `cfm.ssl.losses.ibot_loss`.
"""

import math

import numpy as np

# BEiT tries this many random rectangles before it gives up on placing one more block.
_ATTEMPTS_PER_BLOCK = 10


class BlockMaskGenerator:
    """Draws BEiT/DINOv2 block masks on a `grid` = (height, width) of patches.

    Args:
        grid: patch grid (rows, columns), e.g. (14, 14) for 224-pixel crops and 16-pixel patches.
        min_num_patches: smallest block area in patches (BEiT and DINOv2: 4).
        min_aspect: smallest block aspect ratio h/w (BEiT and DINOv2: 0.3).
        max_aspect: largest aspect ratio; None means 1 / min_aspect.
        max_num_patches: largest block area in patches; None means the whole grid. DINOv2 uses
            half the grid (0.5 * h * w).
    """

    def __init__(self, grid: tuple[int, int], min_num_patches: int = 4, min_aspect: float = 0.3,
                 max_aspect: float | None = None, max_num_patches: float | None = None):
        self.height, self.width = int(grid[0]), int(grid[1])
        if self.height < 1 or self.width < 1:
            raise ValueError(f"BlockMaskGenerator: grid must be positive, got {grid}")
        if min_aspect <= 0:
            raise ValueError(f"BlockMaskGenerator: min_aspect must be > 0, got {min_aspect}")
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.min_num_patches = min_num_patches
        n = self.height * self.width
        self.max_num_patches = n if max_num_patches is None else max_num_patches

    def _add_block(self, rng: np.random.Generator, mask: np.ndarray, budget: float) -> int:
        """Tries up to 10 rectangles; marks the first that adds 1..`budget` new patches.

        Returns the number of newly masked patches (0 if every attempt failed).
        """
        for _ in range(_ATTEMPTS_PER_BLOCK):
            u_area, u_aspect, u_top, u_left = rng.random(4)
            area = self.min_num_patches + (budget - self.min_num_patches) * u_area
            lo, hi = self.log_aspect
            aspect = math.exp(lo + (hi - lo) * u_aspect)
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (0 < h < self.height and 0 < w < self.width):
                continue  # BEiT requires the block to be strictly smaller than the grid
            top = int(u_top * (self.height - h + 1))
            left = int(u_left * (self.width - w + 1))
            block = mask[top:top + h, left:left + w]
            added = h * w - int(block.sum())
            if 0 < added <= budget:
                block[...] = True
                return added
        return 0

    def __call__(self, rng: np.random.Generator, num_masking_patches: int) -> np.ndarray:
        """Returns a bool [h, w] mask with at most `num_masking_patches` True entries.

        Blocks are added until the budget is reached or a whole round of attempts adds nothing,
        so the count can fall short of the target but never exceeds it.
        """
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_block(rng, mask, budget)
            if added == 0:
                break
            count += added
        return mask


def _ratio_edges(n_masked: int, ratio_min_max: tuple[float, float]) -> np.ndarray:
    """DINOv2's per-crop mask-ratio intervals: n_masked + 1 evenly spaced edges."""
    lo, hi = float(ratio_min_max[0]), float(ratio_min_max[1])
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(
                f"mask ratio_min_max must satisfy 0 <= min <= max <= 1, got {ratio_min_max}")
    return np.linspace(lo, hi, n_masked + 1)


def sample_batch_masks(rng: np.random.Generator, n_crops: int, grid: tuple[int, int],
                       mask_probability: float, ratio_min_max: tuple[float, float],
                       min_num_patches: int = 4, min_aspect: float = 0.3,
                       max_mask_fraction: float = 0.5) -> np.ndarray:
    """Masks for a batch of `n_crops` global crops, as bool [n_crops, h * w].

    DINOv2's collate rule: int(n_crops * mask_probability) crops are masked, crop i of those with
    a target of int(N * uniform(p_i, p_{i+1})) patches where p = linspace(min, max, n_masked + 1),
    which spreads the mask ratios evenly over the range; the other crops get empty masks and the
    rows are then shuffled. One block covers at most `max_mask_fraction` of the N patches.
    """
    h, w = grid
    n_patches = h * w
    n_masked = int(n_crops * mask_probability)
    edges = _ratio_edges(n_masked, ratio_min_max)
    generator = BlockMaskGenerator(grid, min_num_patches, min_aspect,
                                   max_num_patches=max_mask_fraction * n_patches)
    masks = np.zeros((n_crops, n_patches), dtype=bool)
    for i in range(n_masked):
        target = int(n_patches * rng.uniform(edges[i], edges[i + 1]))
        masks[i] = generator(rng, target).reshape(-1)
    return masks[rng.permutation(n_crops)]


def mask_buffer_size(n_crops: int, n_patches: int, mask_probability: float,
                     ratio_min_max: tuple[float, float]) -> int:
    """Static upper bound on the masked patches of one batch (DINOv2's `upperbound`).

    The sum over masked crops of int(N * p_{i+1}); each crop's target is at most its term and
    block masking never exceeds the target, so a gather buffer of this size always suffices.
    It is 0 when no crop is masked (n_crops * mask_probability < 1).
    """
    n_masked = int(n_crops * mask_probability)
    edges = _ratio_edges(n_masked, ratio_min_max)
    return int(sum(int(n_patches * p) for p in edges[1:]))
