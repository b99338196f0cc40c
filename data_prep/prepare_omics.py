"""Prepare omics tables for masked gene modelling: one ArrayRecord record per sample.

    python -m data_prep.prepare_omics --input FILE[:MODALITY] [--input ...] --out DIR
        --expression-transform {log1p,cpm_log1p,tpm_log1p,signed_log1p,none}
        [--normalise pooled|per-input] [--source-ids] [--clinical FILE]
        [--patient-column NAME] [--vocab VOCAB.tsv] [--overwrite] ...

Inputs: CSV/TSV (gzip ok), Parquet, AnnData .h5ad (layouts: `data_prep.omics_tables`). MODALITY
is expression, mutation or cnv; without it, columns named `<GENE>_rnaseq/_mut/_cnv`
(--suffix-map) give the modality and a table without such columns is all expression.

How several inputs combine (--combine auto): inputs are taken in order; an input whose
modalities do not overlap those of the current group joins it (same samples, matched on sample
id: --join exact requires identical sample sets, --join inner keeps the intersection and
reports what it dropped); an input that repeats a modality starts a new group. Groups are
stacked (different samples; a sample id in two groups is an error). So the three TCGA
multi-omics tables stack, `expr.csv:expression mut.csv:mutation` join. --combine stack / join
force one or the other. A sample has tokens for the features its group has; one gene has one id
across modalities (TP53_mut and TP53_rnaseq share TP53's id).

Values: expression goes through --expression-transform (per file; given once per --input, each
input its own), then is z-scored per gene with the mean and (population) std of the TRAINING
split only (std floored at --std-floor so constant genes stay finite; a gene with no training
value gets no tokens) and clipped to +-clip. --normalise pooled fits one mean/std per gene over
all inputs; --normalise per-input fits them per source (each stacked input on its own: studies
measure on different scales, see data_prep.omics_stats), and stats.json lists every source's.
Its class is its quantile bin: --n-bins bins whose n_bins - 1 edges are quantiles of all
training expression z-scores, class = number of edges <= value. Mutation: 0/1 (class = value).
CNV: call -2..2 (class = call + 2).
--n-bins 51 follows scGPT's value binning (Cui et al., Nat Methods 2024; its released
checkpoints were trained with n_bins=51, their args.json; scGPT's edges are per cell, ours are
global over the training split so a class means the same z-score in every sample): each bin
holds ~2% of training tokens, fine enough that a bin spans about 0.05 std near the median while
leaving a 51-way classification the model can learn.

Splits: by patient (--patient-column; default: each sample is its own patient); a patient goes
to test if u < test_fraction, to val if u < test_fraction + val_fraction, else to train, where
u = first 8 bytes of sha256("seed:patient") / 2^64. A patient's split does not depend on the
other patients, so adding data later never moves anyone between splits.

Several studies in one corpus (TCGA + every ICB cohort: docs/omics.md, configs/omics_mgm.py:pan):
--source-ids makes sample ids `<file name>:<id>` where studies reuse ids; the manifest's
`sources` says what each source gave (samples per split, genes per modality, transform).

Output (--out, written to a temp folder beside it and renamed at the end): `{split}-IIIII-of-
NNNNN.arrayrecord` shards of `cfm.data.omics_records` records, `vocab.tsv`, `stats.json`,
`clinical.csv`, `manifest.json`; read them with `cfm.data.omics_source`. Exit status 0, or 2
with a message naming file/column/row for bad input (nothing is left on disk).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import sys
import time

import numpy as np

from cfm import cli_help, preemption
from cfm.atomic import atomic_folder
from cfm.data.omics_records import MODALITIES, encode_sample
from cfm.data.omics_source import FORMAT
from cfm.version import cfm_version
from data_prep import omics_sources
from data_prep import omics_tables as ot
from data_prep.cli import parse_args
from data_prep.omics_combine import combine, dedupe
from data_prep.omics_files import OmicsInputError, log, read_clinical
from data_prep.omics_stats import NORMALISE, bin_edges, fit_expression, fit_per_source
from data_prep.omics_values import TRANSFORMS, check_values, fill_missing, transform_expression
from data_prep.omics_vocab import build_vocab, map_genes
from data_prep.shard_io import ShardWriter, _file_sha256, balanced_sizes

SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------- writing
def split_writer(folder: str, split: str, total: int, per_shard: int) -> ShardWriter:
    """One split's size-balanced shards {split}-IIIII-of-NNNNN.arrayrecord (the split's sample
    count is known up front), logging progress after each shard."""
    n = math.ceil(total / per_shard)
    files = [f"{split}-{i:05d}-of-{n:05d}.arrayrecord" for i in range(n)]
    return ShardWriter(folder, files, balanced_sizes(total, n), on_shard=lambda w: log(
        f"{split}: {w.written}/{w.total} samples written ({w.shard}/{len(w.files)} shards)"))


def _write(folder: str, name: str, data: bytes) -> None:
    path = os.path.join(folder, name)
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


# ----------------------------------------------------------------------------- the run
def read_inputs(args) -> tuple[list, list, dict | None]:
    """The omics tables (checked), the --clinical tables and the gene lengths."""
    suffix_map = ot.parse_suffix_map(args.suffix_map)
    clinical_columns = tuple(c for c in (args.clinical_columns or "").split(",") if c)
    layout = {"auto": "auto", "samples_by_genes": "samples x genes",
              "genes_by_samples": "genes x samples"}[args.orientation]
    tables, transforms = [], omics_sources.input_transforms(args)
    for spec, transform in zip(args.input, transforms):
        path, modality = ot.split_input_spec(spec)
        t0 = time.time()
        table = ot.read_table(path, modality, orientation=layout, suffix_map=suffix_map,
                              sample_column=args.sample_column,
                              patient_column=args.patient_column,
                              clinical_columns=clinical_columns, layer=args.layer)
        counts = {m: len(table.columns_of(m)) for m in table.modalities()}
        log(f"read {table.name} ({table.layout}): {len(table.sample_ids)} samples, features "
            f"{counts}, {table.clinical.shape[1]} clinical columns ({time.time() - t0:.1f} s)")
        if "expression" in counts and transform is None:
            raise OmicsInputError(f"{path} has expression values: choose "
                                  "--expression-transform (log1p for counts, cpm_log1p, "
                                  "tpm_log1p, signed_log1p for z-score-like tables such as "
                                  "TCGA _rnaseq, none for values already on a log scale)")
        check_values(table, args.fill_missing, transform)
        if args.source_ids:
            omics_sources.prefix_ids(table, args.patient_column)
        tables.append(table)
    extra = [(p, *read_clinical(p, args.clinical_sample_column)) for p in args.clinical]
    lengths = ot.read_gene_lengths(args.gene_lengths) if args.gene_lengths else None
    return tables, extra, lengths


def assign_splits(patients: list[str], seed: int, val: float, test: float) -> list[str]:
    """train/val/test per patient from sha256(seed:patient) (see the module docstring)."""
    out = []
    for patient in patients:
        digest = hashlib.sha256(f"{seed}:{patient}".encode("utf-8")).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
        out.append("test" if u < test else "val" if u < test + val else "train")
    return out


def patients_of(args, tables, extra, clinical) -> list[str]:
    """Patient id per sample (clinical order)."""
    sample_ids = list(clinical.index)
    if args.patient_column is None:
        return sample_ids
    if args.patient_column in clinical.columns:
        values = clinical[args.patient_column]
        bad = [s for s, v in zip(sample_ids, values) if str(v).strip() in ("", "nan", "None")]
        if bad:
            raise OmicsInputError(f"--patient-column {args.patient_column!r} is empty for "
                                  f"{len(bad)} samples, e.g. {bad[:3]}")
        return [str(v).strip() for v in values]
    if args.patient_column in {t.id_column for t in tables} | {c for _, _, c in extra}:
        return sample_ids  # the patient column is the sample id column (TCGA case_id)
    raise OmicsInputError(f"--patient-column {args.patient_column!r} is not a column of the "
                          f"inputs (clinical columns: {list(clinical.columns[:10])})")


def group_matrices(args, tables, groups, group_ids, gene_ids, split_of, lengths, repairs):
    """Per group (values [samples, features], gene ids, modality indices, train mask): missing
    cells filled, expression transformed, duplicates resolved."""
    filled, transforms = 0, omics_sources.input_transforms(args)
    for g, group in enumerate(groups):
        train_rows = np.array([split_of[s] == "train" for s in group_ids[g]])
        for k in group:
            filled += fill_missing(tables[k], args.fill_missing, train_rows)
            if transforms[k]:
                transform_expression(tables[k], transforms[k], lengths)
    if filled:
        repairs[f"--fill-missing {args.fill_missing}: cells filled"] = filled
    skipped = sum(int(np.isnan(t.values).sum()) for t in tables)
    if args.fill_missing == "skip" and skipped:
        repairs["--fill-missing skip: missing cells left out (no token)"] = skipped
    mod_index = {m: i for i, m in enumerate(MODALITIES)}
    out = []
    for g, group in enumerate(groups):
        values = np.concatenate([tables[k].values for k in group], axis=1)
        genes = np.concatenate([gene_ids[k] for k in group])
        mods = np.array([mod_index[m] for k in group for m in tables[k].modality], np.int64)
        names = [f"{tables[k].name}:{n}" for k in group for n in tables[k].names]
        values, genes, mods = dedupe(values, genes, mods, names, args.duplicates, repairs)
        out.append((values, genes, mods, np.array([split_of[s] == "train"
                                                   for s in group_ids[g]])))
    return out


def write_records(groups_data, group_ids, edges, split_of, patient_of, where, writers):
    """Encode every sample into its split's writer; returns (max tokens, modalities present)."""
    max_tokens, present = 0, set()
    for g, (values, genes, mods, _) in enumerate(groups_data):
        order = np.lexsort((mods, genes))  # vocab-id order; a gene's modalities in MODALITIES
        values, genes, mods = values[:, order].astype(np.float32), genes[order], mods[order]
        classes = np.zeros(values.shape, np.uint8)
        exp = mods == 0
        classes[:, exp] = np.searchsorted(edges, values[:, exp].astype(np.float64), "right")
        classes[:, mods == 1] = np.nan_to_num(values[:, mods == 1])
        classes[:, mods == 2] = np.nan_to_num(values[:, mods == 2]) + 2
        for i, sid in enumerate(group_ids[g]):
            ok = ~np.isnan(values[i])
            if not ok.any():
                raise OmicsInputError(f"sample {sid!r} ({where[g]}) has no non-missing feature")
            present |= set(mods[ok].tolist())
            max_tokens = max(max_tokens, int(ok.sum()))
            meta = {"sample_id": sid, "patient_id": patient_of[sid], "split": split_of[sid]}
            writers[split_of[sid]].write(encode_sample(meta, genes[ok], mods[ok], values[i, ok],
                                                       classes[i, ok]))
    for split, writer in writers.items():
        if writer.close() != writer.total:  # a bug, not bad input
            raise RuntimeError(f"{split}: wrote {writer.written} of {writer.total} samples")
    return max_tokens, present


