"""Which unlabelled rows to label next, from their embeddings and the labels so far.

Every strategy is scikit-activeml's (Kottke et al. 2021, `skactiveml.pool`), called here with
one probe and one feature scaling, so the loop, the benchmark and the tests mean the same thing:

- `random` (`RandomSampling`): uniformly at random, the baseline;
- `entropy` (`UncertaintySampling(method="entropy")`): the highest entropy of the probe's class
  probabilities (Settles 2009, "Active learning literature survey");
- `margin` (`UncertaintySampling(method="margin_sampling")`): the smallest gap between the
  probe's two likeliest classes (Scheffer et al. 2001);
- `coreset` (`CoreSet`): k-center greedy on the embeddings, the row farthest from every
  labelled or already picked row, repeatedly (Sener & Savarese 2018);
- `mix` (`Clue`): uncertainty within diversity clusters, k-means with k = batch on the
  unlabelled embeddings, each row weighted by its entropy, then the row nearest each centre
  (CLUE, Prabhu et al. 2021);
- `cold` (`TypiClust`): k-means with (labelled + batch) clusters, then the most typical row
  (1 / mean distance to its 20 nearest neighbours) of each of the largest clusters that hold
  no label (Hacohen et al. 2022).

Cold start: while fewer than two classes are labelled there is no probe to be uncertain with,
so every strategy but `random` picks by `cold` instead. TypiClust covers the clusters of the
embedding space one pick each, largest first, which on pathology embeddings (classes form
clusters) gives a near class-balanced first batch without any label (the label-free
class-balanced cold start of Chen et al. 2023, "Making your first choice").

Features: every strategy and the probe see the embeddings z-scored with the pool's mean and std
(`standardize`); tiny encoders' embeddings have a large common offset and ~0.02 spread per
dimension, on which distances and k-means would follow the few widest dimensions. The probe is
`cfm.evals.probes.linear_probe` (logistic regression, as `cfm.train`'s linear evaluator).
"""

from __future__ import annotations

import warnings

import numpy as np
from skactiveml.classifier import SklearnClassifier
from skactiveml.pool import Clue, CoreSet, RandomSampling, TypiClust, UncertaintySampling
from sklearn.cluster import KMeans

from cfm.active import ActiveError
from cfm.evals.probes import linear_probe

STRATEGIES = ("random", "entropy", "margin", "coreset", "mix", "cold")
UNLABELLED = -1  # label code of a row without a label
TYPICLUST_K = 20  # neighbours of the typicality (Hacohen et al. 2022, Sec. 3.2)


def standardize(x: np.ndarray) -> np.ndarray:
    """`x` [N, D] z-scored per dimension with its own mean and std (float64; a constant
    dimension stays 0)."""
    x = np.asarray(x, np.float64)
    sd = x.std(0)
    return (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)


def probe(n_classes: int, seed: int = 0, c: float = 1.0) -> SklearnClassifier:
    """The probe as scikit-activeml wraps it: fits on the labelled rows only (code
    `UNLABELLED` marks the rest); a class without a label gets probability 0."""
    return SklearnClassifier(linear_probe(c), classes=np.arange(n_classes),
                             missing_label=UNLABELLED, random_state=seed)


def fit_probe(x: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0,
              c: float = 1.0) -> SklearnClassifier:
    """The probe fitted on the labelled rows of (x, y); with one class only it predicts that
    class (scikit-activeml's fallback, its warning silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return probe(n_classes, seed, c).fit(x, y)


def effective(strategy: str, y: np.ndarray) -> str:
    """The strategy a round really uses: `cold` while fewer than two classes are labelled
    (for every strategy but `random`), else `strategy`."""
    if strategy not in STRATEGIES:
        raise ActiveError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    classes = np.unique(y[y != UNLABELLED])
    return strategy if strategy == "random" or len(classes) >= 2 else "cold"


def select(strategy: str, x: np.ndarray, y: np.ndarray, batch: int, n_classes: int,
           seed: int = 0, c: float = 1.0) -> tuple[np.ndarray, str]:
    """(row indices of the next batch, in pick order; the strategy used, see `effective`).
    `x` [N, D] are the standardised features, `y` [N] class codes or `UNLABELLED`; `batch` is
    capped at the number of unlabelled rows. Deterministic for a given `seed`."""
    used = effective(strategy, y)
    n_free = int((y == UNLABELLED).sum())
    if n_free == 0:
        raise ActiveError("every row already has a label; nothing left to select")
    batch = min(int(batch), n_free)
    if batch < 1:
        raise ActiveError(f"--batch {batch}: must be at least 1")
    y = np.asarray(y, np.int64)
    kmeans = {"n_init": 1}  # scikit-learn's default for k-means++ ("auto"), pinned
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # one-class probe fallbacks
        if used == "random":
            idx = RandomSampling(missing_label=UNLABELLED, random_state=seed).query(
                x, y, batch_size=batch)
        elif used in ("entropy", "margin"):
            method = "entropy" if used == "entropy" else "margin_sampling"
            idx = UncertaintySampling(method=method, missing_label=UNLABELLED,
                                      random_state=seed).query(
                x, y, clf=probe(n_classes, seed, c), batch_size=batch)
        elif used == "coreset":
            idx = CoreSet(missing_label=UNLABELLED, random_state=seed).query(
                x, y, batch_size=batch)
        elif used == "mix":
            idx = Clue(method="entropy", cluster_algo=KMeans, cluster_algo_dict=dict(
                kmeans, random_state=seed), missing_label=UNLABELLED, random_state=seed).query(
                x, y, estimator=probe(n_classes, seed, c), batch_size=batch)
        else:
            idx = TypiClust(missing_label=UNLABELLED, random_state=seed, cluster_algo=KMeans,
                            cluster_algo_dict=dict(kmeans, random_state=seed),
                            k=TYPICLUST_K).query(x, y, batch_size=batch)
    return np.asarray(idx, np.int64), used


def uncertainty(probs: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row entropy (nats) and margin (top-1 minus top-2 probability) of class
    probabilities [N, C]: what the report summarises for the pool."""
    p = np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)
    top = np.sort(p, axis=1)
    return {"entropy": -(p * np.log(p)).sum(1),
            "margin": top[:, -1] - (top[:, -2] if p.shape[1] > 1 else 0.0)}
