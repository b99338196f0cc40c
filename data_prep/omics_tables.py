"""Reading omics tables for `data_prep.prepare_omics`: CSV/TSV (gzip ok), Parquet and AnnData
`.h5ad` into one shape (samples x features, NaN = missing), gene names into (symbol, Ensembl id),
value checks per modality, missing-value repair and the expression transforms.

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

import csv
import dataclasses
import gzip
import importlib
import os
import re

import numpy as np

from cfm.data.omics_records import MODALITIES

DEFAULT_SUFFIXES = "_rnaseq=expression,_mut=mutation,_cnv=cnv"
TRANSFORMS = ("log1p", "cpm_log1p", "tpm_log1p", "signed_log1p", "none")
ENSEMBL_RE = re.compile(r"^(ENS[A-Z]*G\d{6,})(\.\d+)?(_PAR_Y)?$")
SYMBOL_COLUMNS = ("gene", "genes", "symbol", "gene_symbol", "gene_symbols", "hugo_symbol",
                  "gene_name", "gene_names", "feature_name", "genesymbol")
ENSEMBL_COLUMNS = ("ensembl", "ensembl_id", "ensembl_gene_id", "gene_id", "gene_ids", "ensg")
OTHER_GENE_COLUMNS = ("entrez_gene_id", "entrez_id", "entrez", "description", "gene_type",
                      "gene_biotype", "biotype", "length", "gene_length")
CNV_CALLS = (-2.0, -1.0, 0.0, 1.0, 2.0)
CSV_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": "\t", ".tab": "\t"}
INSTALL_HINT = 'pip install "cfm[omics]" (from a checkout: pip install -e ".[omics]")'


class OmicsInputError(ValueError):
    """Bad input data or options; the message names the file, column and row."""


def require(module: str):
    """Import an optional dependency (pandas, pyarrow, anndata) with a clear error."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise OmicsInputError(f"prepare_omics needs the {module!r} package ({err}); "
                              f"{INSTALL_HINT}") from err


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


# ----------------------------------------------------------------------------- reading
def _separator(path: str) -> str | None:
    lower = path.lower()
    if lower.endswith(".gz"):
        lower = lower[:-3]
    for suffix, sep in CSV_SUFFIXES.items():
        if lower.endswith(suffix):
            return sep
    return None


def _raw_header(path: str, sep: str) -> list[str]:
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as handle:
            return next(csv.reader(handle, delimiter=sep), [])
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise OmicsInputError(f"{path}: cannot read ({err})") from err


def read_frame(path: str, text_columns: tuple[str, ...] = ()):
    """A pandas DataFrame of a CSV/TSV/Parquet file, with the file's own (unmangled) header;
    columns in `text_columns` (and the first column) are read as text."""
    pd = require("pandas")
    if not os.path.isfile(path):
        raise OmicsInputError(f"{path}: no such file")
    lower = path.lower()
    if lower.endswith((".parquet", ".pq")):
        require("pyarrow")
        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # noqa: BLE001 - pyarrow raises many types for bad files
            raise OmicsInputError(f"{path}: cannot read as Parquet ({err})") from err
        if not isinstance(frame.index, pd.RangeIndex):
            frame = frame.reset_index()
        frame.columns = [str(c) for c in frame.columns]
        for column in {frame.columns[0], *text_columns} & set(frame.columns):
            if frame[column].dtype == object or column in text_columns:
                frame[column] = frame[column].map(lambda v: "" if v is None else str(v))
        return frame
    sep = _separator(path)
    if sep is None:
        raise OmicsInputError(f"{path}: unknown file type; use .csv, .tsv, .txt (tab), .parquet "
                              "or .h5ad (optionally .gz for text)")
    header = _raw_header(path, sep)
    if not header:
        raise OmicsInputError(f"{path}: empty file (no header line)")
    text = {0} | {i for i, name in enumerate(header) if name in text_columns}
    try:
        frame = pd.read_csv(path, sep=sep, index_col=False, low_memory=False,
                            converters={i: str for i in text})
    except Exception as err:  # noqa: BLE001 - pandas raises many types for malformed text
        raise OmicsInputError(f"{path}: cannot parse as {'TSV' if sep == chr(9) else 'CSV'} "
                              f"({err})") from err
    if len(header) == frame.shape[1]:
        frame.columns = header
    return frame


