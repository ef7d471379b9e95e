"""Device mesh and logical-axis sharding (Flax NNX sharding metadata,
https://flax.readthedocs.io/en/latest/guides/flax_gspmd.html).

Parameters carry logical axis names in their `nnx.Param` metadata (`out_sharding`, e.g.
`("layers", "embed", "qkv")`); a rule table (config.mesh.rules) maps each name to mesh axes. A
dimension whose size is not divisible by its mesh axes falls back to replicated, and a mesh axis
is used at most once per array (the first dimension that claims it wins).

The mesh uses `AxisType.Auto` axes: `jax.make_mesh` defaults to Explicit axes since JAX 0.10,
which would turn every logical constraint of the model into an error
(https://docs.jax.dev/en/latest/_autosummary/jax.make_mesh.html).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Rules = Sequence[tuple[str, str | Sequence[str] | None]]

# FSDP over a ("data", "fsdp") mesh: the rules of the training recipes (configs/common.py
# `c.mesh.rules`; a test keeps the two equal), also the default of `dinojax.load(..., mesh=)`.
FSDP_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", None),
    ("qkv", None),
    ("heads", None),
    ("norm", None),
    ("layers", None),
    ("hidden", "fsdp"),
    ("bottleneck", None),
    ("prototypes", "fsdp"),
)

__all__ = [
    "FSDP_RULES",
    "assert_sharded",
    "batch_axes",
    "batch_sharding",
    "hybrid_device_array",
    "logical_names",
    "logical_to_mesh_sharding",
    "make_mesh",
    "num_slices",
    "replicated",
    "spec_for",
]


def _resolve_shape(shape: Sequence[int], n: int, what: str) -> list[int]:
    shape = [int(s) for s in shape]
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {tuple(shape)} has more than one -1")
    if -1 in shape:
        rest = math.prod(s for s in shape if s != -1)
        if rest <= 0 or n % rest:
            raise ValueError(f"mesh shape {tuple(shape)} does not divide {n} {what}")
        shape[shape.index(-1)] = n // rest
    if any(s < 1 for s in shape) or math.prod(shape) != n:
        raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} {what}, have {n}")
    return shape


def num_slices(devices: Sequence[Any]) -> int:
    """Distinct `slice_index` values of the devices (TPU multi-slice); 1 where devices have none
    (CPU, GPU, one TPU slice)."""
    return len({getattr(d, "slice_index", 0) for d in devices}) or 1


def hybrid_device_array(
    shape: Sequence[int],
    axes: Sequence[str],
    devices: Sequence[Any],
    dcn_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Devices of a multi-slice mesh: `shape` inside each slice (ICI), `dcn_shape` across slices
    (data-centre network), as MaxText's `ici_*` / `dcn_*` parallelism
    (`jax.experimental.mesh_utils.create_hybrid_device_mesh`). The mesh's shape is their
    element-wise product; every slice is one contiguous block of each axis.

    `shape` may hold one -1 (the rest of a slice's devices). `dcn_shape=None` puts the slices on
    the first axis (data parallelism across slices: only gradient and statistics reductions
    cross the slow network, while FSDP gathers stay inside a slice)."""
    from jax.experimental import mesh_utils

    axes = tuple(axes)
    n_slices = num_slices(devices)
    if n_slices == 1 and not hasattr(devices[0], "slice_index"):
        raise ValueError(
            f"a multi-slice mesh (dcn_shape {dcn_shape}) needs TPU devices that carry a "
            f"slice_index; these ({devices[0].platform}) are one slice: leave mesh.dcn_shape unset"
        )
    if dcn_shape is None:
        dcn_shape = (n_slices,) + (1,) * (len(axes) - 1)
    dcn_shape = [int(s) for s in dcn_shape]
    if len(shape) != len(axes) or len(dcn_shape) != len(axes):
        raise ValueError(
            f"mesh shape {tuple(shape)}, dcn_shape {tuple(dcn_shape)} and axes {axes} differ in "
            "length"
        )
    if math.prod(dcn_shape) != n_slices or min(dcn_shape) < 1:
        raise ValueError(
            f"mesh dcn_shape {tuple(dcn_shape)} needs {math.prod(dcn_shape)} slices, the devices "
            f"are in {n_slices} (slice_index)"
        )
    per_slice = len(devices) // n_slices
    if per_slice * n_slices != len(devices):
        raise ValueError(f"{len(devices)} devices do not split evenly into {n_slices} slices")
    ici = _resolve_shape(shape, per_slice, "devices per slice")
    return mesh_utils.create_hybrid_device_mesh(ici, dcn_shape, list(devices))


