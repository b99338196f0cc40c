"""Reading omics tables for `data_prep.prepare_omics`: CSV/TSV (gzip ok), Parquet and AnnData
`.h5ad` into one shape (samples x features, NaN = missing), gene names into (symbol, Ensembl id).
Files into pandas frames (formats, optional readers, --clinical tables): `data_prep.omics_files`;
value checks, missing-value repair and the expression transforms: `data_prep.omics_values`.

Table layouts (see `read_table`):
  * samples x genes: one row per sample; the sample id is `--sample-column` (default: the first
    column). Feature columns are those whose names end in a `--suffix-map` suffix (TCGA
    multi-omics tables: `<GENE>_rnaseq`, `<GENE>_mut`, `<GENE>_cnv`); every other column is
    clinical. A table without such suffixes (or an input given as FILE:MODALITY) is all one
    modality: every column but the sample column, the patient column and `--clinical-columns`.
  * genes x samples: one row per gene; leading gene columns (`gene`, `symbol`, `gene_id`, ...;
    at least the first column) name the gene, every other column is a sample. Detected when the
    first column is named like a gene column or holds Ensembl ids (or `--orientation`).
  * `.h5ad`: obs = samples (obs_names are the ids; obs columns are clinical), var = genes
    (var_names, plus var columns such as `gene_ids` / `gene_symbols`), X (dense or sparse) or a
    `--layer`. Implicit zeros of a sparse X are values (counts of 0), not missing.

Gene names: `ENSG00000141510.16` (any `ENS...G` id) is an Ensembl id with its version stripped
(`ENSG00000141510`); anything else is a symbol.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import pandas as pd

from cfm.data.omics_records import MODALITIES
from data_prep.omics_files import (OmicsInputError, check_ids, numeric_values, read_frame,
                                     require)

DEFAULT_SUFFIXES = "_rnaseq=expression,_mut=mutation,_cnv=cnv"
ENSEMBL_RE = re.compile(r"^(ENS[A-Z]*G\d{6,})(\.\d+)?(_PAR_Y)?$")
SYMBOL_COLUMNS = ("gene", "genes", "symbol", "gene_symbol", "gene_symbols", "hugo_symbol",
                  "gene_name", "gene_names", "feature_name", "genesymbol")
ENSEMBL_COLUMNS = ("ensembl", "ensembl_id", "ensembl_gene_id", "gene_id", "gene_ids", "ensg")
OTHER_GENE_COLUMNS = ("entrez_gene_id", "entrez_id", "entrez", "description", "gene_type",
                      "gene_biotype", "biotype", "length", "gene_length")


def gene_key(name: str) -> tuple[str, str]:
    """(symbol, ensembl) of one gene name: Ensembl ids lose their version, the rest is a symbol."""
    name = str(name).strip()
    match = ENSEMBL_RE.match(name)
    if match:
        return "", match.group(1) + (match.group(3) or "")
    return name, ""


def parse_suffix_map(text: str) -> dict[str, str]:
    """`_rnaseq=expression,_mut=mutation` -> {suffix: modality}, longest suffixes first."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        suffix, _, modality = item.partition("=")
        if not suffix or modality not in MODALITIES:
            raise OmicsInputError(f"--suffix-map item {item!r}: expected SUFFIX=MODALITY with "
                                  f"MODALITY one of {', '.join(MODALITIES)}")
        out[suffix] = modality
    return dict(sorted(out.items(), key=lambda kv: -len(kv[0])))


