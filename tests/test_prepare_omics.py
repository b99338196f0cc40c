"""data_prep.prepare_omics: tables -> ArrayRecord omics records, vocab, stats, splits, repairs
and every bad-input error; cfm.data.omics_source reads the result."""

import gzip
import json
import os
import pickle

import numpy as np
import pandas as pd
import pytest

from cfm.data.omics_records import MODALITIES
from cfm.data.omics_source import OmicsShardSource, read_manifest, read_stats, read_vocab
from data_prep import prepare_omics

SPLITS = ("train", "val", "test")


def run(capsys, *argv):
    """(exit status, stderr) of the CLI."""
    rc = prepare_omics.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def load(folder):
    """{sample_id: (meta, arrays)} of every split, plus the manifest."""
    manifest = read_manifest(folder)
    out = {}
    for split in SPLITS:
        source = OmicsShardSource(folder, split)
        assert len(source) == manifest["splits"][split]["samples"]
        for i in range(len(source)):
            meta, arrays = source[i]
            assert meta["split"] == split
            out[meta["sample_id"]] = (meta, arrays)
    return out, manifest


def leftovers(tmp_path):
    return sorted(n for n in os.listdir(tmp_path) if n.startswith("."))


def multiomics(n=40, seed=0, genes=("TP53", "EGFR", "KRAS", "MYC"), mut=("TP53", "KRAS"),
               cnv=("EGFR", "MYC"), prefix="S"):
    """A TCGA-like samples x genes table: clinical columns + _mut, _cnv, _rnaseq blocks."""
    rng = np.random.default_rng(seed)
    frame = {"case_id": [f"{prefix}{i:03d}" for i in range(n)],
             "patient": [f"P{prefix}{i // 2:03d}" for i in range(n)],  # two samples a patient
             "age": rng.integers(30, 90, n), "site": rng.choice(["A", "B"], n)}
    for g in mut:
        frame[f"{g}_mut"] = rng.integers(0, 2, n)
    for g in cnv:
        frame[f"{g}_cnv"] = rng.integers(-2, 3, n)
    for g in genes:
        frame[f"{g}_rnaseq"] = rng.standard_normal(n) * 3 + rng.exponential(5, n)
    return pd.DataFrame(frame)


def write(frame, path, **kw):
    frame.to_csv(path, index=False, **kw)
    return path


