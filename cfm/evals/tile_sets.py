"""Labelled tile sets for the kNN and linear-probe evaluators, read and checked at start-up.

Two layouts (`source` of a `config.evals` entry):

- "folder": `path/<class>/...` image files (PNG, JPEG, TIFF; searched recursively in each class
  subfolder); the class is the subfolder's name.
- "shards": the tile shards of `data_prep.tile_wsi` under `path` (`cfm.data.sources.ShardSource`)
  plus `labels`, a CSV with the label column `label_key` and id columns that are tile metadata
  keys: `slide_id`, optionally with `x`, `y` (level-0 pixels) and `level`, the columns of the
  shards' manifest.csv that name a tile independently of how it was packed into shards. A row
  with only `slide_id` labels every tile of that slide; tiles without a row are left out; a row
  that matches no tile is an error.

The train/test split: `test_path` (same layout, same `labels`) when given; otherwise a seeded
split of groups (slides for shards, so no slide is on both sides; single files for folders),
`test_fraction` of them for testing. Every tile is decoded, centre-cropped to a square and
resized (bicubic) to the run's `crops.global_size` once, at start-up, and held as uint8:
N * size^2 * 3 bytes (10,000 tiles at 224 px: 1.5 GB); `max_tiles` caps N per side.
"""

from __future__ import annotations

import csv
import os
from typing import NamedTuple

import numpy as np
from PIL import Image

from cfm.data.sources import IMAGE_SUFFIXES, FolderSource, ShardSource
from cfm.evals.base import check, fail

ID_COLUMNS = ("slide_id", "x", "y", "level")


class TileSet(NamedTuple):
    """Images of one side of a labelled tile set."""

    images: np.ndarray  # uint8 [N, size, size, 3]
    labels: np.ndarray  # int32 [N], index into `classes`


class LabelledTiles(NamedTuple):
    train: TileSet
    test: TileSet
    classes: list[str]  # sorted class names


def square(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: the central square of `image`, resized (bicubic) to `size`."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    image = image[top:top + s, left:left + s]
    if s != size:
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    return image


def _folder_items(name: str, key: str, path: str) -> list[tuple[tuple, str, str]]:
    """[((source, index), class, file)] of every image under the class subfolders of `path`."""
    check(bool(path) and os.path.isdir(path), name, key, path, "not a folder; point it at a "
          "folder of class subfolders of tiles")
    items = []
    for cls in sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))):
        try:
            source = FolderSource(os.path.join(path, cls))
        except ValueError:  # a subfolder without images is not a class
            continue
        items += [((source, i), cls, f) for i, f in enumerate(source.files)]
    check(bool(items), name, key, path, f"no {'/'.join(IMAGE_SUFFIXES)} files in class "
          "subfolders (expected PATH/<class>/<tile>.png)")
    return items


