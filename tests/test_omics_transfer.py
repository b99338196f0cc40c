"""benchmarks.omics_transfer (issue 17, item 6): leave one cancer type out, pretrain on the
others, map the held-out type onto the encoder's vocabulary, adapt on its unlabelled training
patients, and score masked-expression imputation against the type's own kNN. Run end to end on
three tiny synthetic TCGA-like tables with the tiny omics_mgm:test model; bad arguments stop
with one line."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from benchmarks import omics_transfer


def _tables(root, n=120):
    """tcga/tcga_<type>_multiomics.csv.gz with 30 shared genes; kirc adds 10 genes no other
    type has (expression coverage 30/40 under the others' vocabulary)."""
    os.makedirs(root / "tcga")
    for k, t in enumerate(omics_transfer.TYPES):
        rng = np.random.default_rng(k)
        genes = [f"G{i:02d}" for i in range(30)] + ([f"K{i}" for i in range(10)] if t == "kirc"
                                                     else [])
        z = rng.standard_normal((n, 3))
        frame = {"case_id": [f"TCGA-{t}-{i:03d}" for i in range(n)],
                 "survival_months": rng.uniform(1, 60, n), "censorship": rng.integers(0, 2, n)}
        for j, g in enumerate(genes):
            frame[f"{g}_rnaseq"] = np.exp(z @ rng.standard_normal(3) + 2 + 0.3 *
                                          rng.standard_normal(n))
        frame["TP53_mut"] = rng.integers(0, 2, n)
        frame["MYC_cnv"] = rng.integers(-1, 2, n)
        pd.DataFrame(frame).to_csv(root / "tcga" / f"tcga_{t}_multiomics.csv.gz", index=False)
    return root


def test_leave_one_type_out_runs_and_reports(tmp_path, capsys):
    data = _tables(tmp_path / "data")
    out = tmp_path / "out"
    assert omics_transfer.main(["--data", str(data), "--types", "kirc", "--steps", "2",
                                "--adapt-steps", "0,2", "--scratch-steps", "2", "--config",
                                "configs/omics_mgm.py:test", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    rows = json.loads((out / "transfer_tcga.json").read_text())
    assert [r["adapt_steps"] for r in rows] == [0, 2, 2]
    assert rows[2]["sources"] == "none (from scratch)"
    for r in rows:
        assert r["held_out_type"] == "kirc" and r["coverage"] == pytest.approx(30 / 40)
        assert r["held_out"] > 0 and r["train"] > 0
        assert all(np.isfinite(r[m]) for m in ("cfm", "knn", "mean/mode"))
    # one kNN reference, fitted on KIRC's own patients
    assert rows[0]["knn"] == rows[1]["knn"] == rows[2]["knn"]
    assert rows[0]["cfm"] != rows[1]["cfm"]  # the adapted encoder is another model
    # the sources never include the held-out type; the adaptation started from the encoder
    sources = (out / "tcga_without_kirc_data" / "manifest.json").read_text()
    assert "tcga_blca" in sources and "tcga_luad" in sources and "tcga_kirc" not in sources
    assert "init_from" in (out / "tcga_without_kirc_adapt2" / "init_from.txt").read_text()
    assert not (out / "kirc_scratch" / "init_from.txt").exists()
    assert "| KIRC" in text and "encoder_beats_knn=" in text.splitlines()[-1]


@pytest.mark.parametrize("argv,msg", [
    (["--types", "brca"], "--types: choose from blca,luad,kirc"),
    (["--adapt-steps", "0,x"], "--adapt-steps: comma-separated integers"),
    (["--steps", "0"], "--steps must be >= 1, --adapt-steps"),
    (["--data", "/nonexistent"], "tcga_blca_multiomics.csv.gz not found"),
])
def test_bad_arguments_stop_with_one_line(argv, msg, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        omics_transfer.main([*argv, "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