def prepare(args, out_tmp: str) -> dict:
    """Everything but the final rename: read, check, combine, fit, write into out_tmp."""
    start, repairs = time.time(), {}
    tables, extra, lengths = read_inputs(args)
    groups, group_ids, clinical = combine(args, tables, extra, repairs)
    sample_ids = list(clinical.index)
    patients = patients_of(args, tables, extra, clinical)
    splits = assign_splits(patients, args.seed, args.val_fraction, args.test_fraction)
    if "train" not in splits:
        raise OmicsInputError("no sample fell into the training split; lower --val-fraction / "
                              "--test-fraction or add samples")
    split_of, patient_of = dict(zip(sample_ids, splits)), dict(zip(sample_ids, patients))
    vocab = build_vocab(args, tables)
    gene_ids = map_genes(tables, vocab, args.drop_unknown_genes, repairs)
    groups_data = group_matrices(args, tables, groups, group_ids, gene_ids, split_of, lengths,
                                 repairs)
    where = [", ".join(tables[k].name for k in group) for group in groups]
    transforms = [omics_sources.group_transform(omics_sources.input_transforms(args), group,
                                                tables) for group in groups]
    if args.normalise == "per-input":
        expression = fit_per_source(groups_data, where, transforms, len(vocab),
                                    args.std_floor, args.clip, repairs)
    else:
        expression = fit_expression(groups_data, len(vocab), args.std_floor, args.clip, repairs)
    edges = bin_edges(groups_data, args.n_bins, args.seed)
    sources = omics_sources.summary(groups_data, where, split_of, group_ids, transforms)
    writers = {s: split_writer(out_tmp, s, splits.count(s), args.samples_per_shard)
               for s in SPLITS}
    max_tokens, present = write_records(groups_data, group_ids, edges, split_of, patient_of,
                                        where, writers)

    _write(out_tmp, "vocab.tsv", vocab.tsv())
    transform = ("per-input" if args.normalise == "per-input"
                 else (args.expression_transform or [None])[0])
    stats = {"expression": {"transform": transform, "clip": args.clip,
                            "std_floor": args.std_floor, **expression},
             "bin_edges": [float(e) for e in edges], "n_bins": args.n_bins}
    _write(out_tmp, "stats.json", json.dumps(stats).encode("utf-8"))
    table = clinical.rename(columns={c: f"{c}_input" for c in clinical.columns
                                     if c in ("sample_id", "patient_id", "split")})
    table.insert(0, "split", splits)
    table.insert(0, "patient_id", patients)
    table.insert(0, "sample_id", sample_ids)
    _write(out_tmp, "clinical.csv", table.to_csv(index=False).encode("utf-8"))
    genes_per_modality = {name: len(set().union(*(genes[mods == m].tolist()
                                                  for _, genes, mods, _ in groups_data)))
                          for m, name in enumerate(MODALITIES) if m in present}
    inputs = [{"name": t.name, "sha256": _file_sha256(t.path), "role": "omics",
               "layout": t.layout, "samples": len(t.sample_ids),
               "features": {m: len(t.columns_of(m)) for m in t.modalities()}} for t in tables]
    for role, paths in (("clinical", args.clinical), ("vocab", [args.vocab] * bool(args.vocab)),
                        ("gene_lengths", [args.gene_lengths] * bool(args.gene_lengths))):
        inputs += [{"name": os.path.basename(p), "sha256": _file_sha256(p), "role": role}
                   for p in paths]
    manifest = {
        "format": FORMAT, "vocab_size": len(vocab), "n_bins": args.n_bins,
        "modalities": [MODALITIES[m] for m in sorted(present)], "max_tokens": max_tokens,
        "splits": {s: {"files": writers[s].files, "samples": splits.count(s),
                       "patients": len({p for p, x in zip(patients, splits) if x == s})}
                   for s in SPLITS},
        "genes_per_modality": genes_per_modality, "groups": where, "repairs": repairs,
        "normalise": args.normalise, "sources": sources,
        "inputs": inputs, "options": vars(args),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cfm_version": cfm_version(), "seconds": round(time.time() - start, 2)}
    _write(out_tmp, "manifest.json", json.dumps(manifest, indent=1).encode("utf-8"))
    return manifest


# ----------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = cli_help.parser("data_prep.prepare_omics", __doc__,
                        "python -m data_prep.prepare_omics --input counts.csv:expression "
                        "--expression-transform log1p --out /tmp/cfm_omics")
    p.add_argument("--input", action="append", required=True, metavar="FILE[:MODALITY]",
                   help="omics table (.csv/.tsv[.gz], .parquet, .h5ad); repeat for several")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared --out")
    p.add_argument("--orientation", default="auto",
                   choices=("auto", "samples_by_genes", "genes_by_samples"),
                   help="table layout (auto: see data_prep.omics_tables)")
    p.add_argument("--sample-column", default=None,
                   help="sample id column of samples x genes tables (default: the first)")
    p.add_argument("--patient-column", default=None,
                   help="patient id column (default: each sample is its own patient)")
    p.add_argument("--clinical", action="append", default=[],
                   help="clinical table joined on sample id (e.g. ICB *_clinical.csv.gz); "
                   "repeat for several (default: none)")
    p.add_argument("--clinical-sample-column", default=None,
                   help="sample id column of --clinical tables (default: the first)")
    p.add_argument("--clinical-columns", default="",
                   help="comma list of non-feature columns of plain samples x genes tables "
                   "(default: none)")
    p.add_argument("--suffix-map", default=ot.DEFAULT_SUFFIXES,
                   help="column-name suffix -> modality")
    p.add_argument("--layer", default=None,
                   help=".h5ad layer to read instead of X (default: X)")
    p.add_argument("--combine", default="auto", choices=("auto", "stack", "join"),
                   help="how several inputs combine (see above)")
    p.add_argument("--join", default="exact", choices=("exact", "inner"),
                   help="joined inputs: identical sample sets, or their intersection")
    p.add_argument("--vocab", default=None,
                   help="reuse a previous run's vocab.tsv (default: a new vocabulary)")
    p.add_argument("--drop-unknown-genes", action="store_true",
                   help="with --vocab: drop genes it lacks instead of failing")
    p.add_argument("--duplicates", default="error", choices=("error", "first", "mean"),
                   help="features with the same gene and modality: fail, keep the first or "
                   "average")
    p.add_argument("--fill-missing", default="error", choices=("error", "zero", "median", "skip"),
                   help="what to do with missing values")
    p.add_argument("--expression-transform", action="append", default=None,
                   choices=TRANSFORMS,
                   help="transform of expression values: once for every input, or once per "
                   "--input in order (default: none given; required when an input has "
                   "expression)")
    p.add_argument("--normalise", default="pooled", choices=NORMALISE,
                   help="expression z-scores with statistics pooled over all inputs, or per "
                   "source (per-input: each stacked input its own training mean/std)")
    p.add_argument("--source-ids", action="store_true",
                   help="prefix each sample id with its file name (<name>:<id>), for studies "
                   "that reuse ids such as Pt1 (stacked inputs only)")
    p.add_argument("--gene-lengths", default=None,
                   help="gene, length (bp) table for TPM (default: none; tpm_log1p needs it)")
    p.add_argument("--std-floor", type=float, default=0.01,
                   help="minimum per-gene std in transformed units")
    p.add_argument("--clip", type=float, default=10.0, help="clip z-scores to +-this")
    p.add_argument("--n-bins", type=int, default=51, help="expression classes (2-256)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of patients in val")
    p.add_argument("--test-fraction", type=float, default=0.1,
                   help="share of patients in test")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient split")
    p.add_argument("--samples-per-shard", type=int, default=1000,
                   help="records per ArrayRecord shard")
    return p


