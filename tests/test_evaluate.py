"""cfm.evaluate: metrics against sklearn / lifelines, bootstrap CIs, patient-level folds."""

import warnings

import numpy as np
import pytest
from lifelines.utils import concordance_index
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from cfm.evaluate import cv, metrics, report


def test_auc_and_balanced_accuracy_match_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 60)
        s = np.round(rng.normal(size=60), 1)  # ties
        assert metrics.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        p = rng.integers(0, 3, 60)
        q = rng.integers(0, 3, 60)
        assert metrics.balanced_accuracy(p, q) == pytest.approx(balanced_accuracy_score(p, q))
    with pytest.raises(ValueError, match="one class"):
        metrics.roc_auc([1, 1, 1], [0.1, 0.2, 0.3])


def test_c_index_matches_lifelines():
    rng = np.random.default_rng(1)
    for _ in range(5):
        t = np.round(rng.exponential(10, 80))  # tied times
        e = rng.integers(0, 2, 80)
        r = np.round(rng.normal(size=80), 1)    # tied risks
        assert metrics.c_index(t, e, r) == pytest.approx(concordance_index(t, -r, e), abs=1e-12)
    # a perfect ranking
    assert metrics.c_index([1, 2, 3], [1, 1, 1], [3, 2, 1]) == 1.0
    with pytest.raises(ValueError, match="comparable"):
        metrics.c_index([1, 2], [0, 0], [1, 2])


def test_pearson():
    x = np.arange(10.0)
    assert metrics.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert np.isnan(metrics.pearson(x, np.ones(10)))
    y = np.stack([x, -x, np.ones(10)], 1)
    r = metrics.pearson_per_column(y, np.stack([x, x, x], 1))
    np.testing.assert_allclose(r[:2], [1.0, -1.0])
    assert np.isnan(r[2])


def test_bootstrap_ci_contains_point_and_skips_undefined():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 40)
    s = y + rng.normal(size=40)
    point, lo, hi = metrics.bootstrap_ci(metrics.roc_auc, (y, s), n_boot=200)
    assert point == pytest.approx(metrics.roc_auc(y, s))
    assert lo <= point <= hi and hi - lo > 0.01
    # 1 positive in 12: many resamples have one class and are skipped with a warning
    y2 = np.r_[1, np.zeros(11)]
    with pytest.warns(UserWarning, match="skipped"):
        metrics.bootstrap_ci(metrics.roc_auc, (y2, rng.normal(size=12)), n_boot=100)
    # groups: rows of a patient are resampled together (two identical rows per patient)
    g = np.repeat(np.arange(20), 2)
    yy, ss = np.repeat(y[:20], 2), np.repeat(s[:20], 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p2, lo2, hi2 = metrics.bootstrap_ci(metrics.roc_auc, (yy, ss), n_boot=100, groups=g)
    assert lo2 <= p2 <= hi2


def test_patient_folds_never_split_a_patient_and_stratify():
    rng = np.random.default_rng(3)
    pids = np.repeat(np.arange(30), rng.integers(1, 4, 30))  # 1-3 rows per patient
    plab = rng.permutation(np.r_[np.zeros(20), np.ones(10)]).astype(int)
    labels = plab[pids]
    folds = cv.patient_folds(pids, labels, k=5, seed=0)
    seen = np.concatenate([te for _, te in folds])
    assert sorted(seen.tolist()) == list(range(len(pids)))  # every row tested exactly once
    for tr, te in folds:
        assert not set(pids[tr]) & set(pids[te])
        assert sorted(set(plab[np.unique(pids[te])])) == [0, 1]
        assert np.sum(plab[np.unique(pids[te])]) == 2  # 10 positives / 5 folds
    with pytest.raises(ValueError, match="smaller k"):
        cv.patient_folds(np.arange(8), np.r_[np.zeros(5), np.ones(3)], k=5)


def test_roc_curve_and_fmt():
    fpr, tpr = report.roc_curve([0, 1, 0, 1], [0.1, 0.9, 0.4, 0.3])
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.roc_auc([0, 1, 0, 1],
                                                                   [0.1, 0.9, 0.4, 0.3]))
    assert report.fmt_ci({"value": 0.5, "low": 0.4, "high": 0.6}) == "0.500 (0.400-0.600)"
