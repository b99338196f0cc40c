"""Expression statistics of `data_prep.prepare_omics`: per-gene z-scoring with training-split
mean / std, pooled over every input (--normalise pooled) or fitted per source (--normalise
per-input), and the quantile bin edges of the z-scores.

A source is a group of inputs that hold the same samples (joined); stacked inputs are each a
source. Why per source: tables from different studies measure expression on different scales
(TCGA's `_rnaseq` values are z-score-like with heavy tails, signed_log1p'd here; the ICB
cohorts' are log2(TPM + 0.001)) and with platform and batch shifts of their own. Pooled
statistics would leave every source at its own offset, so a gene's z-score would say which
study a sample came from more than how high the gene is in it. Z-scoring each source with its
own training-split mean / std puts every source at mean 0 / std 1 per gene, and a cohort never
seen in pretraining is prepared the same way (with `--vocab`, its own statistics), which is
also what `cfm.finetune`'s `encoder_norm = cohort` does.
"""

from __future__ import annotations

import numpy as np

from data_prep.omics_files import OmicsInputError

MAX_BIN_SAMPLE = 20_000_000  # z-scores used for the bin quantiles (random subset beyond this)
NORMALISE = ("pooled", "per-input")


def fit_expression(groups_data, vocab_size: int, std_floor: float, clip: float,
                   repairs: dict) -> dict:
    """Per-gene mean/std over training samples; z-scores and clips every group in place."""
    total = np.zeros(vocab_size)
    count = np.zeros(vocab_size)
    for values, genes, mods, train in groups_data:
        cols = np.flatnonzero(mods == 0)
        block = values[train][:, cols]
        np.add.at(total, genes[cols], np.nansum(block, axis=0))
        np.add.at(count, genes[cols], (~np.isnan(block)).sum(axis=0))
    mean = np.divide(total, count, out=np.zeros(vocab_size), where=count > 0)
    sq = np.zeros(vocab_size)
    for values, genes, mods, train in groups_data:
        cols = np.flatnonzero(mods == 0)
        block = values[train][:, cols] - mean[genes[cols]]
        np.add.at(sq, genes[cols], np.nansum(block * block, axis=0))
    raw_std = np.sqrt(np.divide(sq, count, out=np.zeros(vocab_size), where=count > 0))
    std = np.maximum(raw_std, std_floor)
    fitted = np.flatnonzero(count > 0)
    floored = int((raw_std[fitted] < std_floor).sum())
    if floored:
        repairs["genes with std < --std-floor (std floored)"] = floored
    unfitted = set()
    for values, genes, mods, _ in groups_data:
        cols = np.flatnonzero(mods == 0)
        orphan = cols[count[genes[cols]] == 0]
        unfitted |= set(genes[orphan].tolist())
        values[:, orphan] = np.nan  # no training value: no statistics, no tokens
        cols = cols[count[genes[cols]] > 0]
        values[:, cols] = np.clip((values[:, cols] - mean[genes[cols]]) / std[genes[cols]],
                                  -clip, clip)
    if unfitted:
        repairs["expression genes without training values (tokens dropped)"] = len(unfitted)
    return {"genes": fitted.tolist(), "mean": mean[fitted].tolist(),
            "std": std[fitted].tolist(), "std_floored": floored}


def fit_per_source(groups_data, where: list[str], transforms: list[str | None],
                   vocab_size: int, std_floor: float, clip: float, repairs: dict) -> dict:
    """`fit_expression` on each source (group) alone: stats.json's `expression` entry with
    `sources` (per source: its inputs, transform, training samples and per-gene mean / std)
    and `genes`, the union of the genes fitted anywhere (the genes the model saw as
    expression). `transforms`: each group's --expression-transform."""
    sources = []
    for g, data in enumerate(groups_data):
        values, _, mods, train = data
        if (mods == 0).any() and not train.any():
            raise OmicsInputError(f"--normalise per-input: no sample of {where[g]} fell into "
                                  "the training split, so its expression cannot be z-scored "
                                  "with its own statistics; lower --val-fraction / "
                                  "--test-fraction or leave the input out")
        part: dict = {}
        stats = fit_expression([data], vocab_size, std_floor, clip, part)
        for key, n in part.items():
            repairs[key] = repairs.get(key, 0) + n
        sources.append({"inputs": where[g], "transform": transforms[g],
                        "train_samples": int(train.sum()), **stats})
    genes = sorted(set().union(*(s["genes"] for s in sources)))
    return {"normalise": "per-input", "genes": genes,
            "std_floored": sum(s["std_floored"] for s in sources), "sources": sources}


def bin_edges(groups_data, n_bins: int, seed: int) -> np.ndarray:
    """n_bins - 1 quantile edges of the training expression z-scores (as float32 values)."""
    chunks = []
    for values, _, mods, train in groups_data:
        block = values[train][:, mods == 0].astype(np.float32).ravel()
        chunks.append(block[~np.isnan(block)])
    pooled = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if not len(pooled):
        return np.zeros(0)
    if len(pooled) > MAX_BIN_SAMPLE:
        pooled = np.random.default_rng(seed).choice(pooled, MAX_BIN_SAMPLE, replace=False)
    return np.quantile(pooled.astype(np.float64), np.arange(1, n_bins) / n_bins)