# ----------------------------------------------------------------------------- round trip
def test_round_trip_values_classes_splits_and_train_only_stats(tmp_path, capsys):
    frame = multiomics(60)
    src = write(frame, tmp_path / "t.csv.gz")
    out = tmp_path / "out"
    rc, err = run(capsys, "--input", src, "--out", out, "--expression-transform", "signed_log1p",
                  "--patient-column", "patient", "--val-fraction", 0.2, "--test-fraction", 0.2,
                  "--n-bins", 8, "--samples-per-shard", 7, "--seed", 3)
    assert rc == 0, err
    assert "done: train" in err and "samples written" in err
    samples, manifest = load(out)
    assert manifest["format"] == "cfm-omics/1" and manifest["n_bins"] == 8
    assert manifest["modalities"] == list(MODALITIES)
    assert manifest["max_tokens"] == 4 + 2 + 2
    assert manifest["genes_per_modality"] == {"expression": 4, "mutation": 2, "cnv": 2}
    assert sum(manifest["splits"][s]["samples"] for s in SPLITS) == 60
    assert all(manifest["splits"][s]["samples"] for s in SPLITS)
    train_files = manifest["splits"]["train"]["files"]
    n = len(train_files)
    assert n == -(-manifest["splits"]["train"]["samples"] // 7)
    assert train_files[0] == f"train-00000-of-{n:05d}.arrayrecord"
    first_input = manifest["inputs"][0]
    assert first_input["name"] == "t.csv.gz" and len(first_input["sha256"]) == 64
    assert manifest["options"]["n_bins"] == 8 and manifest["created"]
    # vocab: reserved rows, then genes sorted by symbol; one id per gene across modalities
    vocab = read_vocab(out / "vocab.tsv")
    assert [s for s, _ in vocab] == ["EGFR", "KRAS", "MYC", "TP53"]
    gid = {s: i + 2 for i, (s, _) in enumerate(vocab)}
    assert manifest["vocab_size"] == 6
    # splits: by patient, every sample of a patient in one split
    split_of_patient = {}
    for sid, (meta, _) in samples.items():
        assert split_of_patient.setdefault(meta["patient_id"], meta["split"]) == meta["split"]
        assert meta["patient_id"] == frame.set_index("case_id").loc[sid, "patient"]
    assert {m["split"] for m, _ in samples.values()} == set(SPLITS)
    # stats on the train split only, z-scores, clip and bins
    stats = read_stats(out)
    expr = stats["expression"]
    assert expr["transform"] == "signed_log1p" and expr["clip"] == 10.0
    train = frame[[samples[s][0]["split"] == "train" for s in frame.case_id]]
    edges = np.asarray(stats["bin_edges"])
    assert len(edges) == 7 and stats["n_bins"] == 8 and np.all(np.diff(edges) >= 0)
    z_train = []
    for g in ("TP53", "EGFR", "KRAS", "MYC"):
        k = expr["genes"].index(gid[g])
        x = np.sign(train[f"{g}_rnaseq"]) * np.log1p(np.abs(train[f"{g}_rnaseq"]))
        assert expr["mean"][k] == pytest.approx(x.mean(), rel=1e-9)
        assert expr["std"][k] == pytest.approx(x.std(ddof=0), rel=1e-9)
        allx = np.sign(frame[f"{g}_rnaseq"]) * np.log1p(np.abs(frame[f"{g}_rnaseq"]))
        assert expr["mean"][k] != pytest.approx(allx.mean(), rel=1e-6)  # not fitted on all
        z_train += list((x - x.mean()) / x.std(ddof=0))
    np.testing.assert_allclose(edges, np.quantile(np.float32(z_train), np.arange(1, 8) / 8),
                               rtol=1e-5, atol=1e-6)
    for _, row in frame.iterrows():
        meta, a = samples[row.case_id]
        assert list(a["gene_ids"]) == sorted(a["gene_ids"])  # vocab-id order
        for g, m, v, c in zip(a["gene_ids"], a["modality"], a["values"], a["classes"]):
            sym = vocab[g - 2][0]
            if MODALITIES[m] == "mutation":
                assert v == row[f"{sym}_mut"] and c == v
            elif MODALITIES[m] == "cnv":
                assert v == row[f"{sym}_cnv"] and c == v + 2
            else:
                k = expr["genes"].index(g)
                x = np.sign(row[f"{sym}_rnaseq"]) * np.log1p(abs(row[f"{sym}_rnaseq"]))
                z = np.clip((x - expr["mean"][k]) / expr["std"][k], -10, 10)
                assert v == pytest.approx(z, abs=1e-5)
                assert c == np.searchsorted(edges, np.float64(v), "right")
    clinical = pd.read_csv(out / "clinical.csv")
    assert list(clinical.columns) == ["sample_id", "patient_id", "split", "patient", "age",
                                      "site"]
    assert len(clinical) == 60
    # the same seed gives the same splits; another seed others
    rc, _ = run(capsys, "--input", src, "--out", tmp_path / "again", "--expression-transform",
                "signed_log1p", "--patient-column", "patient", "--val-fraction", 0.2,
                "--test-fraction", 0.2, "--n-bins", 8, "--seed", 3)
    assert rc == 0
    again = pd.read_csv(tmp_path / "again" / "clinical.csv")
    assert list(again.split) == list(clinical.split)
    rc, _ = run(capsys, "--input", src, "--out", tmp_path / "other", "--expression-transform",
                "signed_log1p", "--patient-column", "patient", "--seed", 4)
    assert list(pd.read_csv(tmp_path / "other" / "clinical.csv").split) != list(clinical.split)
    assert leftovers(tmp_path) == []


def test_shard_source_pickles_and_rejects_non_omics_folders(tmp_path, capsys):
    src = write(multiomics(12), tmp_path / "t.csv")
    rc, err = run(capsys, "--input", src, "--out", tmp_path / "out",
                  "--expression-transform", "none")
    assert rc == 0, err
    source = OmicsShardSource(tmp_path / "out", "train")
    first = source[0]
    clone = pickle.loads(pickle.dumps(source))
    assert clone[0][0] == first[0]
    with pytest.raises(IndexError):
        source[len(source)]
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        read_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OmicsShardSource(tmp_path / "nowhere", "train")
    (tmp_path / "tiles").mkdir()
    (tmp_path / "tiles" / "manifest.json").write_text('{"format": "tiles"}')
    with pytest.raises(ValueError, match="not a prepared omics folder"):
        read_manifest(tmp_path / "tiles")
    os.remove(tmp_path / "out" / source.files[0].split("/")[-1])
    with pytest.raises(FileNotFoundError, match="missing"):
        read_manifest(tmp_path / "out")


# ----------------------------------------------------------------------------- several inputs
def test_separate_modality_files_join_on_sample_id(tmp_path, capsys):
    ids = [f"S{i}" for i in range(10)]
    rng = np.random.default_rng(0)
    expr = pd.DataFrame(rng.poisson(20, (10, 3)), columns=["A", "B", "C"])
    expr.insert(0, "sample", ids)
    mut = pd.DataFrame(rng.integers(0, 2, (10, 2)), columns=["A", "D"])
    mut.insert(0, "sample", ids[::-1])  # other order: joined on id, not position
    e, m = write(expr, tmp_path / "expr.csv"), write(mut, tmp_path / "mut.tsv", sep="\t")
    rc, err = run(capsys, "--input", f"{e}:expression", "--input", f"{m}:mutation",
                  "--out", tmp_path / "out", "--expression-transform", "cpm_log1p")
    assert rc == 0, err
    assert "joined on sample id" in err
    samples, manifest = load(tmp_path / "out")
    assert manifest["genes_per_modality"] == {"expression": 3, "mutation": 2}
    vocab = [s for s, _ in read_vocab(tmp_path / "out" / "vocab.tsv")]
    assert vocab == ["A", "B", "C", "D"]
    meta, a = samples["S4"]
    assert list(a["gene_ids"]) == [2, 2, 3, 4, 5]  # A expression + A mutation share an id
    assert list(a["modality"]) == [0, 1, 0, 0, 1]
    assert a["values"][1] == mut.set_index("sample").loc["S4", "A"]
    assert a["values"][4] == mut.set_index("sample").loc["S4", "D"]
    # CPM: log1p(x / row total * 1e6), then z-scored with train stats
    stats = read_stats(tmp_path / "out")["expression"]
    row = expr.set_index("sample").loc["S4"].to_numpy(float)
    cpm = np.log1p(row / row.sum() * 1e6)
    z = (cpm[0] - stats["mean"][0]) / stats["std"][0]
    assert a["values"][0] == pytest.approx(z, abs=1e-5)
    # ids that do not line up: an error naming both files, or --join inner
    write(mut.iloc[2:], tmp_path / "mut.tsv", sep="\t")
    rc, err = run(capsys, "--input", f"{e}:expression", "--input", f"{m}:mutation",
                  "--out", tmp_path / "bad", "--expression-transform", "log1p")
    assert rc == 2 and "do not line up" in err and "mut.tsv" in err and "--join inner" in err
    rc, err = run(capsys, "--input", f"{e}:expression", "--input", f"{m}:mutation",
                  "--out", tmp_path / "inner", "--expression-transform", "log1p",
                  "--join", "inner")
    assert rc == 0, err
    manifest = read_manifest(tmp_path / "inner")
    assert sum(manifest["splits"][s]["samples"] for s in SPLITS) == 8
    assert manifest["repairs"] == {"--join inner: samples dropped from expr.csv": 2}
    assert leftovers(tmp_path) == [] and not (tmp_path / "bad").exists()


def test_stacked_tables_and_duplicate_sample_ids(tmp_path, capsys):
    a = write(multiomics(10, 0, mut=("TP53",), cnv=("EGFR",), prefix="A"), tmp_path / "a.csv")
    b = write(multiomics(12, 1, genes=("TP53", "EGFR", "BRAF"), mut=("BRAF", "NRAS"),
                         cnv=("MYC",), prefix="B"), tmp_path / "b.csv")
    rc, err = run(capsys, "--input", a, "--input", b, "--out", tmp_path / "out",
                  "--expression-transform", "signed_log1p", "--patient-column", "case_id")
    assert rc == 0, err
    assert "stacked 2 groups" in err
    samples, manifest = load(tmp_path / "out")
    assert len(samples) == 22
    vocab = [s for s, _ in read_vocab(tmp_path / "out" / "vocab.tsv")]
    assert vocab == ["BRAF", "EGFR", "KRAS", "MYC", "NRAS", "TP53"]
    a0 = samples["A000"][1]
    assert {(vocab[g - 2], MODALITIES[m]) for g, m in zip(a0["gene_ids"], a0["modality"])} == {
        ("TP53", "mutation"), ("EGFR", "cnv"), ("TP53", "expression"), ("EGFR", "expression"),
        ("KRAS", "expression"), ("MYC", "expression")}
    b0 = samples["B000"][1]
    assert len(b0["gene_ids"]) == 3 + 2 + 1
    assert manifest["max_tokens"] == 6
    assert samples["A000"][0]["patient_id"] == "A000"  # --patient-column = the sample column
    clinical = pd.read_csv(tmp_path / "out" / "clinical.csv")
    assert len(clinical) == 22 and "age" in clinical.columns
    # the same sample id in two stacked tables
    write(multiomics(3, 2, prefix="A"), tmp_path / "c.csv")
    rc, err = run(capsys, "--input", a, "--input", tmp_path / "c.csv", "--out",
                  tmp_path / "dup", "--expression-transform", "none")
    assert rc == 2 and "'A000'" in err and "a.csv" in err and "c.csv" in err
    assert not (tmp_path / "dup").exists() and leftovers(tmp_path) == []


def test_icb_style_genes_by_samples_with_clinical(tmp_path, capsys):
    rng = np.random.default_rng(0)
    expr = pd.DataFrame(np.log2(rng.exponential(10, (5, 6)) + 0.001),
                        columns=[f"Pt{i}" for i in range(6)])
    expr.insert(0, "gene", ["CD274", "PDCD1", "CTLA4", "CXCL9", "IFNG"])
    clin = pd.DataFrame({"patientid": [f"Pt{i}" for i in range(6)],
                         "response": ["R", "NR", None, "R", "NR", "R"], "age": range(60, 66)})
    e, c = write(expr, tmp_path / "e.csv.gz"), write(clin, tmp_path / "c.csv.gz")
    rc, err = run(capsys, "--input", e, "--clinical", c, "--patient-column", "patientid",
                  "--out", tmp_path / "out", "--expression-transform", "none")
    assert rc == 0, err
    assert "genes x samples" in err
    samples, manifest = load(tmp_path / "out")
    assert set(samples) == set(clin.patientid) and manifest["max_tokens"] == 5
    clinical = pd.read_csv(tmp_path / "out" / "clinical.csv")
    assert list(clinical.columns) == ["sample_id", "patient_id", "split", "response", "age"]
    assert list(clinical.response.fillna("")) == ["R", "NR", "", "R", "NR", "R"]
    write(clin.iloc[:4], c)
    rc, err = run(capsys, "--input", e, "--clinical", c, "--out", tmp_path / "bad",
                  "--expression-transform", "none")
    assert rc == 2 and "c.csv.gz" in err and "2 omics samples lack a row" in err
    rc, err = run(capsys, "--input", e, "--clinical", c, "--out", tmp_path / "inner",
                  "--expression-transform", "none", "--join", "inner")
    assert rc == 0 and read_manifest(tmp_path / "inner")["repairs"] == {
        "--join inner: samples without a row in c.csv.gz": 2}


def test_h5ad_sparse_with_versioned_ensembl_ids_and_parquet(tmp_path, capsys):
    anndata = pytest.importorskip("anndata")
    import scipy.sparse

    rng = np.random.default_rng(0)
    counts = scipy.sparse.random(20, 5, density=0.5, random_state=0, format="csr") * 50
    counts.data = np.round(counts.data)
    var = pd.DataFrame({"gene_ids": ["ENSG00000141510.16", "ENSG00000146648.18",
                                     "ENSG00000133703.12", "ENSG00000136997.21",
                                     "ENSG00000157764.14"]},
                       index=["TP53", "EGFR", "KRAS", "MYC", "BRAF"])
    obs = pd.DataFrame({"donor": [f"D{i // 4}" for i in range(20)],
                        "tissue": rng.choice(["lung", "skin"], 20)},
                       index=[f"cell{i}" for i in range(20)])
    adata = anndata.AnnData(X=counts.astype(np.float32), obs=obs, var=var)
    adata.write_h5ad(tmp_path / "x.h5ad")
    rc, err = run(capsys, "--input", tmp_path / "x.h5ad", "--out", tmp_path / "out",
                  "--expression-transform", "log1p", "--patient-column", "donor")
    assert rc == 0, err
    vocab = read_vocab(tmp_path / "out" / "vocab.tsv")
    assert vocab[0] == ("BRAF", "ENSG00000157764") and ("TP53", "ENSG00000141510") in vocab
    samples, manifest = load(tmp_path / "out")
    assert manifest["max_tokens"] == 5  # implicit zeros are values, not missing
    assert {m["patient_id"] for m, _ in samples.values()} == {f"D{i}" for i in range(5)}
    assert "tissue" in pd.read_csv(tmp_path / "out" / "clinical.csv").columns
    # the same genes by Ensembl id only (other versions), genes x samples Parquet, reusing the
    # vocab: ids match through the Ensembl ids
    dense = pd.DataFrame(counts.toarray().T, columns=[f"cell{i}" for i in range(20)])
    dense.insert(0, "gene_id", [g.split(".")[0] + ".1" for g in var.gene_ids])
    dense.to_parquet(tmp_path / "x.parquet", index=False)
    rc, err = run(capsys, "--input", tmp_path / "x.parquet", "--out", tmp_path / "pq",
                  "--expression-transform", "log1p", "--vocab", tmp_path / "out" / "vocab.tsv")
    assert rc == 0, err
    again, _ = load(tmp_path / "pq")
    for sid in samples:
        np.testing.assert_array_equal(again[sid][1]["gene_ids"], samples[sid][1]["gene_ids"])


# ----------------------------------------------------------------------------- repairs
def test_missing_values_error_and_repairs(tmp_path, capsys):
    frame = multiomics(20)
    frame.loc[5, "EGFR_rnaseq"] = np.nan
    frame.loc[7, "TP53_mut"] = np.nan
    src = write(frame, tmp_path / "t.csv")
    base = ["--input", src, "--expression-transform", "none"]
    rc, err = run(capsys, *base, "--out", tmp_path / "e")
    assert rc == 2 and "t.csv: column 'EGFR_rnaseq', row 7 (sample 'S005'): missing value" in err
    assert "--fill-missing" in err
    rc, err = run(capsys, *base, "--out", tmp_path / "zero", "--fill-missing", "zero")
    assert rc == 0, err
    samples, manifest = load(tmp_path / "zero")
    assert manifest["repairs"] == {"--fill-missing zero: cells filled": 2}
    a = samples["S007"][1]
    assert a["values"][(a["modality"] == 1) & (a["gene_ids"] == 5)] == [0]  # TP53 is id 5
    rc, err = run(capsys, *base, "--out", tmp_path / "med", "--fill-missing", "median")
    assert rc == 0, err
    samples, _ = load(tmp_path / "med")
    train = [s for s, (m, _) in samples.items() if m["split"] == "train"]
    expect = frame.set_index("case_id").loc[train, "EGFR_rnaseq"].median()
    stats = read_stats(tmp_path / "med")["expression"]
    a = samples["S005"][1]
    k = int(np.flatnonzero((a["modality"] == 0) & (a["gene_ids"] == 2))[0])  # EGFR is id 2
    z = (expect - stats["mean"][0]) / stats["std"][0]
    assert a["values"][k] == pytest.approx(z, abs=1e-5)
    rc, err = run(capsys, *base, "--out", tmp_path / "skip", "--fill-missing", "skip")
    assert rc == 0, err
    samples, manifest = load(tmp_path / "skip")
    assert len(samples["S005"][1]["gene_ids"]) == len(samples["S000"][1]["gene_ids"]) - 1
    assert manifest["repairs"] == {"--fill-missing skip: missing cells left out (no token)": 2}
    assert leftovers(tmp_path) == []


def test_duplicated_genes_error_first_mean(tmp_path, capsys):
    expr = pd.DataFrame({"gene": ["ENSG00000141510.16", "ENSG00000141510.17", "ENSG00000146648"],
                         **{f"s{i}": [i + 1.0, i + 3.0, 2.0 * i] for i in range(12)}})
    src = write(expr, tmp_path / "e.tsv", sep="\t")
    base = ["--input", src, "--expression-transform", "none"]
    rc, err = run(capsys, *base, "--out", tmp_path / "e")
    assert rc == 2 and "duplicated gene" in err and "ENSG00000141510.16" in err
    assert "ENSG00000141510.17" in err and "--duplicates" in err
    for rule, expected in (("first", [i + 1.0 for i in range(12)]),
                           ("mean", [i + 2.0 for i in range(12)])):
        rc, err = run(capsys, *base, "--out", tmp_path / rule, "--duplicates", rule)
        assert rc == 0, err
        assert read_manifest(tmp_path / rule)["repairs"] == {
            f"--duplicates {rule}: duplicated genes": 1}
        stats = read_stats(tmp_path / rule)["expression"]
        samples, _ = load(tmp_path / rule)
        train = [int(s[1:]) for s, (m, _) in samples.items() if m["split"] == "train"]
        assert stats["mean"][0] == pytest.approx(np.mean([expected[i] for i in train]))
        assert read_vocab(tmp_path / rule / "vocab.tsv") == [("", "ENSG00000141510"),
                                                             ("", "ENSG00000146648")]


def test_vocab_reuse_unknown_genes(tmp_path, capsys):
    src = write(multiomics(10), tmp_path / "a.csv")
    rc, _ = run(capsys, "--input", src, "--out", tmp_path / "first",
                "--expression-transform", "none")
    assert rc == 0
    vocab = tmp_path / "first" / "vocab.tsv"
    other = write(multiomics(10, genes=("TP53", "NEWGENE")), tmp_path / "b.csv")
    rc, err = run(capsys, "--input", other, "--out", tmp_path / "e", "--vocab", vocab,
                  "--expression-transform", "none")
    assert rc == 2 and "b.csv" in err and "'NEWGENE_rnaseq'" in err
    assert "--drop-unknown-genes" in err
    rc, err = run(capsys, "--input", other, "--out", tmp_path / "ok", "--vocab", vocab,
                  "--expression-transform", "none", "--drop-unknown-genes")
    assert rc == 0, err
    manifest = read_manifest(tmp_path / "ok")
    assert manifest["repairs"] == {"unknown genes dropped (features)": 1}
    assert manifest["vocab_size"] == read_manifest(tmp_path / "first")["vocab_size"]
    assert (tmp_path / "ok" / "vocab.tsv").read_bytes() == vocab.read_bytes()
    (tmp_path / "bad_vocab.tsv").write_text("gene\tid\n")
    rc, err = run(capsys, "--input", src, "--out", tmp_path / "bv", "--vocab",
                  tmp_path / "bad_vocab.tsv", "--expression-transform", "none")
    assert rc == 2 and "bad_vocab.tsv" in err and "first line" in err


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case", ["non_numeric", "mutation", "cnv", "negative_counts",
                                  "empty_modality", "all_missing", "no_tpm_lengths",
                                  "no_transform", "bad_patient_column"])
