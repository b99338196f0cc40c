"""Explanations of downstream models: integrated-gradient attributions and ranked biomarker
tables (attributions.py), templated per-patient text reports (text_report.py), heatmaps over
slide thumbnails (heatmap.py) and top-tile grids (tiles.py)."""
