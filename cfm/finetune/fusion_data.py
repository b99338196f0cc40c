"""Data side of the fusion tasks (`response`, `survival`): config checks, the labelled patients,
the evaluation units and the features of one split.

- `validate`: FinetuneError naming the first config value that cannot work;
- `load_data` / `labelled_patients`: the cohorts (cfm.finetune.tabular_data), minus patients
  without a label for the head;
- `evaluation_units`: one unit per held-out cohort (`data.test_cohort`), per cohort
  (`cv.within_cohort`) or the pooled patients; each unit's splits are patient-level stratified
  k-fold (cfm.evaluate.cv; k shrinks to the smallest class where needed, with a note) or the
  single train/test cohort split;
- `prepare_features`: per split, features standardised on the training patients only (clipped
  to +-CLIP sd), genes grouped into expression modules (k-means on the training patients), GMT
  gene sets or one vector.
"""

from __future__ import annotations

import os
import warnings

import jax.numpy as jnp
import ml_collections
import numpy as np
from sklearn.cluster import KMeans

from cfm.evaluate import cv
from cfm.finetune import tabular_data
from cfm.finetune.common import FinetuneError, check
from cfm.finetune.encoder_tune import TUNE_MODES
from cfm.finetune.losses import HEADS, SURVIVAL_HEADS
from cfm.models.fusion import group_edges

CLIP = 5.0  # standardised features are clipped to +-5 sd (TCGA RNA-seq has heavy tails)
ENCODER_FEATURES = ("cls", "mean", "tokens", "both")  # what fusion takes from an encoder
BATCH_KEYS = ("omics", "omics_mask", "clinical", "clinical_mask", "tiles", "tile_mask",
              "enc_gene_ids", "enc_modality", "enc_values", "enc_classes", "enc_view_mask")


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------

def split_list(s: str) -> list[str]:
    """The non-empty, stripped items of a comma list."""
    return [x.strip() for x in str(s).split(",") if x.strip()]


def validate(config: ml_collections.ConfigDict) -> None:
    """FinetuneError naming the first config value that cannot work."""
    check(config.head in HEADS, "head", config.head, f"choose one of {list(HEADS)}")
    mods = split_list(config.modalities)
    check(bool(mods) and set(mods) <= {"omics", "clinical", "tiles"}, "modalities",
          config.modalities, "a comma list of omics, clinical, tiles")
    check("tiles" not in mods, "modalities", config.modalities,
          "slide tiles are not wired into the tabular cohorts (no slides for ICB/TCGA here); "
          "cfm.models.fusion takes them, use omics and/or clinical")
    if config.omics.encoder:
        o = config.omics
        check("omics" in mods, "omics.encoder", o.encoder, "needs 'omics' in config.modalities")
        check(o.encoder_feature in ENCODER_FEATURES, "omics.encoder_feature", o.encoder_feature,
              f"use one of {list(ENCODER_FEATURES)}")
        check(o.encoder_tune in TUNE_MODES, "omics.encoder_tune", o.encoder_tune,
              f"use one of {list(TUNE_MODES)}")
        check(o.encoder_tune == "frozen" or o.encoder_feature == "cls", "omics.encoder_feature",
              o.encoder_feature, "a tuned encoder (encoder_tune last_k / full) feeds its CLS "
              "only; token outputs need encoder_tune=frozen")
        check(0.0 <= o.min_coverage <= 1.0, "omics.min_coverage", o.min_coverage,
              "must be in [0, 1]")
        check(o.encoder_last_k >= 0, "omics.encoder_last_k", o.encoder_last_k, "must be >= 0")
    check(config.omics.grouping in ("modules", "vector", "gene_sets"), "omics.grouping",
          config.omics.grouping, "use modules, vector or gene_sets")
    if config.omics.grouping == "gene_sets":
        check(os.path.isfile(config.omics.gene_sets), "omics.gene_sets", config.omics.gene_sets,
              "must be a GMT file (name, description, genes... tab-separated per line)")
    check(config.cv.k >= 2, "cv.k", config.cv.k, "must be >= 2")
    check(config.train.ensemble >= 1, "train.ensemble", config.train.ensemble, "must be >= 1")
    check(0 < config.train.val_fraction < 0.5, "train.val_fraction", config.train.val_fraction,
          "must be in (0, 0.5)")
    check(1 <= config.train.min_epochs <= config.train.max_epochs, "train.min_epochs",
          config.train.min_epochs, f"must be in [1, train.max_epochs={config.train.max_epochs}]")
    check(config.model.dim % config.model.heads == 0, "model.dim", config.model.dim,
          f"must be a multiple of model.heads={config.model.heads}")


