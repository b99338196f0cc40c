"""The metric writer: console line, JSONL history (appended locally, rewritten whole on object
stores, which cannot append), loss-curve PNG."""

import json

from cfm import metrics


def _write_three(workdir):
    w = metrics.MetricWriter(str(workdir), total_steps=3, batch_size=4)
    for step in (1, 2, 3):
        w.write(step, {"loss": 10.0 - step, "dino": 5.0})
    w.close()


def test_local_history_png_and_console(tmp_path, capsys):
    _write_three(tmp_path)
    hist = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [1, 2, 3] and hist[-1]["loss"] == 7.0
    assert (tmp_path / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "step 3/3 | loss 7 | dino 5" in capsys.readouterr().out


def test_object_store_rewrites_history_and_keeps_earlier_lines(tmp_path, monkeypatch):
    """A resumed run on gs:// keeps the earlier lines although it cannot append."""
    monkeypatch.setattr(metrics, "_is_url", lambda path: True)
    _write_three(tmp_path)
    _write_three(tmp_path)  # a second (resumed) writer on the same workdir
    hist = metrics.read_history(str(tmp_path))
    assert [h["step"] for h in hist] == [1, 2, 3, 1, 2, 3]
    assert not list(tmp_path.glob("*.tmp*"))
