"""Logical axis names -> mesh axes: the rules, and the shardings of parameters built from them.

Parameters name their axes `embed`, `mlp`, `heads`, `kv`, `vocab`, `layers`; activations use
`act_*` names. The default rules give the three kinds of parallelism of a `(data, fsdp, tensor)`
mesh (`cfm.parallel.mesh`):

- data parallel: the batch (`act_batch`) is split over `data` and `fsdp` together;
- FSDP (ZeRO-3, Rajbhandari et al. 2020): every weight's `embed` axis is split over `fsdp`
  (and, by `zero3_axis` below, every other parameter on some axis), so parameters, teacher and
  both Adam moments are spread over those devices and gathered per layer by XLA when used;
- tensor parallelism (Megatron-LM, Shoeybi et al. 2019): attention heads, MLP hidden units and
  prototypes are split over `tensor`, as are the matching activations.

Two more config keys complete the picture: `sharding.zero3_axis` (default `fsdp`) gives every
parameter that the rules leave without that mesh axis (biases, norms, LayerScale, weight-norm
scales) the axis on its longest evenly divisible dimension, so no parameter stays whole on every
FSDP device ('' turns this off); and a parameter smaller than `sharding.min_shard_size` elements
stays replicated whatever the rules say. An axis whose length does not divide by its mesh axes'
size stays unsplit. Batches are laid out by the same rules: their leading axis by `act_batch`
(`batch_axes`, `batch_sharding`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
)


def rules_from_config(config: ml_collections.ConfigDict) -> Rules:
    """`config.sharding.rules` as a tuple of (logical name, mesh axes) pairs."""
    return tuple((str(name), tuple(axes) if isinstance(axes, (list, tuple)) else axes)
                 for name, axes in config.sharding.rules)


def _axis_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in names)


def batch_axes(rules: Rules) -> tuple[str, ...]:
    """The mesh axes the rules split the batch over (`act_batch`); () for none."""
    for name, axes in rules:
        if name == "act_batch":
            return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return ()


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules) -> NamedSharding:
    """A batch array's sharding: leading axis split as `act_batch` says, the rest replicated."""
    return NamedSharding(mesh, P(batch_axes(rules) or None, *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch is split on `mesh` (the global batch must divide by it)."""
    return _axis_size(mesh, batch_axes(rules) or None)


def _add_zero3(spec: list, shape: tuple[int, ...], mesh: Mesh, axis: str) -> list:
    """ZeRO-3 for every parameter: one the rules left without mesh axis `axis` (biases, norms,
    LayerScale, weight-norm scales) gets it on its longest dimension that still divides evenly,
    so no parameter stays whole on every device of that axis."""
    n = mesh.shape.get(axis, 1) if axis else 1
    used = {a for ax in spec if ax is not None for a in ((ax,) if isinstance(ax, str) else ax)}
    if n == 1 or axis in used:
        return spec
    for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
        names = () if spec[i] is None else ((spec[i],) if isinstance(spec[i], str) else spec[i])
        if shape[i] % (_axis_size(mesh, names or None) * n) == 0:
            spec = list(spec)
            spec[i] = (axis,) + tuple(names) if names else axis
            return spec
    return spec


def param_shardings(boxed_abstract: Any, mesh: Mesh, rules: Rules, min_size: int,
                    zero3_axis: str = "fsdp") -> Any:
    """NamedSharding for every parameter of a boxed (nn.LogicallyPartitioned) abstract tree:
    the rules, then ZeRO-3 over `zero3_axis` ('' for none), replicated under `min_size`."""

    def one(leaf):
        value = leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf
        names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else (None,) * value.ndim
        if math.prod(value.shape) < min_size:
            return NamedSharding(mesh, P())
        spec = nn.logical_to_mesh_axes(names, rules)
        spec = [ax if value.shape[i] % _axis_size(mesh, ax) == 0 else None
                for i, ax in enumerate(spec)]
        return NamedSharding(mesh, P(*_add_zero3(spec, value.shape, mesh, zero3_axis)))

    return jax.tree.map(one, boxed_abstract,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