def _usage_error(args) -> str | None:
    if not (0 <= args.val_fraction < 1 and 0 <= args.test_fraction < 1
            and args.val_fraction + args.test_fraction < 1):
        return "--val-fraction and --test-fraction must be >= 0 with a sum < 1"
    if not 2 <= args.n_bins <= 256:
        return "--n-bins must be in [2, 256] (classes are uint8)"
    if not args.clip > 0 or not args.std_floor > 0:
        return "--clip and --std-floor must be > 0"
    if args.samples_per_shard < 1:
        return "--samples-per-shard must be >= 1"
    if args.drop_unknown_genes and not args.vocab:
        return "--drop-unknown-genes needs --vocab"
    problem = omics_sources.usage_error(args)
    if problem:
        return problem
    out = os.path.abspath(args.out)
    if os.path.exists(out):
        if not args.overwrite:
            return f"--out {args.out} exists; add --overwrite to replace it"
        if not os.path.isdir(out) or (os.listdir(out) and not os.path.isfile(
                os.path.join(out, "manifest.json"))):
            return (f"--out {args.out} exists and is not a prepared omics folder; refusing to "
                    "replace it")
    if not os.path.isdir(os.path.dirname(out)):
        return f"the folder of --out {args.out} does not exist"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns 0, 2 for bad usage or input, 1 if writing failed."""
    args, status = parse_args(_parser(), argv, _usage_error, "prepare_omics")
    if args is None:
        return status
    out = os.path.abspath(args.out)
    try:  # SIGTERM / SIGINT: the staging folder is removed, one line, exit 143 / 130
        with preemption.stop_on_signals("prepare_omics", preemption.folder_kept(out)), \
                atomic_folder(out) as tmp:  # an existing --out is replaced only on success
            manifest = prepare(args, tmp)
    except OmicsInputError as err:
        print(f"prepare_omics: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"prepare_omics: cannot write {out}: {err}", file=sys.stderr)
        return 1
    sp = manifest["splits"]
    log("done: " + ", ".join(f"{s} {sp[s]['samples']} samples / {sp[s]['patients']} patients"
                             for s in SPLITS)
        + f"; genes per modality {manifest['genes_per_modality']}; vocab "
          f"{manifest['vocab_size']}; max tokens {manifest['max_tokens']}; repairs "
          f"{manifest['repairs'] or 'none'}; {manifest['seconds']} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
