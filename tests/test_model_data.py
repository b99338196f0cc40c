"""A model paired with data it was not trained for is refused with one line (cfm.compat): an
omics run with data prepared under another gene vocabulary or transform (cfm.embed --omics,
benchmarks.omics_eval), a ViT with tile shards of another tile size or mpp (cfm.embed --shards,
the slide fine-tuning tasks), an omics backbone as init_from; the matching pairs work."""

import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pandas as pd
import pytest

from cfm import compat, embed, export, init_from, pretrained, setup, train
from cfm.data.sources import SyntheticSource
from cfm.finetune import slide_data
from cfm.finetune.common import FinetuneError
from data_prep import prepare_omics
from tests.conftest import load_config
from tests.test_finetune_slide import random_vit_export
from tests.test_pipeline import _write_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table(path, genes, seed, n=60):
    rng = np.random.default_rng(seed)
    frame = {"case_id": [f"S{i:03d}" for i in range(n)], "TP53_mut": rng.integers(0, 2, n)}
    for g in genes:
        frame[f"{g}_rnaseq"] = rng.standard_normal(n) * 2 + 5
    pd.DataFrame(frame).to_csv(path, index=False)
    return str(path)


def _prepare(table, out, *extra):
    assert prepare_omics.main(["--input", table, "--out", str(out), "--n-bins", "8",
                               *extra]) == 0
    return str(out)


@pytest.fixture(scope="module")
def omics(tmp_path_factory):
    """A 2-step omics_mgm:test run on data `a` (40 genes + TP53); `b` holds other genes."""
    tmp = tmp_path_factory.mktemp("model_data")
    table_a = _table(tmp / "a.csv", [f"G{i:02d}" for i in range(40)], seed=0)
    a = _prepare(table_a, tmp / "a", "--expression-transform", "none")
    b = _prepare(_table(tmp / "b.csv", [f"G{i:02d}" for i in range(20, 52)], seed=1), tmp / "b",
                 "--expression-transform", "none")
    c = load_config("omics_mgm.py", "test")
    c.data.source, c.data.path = "prepared", a
    c.total_steps, c.checkpoint_every, c.log_every, c.mesh.data = 2, 2, 1, -1
    train.train(c, str(tmp / "run"))
    return tmp, str(tmp / "run"), a, b, table_a