# ---------------------------------------------------------------------------------------------
# data -> labelled patients and evaluation units
# ---------------------------------------------------------------------------------------------

def load_data(config: ml_collections.ConfigDict) -> tabular_data.TabularData:
    """The ICB or TCGA cohorts named by `config.data`, labels replaced from `data.labels`."""
    d = config.data
    if d.source == "icb":
        data = tabular_data.load_icb(d.path, split_list(d.cohorts), split_list(d.clinical),
                                     label=d.get("label", "response"))
    elif d.source == "tcga" and "+" in d.cancer:  # several types pooled into one cohort
        data = tabular_data.load_tcga_pooled(d.path, [c.strip() for c in d.cancer.split("+")],
                                             split_list(d.omics_kinds), split_list(d.clinical))
    elif d.source == "tcga":
        data = tabular_data.load_tcga(d.path, d.cancer, split_list(d.omics_kinds),
                                      split_list(d.clinical))
    else:
        raise FinetuneError(f"config.data.source={d.source!r}: use icb or tcga")
    if d.labels:
        data = tabular_data.apply_label_file(data, d.labels)
    return data


def labelled_patients(data: tabular_data.TabularData, head: str) -> tabular_data.TabularData:
    """The patients with a label for `head` (survival: finite time > 0 and event status)."""
    if head in SURVIVAL_HEADS:
        ok = np.isfinite(data.time) & np.isfinite(data.event) & (data.time > 0)
    else:
        ok = np.isfinite(data.label)
    if not ok.any():
        raise FinetuneError("no patient has a label for head "
                            f"{head!r} in the chosen data")
    return data.subset(np.flatnonzero(ok))


def stratum_labels(data: tabular_data.TabularData, head: str) -> np.ndarray:
    """What folds are stratified by: the event indicator (survival) or the class."""
    return (data.event if head in SURVIVAL_HEADS else data.label).astype(int)


def _check_classes(data: tabular_data.TabularData, rows: np.ndarray, head: str,
                   what: str) -> None:
    s = stratum_labels(data, head)[rows]
    if len(np.unique(s)) < 2:
        kind = "event status" if head in SURVIVAL_HEADS else "class"
        raise FinetuneError(f"{what}: all {len(rows)} patients have the same {kind} "
                            f"({s[0]}); a model cannot be trained or evaluated on one class")


