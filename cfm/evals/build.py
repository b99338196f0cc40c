"""Building the evaluators of `config.evals` (schema: `cfm.evals`) and running those due.

    evaluators = build.build_evaluators(s.config, s)    # start-up: ConfigError on bad data
    metrics, warnings = build.run_due(evaluators, state, step, final=step == last)
"""

from __future__ import annotations

from typing import Any

import ml_collections

from cfm.config_check import ConfigError
from cfm.evals import TILE_KEYS, forward, named_entries, tile_sets
from cfm.evals.align import RetrievalEvaluator
from cfm.evals.base import Evaluator, check, fail
from cfm.evals.health import HealthEvaluator
from cfm.evals.omics import MGMEvaluator
from cfm.evals.probes import ProbeEvaluator, TileFeatures


def build_evaluators(config: ml_collections.ConfigDict, setup: Any) -> list[Evaluator]:
    """The evaluators of `config.evals` for the run `setup` (`cfm.setup.setup(config)`), their
    data read and checked now; ConfigError (one line naming the entry) for a bad entry."""
    evaluators: list[Evaluator] = []
    tile_cache: dict[tuple, TileFeatures] = {}
    extract = None
    for name, e in named_entries(config.get("evals")):
        every, bs = e["every"], e["batch_size"]
        check(isinstance(every, int) and every >= 0, name, "every", every,
              "steps between evaluations, an integer >= 1 (the run's last step is always "
              "evaluated), or 0 for off")
        if every == 0:
            continue
        check(isinstance(bs, int) and bs >= 1, name, "batch_size", bs, "an integer >= 1")
        t = e["type"]
        if t in ("knn", "linear"):
            check(forward.takes_images(setup), name, "type", t, "kNN and linear probes evaluate "
                  f"image backbones; this run trains {setup.objective.name!r} (use 'mgm')")
            key = tuple(e[k] for k in TILE_KEYS)
            if key not in tile_cache:
                if extract is None:
                    extract = forward.image_features(setup, bs)
                size = int(setup.config.crops.global_size)
                tile_cache[key] = TileFeatures(tile_sets.load(name, e, size), extract)
            if t == "knn":
                check(int(e["k"]) >= 1, name, "k", e["k"], "must be >= 1")
                check(float(e["temperature"]) > 0, name, "temperature", e["temperature"],
                      "must be > 0")
            else:
                check(float(e["C"]) > 0, name, "C", e["C"], "must be > 0")
            evaluators.append(ProbeEvaluator(name, every, t, tile_cache[key], e))
        elif t == "health":
            check(int(e["n_samples"]) >= 2, name, "n_samples", e["n_samples"], "must be >= 2")
            try:
                evaluators.append(HealthEvaluator(name, every, setup, int(e["n_samples"]), bs))
            except ConfigError:
                raise
            except (OSError, ValueError) as err:
                fail(name, "type", t, f"the run's training data does not read ({err})")
        elif t == "align":
            check(setup.objective.name == "align", name, "type", t, "retrieval evaluates "
                  f"slide-omics alignment; this run trains {setup.objective.name!r}")
            evaluators.append(RetrievalEvaluator(name, every, setup, e))
        else:
            check(not forward.takes_images(setup), name, "type", t, "masked gene modelling "
                  f"evaluates omics models; this run trains {setup.objective.name!r}")
            evaluators.append(MGMEvaluator(name, every, setup, e))
    return evaluators


def run_due(evaluators: list[Evaluator], state: Any, step: int, final: bool = False
            ) -> tuple[dict[str, float], list[str]]:
    """(metrics, warning lines) of the evaluators due after step `step` (`final`: all)."""
    metrics: dict[str, float] = {}
    lines: list[str] = []
    for ev in evaluators:
        if ev.due(step, final):
            m = ev.run(state)
            metrics.update(m)
            lines += ev.warnings(m)
    return metrics, lines
