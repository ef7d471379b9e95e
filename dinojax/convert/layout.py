"""Stacked <-> per-layer block layouts of a backbone parameter tree.

dinojax stores the blocks stacked (`blocks.attn.qkv.kernel` has a leading depth axis) so that
`jax.lax.scan` walks them. Code that keeps one subtree per block (an unrolled implementation, a
pipeline stage, a per-layer checkpoint) uses `blocks.{i}.attn.qkv.kernel` instead. These two
functions convert between the layouts without changing a single value, so a per-layer tree can go
through the converter and come back bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from dinojax.convert.backbone import ConversionError


def _leaves(tree: Mapping, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _map(tree: Mapping, fn) -> dict:
    return {k: _map(v, fn) if isinstance(v, Mapping) else fn(v) for k, v in tree.items()}


def _take(a, i: int):
    if isinstance(a, jax.ShapeDtypeStruct):  # abstract trees (restore targets)
        return jax.ShapeDtypeStruct(a.shape[1:], a.dtype)
    return a[i]


def unstack_blocks(params: Mapping) -> dict:
    """Stacked tree -> per-layer tree: `blocks` becomes `{0: {...}, 1: {...}, ...}` (int keys,
    like `nnx.to_pure_dict` of a list of modules). Other entries are shared, not copied."""
    if "blocks" not in params:
        raise ConversionError("parameter tree has no 'blocks' entry")
    leaves = _leaves(params["blocks"])
    depths = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in leaves.items()}
    if len(set(depths.values())) != 1 or None in depths.values():
        raise ConversionError(f"blocks are not stacked on one leading axis: {depths}")
    depth = next(iter(depths.values()))
    blocks = {i: _map(params["blocks"], lambda a, i=i: _take(a, i)) for i in range(depth)}
    return {**params, "blocks": blocks}


def stack_blocks(params: Mapping) -> dict:
    """Per-layer tree -> stacked tree (the inverse of `unstack_blocks`). Block keys may be ints
    or digit strings (orbax stores dict keys as strings); they must be exactly 0..depth-1 and
    every block must have the same parameter paths and shapes."""
    if "blocks" not in params:
        raise ConversionError("parameter tree has no 'blocks' entry")
    try:
        index = {int(k): k for k in params["blocks"]}
    except (TypeError, ValueError) as e:
        keys = sorted(map(str, params["blocks"]))
        raise ConversionError(f"per-layer blocks must be keyed 0..depth-1, got {keys}") from e
    if not index or sorted(index) != list(range(len(index))):
        raise ConversionError(f"per-layer blocks must be keyed 0..depth-1, got {sorted(index)}")
    per_layer = [_leaves(params["blocks"][index[i]]) for i in range(len(index))]
    ref = {k: np.shape(v) for k, v in per_layer[0].items()}
    bad = [
        f"block {i}: {sorted(set(leaves) ^ set(ref))}"
        if set(leaves) != set(ref)
        else f"block {i}: shapes differ from block 0"
        for i, leaves in enumerate(per_layer)
        if set(leaves) != set(ref) or any(np.shape(leaves[k]) != ref[k] for k in ref)
    ]
    if bad:
        raise ConversionError("per-layer blocks do not match: " + "; ".join(bad))
    stacked: dict = {}
    for path in ref:
        value = np.stack([np.asarray(leaves[path]) for leaves in per_layer])
        node = stacked
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return {**params, "blocks": stacked}
