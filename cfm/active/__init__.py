"""Active learning on frozen embeddings: which tiles (or slides) a pathologist labels next.

    python -m cfm.active --embeddings EMB --workdir LOOP --classes tumour,stroma,... [...]

- `strategies.py`: the selection strategies (scikit-activeml): random, entropy, margin,
  coreset, mix (CLUE), cold start (TypiClust); the probe;
- `label_io.py`: the batch to label as Label Studio tasks, tile PNGs and QuPath GeoJSON; labels
  read back from Label Studio JSON, CSV or QuPath GeoJSON;
- `loop.py`: the loop's state (`state.json`: every round's strategy, ids and labels), resume;
- `report.py`: the probe refitted on the labels so far, and `report.md`;
- `__main__.py`: the command line.

Docs: docs/active_learning.md. Benchmark: benchmarks/active_learning.py.
"""

from __future__ import annotations

from cfm.errors import UserError


class ActiveError(UserError):
    """Bad input for the active-learning loop (a flag, the embeddings, a label file's row); the
    message names it and the command exits 2."""
