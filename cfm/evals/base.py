"""What every evaluator shares: the interface the trainer calls, the checks of a `config.evals`
entry, and a jitted forward over the run's mesh.

An evaluator is built once at start-up (`cfm.evals.build_evaluators`), where every data problem
is a `ConfigError` naming the entry, and then run on the train state every `every` steps and at
the end. `run(state)` returns floats keyed "<name>/<metric>" and its own cost "<name>/seconds"
(wall-clock seconds of that call, feature extraction included).

`ShardedForward` runs a function of (parameters, batch) over the run's mesh: the batch's rows are
split as the rules' `act_batch` says (`cfm.parallel.sharding.batch_sharding`), padded to a whole
number of rows per batch shard, and the result comes back replicated on every process, so a
(data=2, fsdp=2) mesh gives what one device gives and every process sees the same numbers.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from cfm.config_check import ConfigError
from cfm.parallel import mesh as mesh_lib
from cfm.parallel import sharding


def fail(name: str, key: str, value: Any, why: str) -> None:
    """Raise the one-line ConfigError of entry `name`'s key: `config.evals.<name>.<key>=...`."""
    raise ConfigError(f"config.evals.{name}.{key}={value!r}: {why}")


def check(cond: bool, name: str, key: str, value: Any, why: str) -> None:
    """`fail` unless `cond`."""
    if not cond:
        fail(name, key, value, why)


class Evaluator:
    """Base of the evaluators: `run` times `compute` and adds "<name>/seconds"."""

    def __init__(self, name: str, every: int):
        self.name, self.every = name, int(every)

    def due(self, step: int, final: bool = False) -> bool:
        """Whether to run after optimiser step `step` (steps completed): every `every` steps and
        at the end. A function of the step only, so a resumed run continues the series."""
        return final or (self.every > 0 and step > 0 and step % self.every == 0)

    def compute(self, state: Any) -> dict[str, float]:
        """The metrics without their prefix (subclasses)."""
        raise NotImplementedError

    def run(self, state: Any) -> dict[str, float]:
        """{"<name>/<metric>": value, "<name>/seconds": cost} for the train state `state`."""
        start = time.perf_counter()
        out = {f"{self.name}/{k}": float(v) for k, v in self.compute(state).items()}
        out[f"{self.name}/seconds"] = time.perf_counter() - start
        return out

    def warnings(self, metrics: dict[str, float]) -> list[str]:
        """Lines to print for `metrics` (this evaluator's `run` output); none by default."""
        return []


class ShardedForward:
    """`fn(params, batch) -> pytree of [rows, ...] arrays`, jitted once and run over the mesh of
    `setup` in chunks of `batch_size` rows (rounded up to a multiple of the batch shards; the
    last chunk padded with copies of its first row, whose outputs are dropped)."""

    def __init__(self, setup: Any, fn: Callable[[Any, dict], Any], batch_size: int):
        self.mesh, self.rules = setup.mesh, setup.rules
        shards = sharding.batch_shards(self.mesh, self.rules)
        self.chunk = -(-max(int(batch_size), 1) // shards) * shards
        self.fn = jax.jit(fn, out_shardings=mesh_lib.replicated(self.mesh))

    def _place(self, x: np.ndarray) -> jax.Array:
        sh = sharding.batch_sharding(self.mesh, x.ndim, self.rules)
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

    def __call__(self, params: Any, arrays: dict[str, np.ndarray]) -> Any:
        """The outputs for every row of `arrays` (numpy, equal leading lengths), as numpy."""
        n = len(next(iter(arrays.values())))
        outs = []
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            for lo in range(0, n, self.chunk):
                part = {k: np.asarray(v[lo:lo + self.chunk]) for k, v in arrays.items()}
                m = len(next(iter(part.values())))
                if m < self.chunk:
                    part = {k: np.concatenate([v, np.repeat(v[:1], self.chunk - m, 0)])
                            for k, v in part.items()}
                out = self.fn(params, {k: self._place(v) for k, v in part.items()})
                outs.append(jax.tree.map(lambda a: np.asarray(a)[:m], out))
        return jax.tree.map(lambda *a: np.concatenate(a), *outs)

