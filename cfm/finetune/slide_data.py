"""Tile embeddings, slide bags and labels for the slide tasks (tile probe, MIL, spatial, TME).

Features come from one of two places (config keys shared by every slide task):

- `config.model` + `config.shards`: a `cfm.export` folder (orbax/safetensors) or a `cfm.train`
  workdir, loaded with `cfm.pretrained.load`, run over every tile of the `data_prep.tile_wsi`
  shards (or `data_prep.synthetic_tme` shards) exactly as `cfm.embed` does it (resize to the
  model's input size, bicubic, no crop; ImageNet normalisation from the training config; the
  final-norm CLS token, DINOv2's image feature);
- `config.embeddings`: a `cfm.embed --out` folder (`embeddings-*.npy` + `index.csv`).

Each tile keeps its metadata (slide_id, x, y in level-0 px, mpp, tile_size, and for synthetic
tiles `label`), so slide labels, spots and maps are joined on (slide_id[, x, y]). Every mismatch
(labels for slides without tiles, tiles without labels, one class) is a `FinetuneError` that
names the input.
"""

from __future__ import annotations

import functools
import glob
import json
import os
from typing import NamedTuple

import jax
import numpy as np
import pandas as pd

from cfm import compat, pretrained
from cfm.data.sources import ShardSource
from cfm.embed import _prepare as prepare_tile  # one tile preprocessing for cfm.embed and these
from cfm.evaluate.cv import patient_folds
from cfm.finetune.common import FinetuneError


class TileSet(NamedTuple):
    """Tile features with their metadata and provenance."""

    features: np.ndarray  # float32 [N, D]
    meta: pd.DataFrame  # one row per tile: slide_id, x, y, mpp, tile_size, ..., `tile` (index)
    info: dict  # where the features come from (model, variant, dim, tiles)


# ============================================================================ embeddings ======
@functools.lru_cache(maxsize=4)
def _cls_fn(module):
    """Jitted CLS embedding of a backbone module (cached: one compile per architecture)."""
    return jax.jit(lambda prm, x: module.apply({"params": prm}, x)["cls"])


def embed_shards(model_path: str, shards: str, batch: int = 256) -> TileSet:
    """CLS embeddings of every tile under `shards` from the backbone at `model_path`, once
    `cfm.compat.check_tiles` has found the shards' tile size and mpp to be the model's
    training ones (FinetuneError naming both otherwise)."""
    try:
        spec = compat.model_spec(model_path)
    except (FileNotFoundError, pretrained.CheckpointError) as e:
        raise FinetuneError(f"config.model={model_path!r}: {e}") from None
    try:
        source = ShardSource(shards)
    except (FileNotFoundError, ValueError) as e:
        raise FinetuneError(f"config.shards={shards!r}: {e}") from None
    try:
        agreed = compat.check_tiles(spec, shards, override=(
            f"embed them with python -m cfm.embed --model {model_path} --shards {shards} "
            "--allow-scale-mismatch --out EMB and set config.embeddings=EMB"))
    except compat.CompatError as e:
        raise FinetuneError(f"config.model and config.shards: {e}") from None
    try:
        p = pretrained.load(model_path)
    except (FileNotFoundError, pretrained.CheckpointError) as e:
        raise FinetuneError(f"config.model={model_path!r}: {e}") from None
    size = int(p.info["architecture"]["img_size"])
    mean, std = p.info["preprocessing"]["mean"], p.info["preprocessing"]["std"]
    apply = _cls_fn(p.module)
    params = jax.device_put(p.params)
    n = len(source)
    feats, metas = [], []
    for lo in range(0, n, batch):
        idx = range(lo, min(lo + batch, n))
        tiles = []
        for i in idx:
            rgb, meta = source.tile(i)
            tiles.append(prepare_tile(rgb, size, mean, std))
            metas.append({**meta, "tile": i})
        x = np.stack(tiles)
        pad = batch - len(x)  # one compiled shape
        out = np.asarray(apply(params, np.pad(x, ((0, pad), (0, 0), (0, 0), (0, 0)))))
        feats.append(out[:len(idx)])
    features = np.concatenate(feats).astype(np.float32)
    meta = _meta_frame(metas)
    info = {"model": os.path.abspath(model_path), "shards": os.path.abspath(shards),
            "variant": p.info["architecture"]["variant"], "dim": int(features.shape[1]),
            "checkpoint_step": int(p.step), "tiles": int(n), "model_data_check": agreed,
            "feature": "final-norm CLS token of the pretrained backbone (frozen)"}
    return TileSet(features, meta, info)


