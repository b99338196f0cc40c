"""Launchers for TPU pods, SLURM clusters and local multi-process runs (issue 8)."""
