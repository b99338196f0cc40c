"""Loading the tabular (omics + clinical) cohorts of ../shared/data into one patient table.

`TabularData` has one row per patient: raw omics features, clinical variables (NaN =
missing), labels (binary response) and survival (time, event), the cohort, and published
signature scores. Two sources:

- ICB (`load_icb`): PredictioR's immune-checkpoint cohorts, expression log2(TPM + 0.001) of the
  genes common to the chosen cohorts. Any cohort whose two files `<name>_expression.csv.gz`
  and `<name>_clinical.csv.gz` (the same format) sit in `<data.path>/icb` can be named
  (`read_icb_cohort`); nothing in the code lists cohorts. Expression is z-scored per gene
  *within each cohort* (labels are not used; it removes the platform/batch shift between
  studies, which dominates cross-cohort transfer). Clinical: age (years), sex (1 = male),
  stage (I-IV -> 1-4) and log1p(TMB per Mb); all-missing variables are dropped from the table.
- TCGA (`load_tcga`): PORPOISE's per-case table for one cancer type: `_rnaseq` (signed log1p,
  then z-scored per gene on the training patients by the trainer), `_cnv` / 2, `_mut` 0/1;
  clinical age, sex (1 = female) and, for BLCA, SurvPath's stage. Event = 1 - censorship.

Signatures (computed per cohort, from the same expression; higher = more immune / more
likely to respond):
- `CD274`: PD-L1 expression (log2 TPM).
- `IFNG6`: Ayers et al. 2017 J Clin Invest IFN-gamma 6-gene score (IDO1, CXCL10, CXCL9,
  HLA-DRA, STAT1, IFNG): mean of the per-cohort standardised expression.
- `CYT`: cytolytic activity of Rooney et al. 2015 Cell, geometric mean of GZMA and PRF1 TPM
  (= the mean of their log2 values).
A signature whose genes are partly absent (TCGA keeps only high-variance genes) uses those
present and lists them in `signature_genes`; absent entirely, it is left out.

An optional label file (CSV `patient_id,label`) replaces the cohort's labels; every patient
in it must have features (FinetuneError naming the unmatched ids otherwise).
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import pandas as pd

from cfm.finetune.common import FinetuneError

ICB_COHORTS = ("Hugo", "Riaz", "Van_Allen", "Mariathasan", "Miao", "Padron")
TCGA_TYPES = ("blca", "luad", "kirc")
IFNG6 = ("IDO1", "CXCL10", "CXCL9", "HLA-DRA", "STAT1", "IFNG")
CYT = ("GZMA", "PRF1")
RECIST = {"CR": 0.0, "PR": 1.0, "SD": 2.0, "PD": 3.0}
STAGES = {"0": 0.0, "I": 1.0, "II": 2.0, "III": 3.0, "IV": 4.0}
EXPR_SUFFIX, CLIN_SUFFIX = "_expression.csv.gz", "_clinical.csv.gz"  # an ICB cohort's two files
CLIN_OPTIONAL = ("age", "sex", "stage", "TMB_perMb", "response", "recist", "survival_time_os",
                 "event_occurred_os")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclasses.dataclass
class TabularData:
    """One row per patient of the loaded cohorts: omics, clinical values, labels, signatures."""

    patient_ids: np.ndarray            # [n] str
    cohort: np.ndarray                 # [n] str
    omics: np.ndarray                  # [n, G] float32
    feature_names: list[str]
    feature_kinds: np.ndarray          # [G] str: rnaseq / cnv / mut / expr
    clinical: np.ndarray               # [n, C] float32, NaN = missing
    clinical_names: list[str]
    label: np.ndarray                  # [n] float (NaN = none)
    time: np.ndarray                   # [n] float months (NaN = none)
    event: np.ndarray                  # [n] float 1 = observed
    signatures: dict                   # name -> [n] float
    signature_genes: dict              # name -> genes used

    def subset(self, rows: np.ndarray) -> "TabularData":
        rows = np.asarray(rows)
        return dataclasses.replace(
            self, patient_ids=self.patient_ids[rows], cohort=self.cohort[rows],
            omics=self.omics[rows], clinical=self.clinical[rows], label=self.label[rows],
            time=self.time[rows], event=self.event[rows],
            signatures={k: v[rows] for k, v in self.signatures.items()})

    def __len__(self) -> int:
        return len(self.patient_ids)


def _read(path: str) -> pd.DataFrame:
    if not os.path.exists(path):
        raise FinetuneError(f"data file {path} does not exist (config.data.path wrong?)")
    return pd.read_csv(path)


def _zscore(x: np.ndarray) -> np.ndarray:
    sd = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def _signatures(expr: pd.DataFrame, z: pd.DataFrame) -> tuple[dict, dict]:
    """expr/z: patients x genes (raw log scale / standardised)."""
    sig, genes = {}, {}
    if "CD274" in expr:
        sig["CD274"], genes["CD274"] = expr["CD274"].to_numpy(float), ["CD274"]
    g = [x for x in IFNG6 if x in z]
    if g:
        sig["IFNG6"], genes["IFNG6"] = z[g].mean(axis=1).to_numpy(float), g
    g = [x for x in CYT if x in expr]
    if g:
        sig["CYT"], genes["CYT"] = expr[g].mean(axis=1).to_numpy(float), g
    return sig, genes


def _stage(s: pd.Series) -> np.ndarray:
    return s.map(lambda v: STAGES.get(str(v).strip().upper().rstrip("ABC"), np.nan)
                 if pd.notna(v) else np.nan).to_numpy(float)


def _drop_empty_clinical(clin: pd.DataFrame) -> pd.DataFrame:
    return clin.loc[:, clin.notna().any(axis=0)]


def icb_cohorts(data_dir: str) -> list[str]:
    """Every cohort with both files in `data_dir`/icb (the six visible ones and any added)."""
    folder = os.path.join(data_dir, "icb")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(n[:-len(EXPR_SUFFIX)] for n in names if n.endswith(EXPR_SUFFIX)
                  and f"{n[:-len(EXPR_SUFFIX)]}{CLIN_SUFFIX}" in names)


def read_icb_cohort(data_dir: str, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(expression genes x patients indexed by gene, clinical table) of the cohort `name`:
    `<name>_expression.csv.gz` (column `gene`, then one column per patient) and
    `<name>_clinical.csv.gz` (one row per patient, column `patientid` in the same order) in
    `data_dir`/icb. Clinical columns the loader reads but the file lacks (CLIN_OPTIONAL) are
    missing values."""
    if not NAME_RE.fullmatch(name):
        raise FinetuneError(f"config.data.cohorts: {name!r} is not a cohort name (letters, "
                            "digits, '_', '-', '.')")
    folder = os.path.join(data_dir, "icb")
    paths = [os.path.join(folder, f"{name}{s}") for s in (EXPR_SUFFIX, CLIN_SUFFIX)]
    if not all(os.path.isfile(p) for p in paths):
        raise FinetuneError(f"config.data.cohorts: unknown ICB cohort {name!r}: no "
                            f"{paths[0]} and {os.path.basename(paths[1])}; cohorts found "
                            f"there: {icb_cohorts(data_dir)}")
    e, k = _read(paths[0]), _read(paths[1])
    for df, col, p in ((e, "gene", paths[0]), (k, "patientid", paths[1])):
        if col not in df.columns:
            raise FinetuneError(f"{p}: no column {col!r} (columns {list(df.columns[:6])})")
    e = e.set_index("gene")
    if e.index.duplicated().any():
        raise FinetuneError(f"{paths[0]}: gene {e.index[e.index.duplicated()][0]!r} appears "
                            "twice")
    try:
        e = e.astype(float)
    except ValueError as err:
        raise FinetuneError(f"{paths[0]}: a non-numeric expression value ({err})") from None
    if list(e.columns) != k["patientid"].astype(str).tolist():
        raise FinetuneError(f"ICB cohort {name}: the expression columns and the clinical "
                            "patientid column differ (same patients, same order needed)")
    for col in CLIN_OPTIONAL:
        if col not in k.columns:
            k[col] = np.nan
    return e, k


