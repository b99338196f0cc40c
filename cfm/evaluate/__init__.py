"""Evaluation of downstream models: metrics with bootstrap confidence intervals (metrics.py),
patient-level cross-validation folds (cv.py) and the summaries, plots and markdown tables of
the task reports (report.py)."""
