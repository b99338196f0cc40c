"""Downstream fine-tuning: `python -m cfm.finetune --config configs/finetune/<task>.py:<arg>
--workdir DIR`. `config.task` picks the module `cfm.finetune.<module>`, each with
`run(config, workdir) -> dict`:

| task | module | what |
|---|---|---|
| `response` | `response.py` | multimodal fusion (omics + clinical) for ICB response |
| `survival` | `survival.py` | the same fusion model with a Cox / discrete-time survival head |
| `tile` | `tile.py` | linear and kNN probes on tile embeddings, full fine-tuning |
| `mil` | `mil.py` | attention MIL on slide bags |
| `spatial` | `spatial.py` | spatial expression prediction from tiles |
| `tme` | `tme.py` | tumour-microenvironment maps |

Task modules are imported only when chosen (each pulls its own dependencies). The fusion
tasks share `fusion_data` (config checks, units, features), `losses` (heads), `fusion_train`
(training engine), `fusion_baselines` and `fusion_report`; the slide tasks share `slide_data`
and `probe` (linear / kNN probes).
"""

from __future__ import annotations

import importlib
import os
import time

import ml_collections

from cfm.finetune.common import FinetuneError, staged_workdir, write_json

TASKS = {"response": "response", "survival": "survival", "tile": "tile", "mil": "mil",
         "spatial": "spatial", "tme": "tme"}

__all__ = ["TASKS", "FinetuneError", "run"]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run `config.task` into a staging folder and rename it to `workdir` when it succeeds."""
    task = config.get("task", None)
    if task not in TASKS:
        raise FinetuneError(f"config.task={task!r}: choose one of {sorted(TASKS)}")
    try:
        module = importlib.import_module(f"cfm.finetune.{TASKS[task]}")
    except ModuleNotFoundError as e:
        if e.name == f"cfm.finetune.{TASKS[task]}":
            raise FinetuneError(f"config.task={task!r}: module cfm.finetune.{TASKS[task]} is "
                                "not available in this checkout") from e
        raise
    overwrite = bool(config.get("overwrite", False))
    t0 = time.time()
    with staged_workdir(workdir, overwrite) as tmp:
        write_json(os.path.join(tmp, "config.json"), config.to_dict())
        results = module.run(config, tmp)
        if results is None:
            results = {}
        results.setdefault("wall_s", round(time.time() - t0, 1))
        if not os.path.exists(os.path.join(tmp, "results.json")):
            write_json(os.path.join(tmp, "results.json"), results)
    return results