def split_input_spec(spec: str) -> tuple[str, str | None]:
    """`FILE` or `FILE:MODALITY` -> (path, modality or None)."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail in MODALITIES:
        return head, tail
    if sep and not os.path.exists(spec) and "/" not in tail:
        raise OmicsInputError(f"--input {spec!r}: {tail!r} is not a modality (use one of "
                              f"{', '.join(MODALITIES)})")
    return spec, None


@dataclasses.dataclass
class Table:
    """One input as samples x features. values[i, j]: sample i, feature j; NaN = missing."""

    path: str
    layout: str  # "samples x genes", "genes x samples" or "h5ad"
    sample_ids: list[str]
    names: list[str]  # feature names as in the file
    modality: list[str]  # per feature
    symbols: list[str]  # per feature ("" if unknown)
    ensembl: list[str]  # per feature ("" if unknown)
    values: np.ndarray  # float64 [samples, features]
    clinical: object  # pandas DataFrame indexed by sample id (str)
    lines: np.ndarray  # per sample: its row number in the file (for messages)
    gene_lines: np.ndarray  # per feature: its row number (genes x samples) or column number
    id_column: str | None = None  # the column that held the sample ids (samples x genes)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def where(self, i: int, j: int) -> str:
        """File coordinates of cell (sample i, feature j), for error messages."""
        sample, feature = self.sample_ids[i], self.names[j]
        if self.layout == "samples x genes":
            return f"{self.path}: column {feature!r}, row {self.lines[i]} (sample {sample!r})"
        if self.layout == "genes x samples":
            return (f"{self.path}: row {self.gene_lines[j]} (gene {feature!r}), column "
                    f"{sample!r}")
        return f"{self.path}: obs {sample!r} (#{i}), var {feature!r} (#{j})"

    def modalities(self) -> list[str]:
        return [m for m in MODALITIES if m in self.modality]

    def columns_of(self, modality: str) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.modality) == modality)

    def take_rows(self, rows: np.ndarray) -> None:
        """Keep only these samples (in this order)."""
        self.sample_ids = [self.sample_ids[r] for r in rows]
        self.values = self.values[rows]
        self.lines = self.lines[rows]
        self.clinical = self.clinical.iloc[rows]

    def drop_features(self, keep: np.ndarray) -> None:
        """Keep only the features where `keep` (bool [features]) is True."""
        for field in ("names", "modality", "symbols", "ensembl"):
            setattr(self, field, [v for v, k in zip(getattr(self, field), keep) if k])
        self.values = self.values[:, keep]
        self.gene_lines = self.gene_lines[keep]


# ----------------------------------------------------------------------------- layouts
def detect_orientation(frame) -> str:
    """'genes x samples' when the first column is named like a gene column or mostly holds
    Ensembl ids, else 'samples x genes'."""
    first = str(frame.columns[0]).strip().lower()
    if first in SYMBOL_COLUMNS or first in ENSEMBL_COLUMNS:
        return "genes x samples"
    values = frame.iloc[:200, 0].astype(str)
    if len(values) and np.mean([bool(ENSEMBL_RE.match(v.strip())) for v in values]) > 0.5:
        return "genes x samples"
    return "samples x genes"


def read_table(path: str, modality: str | None, *, orientation: str = "auto",
               suffix_map: dict[str, str], sample_column: str | None = None,
               patient_column: str | None = None, clinical_columns: tuple[str, ...] = (),
               layer: str | None = None) -> Table:
    """One input file as a Table (see the module docstring for the layouts)."""
    if path.lower().endswith(".h5ad"):
        table = _read_h5ad(path, modality or "expression", layer)
    else:
        frame = read_frame(path, tuple(c for c in (sample_column, patient_column) if c))
        if frame.shape[1] < 2:
            raise OmicsInputError(f"{path}: {frame.shape[1]} column(s); need an id column and "
                                  "at least one feature column")
        layout = detect_orientation(frame) if orientation == "auto" else orientation
        if layout == "genes x samples":
            table = _genes_by_samples(path, frame, modality or "expression")
        else:
            table = _samples_by_genes(path, frame, modality, suffix_map, sample_column,
                                      patient_column, clinical_columns)
    if not table.sample_ids:
        raise OmicsInputError(f"{path}: no samples")
    if not table.names:
        raise OmicsInputError(f"{path}: no feature columns found (empty modality "
                              f"{modality or 'expression'!r}); check --suffix-map, "
                              "--orientation and --clinical-columns")
    for m in table.modalities():
        columns = table.columns_of(m)
        if np.isnan(table.values[:, columns]).all():
            raise OmicsInputError(f"{path}: modality {m!r} is all missing ({len(columns)} "
                                  "columns, every value empty/NaN)")
    return table


def _genes_by_samples(path: str, frame, modality: str) -> Table:
    n_gene_cols = 1
    while (n_gene_cols < frame.shape[1] - 1 and str(frame.columns[n_gene_cols]).strip().lower()
           in SYMBOL_COLUMNS + ENSEMBL_COLUMNS + OTHER_GENE_COLUMNS):
        n_gene_cols += 1
    gene_frame, data = frame.iloc[:, :n_gene_cols], frame.iloc[:, n_gene_cols:]
    names = [str(v).strip() for v in gene_frame.iloc[:, 0]]
    symbols, ensembl = _gene_columns(gene_frame, names)
    for r, name in enumerate(names):
        if not name or name.lower() == "nan":
            raise OmicsInputError(f"{path}: row {r + 2}: empty gene name in column "
                                  f"{frame.columns[0]!r}")
    sample_ids = check_ids(data.columns, path, "sample id (column header)",
                           lambda i: f"column {i + n_gene_cols + 1}")
    values = numeric_values(data, path, "sample column",
                            lambda r, j: f"{path}: row {r + 2} (gene {names[r]!r}), column "
                                         f"{sample_ids[j]!r}").T.copy()
    return Table(path, "genes x samples", sample_ids, names, [modality] * len(names), symbols,
                 ensembl, values, pd.DataFrame(index=pd.Index(sample_ids, name="sample_id")),
                 np.arange(len(sample_ids)) + n_gene_cols + 1, np.arange(len(names)) + 2)


def _gene_columns(gene_frame, names: list[str]) -> tuple[list[str], list[str]]:
    """Per gene (symbol, ensembl) from names plus any symbol / Ensembl annotation columns."""
    keys = [gene_key(n) for n in names]
    symbols, ensembl = [k[0] for k in keys], [k[1] for k in keys]
    lowered = {str(c).strip().lower(): c for c in gene_frame.columns}
    for low, column in lowered.items():
        col_values = [str(v).strip() for v in gene_frame[column]]
        if low in SYMBOL_COLUMNS + ENSEMBL_COLUMNS:
            for i, value in enumerate(col_values):
                if not value or value.lower() == "nan":
                    continue
                sym, ens = gene_key(value)
                if ens and not ensembl[i]:
                    ensembl[i] = ens
                if sym and not symbols[i] and low in SYMBOL_COLUMNS:
                    symbols[i] = sym
    return symbols, ensembl


def _samples_by_genes(path, frame, modality, suffix_map, sample_column, patient_column,
                      clinical_columns) -> Table:
    columns = [str(c) for c in frame.columns]
    sample_column = sample_column or columns[0]
    if sample_column not in columns:
        raise OmicsInputError(f"{path}: no column {sample_column!r} (--sample-column); columns "
                              f"start {columns[:6]}")
    for name in clinical_columns:
        if name not in columns:
            raise OmicsInputError(f"{path}: --clinical-columns names {name!r}, which is not a "
                                  "column of this table")
    if columns.count(sample_column) > 1:
        raise OmicsInputError(f"{path}: the sample column {sample_column!r} appears twice")
    ids = check_ids(frame.iloc[:, columns.index(sample_column)], path, "sample id",
                    lambda i: f"row {i + 2}")
    fixed = {sample_column, patient_column, *clinical_columns} - {None}
    feature_idx, feature_mod, feature_gene = [], [], []
    suffixed = modality is None and any(_suffix_of(c, suffix_map) for c in columns)
    for j, name in enumerate(columns):
        if name in fixed:
            continue
        if suffixed:
            hit = _suffix_of(name, suffix_map)
            if not hit:
                continue
            gene, mod = name[:-len(hit)], suffix_map[hit]
        else:
            mod = modality or "expression"
            hit = _suffix_of(name, suffix_map)
            gene = name[:-len(hit)] if hit and suffix_map[hit] == mod else name
        if not gene.strip():
            raise OmicsInputError(f"{path}: column {j + 1} ({name!r}) has no gene name")
        feature_idx.append(j)
        feature_mod.append(mod)
        feature_gene.append(gene.strip())
    clinical_idx = [j for j in range(len(columns)) if j not in set(feature_idx)
                    and columns[j] != sample_column]
    clinical_names = [columns[j] for j in clinical_idx]
    dup_clinical = sorted({c for c in clinical_names if clinical_names.count(c) > 1})
    if dup_clinical:
        raise OmicsInputError(f"{path}: clinical column(s) {dup_clinical} appear twice")
    lines = np.arange(len(ids)) + 2
    names = [columns[j] for j in feature_idx]
    values = numeric_values(frame.iloc[:, feature_idx], path, "column",
                            lambda r, j: f"{path}: column {names[j]!r}, row {lines[r]} "
                                         f"(sample {ids[r]!r})")
    keys = [gene_key(g) for g in feature_gene]
    clinical = frame.iloc[:, clinical_idx].copy()
    clinical.index = pd.Index(ids, name="sample_id")
    return Table(path, "samples x genes", ids, names, feature_mod, [k[0] for k in keys],
                 [k[1] for k in keys], values, clinical, lines, np.asarray(feature_idx) + 1,
                 sample_column)


def _suffix_of(name: str, suffix_map: dict[str, str]) -> str | None:
    for suffix in suffix_map:  # longest first
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def _read_h5ad(path: str, modality: str, layer: str | None) -> Table:
    anndata = require("anndata")
    if not os.path.isfile(path):
        raise OmicsInputError(f"{path}: no such file")
    try:
        adata = anndata.read_h5ad(path)
    except Exception as err:  # noqa: BLE001 - h5py/anndata raise many types for bad files
        raise OmicsInputError(f"{path}: cannot read as AnnData .h5ad ({err})") from err
    if layer is not None and layer not in adata.layers:
        raise OmicsInputError(f"{path}: no layer {layer!r} (--layer); layers: "
                              f"{list(adata.layers.keys())}")
    matrix = adata.X if layer is None else adata.layers[layer]
    if matrix is None:
        raise OmicsInputError(f"{path}: X is empty; name a layer with --layer")
    if hasattr(matrix, "toarray"):
        matrix = matrix.toarray()
    values = np.asarray(matrix, dtype=np.float64)
    sample_ids = check_ids(adata.obs_names, path, "obs name (sample id)", lambda i: f"obs #{i}")
    names = [str(v) for v in adata.var_names]
    var = adata.var.copy()
    var.insert(0, "__var_name__", names)
    symbols, ensembl = _gene_columns(var, names)
    clinical = adata.obs.copy()
    clinical.index = pd.Index(sample_ids, name="sample_id")
    for column in clinical.columns:  # categoricals -> plain values for CSV writing
        if isinstance(clinical[column].dtype, pd.CategoricalDtype):
            clinical[column] = clinical[column].astype(object)
    n = len(sample_ids)
    return Table(path, "h5ad", sample_ids, names, [modality] * len(names), symbols, ensembl,
                 values, clinical, np.arange(n), np.arange(len(names)))


def read_gene_lengths(path: str) -> dict[str, float]:
    """{gene name, symbol or Ensembl id: length in bases} from a two-column table."""
    frame = read_frame(path)
    if frame.shape[1] < 2:
        raise OmicsInputError(f"{path}: --gene-lengths needs two columns (gene, length in bp)")
    lengths = numeric_values(frame.iloc[:, 1:2], path, "length column",
                             lambda r, j: f"{path}: row {r + 2}")[:, 0]
    out = {}
    for r, (name, length) in enumerate(zip(frame.iloc[:, 0], lengths)):
        if not np.isfinite(length) or length <= 0:
            raise OmicsInputError(f"{path}: row {r + 2}: gene length {length} is not > 0")
        sym, ens = gene_key(name)
        for key in {str(name).strip(), sym, ens} - {""}:
            out[key] = float(length)
    return out
