"""Combining the omics inputs of `data_prep.prepare_omics` (see its docstring): tables of other
modalities of the same samples are joined on sample id (--join exact / inner), groups of
different samples are stacked, the clinical tables are merged, and features of one group that
name the same gene and modality are resolved (--duplicates)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from cfm.data.omics_records import MODALITIES
from data_prep.omics_files import OmicsInputError, log


def group_tables(tables, combine: str) -> list[list[int]]:
    """Indices of the tables of each group (joined within, stacked across)."""
    if combine == "join":
        return [list(range(len(tables)))]
    groups, seen = [], set()
    for k, table in enumerate(tables):
        mods = set(table.modalities())
        if combine == "stack" or not groups or mods & seen:
            groups.append([k])
            seen = set(mods)
        else:
            groups[-1].append(k)
            seen |= mods
    return groups


def align(tables, mode: str, what: str, repairs: dict) -> list[str]:
    """Sample ids common to the tables (first table's order); each table keeps only those rows.
    mode exact: the sets must be equal."""
    first = tables[0]
    keep = set(first.sample_ids)
    for table in tables[1:]:
        ids = set(table.sample_ids)
        if ids != set(first.sample_ids) and mode == "exact":
            only_a = sorted(set(first.sample_ids) - ids)
            only_b = sorted(ids - set(first.sample_ids))
            raise OmicsInputError(
                f"{what}: sample ids of {table.path} and {first.path} do not line up: "
                f"{len(only_b)} only in {table.name} (e.g. {only_b[:3]}), {len(only_a)} only in "
                f"{first.name} (e.g. {only_a[:3]}); --join inner keeps the common samples")
        keep &= ids
    ids = [s for s in first.sample_ids if s in keep]
    if not ids:
        raise OmicsInputError(f"{what}: {', '.join(t.path for t in tables)} share no sample id")
    for table in tables:
        dropped = len(table.sample_ids) - len(ids)
        if dropped:
            repairs[f"--join inner: samples dropped from {table.name}"] = dropped
            log(f"--join inner: dropped {dropped} of {len(table.sample_ids)} samples of "
                f"{table.name} (not in every joined file)")
        index = {s: i for i, s in enumerate(table.sample_ids)}
        table.take_rows(np.array([index[s] for s in ids], np.int64))
    return ids


def merge_clinical(tables, groups, extra: list[tuple[str, object]], mode: str, repairs: dict):
    """One clinical DataFrame (index = sample id) for all samples; drops samples (from the
    tables) that an --join inner --clinical file lacks."""
    parts = []
    for group in groups:
        frame = tables[group[0]].clinical
        for k in group[1:]:
            other = tables[k].clinical
            new = [c for c in other.columns if c not in frame.columns]
            frame = frame.join(other[new])
        parts.append(frame)
    clinical = pd.concat(parts, axis=0, sort=False) if len(parts) > 1 else parts[0]
    for path, frame, _ in extra:
        missing = clinical.index.difference(frame.index)
        surplus = frame.index.difference(clinical.index)
        if (len(missing) or len(surplus)) and mode == "exact":
            raise OmicsInputError(
                f"--clinical {path}: sample ids do not line up with the omics inputs: "
                f"{len(missing)} omics samples lack a row (e.g. {list(missing[:3])}), "
                f"{len(surplus)} rows match no omics sample (e.g. {list(surplus[:3])}); "
                "--join inner keeps the common samples")
        if len(missing):
            repairs[f"--join inner: samples without a row in {os.path.basename(path)}"] = (
                len(missing))
            log(f"--join inner: dropped {len(missing)} samples without a row in {path}")
        if len(surplus):
            log(f"--join inner: ignored {len(surplus)} rows of {path} that match no sample")
        new = [c for c in frame.columns if c not in clinical.columns]
        clinical = clinical.join(frame[new], how="inner")
    return clinical


def combine(args, tables, extra, repairs: dict):
    """(groups of table indices, sample ids per group, clinical table of all samples)."""
    groups = group_tables(tables, args.combine)
    group_ids = []
    for group in groups:
        members = [tables[k] for k in group]
        group_ids.append(align(members, args.join, "join", repairs) if len(members) > 1
                         else members[0].sample_ids)
        if len(members) > 1:
            log(f"joined on sample id: {', '.join(t.name for t in members)} -> "
                f"{len(group_ids[-1])} samples")
    owner = {}
    for g, ids in enumerate(group_ids):
        for sid in ids:
            if sid in owner:
                first, second = tables[groups[owner[sid]][0]].path, tables[groups[g][0]].path
                raise OmicsInputError(f"sample id {sid!r} is in {first} and {second} (stacked "
                                      "inputs must hold different samples; give modalities "
                                      "of the same samples as consecutive inputs, or "
                                      "--combine join)")
            owner[sid] = g
    if len(groups) > 1:
        log(f"stacked {len(groups)} groups of inputs: {len(owner)} samples")
    clinical = merge_clinical(tables, groups, extra, args.join, repairs)
    if len(clinical) < len(owner):  # --join inner dropped samples without clinical rows
        kept = set(clinical.index)
        for g, group in enumerate(groups):
            index = {s: i for i, s in enumerate(group_ids[g])}
            group_ids[g] = [s for s in group_ids[g] if s in kept]
            for k in group:
                tables[k].take_rows(np.array([index[s] for s in group_ids[g]], np.int64))
    return groups, group_ids, clinical.loc[[s for ids in group_ids for s in ids]]


def dedupe(values: np.ndarray, genes: np.ndarray, mods: np.ndarray, names: list[str],
           rule: str, repairs: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resolve features of one group with the same (gene, modality): error, first or mean."""
    keys = genes * len(MODALITIES) + mods
    uniq, first, counts = np.unique(keys, return_index=True, return_counts=True)
    if (counts == 1).all():
        return values, genes, mods
    dup_key = uniq[np.argmax(counts > 1)]
    where = [names[j] for j in np.flatnonzero(keys == dup_key)]
    if rule == "error":
        raise OmicsInputError(f"duplicated gene: features {where} are one gene and modality "
                              f"({int((counts > 1).sum())} such genes); resolve with "
                              "--duplicates first|mean")
    out = values[:, np.sort(first)].copy()
    keep = np.sort(first)
    if rule == "mean":
        for k in np.flatnonzero(counts > 1):
            columns = np.flatnonzero(keys == uniq[k])
            if MODALITIES[mods[columns[0]]] != "expression":
                raise OmicsInputError(f"--duplicates mean averages expression only; "
                                      f"{[names[j] for j in columns]} are "
                                      f"{MODALITIES[mods[columns[0]]]}: use --duplicates first")
            with np.errstate(all="ignore"):
                mean = np.nanmean(values[:, columns], axis=1)
            out[:, np.searchsorted(keep, columns.min())] = mean
    n = int((counts > 1).sum())
    repairs[f"--duplicates {rule}: duplicated genes"] = (
        repairs.get(f"--duplicates {rule}: duplicated genes", 0) + n)
    log(f"--duplicates {rule}: {n} gene(s) had several columns (e.g. {where})")
    return out, genes[keep], mods[keep]
