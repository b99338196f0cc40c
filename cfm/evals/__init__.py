"""Evaluators that `cfm.train` runs every N steps and at the end (issue 16), like big_vision's
config-listed evaluators and DINOv2's kNN evaluation.

`config.evals` maps a name to an entry (a ConfigDict; a list of entries also works, each named
after its `type`, numbered on repeats). Build entries with `entry(type, **keys)`, which fills
every key's default so each one can be overridden on the command line
(`--config.evals.knn.every=500 --config.evals.knn.path=/data/crc`); `every=0` turns an entry
off (its data is not read), so a config file can list an evaluator that a run switches on:

    c.evals = ml_collections.ConfigDict({
        "knn": evals.entry("knn", every=1000, source="folder", path="/data/crc/train",
                           test_path="/data/crc/test"),
        "linear": evals.entry("linear", every=1000, source="folder", path="/data/crc/train",
                              test_path="/data/crc/test"),
        "health": evals.entry("health", every=500)})

Types (`DEFAULTS` holds every key and its default):

- knn: DINO's weighted kNN (k = 20, T = 0.07) on a labelled tile set (`cfm.evals.probes`,
  `cfm.evals.tile_sets`); metrics top1, balanced_accuracy.
- linear: logistic regression on standardised frozen features of such a set; top1,
  balanced_accuracy. A knn and a linear entry on the same data share one feature extraction.
- health: collapse monitors on a fixed batch of the run's training data (`cfm.evals.health`):
  cls_std, cls_std_ref, rankme and, for DINOv2, teacher/student entropy against ln_k; warning
  lines (`Evaluator.warnings`) when they signal collapse.
- mgm: held-out masked-value imputation against kNN imputation (`cfm.evals.omics`): pearson,
  mse, mutation_acc, cnv_acc, knn_pearson, knn_mutation_acc, knn_cnv_acc.

Every evaluator adds "<name>/seconds", its wall-clock cost. `cfm.evals.build.build_evaluators`
reads and checks all the data at start-up: a missing or malformed input is a one-line
`ConfigError` naming the entry and key (`config.evals.knn.path='/x': not a folder; ...`),
before the first step; `cfm.evals.build.run_due` runs the evaluators due at a step.

This module holds only the schema (light to import from config files); the evaluators live in
`cfm.evals.build` and the modules it imports.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from cfm.config_check import ConfigError

_COMMON = {"type": "", "every": 1000, "batch_size": 64}
# The keys of a labelled tile set (cfm.evals.tile_sets); entries equal on them share features.
TILE_KEYS = {"source": "folder", "path": "", "test_path": "", "labels": "",
             "label_key": "label", "test_fraction": 0.25, "seed": 0, "max_tiles": 0}
DEFAULTS: dict[str, dict[str, Any]] = {
    # DINO's kNN protocol (Caron et al. 2021): k = 20, temperature 0.07.
    "knn": dict(_COMMON, **TILE_KEYS, type="knn", k=20, temperature=0.07),
    # scikit-learn's LogisticRegression defaults (C = 1, L2).
    "linear": dict(_COMMON, **TILE_KEYS, type="linear", C=1.0, max_iter=1000),
    "health": dict(_COMMON, type="health", every=500, n_samples=64),
    # mask_ratio and neighbours: benchmarks/omics_eval.py's defaults.
    "mgm": dict(_COMMON, type="mgm", split="val", mask_ratio=0.3, neighbours=10,
                max_samples=256, max_train=1024, seed=0),
    # Held-out cross-modal retrieval of slide-omics alignment (cfm/evals/align.py).
    "align": dict(_COMMON, type="align", split="test"),
}


def entry(type: str, **keys: Any) -> ml_collections.ConfigDict:
    """A `config.evals` entry of `type` with every key at its default, then `keys`."""
    if type not in DEFAULTS:
        raise ConfigError(f"evals entry type={type!r}: choose one of {sorted(DEFAULTS)}")
    unknown = sorted(set(keys) - set(DEFAULTS[type]))
    if unknown:
        raise ConfigError(f"evals entry of type {type!r}: unknown keys {unknown}; known: "
                          f"{sorted(DEFAULTS[type])}")
    return ml_collections.ConfigDict(dict(DEFAULTS[type], **keys))


def named_entries(evals: Any) -> list[tuple[str, dict]]:
    """(name, plain dict with every default filled) of every entry of `config.evals` (a mapping
    or a list); ConfigError for an entry without a known type or with an unknown key."""
    if evals is None:
        return []
    if isinstance(evals, ml_collections.ConfigDict):
        evals = evals.to_dict()
    if isinstance(evals, dict):
        items = list(evals.items())
    elif isinstance(evals, (list, tuple)):
        items, seen = [], {}
        for e in evals:
            t = str(dict(e).get("type", "")) if isinstance(e, (dict, ml_collections.ConfigDict)) \
                else "?"
            seen[t] = seen.get(t, 0) + 1
            items.append((t if seen[t] == 1 else f"{t}{seen[t]}", e))
    else:
        raise ConfigError(f"config.evals={evals!r}: a ConfigDict of named entries "
                          "(cfm.evals.entry) or a list of them")
    out = []
    for name, e in items:
        if isinstance(e, ml_collections.ConfigDict):
            e = e.to_dict()
        if not isinstance(e, dict):
            raise ConfigError(f"config.evals.{name}={e!r}: an entry is a dict with a type")
        if e.get("type") not in DEFAULTS:
            raise ConfigError(f"config.evals.{name}.type={e.get('type')!r}: choose one of "
                              f"{sorted(DEFAULTS)}")
        unknown = sorted(set(e) - set(DEFAULTS[e["type"]]))
        if unknown:
            raise ConfigError(f"config.evals.{name}.{unknown[0]}={e[unknown[0]]!r}: unknown key "
                              f"for type {e['type']!r}; known: {sorted(DEFAULTS[e['type']])}")
        out.append((str(name), dict(DEFAULTS[e["type"]], **e)))
    return out
