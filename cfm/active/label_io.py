"""The batch to label, in the formats pathologists' tools import, and the labels read back.

Written for each round (`write_batch`), in the round's folder:

    tasks.json         Label Studio tasks (its JSON import format): one per row, data = image
                       (a tile PNG; `image_url` + its path below the loop folder), cfm_id,
                       slide_id, x, y; the probe's guess as a pre-annotation ("predictions")
    label_config.xml   the Label Studio labelling interface: the image and one choice per class
    tiles/<id>.png     the tiles (when the loop knows the tile shards)
    qupath/<slide_id>.geojson
                       QuPath annotations, one unclassified box per tile in level-0 pixels,
                       named "cfm <id>": File > Import objects on the slide, classify the
                       boxes, File > Export objects as GeoJSON
    batch.csv          cfm_id, slide_id, x, y, the probe's guess and an empty label column: a
                       CSV to fill in by hand

Read back (`read_labels`), by content: a Label Studio export (JSON: the full format with
"annotations", or JSON-MIN with one flat object per task), a QuPath GeoJSON export (a
FeatureCollection or a list of features: a box's classification is its label, matched by its
name "cfm <id>" or else by its top-left corner on the slide the file is named after) or a CSV
with cfm_id (or id) and label columns (Label Studio's CSV export has them). Class names match
case-insensitively. Rows without a label (no annotation, a cancelled one, an empty cell, an
unclassified box) are skipped; anything else that does not fit is an ActiveError naming the
file and the row.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Iterable, Mapping

import numpy as np
from PIL import Image

from cfm.active import ActiveError

FROM_NAME, TO_NAME = "label", "image"  # the names in label_config.xml
NAME_PREFIX = "cfm "  # QuPath box names: "cfm <id>"


# ============================================================================ writing =========
def label_config(classes: Iterable[str], unit: str = "tile") -> str:
    """Label Studio's labelling interface for one choice among `classes` per task."""
    choices = "\n".join(f'    <Choice value="{c}"/>' for c in classes)
    shown = (f'  <Image name="{TO_NAME}" value="$image"/>' if unit == "tile" else
             f'  <Text name="{TO_NAME}" value="$slide_id"/>')
    return (f"<View>\n{shown}\n  <Choices name=\"{FROM_NAME}\" toName=\"{TO_NAME}\" "
            f"choice=\"single\" showInline=\"true\">\n{choices}\n  </Choices>\n</View>\n")


def tasks(rows: list[dict], guesses: list[tuple[str, float]] | None, round_no: int) -> list:
    """Label Studio tasks for `rows` (dicts with cfm_id and whatever the task shows: image,
    slide_id, x, y), with the probe's (class, probability) guesses as pre-annotations."""
    out = []
    for i, row in enumerate(rows):
        task: dict = {"data": {k: v for k, v in row.items() if v is not None}}
        if guesses is not None:
            cls, p = guesses[i]
            task["predictions"] = [{
                "model_version": f"cfm.active round {round_no} probe", "score": round(p, 4),
                "result": [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
                            "value": {"choices": [cls]}}]}]
        out.append(task)
    return out


def geojson_boxes(rows: list[dict], footprint: Mapping[str, tuple[float, float]]) -> dict:
    """slide_id -> QuPath FeatureCollection of the rows' tile boxes (level-0 px; `footprint`
    is each slide's tile extent), each an unclassified annotation named "cfm <id>"."""
    out: dict[str, dict] = {}
    for row in rows:
        sid, x, y = row["slide_id"], float(row["x"]), float(row["y"])
        fx, fy = footprint[sid]
        ring = [[x, y], [x + fx, y], [x + fx, y + fy], [x, y + fy], [x, y]]
        feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                   "properties": {"objectType": "annotation",
                                  "name": f"{NAME_PREFIX}{row['cfm_id']}", "isLocked": False}}
        out.setdefault(sid, {"type": "FeatureCollection", "features": []})["features"].append(
            feature)
    return out