def test_bad_input_names_file_column_row(tmp_path, capsys, case):
    frame = multiomics(8)
    extra, want = [], []
    transform = ["--expression-transform", "signed_log1p"]
    if case == "non_numeric":
        frame["MYC_rnaseq"] = frame["MYC_rnaseq"].astype(object)
        frame.loc[3, "MYC_rnaseq"] = "high"
        want = ["column 'MYC_rnaseq', row 5 (sample 'S003')", "non-numeric value 'high'"]
    elif case == "mutation":
        frame.loc[2, "KRAS_mut"] = 2
        want = ["column 'KRAS_mut', row 4 (sample 'S002')", "must be 0 or 1"]
    elif case == "cnv":
        frame.loc[6, "MYC_cnv"] = 3
        want = ["column 'MYC_cnv', row 8 (sample 'S006')", "-2, -1, 0, 1, 2"]
    elif case == "negative_counts":
        transform = ["--expression-transform", "log1p"]
        want = ["_rnaseq'", "counts >= 0", "signed_log1p"]
        frame.loc[:, [c for c in frame if c.endswith("_rnaseq")]] = -1.0
    elif case == "empty_modality":
        frame = frame[["case_id", "age"]]
        extra = [":mutation"]
        want = ["no feature columns", "'mutation'"]
        transform = ["--clinical-columns", "age"]
    elif case == "all_missing":
        for c in [c for c in frame if c.endswith("_cnv")]:
            frame[c] = np.nan
        want = ["modality 'cnv' is all missing"]
    elif case == "no_tpm_lengths":
        frame.loc[:, [c for c in frame if c.endswith("_rnaseq")]] = 1.0
        transform = ["--expression-transform", "tpm_log1p"]
        want = ["--gene-lengths", "cpm_log1p"]
    elif case == "no_transform":
        transform = []
        want = ["--expression-transform", "signed_log1p"]
    elif case == "bad_patient_column":
        extra_args = ["--patient-column", "donor"]
        transform += extra_args
        want = ["--patient-column 'donor'"]
    src = write(frame, tmp_path / "t.csv")
    spec = f"{src}{extra[0]}" if extra else str(src)
    rc, err = run(capsys, "--input", spec, "--out", tmp_path / "out", *transform)
    assert rc == 2
    assert "t.csv" in err or case in ("no_tpm_lengths", "bad_patient_column")
    for text in want:
        assert text in err, (text, err)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_usage_errors_and_overwrite_is_atomic(tmp_path, capsys):
    src = write(multiomics(10), tmp_path / "t.csv")
    base = ["--input", src, "--expression-transform", "none"]
    assert run(capsys, *base, "--out", tmp_path / "o", "--val-fraction", 0.6,
               "--test-fraction", 0.5)[0] == 2
    assert run(capsys, *base, "--out", tmp_path / "o", "--n-bins", 300)[0] == 2
    rc, err = run(capsys, "--input", tmp_path / "none.csv", "--out", tmp_path / "o")
    assert rc == 2 and "none.csv: no such file" in err
    rc, err = run(capsys, "--input", f"{src}:rna", "--out", tmp_path / "o")
    assert rc == 2 and "not a modality" in err
    rc, _ = run(capsys, *base, "--out", tmp_path / "o")
    assert rc == 0
    before = read_manifest(tmp_path / "o")
    rc, err = run(capsys, *base, "--out", tmp_path / "o")
    assert rc == 2 and "exists" in err and "--overwrite" in err
    # a failing --overwrite run leaves the old folder as it was and no temp folder
    bad = multiomics(10)
    bad.loc[0, "TP53_mut"] = 5
    write(bad, tmp_path / "bad.csv")
    rc, err = run(capsys, "--input", tmp_path / "bad.csv", "--out", tmp_path / "o",
                  "--expression-transform", "none", "--overwrite")
    assert rc == 2 and read_manifest(tmp_path / "o") == before
    # a late failure (after reading, splitting and fitting: no training sample)
    rc, err = run(capsys, *base, "--out", tmp_path / "late", "--val-fraction", 0.5,
                  "--test-fraction", 0.49999, "--seed", 1)
    assert rc == 2 and "training split" in err and not (tmp_path / "late").exists()
    rc, _ = run(capsys, *base, "--out", tmp_path / "o", "--overwrite", "--seed", 9)
    assert rc == 0 and read_manifest(tmp_path / "o")["options"]["seed"] == 9
    assert leftovers(tmp_path) == []
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.txt").write_text("x")
    rc, err = run(capsys, *base, "--out", tmp_path / "precious", "--overwrite")
    assert rc == 2 and "not a prepared omics folder" in err
    assert (tmp_path / "precious" / "thesis.txt").exists()


