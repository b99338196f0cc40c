"""Evaluators inside `cfm.train` (issue 16): `config.evals` runs at step 0 of a new run, every N
steps and at the end; the results reach metrics.jsonl, the console and the loss-curve panel; a
resumed run continues the series without gaps or repeats, dropping what a killed run logged
after its last checkpoint."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from cfm import metrics, train
from tests.conftest import load_config


def _probe(folder) -> None:
    """A labelled tile folder: two classes of 8 tiles that differ in colour."""
    rng = np.random.default_rng(0)
    for c, colour in enumerate(((200, 80, 160), (240, 200, 220))):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(8):
            tile = np.clip(rng.normal(colour, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(tile).save(folder / f"class{c}" / f"{i}.png")


def _config(probe, total_steps: int):
    c = load_config("dino_vit.py", "test")
    c.total_steps, c.checkpoint_every, c.log_every = total_steps, 2, 2
    c.evals.knn.every, c.evals.knn.path, c.evals.knn.test_fraction = 2, str(probe), 0.5
    c.evals.health.every = 4
    return c


def _eval_steps(workdir, key: str) -> list[int]:
    return [h["step"] for h in metrics.read_history(str(workdir)) if key in h]


def test_evaluations_series_across_resume(tmp_path, capsys):
    probe, workdir = tmp_path / "probe", tmp_path / "run"
    _probe(probe)
    train.train(_config(probe, 4), str(workdir))
    out = capsys.readouterr().out
    first = next(line for line in out.splitlines() if line.startswith("eval 0/4 |"))
    assert "knn/top1" in first and "health/rankme" in first
    assert _eval_steps(workdir, "knn/top1") == [0, 2, 4]
    assert _eval_steps(workdir, "health/rankme") == [0, 4]  # every 4 and at the end
    history = metrics.read_history(str(workdir))
    assert all(0.0 <= h["knn/top1"] <= 1.0 for h in history if "knn/top1" in h)
    assert all(h["knn/seconds"] > 0 for h in history if "knn/top1" in h)  # cost reported
    # a killed run logged step 6 after its last checkpoint (4): the resumed run drops that line
    with open(workdir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 6, "knn/top1": -1.0}) + "\n")
    train.train(_config(probe, 8), str(workdir))
    assert _eval_steps(workdir, "knn/top1") == [0, 2, 4, 6, 8]  # no gap, no repeat
    assert _eval_steps(workdir, "health/rankme") == [0, 4, 8]
    assert all(h["knn/top1"] >= 0 for h in metrics.read_history(str(workdir))
               if "knn/top1" in h)
    loss_steps = [h["step"] for h in metrics.read_history(str(workdir)) if "loss" in h]
    assert loss_steps == [2, 4, 6, 8]
    assert (workdir / "loss_curve.png").is_file()


def test_loss_curve_has_an_evaluation_panel(tmp_path):
    history = [{"step": 2, "loss": 3.0, "dino": 2.0}, {"step": 2, "knn/top1": 0.5},
               {"step": 4, "loss": 2.5, "dino": 1.5}, {"step": 4, "knn/top1": 0.7}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    with_panel = Image.open(metrics.plot_loss_curve(str(tmp_path))).size
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history
                                                    if "loss" in h))
    without = Image.open(metrics.plot_loss_curve(str(tmp_path))).size
    assert with_panel[1] > without[1]  # a second panel below the losses


def test_loss_curve_of_a_run_stopped_before_its_first_log_step(tmp_path):
    """Only the step-0 evaluation is in the history (a run stopped early): a PNG, no warning
    about an empty legend."""
    import warnings

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "knn/top1": 0.5}) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = metrics.plot_loss_curve(str(tmp_path))
    assert Image.open(path).size[1] > 0
