"""The labelling loop: the pool, the rounds kept in `state.json`, and one step of the loop.

A loop folder (`--workdir`) holds:

    state.json      the settings (embeddings, unit, classes, shards) and every round: number,
                    strategy asked and used, seed, the ids picked in order, the labels it got
                    and from which files, the probe's figures after it
    labels.csv      every label so far: cfm_id, label, round (the audit trail as a table)
    report.md       one line per round (`cfm.active.report`)
    round-NNN/      the batch of round NNN to label (`cfm.active.label_io.write_batch`)

`step` closes the open round with the labels given (or takes them as seed labels when no round
is open), refits the probe, writes the report and opens the next round. Each round folder is
written whole (`cfm.atomic.atomic_folder`) before `state.json` is replaced (temp file, then
rename), so a stop at any point leaves the last complete state: the next call resumes from it
(a round folder without its state entry is written again, identically: selection is a
function of the embeddings, the labels and the seed).
"""

from __future__ import annotations

import csv
import datetime
import json
import os
from typing import NamedTuple

import numpy as np
import pandas as pd

from cfm import atomic
from cfm.active import ActiveError, label_io, report, strategies
from cfm.data.sources import ShardSource
from cfm.explain.heatmap import infer_footprint
from cfm.finetune.common import FinetuneError, to_jsonable
from cfm.finetune.slide_data import read_embeddings

FORMAT = "cfm.active/1"
UNITS = ("tile", "slide")


class Pool(NamedTuple):
    """What can be labelled: one row per tile (or slide) of an embeddings folder."""

    ids: list[str]  # cfm ids: the tile's index in its shards, or the slide_id
    x: np.ndarray  # float64 [N, D] features, standardised (`strategies.standardize`)
    meta: pd.DataFrame  # per row: cfm_id, slide_id (+ x, y, tile and the tile metadata)


def load_pool(embeddings: str, unit: str) -> Pool:
    """The pool of a `cfm.embed --out` folder: its tiles, or its slides (features = the mean
    of the slide's tile embeddings, the mean-pooling baseline of MIL)."""
    if unit not in UNITS:
        raise ActiveError(f"--unit {unit!r}: choose tile or slide")
    try:
        tiles = read_embeddings(embeddings)
    except FinetuneError as e:
        raise ActiveError(str(e).replace("config.embeddings=", "--embeddings ")) from None
    meta = tiles.meta.copy()
    if unit == "tile":
        ids = (meta["tile"] if "tile" in meta else pd.Series(range(len(meta)))).astype(str)
        if ids.duplicated().any():
            raise ActiveError(f"--embeddings {embeddings}: tile ids repeat in index.csv")
        meta.insert(0, "cfm_id", ids.to_list())
        return Pool(meta["cfm_id"].to_list(), strategies.standardize(tiles.features), meta)
    groups = meta.groupby("slide_id").indices
    slides = sorted(groups)
    x = np.stack([tiles.features[groups[s]].mean(0) for s in slides])
    meta = pd.DataFrame({"cfm_id": slides, "slide_id": slides,
                         "n_tiles": [len(groups[s]) for s in slides]})
    return Pool(slides, strategies.standardize(x), meta)


# ============================================================================ state ===========
def state_path(workdir: str) -> str:
    return os.path.join(workdir, "state.json")


def load_state(workdir: str) -> dict | None:
    """The loop's state, or None for a new loop; ActiveError for a damaged one."""
    path = state_path(workdir)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except ValueError as e:
        raise ActiveError(f"{path} is not valid JSON ({e}); restore it or start a new "
                          "--workdir") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ActiveError(f"{path} is not a cfm.active state ({FORMAT})")
    return state