def load_icb(data_dir: str, cohorts: list[str], clinical: list[str],
             label: str = "response") -> TabularData:
    """ICB cohorts -> TabularData; label `response` (R 1 / NR 0 / NaN) or `recist` (best
    RECIST response CR 0 / PR 1 / SD 2 / PD 3 / NaN); OS as survival."""
    if label not in ("response", "recist"):
        raise FinetuneError(f"config.data.label={label!r}: use response or recist")
    exprs, clins = [], []
    for c in cohorts:
        e, k = read_icb_cohort(data_dir, c)
        exprs.append(e.T)
        clins.append(k.assign(_cohort=c))
    genes = sorted(set.intersection(*[set(e.columns) for e in exprs]))
    zs = [pd.DataFrame(_zscore(e[genes].to_numpy(float)), index=e.index, columns=genes)
          for e in exprs]
    sigs = [_signatures(e, z) for e, z in zip(exprs, zs)]
    names = set.intersection(*[set(s[0]) for s in sigs])
    k = pd.concat(clins, ignore_index=True)
    table = pd.DataFrame(index=k.index)
    table["age"] = pd.to_numeric(k["age"], errors="coerce")
    table["sex_male"] = k["sex"].map({"M": 1.0, "F": 0.0})
    table["stage"] = _stage(k["stage"])
    table["log_tmb"] = np.log1p(pd.to_numeric(k["TMB_perMb"], errors="coerce"))
    unknown = [c for c in clinical if c not in table]
    if unknown:
        raise FinetuneError(f"config.data.clinical: unknown ICB variable(s) {unknown}; choose "
                            f"from {list(table.columns)}")
    table = _drop_empty_clinical(table[list(clinical)])
    return TabularData(
        patient_ids=k["patientid"].astype(str).to_numpy(),
        cohort=k["_cohort"].to_numpy(),
        omics=np.concatenate([z.to_numpy(np.float32) for z in zs]),
        feature_names=genes, feature_kinds=np.array(["expr"] * len(genes)),
        clinical=table.to_numpy(np.float32), clinical_names=list(table.columns),
        label=(k["response"].map({"R": 1.0, "NR": 0.0}) if label == "response" else
               k["recist"].map(RECIST)).to_numpy(float),
        time=pd.to_numeric(k["survival_time_os"], errors="coerce").to_numpy(float),
        event=pd.to_numeric(k["event_occurred_os"], errors="coerce").to_numpy(float),
        signatures={n: np.concatenate([s[0][n] for s in sigs]) for n in sorted(names)},
        signature_genes={n: sigs[0][1][n] for n in sorted(names)})


