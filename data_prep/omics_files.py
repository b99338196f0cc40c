"""Files of omics inputs for `data_prep.prepare_omics`: CSV/TSV (gzip ok) and Parquet into pandas
DataFrames with the file's own header, numeric columns and id columns checked cell by cell, the
optional readers (pyarrow, anndata) imported with an install hint, and --clinical tables; also the
error type and the stderr log of the whole omics preparation. How a frame becomes a samples x
features table: `data_prep.omics_tables`."""

from __future__ import annotations

import csv
import gzip
import importlib
import os
import sys

import numpy as np
import pandas as pd

CSV_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": "\t", ".tab": "\t"}
INSTALL_HINT = 'pip install "cfm[omics]" (from a checkout: pip install -e ".[omics]")'


class OmicsInputError(ValueError):
    """Bad input data or options; the message names the file, column and row."""


def log(message: str) -> None:
    """A progress or repair note of prepare_omics, on stderr."""
    print(f"prepare_omics: {message}", file=sys.stderr, flush=True)


def require(module: str):
    """Import an optional dependency (pyarrow, anndata: extra "omics") with a clear error."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise OmicsInputError(f"prepare_omics needs the {module!r} package ({err}); "
                              f"{INSTALL_HINT}") from err


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


def numeric_values(frame, path: str, what: str, where) -> np.ndarray:
    """float64 array of a frame whose every column must be numeric (empty cells -> NaN)."""
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


def check_ids(values, path: str, what: str, lines) -> list[str]:
    """The ids as stripped strings; OmicsInputError naming `lines(i)` for an empty or repeated
    one."""
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


def read_clinical(path: str, sample_column: str | None):
    """(clinical table indexed by sample id, name of its sample id column (default: first))."""
    frame = read_frame(path, (sample_column,) if sample_column else ())
    column = sample_column or str(frame.columns[0])
    if column not in frame.columns:
        raise OmicsInputError(f"{path}: no column {column!r} (--clinical-sample-column); "
                              f"columns start {list(frame.columns[:6])}")
    ids = check_ids(frame[column], path, f"sample id in column {column!r}",
                    lambda i: f"row {i + 2}")
    frame = frame.drop(columns=[column])
    frame.index = ids
    frame.index.name = "sample_id"
    return frame, column