# ----------------------------------------------------------------------------- real data
def test_tcga_blca_real_table(shared_data, tmp_path, capsys):
    src = shared_data / "tcga" / "tcga_blca_multiomics.csv.gz"
    rc, err = run(capsys, "--input", src, "--out", tmp_path / "blca",
                  "--expression-transform", "signed_log1p", "--patient-column", "case_id")
    assert rc == 0, err
    manifest = read_manifest(tmp_path / "blca")
    assert sum(manifest["splits"][s]["samples"] for s in SPLITS) == 373
    assert sum(manifest["splits"][s]["patients"] for s in SPLITS) == 373
    assert manifest["modalities"] == ["expression", "mutation", "cnv"]
    assert manifest["genes_per_modality"] == {"expression": 1554, "mutation": 371, "cnv": 256}
    assert manifest["max_tokens"] == 1554 + 371 + 256 and manifest["repairs"] == {}
    assert 0.7 < manifest["splits"]["train"]["samples"] / 373 < 0.9
    source = OmicsShardSource(tmp_path / "blca", "val")
    meta, arrays = source[0]
    assert meta["sample_id"].startswith("TCGA-") and len(arrays["gene_ids"]) == 2181
    assert set(np.unique(arrays["classes"][arrays["modality"] == 2])) <= set(range(5))
    clinical = pd.read_csv(tmp_path / "blca" / "clinical.csv")
    assert len(clinical) == 373 and {"survival_months", "censorship"} <= set(clinical.columns)
    with gzip.open(src, "rt") as handle:
        assert handle.readline().startswith("case_id,")
    assert json.loads((tmp_path / "blca" / "stats.json").read_text())["n_bins"] == 51


