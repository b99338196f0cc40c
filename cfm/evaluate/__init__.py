"""Evaluation of downstream models: metrics with bootstrap confidence intervals (metrics.py),
patient-level cross-validation folds (cv.py) and the results.json + report.md writer
(report.py)."""
