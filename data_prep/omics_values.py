"""Values of omics tables for `data_prep.prepare_omics`: checks per modality (mutation 0/1, CNV
calls -2..2, counts >= 0 where the transform needs them), missing-value repair and the expression
transforms. The tables come from `data_prep.omics_tables`."""

from __future__ import annotations

import numpy as np

from data_prep.omics_files import OmicsInputError
from data_prep.omics_tables import Table

TRANSFORMS = ("log1p", "cpm_log1p", "tpm_log1p", "signed_log1p", "none")
CNV_CALLS = (-2.0, -1.0, 0.0, 1.0, 2.0)


def check_values(table: Table, fill_missing: str, transform: str | None) -> None:
    """Errors for missing cells (with --fill-missing error), mutation values other than 0/1, CNV
    calls outside -2..2 and negative values where the transform needs counts."""
    values = table.values
    bad = np.argwhere(np.isinf(values))
    if len(bad):
        i, j = bad[0]
        raise OmicsInputError(f"{table.where(i, j)}: infinite value ({len(bad)} such cells)")
    if fill_missing == "error":
        bad = np.argwhere(np.isnan(values))
        if len(bad):
            i, j = bad[0]
            raise OmicsInputError(f"{table.where(i, j)}: missing value ({len(bad)} missing "
                                  "cells in this file); repair with --fill-missing "
                                  "zero|median|skip")
    checks = {"mutation": (lambda v: (v != 0) & (v != 1), "mutation values must be 0 or 1"),
              "cnv": (lambda v: ~np.isin(v, CNV_CALLS),
                      "copy-number calls must be one of -2, -1, 0, 1, 2")}
    if transform in ("log1p", "cpm_log1p", "tpm_log1p"):
        checks["expression"] = (lambda v: v < 0, f"--expression-transform {transform} needs "
                                "counts >= 0 (for z-score-like or log-scale tables use "
                                "signed_log1p or none)")
    for modality, (is_bad, rule) in checks.items():
        columns = table.columns_of(modality)
        if not len(columns):
            continue
        block = values[:, columns]
        bad = np.argwhere(~np.isnan(block) & is_bad(block))
        if len(bad):
            i, j = bad[0]
            raise OmicsInputError(f"{table.where(i, columns[j])}: {modality} value "
                                  f"{block[i, j]:g}: {rule} ({len(bad)} such cells)")


def fill_missing(table: Table, mode: str, train_rows: np.ndarray) -> int:
    """Replace missing cells: `zero`, `median` (expression: median of the column's training
    samples; mutation/cnv: their most frequent value) or `skip` (left missing: no token).
    Returns the number of cells filled."""
    missing = np.isnan(table.values)
    count = int(missing.sum())
    if mode in ("error", "skip") or count == 0:
        return 0 if mode == "skip" else count
    for j in np.flatnonzero(missing.any(axis=0)):
        column = table.values[:, j]
        if mode == "zero":
            fill = 0.0
        else:
            known = column[train_rows][~np.isnan(column[train_rows])]
            if not len(known):
                raise OmicsInputError(f"{table.path}: column {table.names[j]!r} has no value in "
                                      "any training sample, so --fill-missing median is "
                                      "undefined; use zero or skip")
            if table.modality[j] == "expression":
                fill = float(np.median(known))
            else:
                uniq, counts = np.unique(known, return_counts=True)
                fill = float(uniq[np.argmax(counts)])
        column[np.isnan(column)] = fill
    return count


def transform_expression(table: Table, transform: str,
                         gene_lengths: dict[str, float] | None) -> None:
    """Apply --expression-transform in place to the table's expression columns (per sample for
    CPM/TPM: library size over this file's expression columns, missing cells ignored)."""
    columns = table.columns_of("expression")
    if not len(columns) or transform == "none":
        return
    x = table.values[:, columns]
    if transform == "signed_log1p":
        x = np.sign(x) * np.log1p(np.abs(x))
    elif transform == "log1p":
        x = np.log1p(x)
    else:
        if transform == "tpm_log1p":
            if gene_lengths is None:
                raise OmicsInputError("--expression-transform tpm_log1p needs gene lengths: give "
                                      "--gene-lengths FILE (gene, length in bp), or use "
                                      "cpm_log1p, which needs none")
            lengths = np.empty(len(columns))
            for k, j in enumerate(columns):
                keys = [table.names[j], table.symbols[j], table.ensembl[j]]
                found = [gene_lengths[key] for key in keys if key and key in gene_lengths]
                if not found:
                    raise OmicsInputError(f"{table.path}: gene {table.names[j]!r} has no length "
                                          "in --gene-lengths")
                lengths[k] = found[0]
            x = x / (lengths / 1000.0)
        library = np.nansum(x, axis=1)
        empty = np.flatnonzero(library <= 0)
        if len(empty):
            raise OmicsInputError(f"{table.path}: sample {table.sample_ids[empty[0]]!r} has a "
                                  f"total of 0 over its expression columns; {transform} is "
                                  "undefined")
        x = np.log1p(x / library[:, None] * 1e6)
    table.values[:, columns] = x