def test_icb_hugo_real_tables(shared_data, tmp_path, capsys):
    icb = shared_data / "icb"
    rc, err = run(capsys, "--input", icb / "Hugo_expression.csv.gz", "--clinical",
                  icb / "Hugo_clinical.csv.gz", "--patient-column", "patientid",
                  "--expression-transform", "none", "--out", tmp_path / "hugo")
    assert rc == 0, err
    manifest = read_manifest(tmp_path / "hugo")
    assert sum(manifest["splits"][s]["samples"] for s in SPLITS) == 27
    assert manifest["genes_per_modality"] == {"expression": 1801} and manifest["max_tokens"] == 1801
    clinical = pd.read_csv(tmp_path / "hugo" / "clinical.csv")
    assert clinical.response.value_counts().to_dict() == {"R": 14, "NR": 13}
    assert [i["role"] for i in manifest["inputs"]] == ["omics", "clinical"]


def test_tpm_combine_join_duplicate_headers_and_infinite_values(tmp_path, capsys):
    counts = pd.DataFrame({"gene": ["A", "B", "C"], **{f"s{i}": [10.0 + i, 20.0, 5.0 * i + 1]
                                                       for i in range(10)}})
    e = write(counts, tmp_path / "counts.csv")
    lengths = write(pd.DataFrame({"gene": ["A", "B", "C"], "length": [1000, 2000, 500]}),
                    tmp_path / "len.csv")
    rc, err = run(capsys, "--input", e, "--out", tmp_path / "tpm", "--expression-transform",
                  "tpm_log1p", "--gene-lengths", lengths)
    assert rc == 0, err
    samples, _ = load(tmp_path / "tpm")
    stats = read_stats(tmp_path / "tpm")["expression"]
    x = counts[["s3"]].to_numpy()[:, 0] / np.array([1.0, 2.0, 0.5])
    tpm = np.log1p(x / x.sum() * 1e6)
    np.testing.assert_allclose(samples["s3"][1]["values"],
                               (tpm - stats["mean"]) / np.asarray(stats["std"]), atol=1e-5)
    # two expression files of the same samples: --combine join puts them in one group
    more = pd.DataFrame({"gene": ["D"], **{f"s{i}": [float(i)] for i in range(10)}})
    m = write(more, tmp_path / "more.csv")
    rc, err = run(capsys, "--input", e, "--input", m, "--out", tmp_path / "stack",
                  "--expression-transform", "log1p")
    assert rc == 2 and "'s0'" in err and "--combine join" in err
    rc, err = run(capsys, "--input", e, "--input", m, "--out", tmp_path / "join",
                  "--expression-transform", "log1p", "--combine", "join")
    assert rc == 0, err
    assert load(tmp_path / "join")[1]["max_tokens"] == 4
    # the same column twice in a samples x genes table is a duplicated gene
    (tmp_path / "dup.csv").write_text("id,A,A,B\nx,1,2,3\ny,4,5,6\nz,7,8,9\n")
    rc, err = run(capsys, "--input", tmp_path / "dup.csv", "--out", tmp_path / "d",
                  "--expression-transform", "none")
    assert rc == 2 and "dup.csv:A" in err and "duplicated gene" in err
    (tmp_path / "inf.csv").write_text("id,A,B\nx,1,inf\ny,4,6\n")
    rc, err = run(capsys, "--input", tmp_path / "inf.csv", "--out", tmp_path / "i",
                  "--expression-transform", "none")
    assert rc == 2 and "column 'B', row 2 (sample 'x'): infinite value" in err
    assert leftovers(tmp_path) == []


def test_missing_optional_dependency_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import sys

    (tmp_path / "x.h5ad").write_bytes(b"not really")
    monkeypatch.setitem(sys.modules, "anndata", None)  # import anndata -> ImportError
    rc, err = run(capsys, "--input", tmp_path / "x.h5ad", "--out", tmp_path / "o")
    assert rc == 2 and "'anndata'" in err and "cfm[omics]" in err
    assert leftovers(tmp_path) == []