def save_state(workdir: str, state: dict) -> None:
    """state.json and labels.csv, each written to a temp file and renamed into place."""
    rows = [(cid, lab, r["round"]) for r in state["rounds"] for cid, lab in r["labels"].items()]
    for name, text in (("labels.csv", _csv_text(["cfm_id", "label", "round"], rows)),
                       ("state.json", json.dumps(to_jsonable(state), indent=1) + "\n")):
        path = os.path.join(workdir, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    atomic.fsync_dir(workdir)


def _csv_text(header: list[str], rows: list) -> str:
    lines = [",".join(header)] + [",".join(str(v) for v in r) for r in rows]
    return "\n".join(lines) + "\n"


def labels_so_far(state: dict) -> dict[str, str]:
    """{cfm_id: class}: every round's labels, a later label of an id replacing an earlier."""
    out: dict[str, str] = {}
    for r in state["rounds"]:
        out.update(r["labels"])
    return out


def new_state(embeddings: str, unit: str, classes: list[str], shards: str) -> dict:
    if len(classes) < 2 or len(set(classes)) != len(classes) or not all(classes):
        raise ActiveError(f"--classes {','.join(classes)!r}: give at least two distinct class "
                          "names, comma-separated")
    return {"format": FORMAT, "embeddings": os.path.abspath(embeddings), "unit": unit,
            "classes": classes, "shards": os.path.abspath(shards) if shards else "",
            "rounds": []}


# ============================================================================ one step ========
def step(workdir: str, state: dict, pool: Pool, label_files: list[str], strategy: str,
         batch: int, seed: int, image_url: str, simulate: str = "") -> dict:
    """Close the open round with the labels of `label_files` (or of the metadata column
    `simulate`, a simulated annotator), refit the probe, report, open the next round; saves
    the state and returns it. A round still waiting for labels when none are given is an
    ActiveError that says where its batch is."""
    rounds, classes = state["rounds"], state["classes"]
    open_round = rounds[-1] if rounds and rounds[-1].get("closed") is None else None
    if simulate:
        label_files = label_files + [_simulate(workdir, open_round, pool, simulate, classes)]
    if open_round is not None and not label_files:
        raise ActiveError(f"round {open_round['round']} is waiting for labels: label "
                          f"{workdir}/round-{open_round['round']:03d}/ (tasks.json, qupath/, "
                          "batch.csv) and pass the export with --labels FILE")
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    corners = _corners(pool) if state["unit"] == "tile" else {}
    got: dict[str, str] = {}
    for path in label_files:
        for cid, lab in label_io.read_labels(path, classes, pool.ids, corners).items():
            if got.get(cid, lab) != lab:
                raise ActiveError(f"--labels {os.path.basename(path)}: cfm_id {cid!r} labelled "
                                  f"{lab!r} here and {got[cid]!r} in an earlier --labels file")
            got[cid] = lab
    if label_files and not got:
        raise ActiveError(f"--labels {', '.join(map(os.path.basename, label_files))}: no "
                          "labelled row in the file(s)")
    if open_round is None and label_files:  # labels that exist already: round 0
        open_round = {"round": rounds[-1]["round"] + 1 if rounds else 0,
                      "strategy": "imported", "used": "imported", "seed": None, "ids": [],
                      "opened": now, "labels": {}}
        rounds.append(open_round)
    if open_round is not None:
        open_round.update(labels=got, label_files=[os.path.abspath(p) for p in label_files],
                          closed=now)
    y = _codes(pool, labels_so_far(state), classes)
    if open_round is not None:
        open_round["probe"] = report.probe_figures(pool, y, classes, seed)
    number = rounds[-1]["round"] + 1 if rounds else 1
    round_seed = seed + number
    idx, used = strategies.select(strategy, pool.x, y, batch, len(classes), round_seed)
    ids = [pool.ids[i] for i in idx]
    guesses = report.guesses(pool, y, classes, idx, round_seed)
    name = f"round-{number:03d}"
    with atomic.atomic_folder(os.path.join(workdir, name)) as tmp:
        _write_round(tmp, name, state, pool, idx, guesses, number, image_url)
    rounds.append({"round": number, "strategy": strategy, "used": used, "seed": round_seed,
                   "batch": int(batch), "ids": ids, "opened": now, "labels": {}, "closed": None})
    save_state(workdir, state)
    report.write_report(os.path.join(workdir, "report.md"), state)
    return state


def _codes(pool: Pool, labels: dict[str, str], classes: list[str]) -> np.ndarray:
    """Class codes [N] of the pool rows (`strategies.UNLABELLED` where none)."""
    y = np.full(len(pool.ids), strategies.UNLABELLED, np.int64)
    row = {cid: i for i, cid in enumerate(pool.ids)}
    for cid, lab in labels.items():
        y[row[cid]] = classes.index(lab)
    return y


def _corners(pool: Pool) -> dict[tuple[str, int, int], str]:
    m = pool.meta
    if "x" not in m or "y" not in m:
        return {}
    return {(s, int(x), int(y)): c for s, x, y, c in zip(m["slide_id"], m["x"], m["y"],
                                                         m["cfm_id"])}


def _write_round(tmp: str, name: str, state: dict, pool: Pool, idx: np.ndarray,
                 guesses: list[tuple[str, float]], number: int, image_url: str) -> None:
    unit, m = state["unit"], pool.meta
    keys = ["cfm_id", "slide_id"] + (["x", "y"] if unit == "tile" and "x" in m else [])
    rows = [{k: (int(m[k].iloc[i]) if k in ("x", "y") else str(m[k].iloc[i])) for k in keys}
            for i in idx]
    images, footprint = None, None
    if unit == "tile" and "x" in m:
        fallback = m["tile_size"] if "tile_size" in m else pd.Series([224] * len(m))
        footprint = {}
        for sid in {r["slide_id"] for r in rows}:
            on = (m["slide_id"] == sid).to_numpy()
            footprint[sid] = infer_footprint(m["x"][on], m["y"][on], float(fallback[on].iloc[0]))
        if state["shards"]:
            images = _tile_images(state["shards"], m, idx)
    label_io.write_batch(tmp, rows, state["classes"], unit, number, guesses, images, footprint,
                         image_url, name)


def _tile_images(shards: str, meta: pd.DataFrame, idx: np.ndarray) -> list[np.ndarray]:
    """The picked tiles' RGB images from the shards; ActiveError when the shards are not the
    tiles the embeddings were made from."""
    try:
        source = ShardSource(shards)
    except (FileNotFoundError, ValueError) as e:
        raise ActiveError(f"--shards {shards!r}: {e}") from None
    out = []
    for i in idx:
        tile = int(meta["tile"].iloc[i])
        if tile >= len(source):
            raise ActiveError(f"--shards {shards}: has {len(source)} tiles, the embeddings "
                              f"name tile {tile}; give the shards they were made from")
        rgb, tm = source.tile(tile)
        want = (str(meta["slide_id"].iloc[i]), int(meta["x"].iloc[i]), int(meta["y"].iloc[i]))
        have = (str(tm.get("slide_id")), int(tm.get("x", -1)), int(tm.get("y", -1)))
        if have != want:
            raise ActiveError(f"--shards {shards}: tile {tile} is {have} there but {want} in "
                              "the embeddings' index.csv; give the shards they were made from")
        out.append(rgb)
    return out


def _simulate(workdir: str, open_round: dict | None, pool: Pool, key: str,
              classes: list[str]) -> str:
    """A simulated annotator: the open round's labels from metadata column `key`, written as
    round-NNN/simulated.csv (read back like a pathologist's CSV); for trying the loop on
    labelled data (e.g. data_prep.synthetic_tme tiles)."""
    if open_round is None:
        raise ActiveError("--simulate: no round is waiting for labels yet; run once without it")
    if key not in pool.meta:
        raise ActiveError(f"--simulate {key!r}: the pool has no such column "
                          f"({', '.join(map(str, pool.meta.columns))})")
    truth = dict(zip(pool.meta["cfm_id"], pool.meta[key].astype(str)))
    path = os.path.join(workdir, f"round-{open_round['round']:03d}", "simulated.csv")
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["cfm_id", "label"])
        w.writerows([cid, truth[cid]] for cid in open_round["ids"])
    return path