def _numeric(frame, path: str, what: str, where) -> np.ndarray:
    """float64 array of a frame whose every column must be numeric (empty cells -> NaN)."""
    pd = require("pandas")
    out = np.empty(frame.shape, np.float64)
    for j in range(frame.shape[1]):
        column = frame.iloc[:, j]
        if column.dtype == bool:
            out[:, j] = column.to_numpy(np.float64)
            continue
        if column.dtype.kind in "iuf":
            out[:, j] = column.to_numpy(np.float64)
            continue
        coerced = pd.to_numeric(column, errors="coerce")
        bad = np.flatnonzero(coerced.isna().to_numpy() & column.notna().to_numpy()
                             & (column.astype(str).str.strip() != "").to_numpy())
        if len(bad):
            raise OmicsInputError(f"{where(bad[0], j)}: non-numeric value "
                                  f"{column.iloc[bad[0]]!r} ({len(bad)} such cells in this "
                                  f"{what}){_clinical_hint(what)}")
        out[:, j] = coerced.to_numpy(np.float64)
    return out


def _clinical_hint(what: str) -> str:
    return ("; if it is not a feature, name it in --clinical-columns" if what == "column"
            else "")


def _ids(values, path: str, what: str, lines) -> list[str]:
    ids = [str(v).strip() for v in values]
    seen = {}
    for i, sid in enumerate(ids):
        if not sid or sid.lower() == "nan":
            raise OmicsInputError(f"{path}: empty {what} at {lines(i)}")
        if sid in seen:
            raise OmicsInputError(f"{path}: {what} {sid!r} appears twice ({lines(seen[sid])} "
                                  f"and {lines(i)})")
        seen[sid] = i
    return ids


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
    pd = require("pandas")
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
    sample_ids = _ids(data.columns, path, "sample id (column header)",
                      lambda i: f"column {i + n_gene_cols + 1}")
    values = _numeric(data, path, "sample column",
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
    pd = require("pandas")
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
    ids = _ids(frame.iloc[:, columns.index(sample_column)], path, "sample id",
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
    values = _numeric(frame.iloc[:, feature_idx], path, "column",
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
    pd = require("pandas")
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
    sample_ids = _ids(adata.obs_names, path, "obs name (sample id)", lambda i: f"obs #{i}")
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


def read_clinical(path: str, sample_column: str | None):
    """(clinical table indexed by sample id, name of its sample id column (default: first))."""
    frame = read_frame(path, (sample_column,) if sample_column else ())
    column = sample_column or str(frame.columns[0])
    if column not in frame.columns:
        raise OmicsInputError(f"{path}: no column {column!r} (--clinical-sample-column); "
                              f"columns start {list(frame.columns[:6])}")
    ids = _ids(frame[column], path, f"sample id in column {column!r}", lambda i: f"row {i + 2}")
    frame = frame.drop(columns=[column])
    frame.index = ids
    frame.index.name = "sample_id"
    return frame, column


def read_gene_lengths(path: str) -> dict[str, float]:
    """{gene name, symbol or Ensembl id: length in bases} from a two-column table."""
    frame = read_frame(path)
    if frame.shape[1] < 2:
        raise OmicsInputError(f"{path}: --gene-lengths needs two columns (gene, length in bp)")
    lengths = _numeric(frame.iloc[:, 1:2], path, "length column",
                       lambda r, j: f"{path}: row {r + 2}")[:, 0]
    out = {}
    for r, (name, length) in enumerate(zip(frame.iloc[:, 0], lengths)):
        if not np.isfinite(length) or length <= 0:
            raise OmicsInputError(f"{path}: row {r + 2}: gene length {length} is not > 0")
        sym, ens = gene_key(name)
        for key in {str(name).strip(), sym, ens} - {""}:
            out[key] = float(length)
    return out


# ----------------------------------------------------------------------------- values
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
