"""A site's private data: one hospital's patients, loaded where they live and never sent.

Each site (a Flower client) loads only its own cohort with cfm.finetune's loaders
(`tabular_data.load_icb` for one ICB cohort, `load_tcga` for one TCGA type) or, for tests and
users with their own tables, a CSV `<data.path>/<site>.csv` (columns: the features, `label`,
and for survival `time`, `event`). Features are aligned to the federation's feature list
(`feature_names`: a published vocabulary, the same at every site; a feature a site lacks is 0,
i.e. the site mean after standardising) and clinical variables to `data.clinical` (a variable
a site lacks is missing, which the fusion model has a learned token for). Standardisation uses
the site's own patients only (`data.standardize`); nothing but model updates leaves the site.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os

import ml_collections
import numpy as np
import pandas as pd

from cfm.errors import UserError
from cfm.finetune import tabular_data
from cfm.finetune.common import FinetuneError
from cfm.finetune.fusion_data import labelled_patients, prepare_features, split_list
from cfm.finetune.fusion_train import pad_bucket, pad_rows
from cfm.finetune.losses import SURVIVAL_HEADS


class FederatedError(UserError):
    """Bad federated config, data or peer (a client, a server): one line says which."""


@dataclasses.dataclass
class SiteData:
    """One site's model inputs, padded to `pad_bucket` rows (weight 0 on padding)."""

    name: str
    n: int                 # patients with a label
    feats: dict            # prepare_features output (omics, clinical and their masks)
    rows: np.ndarray       # [n_pad] row indices into feats (padding repeats the first)
    weight: np.ndarray     # [n_pad] 1 = patient, 0 = padding
    targets: dict          # y, time, event of every row of feats: float32
    data: tabular_data.TabularData  # kept on the site: ids and raw values never leave it


def _csv_sites(path: str, site: str) -> tuple[pd.DataFrame, str]:
    f = os.path.join(path, f"{site}.csv")
    if not os.path.isfile(f):
        raise FederatedError(f"site {site!r} has no data: {f} does not exist")
    return pd.read_csv(f), f


def feature_names(config: ml_collections.ConfigDict) -> list[str]:
    """The federation's omics feature list: `data.features` (a file, one name a line) or, when
    empty, the features common to every file of `data.sites` (headers only, on one machine)."""
    d = config.data
    if d.features:
        if not os.path.isfile(d.features):
            raise FederatedError(f"config.data.features={d.features!r} is not a file")
        with open(d.features, encoding="utf-8") as fh:
            return [ln.strip() for ln in fh if ln.strip()]
    names = None
    for site in split_list(d.sites):
        cols = _load(config, site).feature_names
        names = list(cols) if names is None else [c for c in names if c in set(cols)]
    if not names:
        raise FederatedError(f"config.data.sites={d.sites!r}: no feature common to all sites")
    return names


@functools.lru_cache(maxsize=32)
def _load_cached(source: str, path: str, site: str, clinical: str, kinds: str,
                 label: str) -> tabular_data.TabularData:
    try:
        if source == "icb":
            return tabular_data.load_icb(path, [site], split_list(clinical), label=label)
        if source == "tcga":
            return tabular_data.load_tcga(path, site, split_list(kinds), split_list(clinical))
    except FinetuneError as e:
        raise FederatedError(f"site {site!r}: {e}") from None
    if source != "csv":
        raise FederatedError(f"config.data.source={source!r}: use icb, tcga or csv")
    df, f = _csv_sites(path, site)
    if "label" not in df:
        raise FederatedError(f"site {site!r}: {f} has no `label` column")
    feats = [c for c in df.columns if c not in ("label", "time", "event", "patient_id")]
    col = lambda c: df[c].to_numpy(float) if c in df else np.full(len(df), np.nan)  # noqa
    ids = df["patient_id"].astype(str).to_numpy() if "patient_id" in df else \
        np.array([f"{site}-{i}" for i in range(len(df))])
    return tabular_data.TabularData(
        patient_ids=ids, cohort=np.array([site] * len(df)),
        omics=df[feats].to_numpy(np.float32), feature_names=feats,
        feature_kinds=np.array(["csv"] * len(feats)),
        clinical=np.zeros((len(df), 0), np.float32), clinical_names=[],
        label=col("label"), time=col("time"), event=col("event"), signatures={},
        signature_genes={})


