"""Checkpoints and exports written by cfm before the objective/setup redesign (commit 004aaee,
tests/fixtures/v0_1) still work: every one loads and gives the CLS embeddings the old code
computed (expected.json), the old DINOv2 workdir exports, initialises a new run and resumes
training. The fixtures are only read; anything that writes works on a copy in tmp_path."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import cfm
from cfm import export, init_from, pretrained, setup
from tests.conftest import ROOT
from tests.test_train import _tiny

FIX = ROOT / "tests" / "fixtures" / "v0_1"
EXPECTED = json.loads((FIX / "expected.json").read_text())
ATOL = 1e-5  # expected.json is rounded to 6 decimals


def _images() -> np.ndarray:
    return (np.arange(2 * 32 * 32 * 3).reshape(2, 32, 32, 3) % 255 / 255.0 - 0.5
            ).astype(np.float32)


def _omics_batch() -> tuple[np.ndarray, ...]:
    ids = np.array([[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0]], np.int32)
    mod = np.array([[0, 0, 0, 1, 2, 0], [0, 0, 0, 1, 0, 0]], np.int32)
    vals = np.array([[0.5, -1, 2, 1, 0, 0], [1, 1, -0.5, 0, 0, 0]], np.float32)
    cls = np.array([[3, 4, 5, 1, 2, 0], [1, 2, 3, 0, 0, 0]], np.int32)
    return ids, mod, vals, cls


def _cls(path) -> np.ndarray:
    model, params = cfm.load_pretrained(str(path))
    args = _omics_batch() if model.__class__.__name__ == "OmicsTransformer" else (_images(),)
    return np.asarray(model.apply({"params": params}, *args)["cls"])


@pytest.mark.parametrize("name", ["dino", "dino_export", "dino_export_orbax", "mgm"])
def test_old_checkpoints_and_exports_give_the_old_embeddings(name):
    np.testing.assert_allclose(_cls(FIX / name), np.asarray(EXPECTED[name]), rtol=0, atol=ATOL)


@pytest.mark.parametrize("name,fmt", [("dino", "safetensors"), ("mgm", "orbax")])
def test_old_workdirs_export(tmp_path, name, fmt):
    out = tmp_path / "model"
    info = export.export(str(FIX / name), str(out), fmt)
    assert info["provenance"]["step"] == 2 and info["export"]["format"] == fmt
    np.testing.assert_allclose(_cls(out), np.asarray(EXPECTED[name]), rtol=0, atol=ATOL)


def test_old_workdir_initialises_a_new_run():
    c = _tiny()
    s = setup.setup(c, devices=jax.devices()[:1])
    state = setup.create_state(s)
    new, report = init_from.apply_init_from(state, s.config, str(FIX / "dino"))
    assert not report.reinitialised and not report.unused, report.format()
    _, student, teacher, step = init_from.read_checkpoint_params(str(FIX / "dino"))
    assert step == 2
    for tree, want in ((new.params, student), (new.teacher, teacher)):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(tree), want)
    released = pretrained.flatten(cfm.load_pretrained(str(FIX / "dino"))[1])
    jax.tree.map(np.testing.assert_array_equal,
                 pretrained.flatten(jax.device_get(new.teacher["backbone"])), released)


def test_old_workdir_resumes_training(tmp_path):
    workdir = tmp_path / "dino"
    shutil.copytree(FIX / "dino", workdir)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1 "
               "--xla_backend_optimization_level=0")
    proc = subprocess.run(
        [sys.executable, "-m", "cfm.train", "--config", f"{ROOT}/configs/dino_vit.py:test",
         "--workdir", str(workdir), "--config.total_steps=3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "resumed from step 2" in log and "done at step 3" in log, log[-3000:]
    assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == [2, 3]
    assert np.isfinite(_cls(workdir)).all()
