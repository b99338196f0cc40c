"""data_prep.prepare_omics on several studies at once (the pan-cohort corpus of
configs/omics_mgm.py:pan): per-input transforms and z-scoring against numpy, the union
vocabulary, ICB-format tables (`gene` x patients), --source-ids, the manifest's sources and
what an export says about them."""

import json

import numpy as np
import pandas as pd
import pytest

from cfm import export
from cfm.data.omics_records import MODALITIES
from cfm.data.omics_source import read_manifest, read_stats, read_vocab
from data_prep import prepare_omics
from tests.conftest import load_config
from tests.test_prepare_omics import SPLITS, leftovers, load, run, write

TCGA_GENES = ("TP53", "EGFR", "CD274", "MYC")
ICB_GENES = ("CD274", "IFNG", "CD8A", "MYC", "PDCD1")


def tcga_like(n=30, seed=0):
    """samples x genes with _rnaseq / _mut columns on a large scale (hundreds)."""
    rng = np.random.default_rng(seed)
    frame = {"case_id": [f"T{i:03d}" for i in range(n)], "age": rng.integers(30, 90, n)}
    for g in TCGA_GENES:
        frame[f"{g}_rnaseq"] = rng.normal(300, 80, n)
    frame["TP53_mut"] = rng.integers(0, 2, n)
    return pd.DataFrame(frame)