def evaluation_units(data: tabular_data.TabularData, config: ml_collections.ConfigDict
                     ) -> tuple[list[dict], list[str]]:
    """[{name, splits: [(train_rows, test_rows)], kind}], notes."""
    head = config.head
    notes: list[str] = []
    units = []
    test = config.data.get("test_cohort", "")
    if test:
        if test not in set(data.cohort):
            raise FinetuneError(f"config.data.test_cohort={test!r} is not among the loaded "
                                f"cohorts {sorted(set(data.cohort))}")
        tr = np.flatnonzero(data.cohort != test)
        te = np.flatnonzero(data.cohort == test)
        if len(tr) == 0:
            raise FinetuneError("config.data.test_cohort: no training cohort left")
        _check_classes(data, tr, head, f"training cohorts {sorted(set(data.cohort[tr]))}")
        _check_classes(data, te, head, f"test cohort {test}")
        units.append({"name": f"test_{test}", "splits": [(tr, te)], "kind": "cohort"})
        return units, notes
    groups = ([(c, np.flatnonzero(data.cohort == c)) for c in sorted(set(data.cohort))]
              if config.cv.within_cohort else [("pooled", np.arange(len(data)))])
    for name, rows in groups:
        _check_classes(data, rows, head, f"cohort {name}")
        strata = stratum_labels(data, head)[rows]
        if not config.cv.within_cohort and len(set(data.cohort)) > 1:
            strata = np.array([f"{c}|{s}" for c, s in zip(data.cohort[rows], strata)])
        smallest = min(np.unique(strata, return_counts=True)[1])
        k = config.cv.k
        if smallest < k:
            if smallest < 2:
                raise FinetuneError(f"cohort {name}: a stratum has a single patient; cannot "
                                    "cross-validate (use fewer cohorts or within_cohort)")
            notes.append(f"{name}: k reduced from {k} to {smallest} (smallest class has "
                         f"{smallest} patients)")
            k = smallest
        folds = cv.patient_folds(data.patient_ids[rows], strata, k=k, seed=config.cv.seed)
        units.append({"name": name, "splits": [(rows[a], rows[b]) for a, b in folds],
                      "kind": f"{k}-fold CV"})
    return units, notes


# ---------------------------------------------------------------------------------------------
# features of one split (fitted on the training patients only)
# ---------------------------------------------------------------------------------------------

def _read_gmt(path: str, names: list[str]) -> list[tuple[str, tuple[int, ...]]]:
    index = {n: i for i, n in enumerate(names)}
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            idx = tuple(sorted({index[g] for g in parts[2:] if g in index}))
            if len(parts) >= 3 and idx:
                out.append((parts[0], idx))
    if not out:
        raise FinetuneError(f"config.omics.gene_sets={path!r}: no set shares a gene with the "
                            "features")
    return out


