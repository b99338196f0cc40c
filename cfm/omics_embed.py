"""Sample embeddings of a prepared omics folder from a masked-gene-modelling model
(`python -m cfm.embed --model M --omics DIR --out OUT`, see cfm/embed.py).

Every token of a sample goes in (no random subset: the model has no position embeddings, so it
takes any number of tokens); batches are padded to a multiple of 128 tokens so that a handful of
shapes compile. The embedding is the final-norm CLS token (D floats).

Output in `--out`: `embeddings.npy` (float32 [n, D]), `index.csv` (row, sample_id, patient_id,
split) and `embed.json`, written to a temporary folder and renamed.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time

import jax
import numpy as np

from cfm import atomic, compat, pretrained
from cfm.data.omics_pipeline import pad_sample
from cfm.data.omics_source import OmicsShardSource, read_manifest

SPLITS = ("train", "val", "test")


def padded_batches(samples: list[dict[str, np.ndarray]], batch: int = 32, bucket: int = 128,
                   value_mask: list[np.ndarray] | None = None):
    """Yield (n real samples, batch dict [batch, L], value mask bool [batch, L]) over every
    token of `samples` (omics_records.decode_sample's dicts), L a multiple of `bucket` and the
    batch always full (repeated last sample), so that a handful of shapes compile."""
    longest = -(-max(len(s["gene_ids"]) for s in samples) // bucket) * bucket
    # Attention holds batch x heads x L^2 floats: cap the batch for long samples (TCGA's ~3000
    # tokens at batch 32 needed ~5 GB of host memory).
    batch = max(1, min(batch, 2 ** 26 // longest ** 2))
    for lo in range(0, len(samples), batch):
        chunk = samples[lo:lo + batch]
        length = -(-max(len(s["gene_ids"]) for s in chunk) // bucket) * bucket
        padded = [pad_sample(s, length, None) for s in chunk]
        padded += [padded[-1]] * (batch - len(chunk))
        b = {k: np.stack([p[k] for p in padded]) for k in padded[0]}
        m = np.zeros(b["gene_ids"].shape, bool)
        for j, vm in enumerate(value_mask[lo:lo + batch] if value_mask is not None else []):
            m[j, :len(vm)] = vm
        yield len(chunk), b, m


def read_samples(folder: str, splits: tuple[str, ...] = SPLITS
                 ) -> tuple[list[dict], list[dict[str, np.ndarray]]]:
    """(metadata, token arrays) of every sample of `splits` in a prepared omics folder."""
    manifest = read_manifest(folder)
    metas, samples = [], []
    for split in splits:
        if manifest["splits"].get(split, {}).get("samples"):
            src = OmicsShardSource(folder, split)
            for i in range(len(src)):
                meta, arrays = src[i]
                metas.append(meta)
                samples.append(arrays)
    return metas, samples


def window_views(samples: list[dict[str, np.ndarray]], window: int, seed: int = 0,
                 value_mask: list[np.ndarray] | None = None):
    """For a model that attends to its first `window` tokens only (`attend_tokens`): each
    sample's tokens split at random into ceil(n / window) windows, and one view per window with
    that window's tokens first and the rest after. Returns (views, their value masks or None,
    owner sample index per view, the window's token indices per view); every token is in
    exactly one window. window <= 0: each sample is its own single view."""
    views, masks, owner, index = [], [], [], []
    for i, s in enumerate(samples):
        n = len(s["gene_ids"])
        if window <= 0 or n <= window:
            parts, orders = [np.arange(n)], [np.arange(n)]
        else:
            perm = np.random.default_rng([seed, i]).permutation(n)
            parts = np.array_split(perm, -(-n // window))
            orders = [np.concatenate([p, np.setdiff1d(perm, p, assume_unique=True)])
                      for p in parts]
        for p, order in zip(parts, orders):
            views.append({k: v[order] for k, v in s.items()})
            masks.append(value_mask[i][order] if value_mask is not None else None)
            owner.append(i)
            index.append(p)
    return views, (masks if value_mask is not None else None), owner, index


def sample_embeddings(module, params: dict, samples: list[dict[str, np.ndarray]],
                      batch: int = 32, bucket: int = 128, value_mask=None) -> np.ndarray:
    """float32 [len(samples), D] CLS embeddings of token arrays (omics_records.decode_sample's
    dict); `value_mask`, if given, a list of bool arrays hiding those values (evaluation).
    A model with `attend_tokens` gets every window of a sample (`window_views`) and the
    sample's embedding is the mean of their CLS outputs."""
    apply = jax.jit(lambda p, b, m: module.apply(
        {"params": p}, b["gene_ids"], b["modality"], b["values"], b["classes"],
        value_mask=m)["cls"])
    views, masks, owner, _ = window_views(samples, getattr(module, "attend_tokens", 0),
                                          value_mask=value_mask)
    out = np.concatenate([np.asarray(apply(params, b, m))[:n]
                          for n, b, m in padded_batches(views, batch, bucket, masks)])
    sums = np.zeros((len(samples), out.shape[1]))
    np.add.at(sums, np.asarray(owner), out)
    return (sums / np.bincount(owner, minlength=len(samples))[:, None]).astype(np.float32)


def embed_omics(model: str, folder: str, out: str, step: int | None = None, batch: int = 32,
                splits: tuple[str, ...] = SPLITS, trust_data: bool = False) -> int:
    """Write the CLS embeddings of every sample of `splits` in a prepared folder to `out`,
    after `cfm.compat.check_omics` (CompatError, a ValueError, when model and folder differ in
    vocabulary or normalisation; `trust_data` where the model's own cannot be found)."""
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"--out {out!r} exists and is not empty; choose a new folder")
    agreed = compat.check_omics(compat.model_spec(model, step), folder, trust_data)
    print(f"cfm.embed: {agreed}", file=sys.stderr)
    p = pretrained.load(model, step)
    metas, samples = read_samples(folder, splits)
    if not samples:
        raise ValueError(f"--omics {folder}: no samples in splits {list(splits)}")
    start = time.perf_counter()
    emb = sample_embeddings(p.module, p.params, samples, batch)
    print(f"cfm.embed: {len(samples)} samples in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    with atomic.atomic_folder(out) as tmp:  # the whole folder or nothing
        np.save(os.path.join(tmp, "embeddings.npy"), emb)
        with open(os.path.join(tmp, "index.csv"), "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["row", "sample_id", "patient_id", "split"])
            for i, m in enumerate(metas):
                w.writerow([i, m.get("sample_id"), m.get("patient_id"), m.get("split")])
        with open(os.path.join(tmp, "embed.json"), "w", encoding="utf-8") as f:
            json.dump({"checkpoint_step": p.step, "variant": p.info["architecture"]["variant"],
                       "dim": int(emb.shape[1]), "samples": len(samples),
                       "feature": "final-norm CLS token, all tokens of each sample"}, f, indent=1)
    return len(samples)
