"""SigLIP's pairwise sigmoid loss, whole or in per-device chunks around the data axis.

Zhai et al. 2023 ("Sigmoid Loss for Language Image Pre-Training", ICCV): for L2-normalised
embeddings x_i (slides) and y_j (omics) of a global batch of B pairs,

    loss = -1/B * sum_i sum_j log sigmoid( z_ij * (t * <x_i, y_j> + b) ),   z_ij = +1 if i == j
                                                                             else -1,

with a learnable temperature t = exp(t') and bias b, initialised t' = log 10 and b = -10 (the
paper's Sec. 3.2: the bias keeps the many negatives from dominating the first steps).

Unlike the softmax (InfoNCE) loss, every pair's term is independent, so the B x B matrix never
has to exist on one device: each device keeps its b = B / n slides and passes its omics
embeddings round the ring of the batch axes with `jax.lax.ppermute`; after n - 1 hops each
device has met every omics embedding once and summed its b x b block of terms (the positives
only in the first, its own, block). Memory is O(b^2) per device instead of O(B^2); the
gradient flows back through the ring (ppermute's transpose is the reverse permutation). The
result equals the whole-matrix loss (tests/test_align.py checks values and gradients on 1, 2
and 8 devices).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

T_PRIME_INIT = math.log(10.0)  # SigLIP: t = exp(t'), t' initialised at log 10
BIAS_INIT = -10.0  # SigLIP: b initialised at -10


def _block(x: jax.Array, y: jax.Array, t_prime: jax.Array, bias: jax.Array,
           positives: bool) -> jax.Array:
    """Sum over one block of -log sigmoid(z * logits); diagonal positive if `positives`."""
    logits = jnp.exp(t_prime) * (x.astype(jnp.float32) @ y.astype(jnp.float32).T) + bias
    z = 2.0 * jnp.eye(x.shape[0], y.shape[0]) - 1.0 if positives else -1.0
    return -jnp.sum(jax.nn.log_sigmoid(z * logits))


def sigmoid_loss(x: jax.Array, y: jax.Array, t_prime: jax.Array, bias: jax.Array) -> jax.Array:
    """The whole-matrix loss: x, y [B, d] (pair i is row i of both), scalars t', b."""
    return _block(x, y, t_prime, bias, positives=True) / x.shape[0]


def chunked_sigmoid_loss(x: jax.Array, y: jax.Array, t_prime: jax.Array, bias: jax.Array,
                         mesh: jax.sharding.AbstractMesh | jax.sharding.Mesh,
                         axes: Sequence[str]) -> jax.Array:
    """`sigmoid_loss` with x and y split over the mesh axes `axes` (the batch axes): each
    device keeps its rows of x and the rows of y travel round the ring. Mesh axes of size 1
    are dropped; with none left this is `sigmoid_loss`."""
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    if not axes:
        return sigmoid_loss(x, y, t_prime, bias)
    n = math.prod(mesh.shape[a] for a in axes)
    if x.shape[0] % n:
        raise ValueError(f"batch of {x.shape[0]} pairs does not split over {axes} ({n} "
                         "devices)")
    total = x.shape[0]
    ring = [(i, (i + 1) % n) for i in range(n)]

    def local(xl, yl, tp, b):
        acc = _block(xl, yl, tp, b, positives=True)
        for _ in range(n - 1):  # n is static: the ring unrolls into n - 1 hops
            yl = jax.lax.ppermute(yl, axes, ring)
            acc = acc + _block(xl, yl, tp, b, positives=False)
        return jax.lax.psum(acc, axes) / total

    return jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P(), P()),
                         out_specs=P())(x, y, t_prime, bias)


def pair_logits(x: jax.Array, y: jax.Array, t_prime: jax.Array, bias: jax.Array) -> jax.Array:
    """[B, B] logits t * <x_i, y_j> + b (for metrics on small batches and evaluation)."""
    return jnp.exp(t_prime) * (x @ y.T) + bias