def _read_labels(name: str, entry: dict) -> tuple[list[str], dict[tuple, str]]:
    """(id columns, {id tuple: label}) of the labels CSV."""
    path, label_key = entry["labels"], entry["label_key"]
    check(bool(path) and os.path.isfile(path), name, "labels", path, "no such file; shards need "
          f"a labels CSV with columns slide_id[,x,y[,level]] and {label_key}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0]) if rows else []
    ids = [c for c in ID_COLUMNS if c in columns]
    check(bool(rows) and "slide_id" in ids and label_key in columns, name, "labels", path,
          f"needs a header with slide_id (and optionally x, y, level) and {label_key!r} and at "
          f"least one row; found columns {columns}")
    labels = {}
    for r in rows:
        if r[label_key] not in ("", None):
            labels[tuple(str(r[c]) for c in ids)] = str(r[label_key])
    return ids, labels


def _shard_items(name: str, key: str, path: str, ids: list[str], labels: dict[tuple, str]
                 ) -> tuple[list[tuple[tuple, str, str]], set]:
    """([((source, index), class, slide_id)] of the labelled tiles, label ids seen)."""
    try:
        source = ShardSource(path)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        fail(name, key, path, f"not readable as data_prep.tile_wsi shards ({e})")
    items, seen = [], set()
    for i in range(len(source)):
        try:
            meta = source.record(i)[1]
        except ValueError as e:
            fail(name, key, path, f"tile {i} does not read ({e})")
        tid = tuple(str(meta.get(c)) for c in ids)
        if tid in labels:
            seen.add(tid)
            items.append(((source, i), labels[tid], str(meta.get("slide_id"))))
    return items, seen


def _split(items: list, groups: list[str], fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split by group: round(fraction * groups) groups (at least 1) for testing."""
    names = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(names))
    n_test = min(max(1, round(fraction * len(names))), len(names) - 1)
    test_groups = {names[j] for j in order[:n_test]}
    train = [it for it, g in zip(items, groups) if g not in test_groups]
    test = [it for it, g in zip(items, groups) if g in test_groups]
    return train, test


def _cap(items: list, max_tiles: int, seed: int) -> list:
    if max_tiles <= 0 or len(items) <= max_tiles:
        return items
    keep = np.sort(np.random.default_rng([seed, 1]).choice(len(items), max_tiles, False))
    return [items[j] for j in keep]


def load(name: str, entry: dict, size: int) -> LabelledTiles:
    """The labelled tile set of entry `name` (keys source, path, test_path, labels, label_key,
    test_fraction, seed, max_tiles), images at `size` px; ConfigError naming the entry and key
    for a missing path, no images, an unreadable image, labels that match no tile, a class
    missing from the training side or fewer than two classes."""
    src, path, test_path = entry["source"], entry["path"], entry["test_path"]
    check(src in ("folder", "shards"), name, "source", src, "use 'folder' (class subfolders) "
          "or 'shards' (data_prep.tile_wsi shards + labels CSV)")
    check(0.0 < float(entry["test_fraction"]) < 1.0, name, "test_fraction",
          entry["test_fraction"], "must be in (0, 1)")
    seed = int(entry["seed"])
    sides = [("path", path)] + ([("test_path", test_path)] if test_path else [])
    if src == "folder":
        found = [_folder_items(name, k, p) for k, p in sides]
    else:
        ids, labels = _read_labels(name, entry)
        seen, found = set(), []
        for k, p in sides:
            items, s = _shard_items(name, k, p, ids, labels)
            seen |= s
            found.append(items)
        unknown = sorted(set(labels) - seen)
        check(not unknown, name, "labels", entry["labels"], f"{len(unknown)} row(s) match no "
              f"tile of the shards, e.g. {dict(zip(ids, unknown[0])) if unknown else None}")
    parts = [[(it, c) for it, c, _ in items] for items in found]
    groups = [g for _, _, g in found[0]]
    if test_path:
        train, test = parts
    else:
        check(len(set(groups)) >= 2, name, "path", path, "needs at least 2 "
              f"{'slides' if src == 'shards' else 'tiles'} to split off a test set (or set "
              "test_path)")
        train, test = _split(parts[0], groups, float(entry["test_fraction"]), seed)
    check(bool(train) and bool(test), name, "test_path" if test_path and not test else "path",
          test_path if test_path and not test else path, "no labelled tile on the "
          f"{'test' if not test else 'training'} side")
    classes = sorted({c for _, c in train + test})
    check(len(classes) >= 2, name, "path", path, f"only one class ({classes}); a probe needs at "
          "least two")
    missing = sorted({c for _, c in test} - {c for _, c in train})
    check(not missing, name, "path", path, f"classes {missing} have no training tile; add "
          "tiles or change test_fraction/seed")
    lookup = {c: j for j, c in enumerate(classes)}

    def images(items: list, key: str) -> TileSet:
        items = _cap(items, int(entry["max_tiles"]), seed)
        out = np.zeros((len(items), size, size, 3), np.uint8)
        for j, (it, _) in enumerate(items):
            try:
                img = it[0][it[1]]
            except ValueError as e:
                fail(name, key, test_path if key == "test_path" else path, str(e))
            out[j] = square(img, size)
        return TileSet(out, np.array([lookup[c] for _, c in items], np.int32))

    return LabelledTiles(images(train, "path"), images(test, "test_path" if test_path else
                                                         "path"), classes)