def read_embeddings(folder: str) -> TileSet:
    """A `cfm.embed --out` folder: its `.npy` files in order, rows matching `index.csv`."""
    index = os.path.join(folder, "index.csv")
    files = sorted(glob.glob(os.path.join(folder, "embeddings-*.npy")))
    if not os.path.isfile(index) or not files:
        raise FinetuneError(f"config.embeddings={folder!r} is not a cfm.embed --out folder "
                            "(needs index.csv and embeddings-*.npy)")
    meta = pd.read_csv(index, dtype={"slide_id": str, "label": str})
    features = np.concatenate([np.load(f, allow_pickle=False) for f in files]).astype(np.float32)
    if len(features) != len(meta):
        raise FinetuneError(f"config.embeddings={folder!r}: {len(features)} embedding rows but "
                            f"{len(meta)} rows in index.csv")
    info = {"embeddings": os.path.abspath(folder), "dim": int(features.shape[1]),
            "tiles": int(len(meta))}
    embed_json = os.path.join(folder, "embed.json")
    if os.path.isfile(embed_json):
        with open(embed_json, encoding="utf-8") as f:
            info.update({k: v for k, v in json.load(f).items() if k != "tiles"})
    return TileSet(features, _meta_frame(meta.to_dict("records")), info)


def _meta_frame(rows: list[dict]) -> pd.DataFrame:
    meta = pd.DataFrame(rows)
    if "slide_id" not in meta:
        raise FinetuneError("tiles carry no slide_id in their metadata; tile the slides with "
                            "python -m data_prep.tile_wsi")
    meta["slide_id"] = meta["slide_id"].astype(str)
    for key in ("x", "y"):
        if key in meta:
            meta[key] = meta[key].astype(np.int64)
    return meta.reset_index(drop=True)


def load_tiles(config, shards_key: str = "shards", model_key: str = "model",
               embeddings_key: str = "embeddings") -> TileSet:
    """Features of the tiles named by the config: `embeddings` if set, else `model` over
    `shards`."""
    emb = config.get(embeddings_key, "") or ""
    if emb:
        return read_embeddings(emb)
    model, shards = config.get(model_key, "") or "", config.get(shards_key, "") or ""
    if not model or not shards:
        raise FinetuneError(f"set config.{model_key} (a cfm.export folder or cfm.train workdir) "
                            f"and config.{shards_key} (tile shards), or config.{embeddings_key} "
                            "(a cfm.embed --out folder)")
    return embed_shards(model, shards, int(config.get("embed_batch", 256)))


# ============================================================================ labels ==========
def read_table(path: str, key: str, what: str) -> pd.DataFrame:
    """A CSV with a `slide_id` column (read as text), or FinetuneError naming `key`."""
    if not path or not os.path.isfile(path):
        raise FinetuneError(f"config.{key}={path!r} is not a file ({what})")
    try:
        table = pd.read_csv(path, dtype={"slide_id": str, "patient_id": str})
    except (ValueError, OSError) as e:
        raise FinetuneError(f"config.{key}={path!r} does not read as CSV: {e}") from None
    if "slide_id" not in table:
        raise FinetuneError(f"config.{key}={path!r} has no slide_id column (columns: "
                            f"{list(table.columns)})")
    return table