def test_omics_other_vocabulary_is_refused_and_the_same_data_works(omics, capsys):
    tmp, run, a, b, table_a = omics
    want = "vocabulary: model 41 genes, data 33 genes (21 in common, 0 at the same id)"
    # benchmarks.omics_eval, as the README runs it: one line, exit 2, nothing written
    r = subprocess.run([sys.executable, "-m", "benchmarks.omics_eval", "--workdir", run,
                        "--data", b], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"omics_eval: model {run} and data {b} do not fit: {want}; re-run "
        f"data_prep.prepare_omics with --vocab {a}/vocab.tsv"]
    assert not os.path.exists(os.path.join(run, "omics_eval.json"))
    assert embed.main(["--model", run, "--omics", b, "--out", str(tmp / "e_b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0] and not os.path.exists(tmp / "e_b")
    # another expression transform under the same vocabulary: normalisation refused
    c = _prepare(table_a, tmp / "c", "--vocab", os.path.join(a, "vocab.tsv"),
                 "--expression-transform", "signed_log1p")
    capsys.readouterr()
    assert embed.main(["--model", run, "--omics", c, "--out", str(tmp / "e_c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expression transform: model 'none', data 'signed_log1p'" in err[0]
    # the data the run trained on works, and the check is reported
    assert embed.main(["--model", run, "--omics", a, "--out", str(tmp / "e_a")]) == 0
    assert "vocabulary (41 genes) and normalisation" in capsys.readouterr().err
    assert np.load(tmp / "e_a" / "embeddings.npy").shape == (60, 32)
    r = subprocess.run([sys.executable, "-m", "benchmarks.omics_eval", "--workdir", run,
                        "--data", a, "--out", str(tmp / "eval.json")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "_CHECKPOINT_METADATA" not in r.stderr, r.stderr
    result = json.loads((tmp / "eval.json").read_text())
    assert result["held_out_samples"] > 0
    assert np.isfinite(result["imputation"]["cfm"]["expression_pearson"])


def test_omics_model_without_its_vocabulary_needs_trust_data(omics, capsys):
    tmp, run, a, _, _ = omics
    moved = shutil.copytree(a, tmp / "a_copy")
    os.rename(a, a + ".gone")  # the run's data.path is gone
    try:
        assert embed.main(["--model", run, "--omics", str(moved), "--out", str(tmp / "t")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot be found" in err[0] and "--trust-data" in err[0]
        assert embed.main(["--model", run, "--omics", str(moved), "--out", str(tmp / "t"),
                           "--trust-data"]) == 0
        assert "NOT checked" in capsys.readouterr().err
    finally:
        os.rename(a + ".gone", a)


def test_omics_backbone_initialises_only_an_omics_run_on_its_vocabulary(omics, capsys):
    """An omics export cannot start a ViT run; an omics run continues from it (domain
    adaptation, issue 17 item 6) only on data prepared with its vocab.tsv and normalisation:
    other data is refused before anything is built, the matching data loads the backbone (the
    MGM head starts fresh from an export, loads from a workdir)."""
    tmp, run, a, b, table_a = omics
    out = str(tmp / "export")
    export.export(run, out, "safetensors")
    for name in ("vocab.tsv", "stats.json", "manifest.json"):  # they travel with the export
        assert os.path.isfile(os.path.join(out, name))
    vit = load_config("dino_vit.py", "test")
    with pytest.raises(init_from.InitFromError,
                       match="omics backbone .* cannot initialise this vit run"):
        init_from.apply_init_from(None, vit, out)
    vit_arch = compat.model_spec(str(random_vit_export(tmp / "vit"))).arch
    with pytest.raises(init_from.InitFromError, match="patch 8 .* has patch 4"):
        init_from.check_family(vit_arch, dict(vit_arch, patch=4, variant="vit_p4"), out)
    slide = {"family": "slide", "variant": "slide_test"}
    with pytest.raises(init_from.InitFromError, match="ViT or omics backbones, not a slide"):
        init_from.check_family(slide, slide, out)

    c = load_config("omics_mgm.py", "test")
    c.data.source, c.data.path, c.init_from = "prepared", b, out
    c.total_steps, c.checkpoint_every, c.log_every, c.mesh.data = 1, 1, 1, -1
    with pytest.raises(init_from.InitFromError, match=r"vocabulary: model 41 genes, data 33 .*"
                       r"re-run data_prep.prepare_omics with --vocab .*/vocab.tsv"):
        train.train(c, str(tmp / "adapt_b"))
    assert not os.path.exists(tmp / "adapt_b" / "checkpoints")
    c.data.path = _prepare(table_a, tmp / "signed", "--vocab", os.path.join(a, "vocab.tsv"),
                           "--expression-transform", "signed_log1p")
    with pytest.raises(init_from.InitFromError, match="expression transform: model 'none'"):
        init_from.check_path(c, str(tmp / "adapt_c"))
    # another cohort (other patients, 30 of the 40 genes) under the source's vocabulary
    table_new = _table(tmp / "new.csv", [f"G{i:02d}" for i in range(30)], seed=5, n=40)
    c.data.path = _prepare(table_new, tmp / "new", "--vocab", os.path.join(a, "vocab.tsv"),
                           "--drop-unknown-genes", "--expression-transform", "none")
    capsys.readouterr()
    c.init_from = out  # the trainer's path: the report names the data check
    train.train(c, str(tmp / "adapt"))
    text = " ".join((tmp / "adapt" / init_from.REPORT_FILE).read_text().split())
    assert "data: vocabulary (41 genes) and normalisation" in text, text
    assert "gene_embed" not in text.split("re-initialised")[-1], text
    s = setup.setup(c, devices=jax.devices()[:1])
    fresh = setup.create_state(s)
    _, exported = pretrained.read_export(out)
    trained = init_from.read_checkpoint_params(run)[1]
    for source, head_loaded in ((out, False), (run, True)):
        new, report = init_from.apply_init_from(fresh, s.config, source)
        np.testing.assert_array_equal(np.asarray(new.params["backbone"]["gene_embed"]["embedding"]),
                                      exported["gene_embed"]["embedding"])
        head = np.asarray(new.params["mgm_head"]["hidden"]["kernel"])
        assert np.array_equal(head, trained["mgm_head"]["hidden"]["kernel"]) == head_loaded
        assert any(k.startswith("mgm_head") for k, _ in report.reinitialised) != head_loaded
        assert new.teacher == {}


def _tile_shards(folder, size, mpp, n=5):
    """tile_wsi-like shards: ArrayRecord tiles + manifest.csv (mpp) + config.json (tile_size)."""
    synth = SyntheticSource(n, size, seed=2)
    _write_shards(folder, [synth[i] for i in range(n)], per_shard=n)
    with open(os.path.join(folder, "manifest.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["shard", "index", "slide_id", "x", "y", "level", "mpp"])
        w.writerows([["tiles-00000.array_record", i, f"s{i % 3}", i, 0, 0, mpp]
                     for i in range(n)])
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"tile_size": size, "mpp": [mpp]}, f)
    return str(folder)


def test_tile_model_with_other_tile_size_or_mpp_is_refused(tmp_path, capsys):
    model = random_vit_export(tmp_path / "vit")
    with open(os.path.join(model, "config.json")) as f:
        info = json.load(f)
    info["preprocessing"].update(tile_size_px=32, microns_per_pixel=[0.5])
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(info, f)
    same = _tile_shards(tmp_path / "same", 32, 0.52)  # within 10%
    bigger = _tile_shards(tmp_path / "bigger", 48, 0.5)
    coarser = _tile_shards(tmp_path / "coarser", 32, 1.0)
    for shards, want in ((bigger, "tile size: model trained on 32 px tiles, shards hold 48 px"),
                         (coarser, "microns per pixel: model trained at 0.5, shards at 1")):
        out = tmp_path / ("e_" + os.path.basename(shards))
        assert embed.main(["--model", model, "--shards", shards, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and want in err[0] and f"model {model} and data {shards}" in err[0]
        assert "--allow-scale-mismatch" in err[0] and not out.exists()
        with pytest.raises(FinetuneError, match="config.model and config.shards: .*" + want):
            slide_data.embed_shards(model, shards)
    assert embed.main(["--model", model, "--shards", same, "--out", str(tmp_path / "ok")]) == 0
    assert "tile size 32 px, 0.52 um/px as in training" in capsys.readouterr().err
    assert embed.main(["--model", model, "--shards", coarser, "--out", str(tmp_path / "ok2"),
                       "--allow-scale-mismatch"]) == 0
    assert "MISMATCH accepted" in capsys.readouterr().err
    # a model without a recorded tile manifest: said, not refused
    plain = random_vit_export(tmp_path / "plain")
    assert "not compared" in compat.check_tiles(compat.model_spec(plain), coarser)
