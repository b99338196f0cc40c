"""Where training metrics go: a readable console line, TensorBoard event files, a JSONL history
and a loss-curve PNG in the workdir. Only process 0 writes; other processes get a silent writer.

The workdir may be a local folder or a URL (`gs://bucket/run`, through etils.epath and
tensorboardX's GCS writer; both need `pip install gcsfs google-cloud-storage` there). Object
stores cannot append, so for a URL the JSONL history is rewritten whole at each log step.
"""

from __future__ import annotations

import io
import json
import os
import time
from typing import Mapping

import numpy as np
from etils import epath
from tensorboardX import SummaryWriter


def _is_url(path: str) -> bool:
    return "://" in str(path)


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricWriter:
    """Console + TensorBoard (tensorboardX) + metrics.jsonl + loss_curve.png."""

    def __init__(self, workdir: str, total_steps: int, batch_size: int, enabled: bool = True,
                 unit: str = "images", start_step: int | None = None):
        """unit: what a batch holds (images, samples): throughput is logged as `<unit>_per_s`.
        start_step: the step the run starts (resumes) from, if known; history lines of later
        steps, left by a run killed after its last checkpoint, are dropped, so a resumed run
        continues every series (losses and evaluations) without repeats. None keeps them all."""
        self.workdir = workdir
        self.rate_key = f"{unit}_per_s"
        self.rate_label = {"images": "img/s"}.get(unit, f"{unit}/s")
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.enabled = enabled
        self._tb = None
        self._last_time: float | None = None
        self._last_step: int | None = None
        if enabled:
            epath.Path(workdir).mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))
            self._jsonl_path = os.path.join(workdir, "metrics.jsonl")
            kept = [json.dumps(h) for h in read_history(workdir)
                    if start_step is None or h["step"] <= start_step]
            if _is_url(workdir):  # no append on object stores: keep the lines, rewrite them
                self._lines = kept
                self._jsonl = None
            else:
                if os.path.exists(self._jsonl_path):
                    with open(self._jsonl_path + ".tmp", "w", encoding="utf-8") as f:
                        f.write("".join(line + "\n" for line in kept))
                    os.replace(self._jsonl_path + ".tmp", self._jsonl_path)
                self._jsonl = open(self._jsonl_path, "a", encoding="utf-8")

    def start_clock(self, step: int) -> None:
        """Mark the step from which throughput and ETA are measured (after compilation)."""
        self._last_time, self._last_step = time.perf_counter(), step

    def write(self, step: int, scalars: Mapping[str, float]) -> dict:
        """Log `scalars` at `step` (the number of completed steps); adds throughput and ETA."""
        now = time.perf_counter()
        out = {k: float(v) for k, v in scalars.items()}
        if self._last_time is not None and step > self._last_step:
            sec_per_step = (now - self._last_time) / (step - self._last_step)
            out[self.rate_key] = self.batch_size / sec_per_step
            out["eta_s"] = sec_per_step * (self.total_steps - step)
        self._last_time, self._last_step = now, step
        if not self.enabled:
            return out
        for k, v in out.items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()
        self._append(json.dumps({"step": step, **out}))
        print(self.console_line(step, out), flush=True)
        return out

    def write_eval(self, step: int, scalars: Mapping[str, float]) -> dict:
        """Log evaluator results (`cfm.evals`, "<name>/<metric>") at `step`: TensorBoard, a
        metrics.jsonl line of their own and an "eval" console line; no throughput."""
        out = {k: float(v) for k, v in scalars.items()}
        if not self.enabled or not out:
            return out
        for k, v in out.items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()
        self._append(json.dumps({"step": step, **out}))
        width = len(str(self.total_steps))
        print(" | ".join([f"eval {step:>{width}}/{self.total_steps}"]
                         + [f"{k} {v:.4g}" for k, v in out.items()]), flush=True)
        return out

    def _append(self, line: str) -> None:
        if self._jsonl is None:
            self._lines.append(line)
            epath.Path(self._jsonl_path).write_text("\n".join(self._lines) + "\n")
        else:
            self._jsonl.write(line + "\n")
            self._jsonl.flush()

    def console_line(self, step: int, out: Mapping[str, float]) -> str:
        width = len(str(self.total_steps))
        parts = [f"step {step:>{width}}/{self.total_steps}"]
        for k, v in out.items():
            if k in (self.rate_key, "eta_s"):
                continue
            parts.append(f"{k} {v:.4g}")
        if self.rate_key in out:
            parts.append(f"{out[self.rate_key]:.1f} {self.rate_label}")
            parts.append(f"eta {_fmt_duration(out['eta_s'])}")
        return " | ".join(parts)

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            if self._jsonl is not None:
                self._jsonl.close()
            plot_loss_curve(self.workdir)


# evaluator metrics (cfm.evals) drawn in loss_curve.png's second panel
EVAL_PANEL_SUFFIXES = ("/top1", "/pearson", "/knn_pearson")


def read_history(workdir: str) -> list[dict]:
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(workdir: str, keys: tuple[str, ...] = (
        "loss", "dino", "ibot", "koleo", "kde", "expression", "mutation", "cnv")) -> str | None:
    """Write workdir/loss_curve.png from metrics.jsonl; returns its path (None if no history)."""
    history = read_history(workdir)
    if not history:
        return None
    # Drawn by the Agg backend directly, with no pyplot figure to close or global backend to set;
    # imported here, so that a run stopped by a bad config does not pay for matplotlib.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    evals = sorted({k for h in history for k in h if k.endswith(EVAL_PANEL_SUFFIXES)})
    fig = Figure(figsize=(7, 6.5 if evals else 4), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if evals else 1, 1, squeeze=False)[:, 0]
    ax = axes[0]
    for key in keys:
        pts = [(h["step"], h[key]) for h in history if key in h]
        if pts:
            xs, ys = np.asarray(pts).T
            ax.plot(xs, ys, label=key, lw=2 if key == "loss" else 1)
    ln_k = [h["health/ln_k"] for h in history if "health/ln_k" in h]
    if ln_k and any("dino" in h for h in history):  # DINO's uniform fixed point, for reference
        ax.axhline(ln_k[-1], color="grey", ls="--", lw=1, label=f"ln K = {ln_k[-1]:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"training losses — {os.path.basename(str(workdir).rstrip('/'))}")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # none before the first log step (a step-0 eval only)
        ax.legend()
    if evals:  # the evaluators of config.evals (cfm.evals): accuracy and Pearson, 0..1
        ax = axes[1]
        for key in evals:
            xs, ys = np.asarray([(h["step"], h[key]) for h in history if key in h]).T
            ax.plot(xs, ys, marker="o", ms=3, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out score")
        ax.set_title("evaluations (config.evals)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(workdir, "loss_curve.png")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    if _is_url(workdir):  # an object store writes an object whole: no half-written PNG
        epath.Path(path).write_bytes(buf.getvalue())
    else:
        tmp = path + ".tmp.png"
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    return path