def match_slides(labels: pd.DataFrame, tiles: TileSet, key: str) -> pd.DataFrame:
    """Labelled slides that have tiles, in label order; FinetuneError when any labelled slide
    has no tile (naming a few), or when no slide matches at all."""
    have = set(tiles.meta["slide_id"])
    wanted = labels["slide_id"].astype(str)
    if labels["slide_id"].duplicated().any():
        dup = sorted(set(wanted[labels["slide_id"].duplicated()]))[:5]
        raise FinetuneError(f"config.{key}: slide ids listed twice: {dup}")
    missing = sorted(set(wanted) - have)
    if len(missing) == len(wanted):
        raise FinetuneError(f"config.{key}: none of its {len(wanted)} slides has tiles in the "
                            f"features (label slides e.g. {sorted(wanted)[:3]}, tile slides e.g. "
                            f"{sorted(have)[:3]}): labels and tiles do not match")
    if missing:
        raise FinetuneError(f"config.{key}: no tiles for {len(missing)} labelled slide(s), e.g. "
                            f"{missing[:5]}; tile them or drop them from the labels")
    return labels.reset_index(drop=True)


def encode_classes(values, key: str, min_classes: int = 2) -> tuple[np.ndarray, list[str]]:
    """(int codes, sorted class names) of a label column; FinetuneError for fewer than
    `min_classes` classes or missing values."""
    s = pd.Series(values)
    if s.isna().any():
        raise FinetuneError(f"config.{key}: {int(s.isna().sum())} row(s) have no label")
    names = sorted(s.astype(str).unique())
    if len(names) < min_classes:
        raise FinetuneError(f"config.{key}: only one class ({names}) in the labels; "
                            "classification needs at least two")
    lookup = {n: i for i, n in enumerate(names)}
    return np.array([lookup[v] for v in s.astype(str)], np.int32), names


# ============================================================================ bags ============
class Bags(NamedTuple):
    """Padded per-slide bags of tile features (`make_bags`)."""

    features: np.ndarray  # float32 [S, T, D], zero-padded
    mask: np.ndarray  # bool [S, T], True on real tiles
    rows: np.ndarray  # int64 [S, T], row of each tile in the TileSet (-1 on padding)


def make_bags(tiles: TileSet, slide_ids, max_tiles: int = 0, seed: int = 0) -> Bags:
    """One padded bag per slide in `slide_ids` (order kept). A slide with more than `max_tiles`
    (> 0) tiles keeps a seeded random subset of them. FinetuneError for a slide without tiles."""
    groups = tiles.meta.groupby("slide_id").indices
    rng = np.random.default_rng(seed)
    members = []
    for sid in slide_ids:
        rows = groups.get(str(sid))
        if rows is None or len(rows) == 0:
            raise FinetuneError(f"no tiles for slide {sid!r} in the features")
        rows = np.sort(np.asarray(rows))
        if 0 < max_tiles < len(rows):
            rows = np.sort(rng.choice(rows, max_tiles, replace=False))
        members.append(rows)
    t = max(len(m) for m in members)
    s, d = len(members), tiles.features.shape[1]
    feats = np.zeros((s, t, d), np.float32)
    mask = np.zeros((s, t), bool)
    rows = np.full((s, t), -1, np.int64)
    for i, m in enumerate(members):
        feats[i, :len(m)] = tiles.features[m]
        mask[i, :len(m)] = True
        rows[i, :len(m)] = m
    return Bags(feats, mask, rows)


def folds_for(patients, strata, k: int, seed: int, key: str) -> list[tuple[np.ndarray,
                                                                           np.ndarray]]:
    """Patient-level stratified folds (cfm.evaluate.cv), with a FinetuneError naming `key`."""
    try:
        return patient_folds(np.asarray(patients), np.asarray(strata), k=k, seed=seed)
    except ValueError as e:
        raise FinetuneError(f"config.{key}: cannot make {k} patient-level folds: {e}") from None