def write_batch(folder: str, rows: list[dict], classes: list[str], unit: str, round_no: int,
                guesses: list[tuple[str, float]] | None = None,
                images: list[np.ndarray] | None = None,
                footprint: Mapping[str, tuple[float, float]] | None = None,
                image_url: str = "/data/local-files/?d=", rel_dir: str = "") -> None:
    """Write one round's files (module docstring) into `folder` (a staging folder, renamed
    into place by the caller). `rows`: dicts with cfm_id, slide_id and, for tiles, x and y;
    `rel_dir` is the round folder's path below the loop folder (image paths in tasks.json are
    `image_url` + rel_dir/tiles/<id>.png)."""
    shown = []
    if images is not None:
        os.makedirs(os.path.join(folder, "tiles"))
    for i, row in enumerate(rows):
        row = dict(row)
        if images is not None:
            name = f"{row['cfm_id']}.png"
            Image.fromarray(images[i]).save(os.path.join(folder, "tiles", name))
            row = {"image": f"{image_url}{rel_dir}/tiles/{name}", **row}
        shown.append(row)
    _write_json(os.path.join(folder, "tasks.json"), tasks(shown, guesses, round_no))
    with open(os.path.join(folder, "label_config.xml"), "w", encoding="utf-8") as f:
        f.write(label_config(classes, unit))
    if unit == "tile" and footprint is not None:
        os.makedirs(os.path.join(folder, "qupath"))
        for sid, fc in geojson_boxes(rows, footprint).items():
            _write_json(os.path.join(folder, "qupath", f"{sid}.geojson"), fc)
    keys = ["cfm_id", "slide_id"] + (["x", "y"] if unit == "tile" else [])
    with open(os.path.join(folder, "batch.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(keys + ["guess", "guess_probability", "label"])
        for i, row in enumerate(rows):
            g = guesses[i] if guesses is not None else ("", "")
            w.writerow([row[k] for k in keys] + [g[0], g[1] if g[1] == "" else
                                                 f"{g[1]:.3f}", ""])


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


# ============================================================================ reading =========
class _Classes:
    """Case-insensitive lookup of class names; errors name the file and row."""

    def __init__(self, classes: Iterable[str]):
        self.names = list(classes)
        self.lookup = {c.lower(): c for c in self.names}

    def __call__(self, value, where: str) -> str:
        name = self.lookup.get(str(value).strip().lower())
        if name is None:
            raise ActiveError(f"{where}: label {value!r} is not one of the loop's classes "
                              f"({', '.join(self.names)})")
        return name


def read_labels(path: str, classes: Iterable[str], known_ids: Iterable[str],
                corners: Mapping[tuple[str, int, int], str] | None = None) -> dict[str, str]:
    """{cfm_id: class} from a Label Studio JSON / JSON-MIN export, a QuPath GeoJSON export or
    a CSV (see the module docstring). `known_ids`: the pool's ids (an unknown id is an error
    naming the row); `corners`: (slide_id, x, y) -> id, for boxes without a cfm name. The same
    id twice with different labels is an error; rows without a label are skipped."""
    if not os.path.isfile(path):
        raise ActiveError(f"--labels {path!r} is not a file")
    known = set(map(str, known_ids))
    lookup = _Classes(classes)
    name = os.path.basename(path)
    if path.lower().endswith(".csv"):
        pairs = _read_csv(path, name)
    else:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise ActiveError(f"--labels {name}: not JSON (Label Studio / GeoJSON) and not a "
                              f".csv: {e}") from None
        if isinstance(data, dict) and data.get("type") == "FeatureCollection":
            pairs = _read_geojson(data.get("features"), name, corners or {})
        elif isinstance(data, list) and data and isinstance(data[0], dict) and \
                data[0].get("type") == "Feature":
            pairs = _read_geojson(data, name, corners or {})
        elif isinstance(data, list):
            pairs = _read_label_studio(data, name)
        else:
            raise ActiveError(f"--labels {name}: neither a Label Studio export (a JSON list "
                              "of tasks) nor a GeoJSON FeatureCollection")
    out: dict[str, str] = {}
    for where, cid, value in pairs:
        if cid not in known:
            raise ActiveError(f"{where}: cfm_id {cid!r} is not a row of this loop's "
                              "embeddings")
        label = lookup(value, where)
        if out.get(cid, label) != label:
            raise ActiveError(f"{where}: cfm_id {cid!r} labelled {label!r} here and "
                              f"{out[cid]!r} earlier in the file")
        out[cid] = label
    return out


def _read_csv(path: str, name: str) -> list[tuple[str, str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        key = next((k for k in ("cfm_id", "id") if k in cols), None)
        if key is None or "label" not in cols:
            raise ActiveError(f"--labels {name}: needs a cfm_id (or id) column and a label "
                              f"column; it has {cols}")
        out = []
        for line, row in enumerate(reader, start=2):  # line 1 is the header
            cid, label = (row.get(key) or "").strip(), (row.get("label") or "").strip()
            if not label:
                continue
            if not cid:
                raise ActiveError(f"--labels {name} line {line}: label {label!r} without a "
                                  f"{key}")
            out.append((f"--labels {name} line {line}", _canonical_id(cid), label))
    return out


def _canonical_id(cid) -> str:
    """Ids as text; "12.0" (a spreadsheet's number) is "12"."""
    s = str(cid).strip()
    try:
        f = float(s)
        return str(int(f)) if f.is_integer() and "." in s else s
    except ValueError:
        return s


def _read_label_studio(data: list, name: str) -> list[tuple[str, str, str]]:
    out = []
    for i, task in enumerate(data):
        where = f"--labels {name} task {i}"
        if not isinstance(task, dict):
            raise ActiveError(f"{where}: not a JSON object")
        if "annotations" in task or "data" in task:  # the full JSON export
            cid = (task.get("data") or {}).get("cfm_id")
            done = [a for a in task.get("annotations") or []
                    if isinstance(a, dict) and not a.get("was_cancelled")]
            done.sort(key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""))
            choices = [r.get("value", {}).get("choices") for a in done[-1:]
                       for r in a.get("result") or [] if r.get("from_name", FROM_NAME)
                       == FROM_NAME and r.get("type", "choices") == "choices"]
        else:  # JSON-MIN: {"cfm_id": ..., "label": "tumour" or {"choices": [...]}, ...}
            cid, value = task.get("cfm_id"), task.get(FROM_NAME)
            choices = [value.get("choices") if isinstance(value, dict) else
                       [value] if value not in (None, "") else None]
        choices = [c for c in choices if c]
        if not choices:
            continue  # not annotated (yet), or cancelled
        if cid is None or str(cid).strip() == "":
            raise ActiveError(f"{where}: labelled but has no data.cfm_id; import the tasks.json "
                              "that cfm.active wrote")
        if len(choices[0]) != 1:
            raise ActiveError(f"{where}: {len(choices[0])} choices {choices[0]}; give exactly one")
        out.append((f"{where} (cfm_id {cid})", _canonical_id(cid), choices[0][0]))
    return out


def _read_geojson(features, name: str, corners: Mapping[tuple[str, int, int], str]
                  ) -> list[tuple[str, str, str]]:
    if not isinstance(features, list):
        raise ActiveError(f"--labels {name}: a FeatureCollection without a features list")
    slide = os.path.splitext(os.path.splitext(name)[0])[0]
    out = []
    for i, feat in enumerate(features):
        where = f"--labels {name} feature {i}"
        props = (feat or {}).get("properties") or {}
        cls = props.get("classification")
        label = cls.get("name") if isinstance(cls, dict) else cls
        if not label:
            continue  # an unclassified box
        box_name = str(props.get("name") or "")
        if box_name.startswith(NAME_PREFIX):
            cid = _canonical_id(box_name[len(NAME_PREFIX):])
        else:
            cid = corners.get((slide, *_corner(feat, where)))
            if cid is None:
                raise ActiveError(f"{where}: a {label!r} annotation that is no cfm box (no name "
                                  f"'cfm <id>', and its corner is no tile of slide {slide!r}); "
                                  "classify the boxes cfm.active wrote")
        out.append((f"{where} ({box_name or 'unnamed'})", cid, label))
    return out


def _corner(feat: dict, where: str) -> tuple[int, int]:
    """Top-left corner (rounded level-0 px) of a feature's polygon."""
    try:
        ring = np.asarray(feat["geometry"]["coordinates"][0], np.float64)
        return int(round(ring[:, 0].min())), int(round(ring[:, 1].min()))
    except (KeyError, IndexError, TypeError, ValueError):
        raise ActiveError(f"{where}: no polygon geometry to match to a tile") from None