def load_tcga(data_dir: str, cancer: str, kinds: list[str], clinical: list[str]) -> TabularData:
    """One TCGA type -> TabularData (survival; label = event)."""
    cancer = cancer.lower()
    if cancer not in TCGA_TYPES:
        raise FinetuneError(f"config.data.cancer={cancer!r}: choose one of {list(TCGA_TYPES)}")
    bad = [k for k in kinds if k not in ("rnaseq", "cnv", "mut")]
    if bad:
        raise FinetuneError(f"config.data.omics_kinds: unknown {bad}; use rnaseq, cnv, mut")
    df = _read(os.path.join(data_dir, "tcga", f"tcga_{cancer}_multiomics.csv.gz"))
    blocks, names, fkinds = [], [], []
    for kind in kinds:
        cols = [c for c in df.columns if c.endswith(f"_{kind}")]
        x = df[cols].to_numpy(np.float64)
        if kind == "rnaseq":
            x = np.sign(x) * np.log1p(np.abs(x))
        elif kind == "cnv":
            x = x / 2.0
        keep = x.std(axis=0) > 0
        blocks.append(x[:, keep])
        names += [c for c, k in zip(cols, keep) if k]
        fkinds += [kind] * int(keep.sum())
    table = pd.DataFrame(index=df.index)
    table["age"] = pd.to_numeric(df["age"], errors="coerce")
    table["sex_female"] = pd.to_numeric(df["is_female"], errors="coerce")
    if cancer == "blca":
        st = _read(os.path.join(data_dir, "tcga", "survpath_tcga_blca_clinical.csv.gz"))
        st = st.drop_duplicates("case_id").set_index("case_id")["stage"]
        table["stage"] = _stage(df["case_id"].map(st))
    else:
        table["stage"] = np.nan
    unknown = [c for c in clinical if c not in table]
    if unknown:
        raise FinetuneError(f"config.data.clinical: unknown TCGA variable(s) {unknown}; choose "
                            f"from {list(table.columns)}")
    table = _drop_empty_clinical(table[list(clinical)])
    expr = pd.DataFrame({c[:-7]: df[c].to_numpy(float) for c in df.columns
                         if c.endswith("_rnaseq")})
    expr = np.sign(expr) * np.log1p(expr.abs())
    sig, sig_genes = _signatures(expr, pd.DataFrame(_zscore(expr.to_numpy()),
                                                    columns=expr.columns))
    return TabularData(
        patient_ids=df["case_id"].astype(str).to_numpy(),
        cohort=np.array([cancer.upper()] * len(df)),
        omics=(np.concatenate(blocks, axis=1).astype(np.float32) if blocks
               else np.zeros((len(df), 0), np.float32)),
        feature_names=names, feature_kinds=np.array(fkinds),
        clinical=table.to_numpy(np.float32), clinical_names=list(table.columns),
        label=1.0 - df["censorship"].to_numpy(float),
        time=df["survival_months"].to_numpy(float),
        event=1.0 - df["censorship"].to_numpy(float),
        signatures=sig, signature_genes=sig_genes)


