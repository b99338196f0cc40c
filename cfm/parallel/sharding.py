"""Logical axis names -> mesh axes: the rules, and the shardings of parameters built from them.

Parameters name their axes `embed`, `mlp`, `heads`, `kv`, `vocab`, `layers`; activations use
`act_*` names. The default rules give the three kinds of parallelism of a `(data, fsdp, tensor)`
mesh (`cfm.parallel.mesh`):

- data parallel: the batch (`act_batch`) is split over `data` and `fsdp` together;
- FSDP (ZeRO-3, Rajbhandari et al. 2020): every weight's `embed` axis is split over `fsdp`, so
  parameters, teacher and both Adam moments are spread over those devices and gathered per layer
  by XLA when used;
- tensor parallelism (Megatron-LM, Shoeybi et al. 2019): attention heads, MLP hidden units and
  prototypes are split over `tensor`, as are the matching activations.

A parameter smaller than `sharding.min_shard_size` elements stays replicated (norms, biases,
LayerScale: sharding them costs more in collectives than it saves), and so does any axis whose
length does not divide by its mesh axes' size.
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


def _add_fsdp(spec: list, shape: tuple[int, ...], mesh: Mesh) -> list:
    """ZeRO-3 for every parameter: one without an `embed` axis (biases, norms, LayerScale,
    weight-norm scales) gets `fsdp` on its longest axis that still divides evenly, so no
    parameter stays whole on every fsdp device."""
    n = mesh.shape.get("fsdp", 1)
    used = {a for ax in spec if ax is not None for a in ((ax,) if isinstance(ax, str) else ax)}
    if n == 1 or "fsdp" in used:
        return spec
    for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
        names = () if spec[i] is None else ((spec[i],) if isinstance(spec[i], str) else spec[i])
        if shape[i] % (_axis_size(mesh, names or None) * n) == 0:
            spec = list(spec)
            spec[i] = ("fsdp",) + tuple(names) if names else "fsdp"
            return spec
    return spec


def param_shardings(boxed_abstract: Any, mesh: Mesh, rules: Rules, min_size: int) -> Any:
    """NamedSharding for every parameter of a boxed (nn.LogicallyPartitioned) abstract tree."""

    def one(leaf):
        value = leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf
        names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else (None,) * value.ndim
        if math.prod(value.shape) < min_size:
            return NamedSharding(mesh, P())
        spec = nn.logical_to_mesh_axes(names, rules)
        spec = [ax if value.shape[i] % _axis_size(mesh, ax) == 0 else None
                for i, ax in enumerate(spec)]
        return NamedSharding(mesh, P(*_add_fsdp(spec, value.shape, mesh)))

    return jax.tree.map(one, boxed_abstract,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
