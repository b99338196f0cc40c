"""Data preparation jobs: demo tiles now; slide tiling and omics tables in later issues."""