def icb_like(n=24, seed=1, genes=ICB_GENES):
    """The ICB layout: column `gene`, one column per patient, log2(TPM + 0.001)-like values."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(2.0, 0.3, (len(genes), n)),
                         columns=[f"Pt{i}" for i in range(n)])
    frame.insert(0, "gene", list(genes))
    return frame


def prepare_two(tmp_path, capsys, *extra):
    a = write(tcga_like(), tmp_path / "tcga_x.csv.gz")
    b = write(icb_like(), tmp_path / "Cohort_expression.csv.gz")
    rc, err = run(capsys, "--input", a, "--expression-transform", "signed_log1p",
                  "--input", b, "--expression-transform", "none", "--patient-column",
                  "case_id", "--out", tmp_path / "pan", "--test-fraction", "0.2", *extra)
    return rc, err, a, b


def values_by_gene(samples, vocab, ids):
    """{gene: [expression value of each sample in ids]} (NaN where the sample has no token)."""
    out = {}
    for k, sid in enumerate(ids):
        arrays = samples[sid][1]
        for g, m, v in zip(arrays["gene_ids"], arrays["modality"], arrays["values"]):
            if MODALITIES[m] == "expression":
                out.setdefault(vocab[g - 2], np.full(len(ids), np.nan))[k] = v
    return out


def test_per_input_zscores_match_numpy_and_union_vocabulary(tmp_path, capsys):
    rc, err, a, b = prepare_two(tmp_path, capsys, "--normalise", "per-input")
    assert rc == 0, err
    samples, manifest = load(tmp_path / "pan")
    vocab = [s for s, _ in read_vocab(tmp_path / "pan" / "vocab.tsv")]
    assert vocab == sorted(set(TCGA_GENES) | set(ICB_GENES))  # one vocabulary, the union
    stats = read_stats(tmp_path / "pan")["expression"]
    assert stats["transform"] == "per-input" and stats["normalise"] == "per-input"
    assert [vocab[g - 2] for g in stats["genes"]] == vocab  # every gene seen as expression
    split = {s: m["split"] for s, (m, _) in samples.items()}
    tcga = pd.read_csv(a).set_index("case_id")
    icb = pd.read_csv(b).set_index("gene").T
    for frame, ids, transform, source in (
            (tcga.rename(columns=lambda c: c[:-len("_rnaseq")]).loc[:, list(TCGA_GENES)],
             list(tcga.index), lambda x: np.sign(x) * np.log1p(np.abs(x)), 0),
            (icb, list(icb.index), lambda x: x, 1)):
        x = transform(frame.to_numpy(np.float64))
        train = np.array([split[s] == "train" for s in ids])
        mean, std = x[train].mean(0), x[train].std(0)  # population std, training split only
        got = values_by_gene(samples, vocab, ids)
        for j, gene in enumerate(frame.columns):
            np.testing.assert_allclose(got[gene], (x[:, j] - mean[j]) / std[j], atol=1e-5)
            z = got[gene][train]
            assert abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-5  # each input's own 0 / 1
        st = stats["sources"][source]
        assert st["transform"] == ("signed_log1p", "none")[source]
        assert st["train_samples"] == int(train.sum())
        np.testing.assert_allclose(st["mean"], [mean[list(frame.columns).index(vocab[g - 2])]
                                                for g in st["genes"]])
    # genes of one input only have tokens only in its samples
    t0, p0 = values_by_gene(samples, vocab, ["T000"]), values_by_gene(samples, vocab, ["Pt0"])
    assert set(t0) == set(TCGA_GENES) and set(p0) == set(ICB_GENES)
    src = manifest["sources"]
    assert manifest["normalise"] == "per-input"
    assert [s["inputs"] for s in src] == ["tcga_x.csv.gz", "Cohort_expression.csv.gz"]
    assert [s["samples"] for s in src] == [30, 24]
    assert src[0]["genes_per_modality"] == {"expression": 4, "mutation": 1}
    assert src[1]["genes_per_modality"] == {"expression": 5}
    assert sum(s["samples_per_split"][k] for s in src for k in SPLITS) == 54
    # pooled statistics over the same two inputs leave each input off mean 0 (what per-input
    # fixes): the shared genes CD274 and MYC sit far from 0 in both
    rc, err = run(capsys, "--input", a, "--input", b, "--expression-transform", "none",
                  "--patient-column", "case_id", "--out", tmp_path / "pooled")
    assert rc == 0, err
    pooled, _ = load(tmp_path / "pooled")
    z = values_by_gene(pooled, vocab, [f"Pt{i}" for i in range(24)])["CD274"]
    assert np.nanmean(z) < -0.5


def test_icb_tables_reusing_patient_ids_need_source_ids(tmp_path, capsys):
    a = write(icb_like(6, 0, ("CD274", "IFNG")), tmp_path / "Hugo_expression.csv.gz")
    b = write(icb_like(5, 1, ("CD274", "GZMA", "PRF1")), tmp_path / "Riaz_expression.csv")
    rc, err = run(capsys, "--input", a, "--input", b, "--expression-transform", "none",
                  "--normalise", "per-input", "--out", tmp_path / "dup")
    assert rc == 2 and "'Pt0'" in err and "Hugo_expression" in err
    rc, err = run(capsys, "--input", a, "--input", b, "--expression-transform", "none",
                  "--normalise", "per-input", "--source-ids", "--out", tmp_path / "ok",
                  "--val-fraction", "0", "--test-fraction", "0")
    assert rc == 0, err
    samples, manifest = load(tmp_path / "ok")
    assert sorted(samples) == sorted([f"Hugo_expression:Pt{i}" for i in range(6)]
                                     + [f"Riaz_expression:Pt{i}" for i in range(5)])
    assert samples["Riaz_expression:Pt3"][0]["patient_id"] == "Riaz_expression:Pt3"
    vocab = [s for s, _ in read_vocab(tmp_path / "ok" / "vocab.tsv")]
    assert vocab == ["CD274", "GZMA", "IFNG", "PRF1"]
    raw = pd.read_csv(b).set_index("gene")  # genes x patients, read the right way round
    got = values_by_gene(samples, vocab, [f"Riaz_expression:Pt{i}" for i in range(5)])
    for gene in ("CD274", "GZMA", "PRF1"):
        x = raw.loc[gene].to_numpy(np.float64)
        np.testing.assert_allclose(got[gene], (x - x.mean()) / x.std(), atol=1e-5)
    assert manifest["genes_per_modality"] == {"expression": 4}


@pytest.mark.parametrize("argv, message", [
    (["--expression-transform", "none", "--expression-transform", "none",
      "--expression-transform", "none"], "given 3 times for 2 --input"),
    (["--expression-transform", "signed_log1p", "--expression-transform", "none"],
     "add --normalise per-input"),
    (["--expression-transform", "none", "--source-ids", "--clinical", "c.csv"],
     "--source-ids renames"),
])
def test_usage_errors(tmp_path, capsys, argv, message):
    a = write(icb_like(4), tmp_path / "a.csv")
    rc, err = run(capsys, "--input", a, "--input", a, "--out", tmp_path / "o", *argv)
    assert rc == 2 and message in err and not (tmp_path / "o").exists()


def test_a_source_without_training_samples_is_an_error(tmp_path, capsys):
    ids = [f"Pt{i}" for i in range(200)]
    held = [s for s, x in zip(ids, prepare_omics.assign_splits(ids, 0, 0.1, 0.1))
            if x != "train"][:2]
    small = icb_like(2).rename(columns=dict(zip(["Pt0", "Pt1"], held)))
    a = write(icb_like(10, 2).rename(columns=lambda c: c.replace("Pt", "A")),
              tmp_path / "a.csv")
    b = write(small, tmp_path / "held.csv")
    rc, err = run(capsys, "--input", a, "--input", b, "--expression-transform", "none",
                  "--normalise", "per-input", "--out", tmp_path / "o")
    assert rc == 2 and "no sample of held.csv fell into the training split" in err
    assert leftovers(tmp_path) == []


def test_export_says_which_sources_the_model_saw(tmp_path, capsys):
    rc, err, _, _ = prepare_two(tmp_path, capsys, "--normalise", "per-input")
    assert rc == 0, err
    c = load_config("omics_mgm.py", "pan").to_dict()
    c["data"]["path"] = str(tmp_path / "pan")
    info = export.build_info(c, 3, "safetensors", "float32")
    seen = info["provenance"]["training_data"]
    assert seen["normalise"] == "per-input" and seen["samples"] == 54
    assert [s["inputs"] for s in seen["sources"]] == ["tcga_x.csv.gz",
                                                      "Cohort_expression.csv.gz"]
    readme = export._readme(info, "/models/m")
    assert "54 samples from 2 sources" in readme and "Cohort_expression.csv.gz (24" in readme
    assert "--vocab /models/m/vocab.tsv --normalise per-input" in readme
    assert json.loads(json.dumps(seen)) == seen  # plain JSON in config.json


def test_pan_corpus_of_the_shared_tables(shared_data, tmp_path, capsys):
    """TCGA BLCA and two ICB cohorts that both name patients Pt1, Pt2, ...: every gene of each
    is in the vocabulary."""
    icb, tcga = shared_data / "icb", shared_data / "tcga"
    rc, err = run(capsys, "--input", tcga / "tcga_blca_multiomics.csv.gz",
                  "--expression-transform", "signed_log1p",
                  "--input", icb / "Hugo_expression.csv.gz", "--expression-transform", "none",
                  "--input", icb / "Riaz_expression.csv.gz", "--expression-transform", "none",
                  "--normalise", "per-input", "--source-ids", "--patient-column", "case_id",
                  "--out", tmp_path / "pan")
    assert rc == 0, err
    manifest = read_manifest(tmp_path / "pan")
    vocab = {s for s, _ in read_vocab(tmp_path / "pan" / "vocab.tsv")}
    blca = pd.read_csv(tcga / "tcga_blca_multiomics.csv.gz", nrows=1).columns
    rna = {c[:-len("_rnaseq")] for c in blca if c.endswith("_rnaseq")}
    hugo = set(pd.read_csv(icb / "Hugo_expression.csv.gz", usecols=["gene"]).gene)
    assert rna | hugo <= vocab
    assert manifest["genes_per_modality"]["expression"] == len(rna | hugo)  # Riaz's = Hugo's
    assert [s["samples"] for s in manifest["sources"]] == [373, 27, 23]
    assert [s["genes_per_modality"]["expression"] for s in manifest["sources"]] == [
        len(rna), 1801, 1801]