def _standardise(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    mu, sd = x[train].mean(0), x[train].std(0)
    return np.clip((x - mu) / np.where(sd > 0, sd, 1.0), -CLIP, CLIP).astype(np.float32)


def encoder_features(out: dict, enc: dict, train: np.ndarray,
                     config: ml_collections.ConfigDict) -> dict:
    """Replace the raw omics input of `out` by the pretrained encoder's (cfm.finetune.
    omics_encoder.encode): the raw features stay as `raw_omics` (the baselines' input); the
    frozen patient vector (CLS or mean token output), standardised on the `train` rows, is
    `omics` (and `probe_x`, the probe's input); token outputs go to the fusion model's
    co-attention slot (`tiles`); a tuned encoder gets its token arrays (`enc_*`) instead of
    `omics`."""
    out["raw_omics"] = out.pop("omics")
    for k in ("omics_edges", "n_groups"):
        out.pop(k, None)
    cls = _standardise(enc["vector"].astype(np.float64), train)
    out["probe_x"] = cls
    feature = config.omics.encoder_feature
    if config.omics.encoder_tune != "frozen":
        out.update(enc["tuning"])
        out["omics_names"], out["omics_kinds"] = [], []
    elif feature in ("cls", "mean", "both"):
        out["omics"] = cls
        out["omics_names"] = [f"encoder_{i}" for i in range(cls.shape[1])]
        out["omics_kinds"] = ["encoder"] * cls.shape[1]
        out["group_names"] = ["encoder"]
    else:
        out["omics_names"], out["omics_kinds"] = [], []
        del out["omics_mask"]
    if feature in ("tokens", "both"):
        out["tiles"], out["tile_mask"] = enc["tokens"], enc["token_mask"]
    return out


def prepare_features(data: tabular_data.TabularData, train: np.ndarray,
                     config: ml_collections.ConfigDict, seed: int, enc: dict | None = None
                     ) -> dict:
    """Model inputs of every patient for one split, with statistics (mean, sd, k-means
    modules, most variable features) from the `train` rows only: omics [N, G] + mask, its
    feature names and kinds, group edges and names; clinical [N, C] + per-value mask. With a
    pretrained encoder's outputs `enc`, its features replace the raw omics
    (`encoder_features`)."""
    mods = split_list(config.modalities)
    out: dict = {"modalities": mods}
    if "omics" in mods:
        if data.omics.shape[1] == 0:
            raise FinetuneError("modality 'omics' has no feature for any patient")
        x = data.omics.astype(np.float64)
        mu, sd = x[train].mean(0), x[train].std(0)
        # every feature is kept (constant ones become 0 on the training patients) so that
        # shapes, and the compiled model, are the same in every split
        keep = np.ones(x.shape[1], bool)
        if config.omics.max_features and x.shape[1] > config.omics.max_features:
            order = np.argsort(-sd, kind="mergesort")
            keep = np.zeros_like(keep)
            keep[order[:config.omics.max_features]] = True
        sd = np.where(sd > 0, sd, 1.0)
        x = np.clip((x[:, keep] - mu[keep]) / sd[keep], -CLIP, CLIP).astype(np.float32)
        names = [n for n, k in zip(data.feature_names, keep) if k]
        out["omics"] = x
        out["omics_mask"] = np.ones(len(x), bool)
        out["omics_names"] = names
        out["omics_kinds"] = [str(k) for k, kk in zip(data.feature_kinds, keep) if kk]
        grouping = "vector" if enc is not None else config.omics.grouping
        if grouping == "vector":
            groups, out["group_names"] = None, ["omics"]
        elif grouping == "gene_sets":
            sets = _read_gmt(config.omics.gene_sets, data.feature_names)
            index = {n: i for i, n in enumerate(names)}
            full = data.feature_names
            groups = [tuple(index[full[i]] for i in idx if full[i] in index) for _, idx in sets]
            out["group_names"] = [n for n, _ in sets]
        else:
            n_mod = min(config.omics.n_modules, x.shape[1])
            km = KMeans(n_mod, n_init=1, random_state=seed).fit(x[train].T)
            groups = [tuple(np.flatnonzero(km.labels_ == m).tolist()) for m in range(n_mod)]
            out["group_names"] = [f"module_{i}" for i in range(n_mod)]
        if groups is not None:
            # edges padded to a split-independent count (modules: G; gene sets: all members)
            n_edges = x.shape[1] if grouping == "modules" else sum(len(i) for _, i in sets)
            out["omics_edges"] = group_edges(groups, n_edges)
            out["n_groups"] = len(groups)
    if "clinical" in mods:
        c = data.clinical.astype(np.float64)
        present = np.isfinite(c)
        if c.shape[1] == 0 or not present.any():
            raise FinetuneError("modality 'clinical' is missing for every patient "
                                f"(variables {data.clinical_names})")
        if not present[train].any():
            raise FinetuneError("modality 'clinical' is missing for every training patient")
        ct = np.where(present[train], c[train], np.nan)
        with warnings.catch_warnings():  # a variable absent in every training patient: mean 0
            warnings.simplefilter("ignore")
            mu, sd = np.nanmean(ct, 0), np.nanstd(ct, 0)
        mu, sd = np.nan_to_num(mu), np.where(np.isfinite(sd) & (sd > 0), sd, 1.0)
        z = np.where(present, (c - mu) / sd, 0.0)
        out["clinical"] = np.clip(z, -CLIP, CLIP).astype(np.float32)
        out["clinical_mask"] = present
        out["clinical_names"] = list(data.clinical_names)
    return encoder_features(out, enc, train, config) if enc is not None else out


def device_batch(feats: dict, rows: np.ndarray) -> dict:
    """The model's input batch of `rows` (device arrays), with the omics group edges."""
    b = {}
    for k in BATCH_KEYS:
        if k in feats:
            b[k] = jnp.asarray(feats[k][rows])
    for k, v in feats.get("omics_edges", {}).items():
        b[k] = jnp.asarray(v)
    return b