def _load(config: ml_collections.ConfigDict, site: str) -> tabular_data.TabularData:
    d = config.data
    return _load_cached(d.source, d.path, site, d.clinical if d.source != "csv" else "",
                        d.get("omics_kinds", ""), d.get("label", "response"))


def align(data: tabular_data.TabularData, names: list[str],
          clinical: list[str]) -> tabular_data.TabularData:
    """`data` with omics columns in the order of `names` (absent = 0) and clinical columns in
    the order of `clinical` (absent = NaN, i.e. missing)."""
    index = {n: i for i, n in enumerate(data.feature_names)}
    om = np.zeros((len(data), len(names)), np.float32)
    for j, n in enumerate(names):
        if n in index:
            om[:, j] = data.omics[:, index[n]]
    cindex = {n: i for i, n in enumerate(data.clinical_names)}
    cl = np.full((len(data), len(clinical)), np.nan, np.float32)
    for j, n in enumerate(clinical):
        if n in cindex:
            cl[:, j] = data.clinical[:, cindex[n]]
    return dataclasses.replace(data, omics=om, feature_names=list(names),
                               feature_kinds=np.array(["x"] * len(names)), clinical=cl,
                               clinical_names=list(clinical))


def features_of(data: tabular_data.TabularData, config: ml_collections.ConfigDict,
                rows: np.ndarray) -> dict:
    """Model inputs of `data`, standardised on `rows` (the site's own training patients) when
    `data.standardize`, else the raw values (tests: the convex reference sees the same)."""
    if not config.data.standardize:
        out = {"omics": data.omics.astype(np.float32), "omics_mask": np.ones(len(data), bool)}
        if data.clinical.shape[1]:
            out["clinical"] = np.nan_to_num(data.clinical).astype(np.float32)
            out["clinical_mask"] = np.isfinite(data.clinical)
        return out
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
        cfg.omics = ml_collections.ConfigDict({"grouping": "vector", "max_features": 0})
        cfg.modalities = "omics,clinical" if data.clinical.shape[1] else "omics"
    try:
        return prepare_features(data, rows, cfg, seed=0)
    except FinetuneError as e:
        raise FederatedError(f"site {data.cohort[0]!r}: {e}") from None


def _subset(name: str, data: tabular_data.TabularData, feats: dict, targets: dict,
            rows: np.ndarray) -> SiteData:
    idx, w = pad_rows(rows, pad_bucket(len(rows)))
    return SiteData(name=name, n=len(rows), feats=feats, rows=idx, weight=w, targets=targets,
                    data=data)


def site_split(config: ml_collections.ConfigDict, site: str, names: list[str]
               ) -> tuple[SiteData, SiteData | None]:
    """Site `site`'s labelled patients as model inputs: (training part, held-out part or None).
    `data.holdout` > 0 keeps that fraction of the site's patients (stratified by class or
    event, seed `config.seed`) out of training, for evaluation at the site; features are
    standardised on the training part. FederatedError if the site has no labelled patient."""
    try:
        data = labelled_patients(_load(config, site), config.head)
    except FinetuneError as e:
        raise FederatedError(f"site {site!r} has no data for head {config.head!r}: {e}") from None
    data = align(data, names, split_list(config.data.clinical) if config.data.source != "csv"
                 else [])
    n = len(data)
    tg = {k: np.nan_to_num(v).astype(np.float32) for k, v in
          (("y", data.label), ("time", data.time), ("event", data.event))}
    if config.head in SURVIVAL_HEADS and not tg["event"].any():
        raise FederatedError(f"site {site!r}: no observed event; a Cox model needs one")
    train, test = np.arange(n), None
    if config.data.get("holdout", 0.0) > 0:
        strata = (tg["event"] if config.head in SURVIVAL_HEADS else tg["y"]).astype(int)
        rng = np.random.default_rng(int(config.seed))
        test = np.sort(np.concatenate([
            rng.permutation(np.flatnonzero(strata == c))[
                :int(round(config.data.holdout * np.sum(strata == c)))]
            for c in np.unique(strata)]))
        train = np.setdiff1d(train, test)
    feats = features_of(data, config, train)
    return (_subset(site, data, feats, tg, train),
            None if test is None else _subset(site, data, feats, tg, test))


def site_data(config: ml_collections.ConfigDict, site: str, names: list[str]) -> SiteData:
    """The training part of `site_split` (all the site's patients without `data.holdout`)."""
    return site_split(config, site, names)[0]
