"""Held-out cross-modal retrieval of slide–omics alignment, during training and in reports.

For N held-out patients, the slide embeddings x_i and omics embeddings y_j (both projected and
L2-normalised, `cfm.ssl.align.embed`) are ranked by cosine similarity; slide -> omics recall@k
is the fraction of slides whose own patient's omics is among the k most similar of the N (and
omics -> slide likewise). Chance is k / N, printed beside it (TANGLE and THREADS report the
same retrieval measures).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cfm.data import paired_pipeline
from cfm.evals.base import Evaluator, ShardedForward, check, fail

KS = (1, 5, 10)


def recall_at_k(x: np.ndarray, y: np.ndarray, ks=KS) -> dict[str, float]:
    """{"s2o@k", "o2s@k", "chance@k"} for paired rows x[i] <-> y[i] (cosine similarity)."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    y = y / np.linalg.norm(y, axis=1, keepdims=True).clip(1e-12)
    sim = x @ y.T
    n = len(x)
    # rank of the true partner: how many candidates score strictly higher
    s2o = np.sum(sim > np.diag(sim)[:, None], axis=1)
    o2s = np.sum(sim.T > np.diag(sim)[:, None], axis=1)
    out = {}
    for k in ks:
        out[f"s2o@{k}"] = float(np.mean(s2o < k))
        out[f"o2s@{k}"] = float(np.mean(o2s < k))
        out[f"chance@{k}"] = min(k, n) / n
    return out


def split_embeddings(setup: Any, params: Any, arrays: dict, batch_size: int = 64
                     ) -> dict[str, np.ndarray]:
    """{x, y (projected), slide, omics (raw)} of padded pairs `arrays` under `params`."""
    from cfm.ssl import align  # here: cfm.ssl.align is the objective this serves

    def fn(p, b):
        out = align.embed(setup.models, p, b)
        keep = {k: out[k] for k in ("x", "y", "slide", "omics")}
        if "recon" in out:
            keep["recon"] = out["recon"]
        return keep

    return ShardedForward(setup, fn, batch_size)(params, arrays)


class RetrievalEvaluator(Evaluator):
    """Recall@1/5/10 both ways on split `entry["split"]` of the run's pairs folder."""

    def __init__(self, name: str, every: int, setup: Any, entry: dict):
        super().__init__(name, every)
        data = setup.config.data
        try:
            self.metas, arrays = paired_pipeline.read_split(
                data.path, entry["split"], int(data.max_tiles), int(data.max_tokens))
        except (OSError, ValueError) as e:
            fail(name, "split", entry["split"], f"config.data.path={data.path!r}: {e}")
        check(len(self.metas) >= 2, name, "split", entry["split"], "needs >= 2 pairs")
        self.arrays, self.setup, self.bs = arrays, setup, int(entry["batch_size"])

    def compute(self, state: Any) -> dict[str, float]:
        e = split_embeddings(self.setup, state.params, self.arrays, self.bs)
        return recall_at_k(e["x"], e["y"])
