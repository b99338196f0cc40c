"""Several sources in one `data_prep.prepare_omics` corpus (e.g. TCGA and every ICB cohort):
the expression transform of each input (--expression-transform once for all, or once per
--input), sample ids made unique per source (--source-ids: two studies both call a patient
`Pt1`) and what the manifest says about each source."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from cfm.data.omics_records import MODALITIES

EXTENSIONS = (".gz", ".csv", ".tsv", ".txt", ".parquet", ".h5ad")


def input_transforms(args) -> list[str | None]:
    """--expression-transform of each --input: one value applies to every input."""
    given = args.expression_transform or [None]
    return list(given) if len(given) > 1 else given * len(args.input)


def usage_error(args) -> str | None:
    """What is wrong with the source options of a command line, or None."""
    given = args.expression_transform or []
    if len(given) > 1 and len(given) != len(args.input):
        return (f"--expression-transform is given {len(given)} times for {len(args.input)} "
                "--input: give it once (every input) or once per --input, in order")
    if len(set(given)) > 1 and args.normalise != "per-input":
        return ("different --expression-transform values leave the inputs on different "
                "scales; pooled statistics would mix them: add --normalise per-input")
    if args.source_ids and (args.clinical or args.combine == "join"):
        return ("--source-ids renames every input's samples, so --clinical tables and "
                "--combine join could no longer match them; use it with stacked inputs only")
    return None


def source_name(path: str) -> str:
    """The file name without its extensions: `Hugo_expression.csv.gz` -> `Hugo_expression`."""
    name = os.path.basename(path)
    while name.lower().endswith(EXTENSIONS):
        name = name[:name.rfind(".")]
    return name


def prefix_ids(table, patient_column: str | None) -> None:
    """--source-ids: the table's sample ids (and values of its patient column) become
    `<source name>:<id>`, unique across studies that reuse ids."""
    stem = source_name(table.path)
    table.sample_ids = [f"{stem}:{s}" for s in table.sample_ids]
    table.clinical.index = pd.Index(table.sample_ids, name="sample_id")
    if patient_column and patient_column in table.clinical.columns:
        values = table.clinical[patient_column]
        table.clinical[patient_column] = [v if pd.isna(v) or not str(v).strip() else
                                          f"{stem}:{str(v).strip()}" for v in values]


def group_transform(transforms: list[str | None], group: list[int], tables) -> str | None:
    """The transform of a source's expression (the one of its inputs that has expression)."""
    found = {transforms[k] for k in group if "expression" in tables[k].modality}
    return found.pop() if len(found) == 1 else (sorted(map(str, found)) or None)


def summary(groups_data, where: list[str], split_of: dict, group_ids: list[list[str]],
            transforms: list) -> list[dict]:
    """Per source, for the manifest (and so the export): its inputs, expression transform,
    samples per split and genes per modality the model saw from it."""
    out = []
    for g, (values, genes, mods, _) in enumerate(groups_data):
        splits = [split_of[s] for s in group_ids[g]]
        seen = ~np.isnan(values).all(axis=0)  # a column with a value in some sample
        out.append({"inputs": where[g], "transform": transforms[g], "samples": len(splits),
                    "samples_per_split": {s: splits.count(s) for s in ("train", "val", "test")},
                    "genes_per_modality": {name: len(set(genes[seen & (mods == m)].tolist()))
                                           for m, name in enumerate(MODALITIES)
                                           if (mods == m).any()}})
    return out
