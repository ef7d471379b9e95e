"""The input of a linear head, shared by the released heads (`dinojax.eval.linear`) and the probe
grid (`dinojax.eval.probe`): the official feature recipe and the placement of feature rows on
the mesh.

Feature recipe: facebookresearch/dinov2 `dinov2/eval/linear.py` `create_linear_input`. From
`get_intermediate_layers(x, n, return_class_token=True)` (final norm applied), the CLS tokens of
the last `n` blocks concatenated oldest first, optionally followed by the mean patch token of the
last block (registers excluded): `[CLS_{L-n}, ..., CLS_{L-1} (, mean(patch_{L-1}))]`.
`dinojax.eval.features.LinearInputs` extracts the `cls` and `avgpool` arrays this reads.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dinojax.eval.features import batch_sharding

__all__ = ["linear_input", "pad_rows"]


def linear_input(cls: jax.Array, avgpool: jax.Array, n_blocks: int, use_avgpool: bool) -> jax.Array:
    """`create_linear_input`: `cls` (B, n_total, D) CLS tokens of the last blocks (oldest first),
    `avgpool` (B, D) the last block's mean patch token -> (B, n_blocks*D [+ D])."""
    if not 1 <= n_blocks <= cls.shape[1]:
        raise ValueError(f"n_blocks must be in [1, {cls.shape[1]}], got {n_blocks}")
    x = cls[:, -n_blocks:].reshape(cls.shape[0], -1)
    if use_avgpool:
        x = jnp.concatenate([x, avgpool.astype(x.dtype)], axis=-1)
    return x.astype(jnp.float32)


def pad_rows(mesh: Mesh, *arrays: np.ndarray) -> tuple[list[jax.Array], jax.Array]:
    """The arrays (same number of rows) padded with zero rows to a multiple of the mesh's device
    count and split over it by rows, and the (rows,) mask of the real ones."""
    n_shards = math.prod(mesh.shape[a] for a in mesh.axis_names)
    n = arrays[0].shape[0]
    pad = -(-n // n_shards) * n_shards - n
    sharding = batch_sharding(mesh)
    out = [
        jax.device_put(np.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)), sharding) for a in arrays
    ]
    valid = jax.device_put(np.arange(n + pad) < n, sharding)
    return out, valid
