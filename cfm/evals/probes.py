"""kNN and linear-probe evaluators on a labelled tile set's frozen features.

- kNN: DINO's protocol (Caron et al. 2021, Sec. 4.1 / Wu et al. 2018): cosine similarity of
  L2-normalised CLS features, the k = 20 nearest training tiles vote with weight
  exp(similarity / T), T = 0.07 (`cfm.finetune.probe.knn_predict`).
- linear: multinomial logistic regression (scikit-learn's `LogisticRegression`, L-BFGS, L2
  penalty `C`) on features z-scored with the training side's mean and std.

Both report `top1` (accuracy) and `balanced_accuracy` (mean per-class recall) on the test side.
Features are computed once per (tile set, step) and shared by a kNN and a linear entry that read
the same data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from cfm.evals.base import Evaluator
from cfm.evals.tile_sets import LabelledTiles
from cfm.evaluate.metrics import accuracy, balanced_accuracy
from cfm.finetune.probe import knn_predict

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline


class TileFeatures:
    """Train and test features of one labelled tile set, cached for the last step seen."""

    def __init__(self, tiles: LabelledTiles, extract: Callable[[Any, np.ndarray], np.ndarray]):
        self.tiles, self.extract = tiles, extract
        self._step, self._feats = None, None

    def __call__(self, state: Any) -> tuple[np.ndarray, np.ndarray]:
        step = int(state.step)
        if step != self._step:
            self._feats = (self.extract(state, self.tiles.train.images),
                           self.extract(state, self.tiles.test.images))
            self._step = step
        return self._feats


def knn_scores(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
               n_classes: int, k: int = 20, temperature: float = 0.07) -> dict[str, float]:
    """top1 and balanced accuracy of DINO's weighted kNN (see module docstring)."""
    pred = knn_predict(x_train, y_train, x_test, n_classes, k, temperature).argmax(1)
    return {"top1": accuracy(y_test, pred), "balanced_accuracy": balanced_accuracy(y_test, pred)}


def linear_probe(c: float = 1.0, max_iter: int = 1000) -> "Pipeline":
    """The (unfitted) linear probe: z-scoring with the training side's mean and std, then
    multinomial logistic regression (L-BFGS, L2 penalty `c`); cfm.active refits it every round."""
    # scikit-learn is imported here, not with the module: cfm.train imports this module, and
    # importing scikit-learn costs every training process about a second.
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))


def linear_scores(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                  y_test: np.ndarray, c: float = 1.0, max_iter: int = 1000) -> dict[str, float]:
    """top1 and balanced accuracy of logistic regression on standardised features."""
    pred = linear_probe(c, max_iter).fit(x_train, y_train).predict(x_test)
    return {"top1": accuracy(y_test, pred), "balanced_accuracy": balanced_accuracy(y_test, pred)}


class ProbeEvaluator(Evaluator):
    """A kNN (`kind="knn"`: entry keys k, temperature) or linear (`kind="linear"`: C, max_iter)
    probe on the features of `features`."""

    def __init__(self, name: str, every: int, kind: str, features: TileFeatures, entry: dict):
        super().__init__(name, every)
        self.kind, self.features, self.entry = kind, features, entry

    def compute(self, state: Any) -> dict[str, float]:
        x_tr, x_te = self.features(state)
        t = self.features.tiles
        y_tr, y_te = t.train.labels, t.test.labels
        if self.kind == "knn":
            return knn_scores(x_tr, y_tr, x_te, y_te, len(t.classes), int(self.entry["k"]),
                              float(self.entry["temperature"]))
        return linear_scores(x_tr, y_tr, x_te, y_te, float(self.entry["C"]),
                             int(self.entry["max_iter"]))