def make_mesh(
    shape: Sequence[int] = (-1, 1),
    axes: Sequence[str] = ("data", "fsdp"),
    devices: Sequence[jax.Device] | None = None,
    dcn_shape: Sequence[int] | None = None,
) -> Mesh:
    """A mesh of `devices` (default: all) with Auto axes; one -1 in `shape` takes the rest.

    Devices of several TPU slices (`slice_index`, a multi-slice pod) or an explicit `dcn_shape`
    give the hybrid mesh of `hybrid_device_array`: `shape` per slice, `dcn_shape` across."""
    axes = tuple(axes)
    if len(shape) != len(axes):
        raise ValueError(f"mesh shape {tuple(shape)} and axes {axes} differ in length")
    devices = list(jax.devices() if devices is None else devices)
    n_slices = num_slices(devices)
    if n_slices > 1 or (dcn_shape is not None and math.prod(dcn_shape) != 1):
        arr = hybrid_device_array(shape, axes, devices, dcn_shape)
        return Mesh(arr, axes, axis_types=(AxisType.Auto,) * len(axes))
    shape = _resolve_shape(shape, len(devices), "devices")
    return jax.make_mesh(
        tuple(shape), axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _rule_table(rules: Rules) -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {}
    for name, target in rules:
        if name in table:  # first rule wins, like flax's logical_axis_rules
            continue
        if target is None:
            table[name] = ()
        elif isinstance(target, str):
            table[name] = (target,)
        else:
            table[name] = tuple(target)
    return table


def spec_for(
    shape: Sequence[int], names: Sequence[str | None] | None, mesh: Mesh, rules: Rules
) -> P:
    """PartitionSpec of one array from its logical names (replicated where not divisible)."""
    if names is None:
        return P()
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
    table = _rule_table(rules)
    used: set[str] = set()
    out: list[Any] = []
    for size, name in zip(shape, names):
        axes = tuple(a for a in table.get(name, ()) if a not in used) if name else ()
        for a in axes:
            if a not in mesh.shape:
                raise ValueError(f"sharding rule for {name!r} names unknown mesh axis {a!r}")
        n = math.prod(mesh.shape[a] for a in axes)
        if not axes or size % n:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def logical_names(state: Any) -> Any:
    """Tree of logical-name tuples (None where a leaf has none) of an nnx.State / module."""
    if isinstance(state, nnx.Module):
        state = nnx.state(state, nnx.Param)

    def names(v):
        return tuple(v.get_metadata().get("out_sharding") or ()) or None if _is_var(v) else None

    tree = jax.tree.map(names, state, is_leaf=_is_var)
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def logical_to_mesh_sharding(
    abstract_state: Any, mesh: Mesh, rules: Rules, names: Any | None = None
) -> Any:
    """NamedShardings for a state.

    `abstract_state` is either an nnx.State / module whose Variables carry `out_sharding`
    metadata, or a plain pytree of arrays / ShapeDtypeStructs; then `names` (same structure,
    tuples of logical names or None per leaf) gives the names, and leaves without names are
    replicated. The result is a plain pytree (pure dicts for nnx states).
    """
    if isinstance(abstract_state, nnx.Module | nnx.State):
        if isinstance(abstract_state, nnx.Module):
            abstract_state = nnx.state(abstract_state, nnx.Param)
        names = logical_names(abstract_state)
        abstract_state = nnx.to_pure_dict(abstract_state)
    if names is None:
        return jax.tree.map(lambda _: replicated(mesh), abstract_state)
    return _map_with_names(abstract_state, names, mesh, rules)


def _map_with_names(tree: Any, names: Any, mesh: Mesh, rules: Rules) -> Any:
    # `names` leaves are tuples (which jax.tree treats as nodes) or None: walk `tree` and look the
    # names up by path instead.
    flat_names = dict(_flatten_names(names))

    def leaf(path, x):
        key = jax.tree_util.keystr(path)
        return NamedSharding(mesh, spec_for(np.shape(x), flat_names.get(key), mesh, rules))

    return jax.tree_util.tree_map_with_path(leaf, tree)


def _flatten_names(names: Any, path: tuple = ()) -> list[tuple[str, tuple | None]]:
    if isinstance(names, Mapping):
        out = []
        for k, v in names.items():
            out += _flatten_names(v, (*path, jax.tree_util.DictKey(k)))
        return out
    return [(jax.tree_util.keystr(path), names)]


def batch_axes(mesh: Mesh, rules: Rules | None = None) -> tuple[str, ...]:
    """Mesh axes the batch dimension is split over: the `batch` rule, else every mesh axis."""
    table = _rule_table(rules or ())
    axes = table.get("batch", tuple(mesh.axis_names))
    return tuple(a for a in axes if a in mesh.shape)


def batch_sharding(mesh: Mesh, rules: Rules | None = None) -> NamedSharding:
    """Leading (batch) axis split over the batch mesh axes, the rest replicated."""
    axes = batch_axes(mesh, rules)
    return NamedSharding(mesh, P(axes if len(axes) != 1 else axes[0]))


def assert_sharded(state: Any, min_size: int = 2**20) -> None:
    """Raise if an array with at least `min_size` elements is fully replicated on a mesh of more
    than one device (a missing or non-divisible rule silently costs memory otherwise)."""
    bad = []
    for path, x in jax.tree_util.tree_leaves_with_path(state):
        if not isinstance(x, jax.Array) or x.size < min_size:
            continue
        sh = x.sharding
        n_dev = len(sh.device_set)
        if n_dev > 1 and sh.is_fully_replicated:
            bad.append(f"{jax.tree_util.keystr(path)} {tuple(x.shape)}")
    if bad:
        raise AssertionError(
            f"{len(bad)} large arrays (>= {min_size} elements) are replicated on every device "
            "instead of sharded (a missing or non-divisible rule in config.mesh.rules; the "
            "threshold is train.assert_sharded_min_size): " + ", ".join(bad)
        )