def load_tcga_pooled(data_dir: str, cancers: list[str], kinds: list[str],
                     clinical: list[str]) -> TabularData:
    """Several TCGA types as one cohort (`data.cancer = "blca+luad+kirc"`): the omics features
    every type has (each type's own non-constant columns, intersected by name; the `_rnaseq`
    genes are nearly the same in the three tables, the mutation and CNV panels differ), the
    union of the clinical variables (NaN where a type lacks one: stage is BLCA's only) plus a
    0/1 indicator per type but the first (cancer type carries much of the risk), and each
    type's signatures as scored within it. `cohort` keeps the type, so the CV folds are
    stratified by type and event."""
    parts = [load_tcga(data_dir, c, kinds, clinical) for c in cancers]
    common = set(parts[0].feature_names).intersection(*(p.feature_names for p in parts[1:]))
    names = [n for n in parts[0].feature_names if n in common]
    kind_of = dict(zip(parts[0].feature_names, parts[0].feature_kinds))
    clin_names = [c for c in clinical if any(c in p.clinical_names for p in parts)]
    clin = []
    for p in parts:
        col = {n: i for i, n in enumerate(p.feature_names)}
        p.omics = p.omics[:, [col[n] for n in names]]
        at = {n: i for i, n in enumerate(p.clinical_names)}
        clin.append(np.stack([p.clinical[:, at[c]] if c in at else np.full(len(p), np.nan)
                              for c in clin_names], axis=1).astype(np.float32))
    types = [c.upper() for c in cancers]
    cohort = np.concatenate([p.cohort for p in parts])
    onehot = np.stack([(cohort == t).astype(np.float32) for t in types[1:]], axis=1)
    sig_names = sorted(set(parts[0].signatures).intersection(*(p.signatures for p in parts)))
    return TabularData(
        patient_ids=np.concatenate([p.patient_ids for p in parts]), cohort=cohort,
        omics=np.concatenate([p.omics for p in parts]), feature_names=names,
        feature_kinds=np.array([kind_of[n] for n in names]),
        clinical=np.concatenate([np.concatenate(clin), onehot], axis=1),
        clinical_names=clin_names + [f"type_{t}" for t in types[1:]],
        label=np.concatenate([p.label for p in parts]),
        time=np.concatenate([p.time for p in parts]),
        event=np.concatenate([p.event for p in parts]),
        signatures={k: np.concatenate([p.signatures[k] for p in parts]) for k in sig_names},
        signature_genes={k: parts[0].signature_genes[k] for k in sig_names})


def apply_label_file(data: TabularData, path: str) -> TabularData:
    """Replace labels by those of a CSV `patient_id,label`; keep only its patients."""
    lab = _read(path)
    if list(lab.columns[:2]) != ["patient_id", "label"]:
        raise FinetuneError(f"label file {path}: needs columns patient_id,label, has "
                            f"{list(lab.columns)}")
    ids = lab["patient_id"].astype(str).to_numpy()
    index = {p: i for i, p in enumerate(data.patient_ids)}
    missing = [p for p in ids if p not in index]
    if missing:
        raise FinetuneError(f"label file {path}: {len(missing)} of {len(ids)} patients have no "
                            f"features in the chosen data (e.g. {missing[:5]}); patient ids "
                            "must match the feature table's")
    if len(set(ids)) != len(ids):
        raise FinetuneError(f"label file {path}: duplicate patient ids")
    out = data.subset(np.array([index[p] for p in ids]))
    out.label = pd.to_numeric(lab["label"], errors="coerce").to_numpy(float)
    return out
