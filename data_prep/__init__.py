"""Data preparation jobs: `demo_tiles` (the README demo), `tile_wsi` (whole-slide images to
ArrayRecord tile shards, with `tissue` segmentation); omics tables come with issue 6."""
