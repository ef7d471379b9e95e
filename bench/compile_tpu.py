"""Compile the training step that `train.py` runs for a Cloud TPU slice, on this CPU: deviceless.

With `libtpu` installed (the `tpu` or `test` extra), XLA's real TPU compiler runs on the host and
reports what one chip of the slice would hold and compute. Nothing is run: no TPU is needed.

    JAX_PLATFORMS=cpu python bench/compile_tpu.py --config configs/dinov2_vitg14.py \
        --topology v5p-256 --config.model.overrides.dtype=bfloat16 \
        --config.model.overrides.remat_policy=full

The step is the trainer's own (`dinojax.train.trainer`: `make_mesh` over the slice's devices,
`StepSetup.from_config`, `state_shardings_for`, `make_train_step`) lowered on the abstract state
(`jax.eval_shape`: nothing is materialised) and the batch the input pipeline would hand it (the
recipe's global batch, crop sizes and masked-token buffer). Prints one line and appends one JSON
line to bench/results/compile_tpu.jsonl: per-chip memory from `compiled.memory_analysis()` against
the chip's HBM, XLA's per-chip FLOPs against `dinojax.ssl.step.flops_per_step` (the trainer's
nominal MFU numerator, `analytic_flops_per_chip`, and the count of what this step executes,
`analytic_executed_flops_per_chip`: batch-subset drop path, full remat's recompute; XLA's
matmuls alone are `xla_matmul_flops_per_chip`), and the collectives of the optimized HLO per
step. A recipe that does not fit exits with status 2.
`--sweep` finds, per remat policy (`--sweep_policies`), the largest power-of-two per-chip batch
that fits, by bisection (each compile recorded).

`--num_slices N` compiles for N such slices joined over the data-centre network (a multi-slice
pod): the trainer's hybrid mesh (`config.mesh.shape` inside each slice, `config.mesh.dcn_shape`
across; by default the slices on the data axis), and the collectives report, per kind, what
crosses slices (`cross_slice_count` / `cross_slice_bytes` / `cross_slice_shapes`: the DCN sends
XLA's TPU compiler makes of a collective).

Slice names count what Cloud TPU counts: TensorCores for v4 / v5p (2 per chip: `v5p-256` is 128
chips), chips for v5e / v6e (`v5e-64` is 64 chips).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # TPU is a compile target only; runtime stays CPU
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # silences a libtpu start-up error
# libtpu takes a machine-wide lock file by default; compiling touches no TPU, so several
# processes (parallel tests, a compile beside another) may load it at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 2**30

# Per-chip HBM of each generation (Cloud TPU system architecture pages).
HBM_BYTES = {"v4": 32 * GIB, "v5p": 95 * GIB, "v5e": 16 * GIB, "v6e": 32 * GIB}
# Slice sizes offered per generation (in the slice name's unit).
_SIZES = {
    "v4": [2**k for k in range(3, 13)],  # v4-8 .. v4-4096 (TensorCores)
    "v5p": [2**k for k in range(3, 14)],  # v5p-8 .. v5p-8192 (TensorCores)
    "v5e": [4, 8, 16, 32, 64, 128, 256],  # chips
    "v6e": [4, 8, 16, 32, 64, 128, 256],  # chips
}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # "v5p-256"
    generation: str  # "v5p"
    chips: int
    topology_name: str  # for jax.experimental.topologies.get_topology_desc
    chip_config_name: str | None
    hbm_bytes: int

    @property
    def torus(self) -> str:
        return self.topology_name.split(":", 1)[1]


def known_slices() -> list[str]:
    return [f"{g}-{n}" for g, sizes in _SIZES.items() for n in sizes]


def _torus_3d(chips: int) -> tuple[int, int, int]:
    # Cloud TPU's v4 / v5p shapes: 2x2x1, 2x2x2, then the axes double in turn from the last
    # (2x2x4, 2x4x4, 4x4x4, 4x4x8, 4x8x8, 8x8x8, ...).
    if chips == 4:
        return (2, 2, 1)
    dims, i = [2, 2, 2], 2
    while math.prod(dims) < chips:
        dims[i] *= 2
        i = (i - 1) % 3
    return tuple(dims)


def _torus_2d(chips: int) -> tuple[int, int]:
    # v5e / v6e: 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16.
    a = 2 ** (int(math.log2(chips)) // 2)
    return (a, chips // a)


def parse_slice(name: str) -> Slice:
    """`v5p-256` -> its topology; an unknown name is a one-line error listing the known ones."""
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name.strip().lower())
    if not m or int(m.group(2)) not in _SIZES[m.group(1)]:
        known = ", ".join(f"{g}-{{{','.join(map(str, s))}}}" for g, s in _SIZES.items())
        raise ValueError(f"unknown TPU slice {name!r}; known: {known}")
    gen, n = m.group(1), int(m.group(2))
    if gen in ("v4", "v5p"):
        chips = n // 2
        torus = "x".join(map(str, _torus_3d(chips)))
        prefix = "v5" if gen == "v5p" else "v4"
        return Slice(name, gen, chips, f"{prefix}:{torus}", "megacore", HBM_BYTES[gen])
    torus = "x".join(map(str, _torus_2d(n)))
    return Slice(name, gen, n, f"{gen}:{torus}", None, HBM_BYTES[gen])


def topology_devices(s: Slice, num_slices: int = 1) -> list:
    """The devices of `num_slices` such slices (a multi-slice pod: each device carries its
    `slice_index`), described by libtpu (no TPU needed)."""
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - jax always has it
        raise RuntimeError(f"jax.experimental.topologies is unavailable: {e}") from None
    kw = {"chip_config_name": s.chip_config_name} if s.chip_config_name else {}
    try:
        topo = topologies.get_topology_desc(
            platform="tpu", topology_name=s.topology_name, chips_per_host_bounds=(2, 2, 1),
            num_slices=num_slices, **kw,
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001 - libtpu missing or refusing: say which
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(
            f"cannot describe TPU topology {s.topology_name} ({first}); is libtpu installed "
            "(pip install 'dinojax[tpu]')?"
        ) from None
    return list(topo.devices)


def make_slice_mesh(config, s: Slice, devices: list):
    """The trainer's mesh (`dinojax.sharding.make_mesh`, config.mesh) over the slice's devices.
    A shape the torus cannot host is a one-line error naming the physical axes."""
    from dinojax.sharding import make_mesh

    shape, axes = tuple(config.mesh.shape), tuple(config.mesh.axes)
    dcn = config.mesh.get("dcn_shape", None)
    try:
        return make_mesh(shape, axes, devices, dcn_shape=dcn)
    except Exception as e:  # noqa: BLE001 - jax's assignment errors are several lines
        msg = str(e)
        if "assignment" not in msg and "physical" not in msg:
            raise
        raise ValueError(
            f"mesh shape {shape} (axes {axes}) cannot be laid on the {s.name} torus "
            f"{s.torus} (physical axes {s.torus.split('x')}): each mesh axis must be a product "
            "of whole physical axes"
        ) from None


def batch_spec(config, mesh, process_count: int) -> dict:
    """The `ShapeDtypeStruct`s of one batch, as `DinoDataIterator.element_spec` gives them on a
    pod of `process_count` hosts (same shapes, dtypes, masked-token buffer and sharding)."""
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from dinojax.data import pipeline
    from dinojax.sharding import batch_axes
    from dinojax.ssl import step as ssl_step
    from dinojax.train.data import data_config

    rules = tuple(tuple(r) for r in config.mesh.rules)
    data_axes = batch_axes(mesh, rules)
    sharding = NamedSharding(mesh, PartitionSpec(data_axes))
    n_shards = int(np.prod([mesh.shape[a] for a in data_axes]))
    dc = data_config(config, process_count, ssl_step.n_batch_shards(config, mesh))
    return pipeline.batch_spec(dc, process_count, max(1, n_shards // process_count), sharding)


def abstract_train_state(config, mesh, setup) -> tuple[dict, dict]:
    """(state as sharded ShapeDtypeStructs, shardings): `create_train_state`'s shapes and
    shardings without creating anything."""
    import jax

    from dinojax.ssl import step as ssl_step

    key = jax.random.key(int(config.seed))
    abstract = jax.eval_shape(lambda k: ssl_step._init_state(config, setup, k), key)
    shardings = ssl_step.state_shardings_for(config, mesh, abstract, setup=setup)
    spec = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return spec, shardings


def bytes_per_chip(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (its shard shapes)."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += int(np.prod(shard, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def tiled_bytes_per_chip(tree: Any, formats: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs in the layouts the compiler
    chose (`compiled.input_formats`, same tree order): TPU pads the two minor dimensions of every
    array to its tile, e.g. (8, 128) for float32, which dominates for tiny smoke-size arrays."""
    import jax
    import numpy as np

    total = 0
    for x, f in zip(jax.tree.leaves(tree), jax.tree.leaves(formats), strict=True):
        shard = list(x.sharding.shard_shape(x.shape))
        layout = getattr(f, "layout", None)
        if layout is not None and layout.tiling:
            tile = layout.tiling[0]
            dims = [shard[i] for i in layout.major_to_minor]
            dims = [1] * max(0, len(tile) - len(dims)) + dims
            for j, t in enumerate(tile[::-1], start=1):
                dims[-j] = -(-dims[-j] // t) * t
            shard = dims
        total += int(np.prod(shard, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def replicated_leaves(tree: Any, min_size: int) -> list[str]:
    """Leaves with at least `min_size` elements that every device holds whole."""
    import jax

    return [
        f"{jax.tree_util.keystr(p)} {tuple(x.shape)}"
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
        if math.prod(x.shape) >= min_size and x.sharding.is_fully_replicated
    ]


# ------------------------------------------------------------------------------------------------
# Collectives of the optimized HLO
# ------------------------------------------------------------------------------------------------

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
    "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_COMP_HEAD = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][a-z\-]*)\((.*)$")
_CALLEES = re.compile(
    r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


_OOM = re.compile(r"HLO temporaries \(([0-9.]+)([KMGT]?)\)")
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _shape_bytes(shape: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * _DTYPE_BYTES.get(dtype, 0)
    return total


class _Instr(NamedTuple):
    op: str  # opcode
    shape: str  # result shape
    rest: str  # the line after `opcode(`: operands, then attributes
    name: str
    root: bool


def _parse_hlo(hlo: str) -> tuple[str | None, dict[str, list[_Instr]], dict]:
    """(entry name, computation -> its instructions, computation -> (first line, last line) of
    its text)."""
    comps: dict[str, list[_Instr]] = {}
    spans: dict[str, tuple[int, int]] = {}
    entry, current, start = None, None, 0
    for i, line in enumerate(hlo.splitlines()):
        if current is None:
            m = _COMP_HEAD.match(line)
            if m and "=" not in line.split("{")[0].split("(")[0]:
                current, start = m.group(2), i
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            spans[current] = (start, i)
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            root, name, shape, op, rest = m.groups()
            comps[current].append(_Instr(op, shape, rest, name, bool(root)))
    return entry, comps, spans


def _operands(rest: str) -> list[str]:
    return re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])


def _resolve(defs: Mapping[str, _Instr], name: str) -> tuple[str, int] | None:
    """What a scalar loop value is, through copies and converts: ("const", value) or
    ("param", tuple index of the computation's parameter)."""
    for _ in range(16):
        ins = defs.get(name)
        if ins is None:
            return None
        if ins.op == "constant":
            m = re.match(r"\s*(-?\d+)\)", ins.rest)
            return ("const", int(m.group(1))) if m else None
        if ins.op == "get-tuple-element":
            src, idx = _operands(ins.rest), re.search(r"\bindex=(\d+)", ins.rest)
            if src and idx and defs.get(src[0]) is not None and defs[src[0]].op == "parameter":
                return ("param", int(idx.group(1)))
            return None
        if ins.op not in ("copy", "convert", "bitcast") or not _operands(ins.rest):
            return None
        name = _operands(ins.rest)[0]
    return None


def _trip_count(
    cond: list[_Instr], body: list[_Instr], init: _Instr | None, caller: Mapping[str, _Instr]
) -> int | None:
    """Iterations of a while loop from its induction variable: the condition compares one
    element of the loop state with a constant, the body adds a constant to that element, and the
    loop's initial tuple sets it to a constant. Scans count 0, 1, .., N-1; XLA's windowed einsum
    loops (`windowed_dot_general_body_*`) may count 0, 2, 4, .. when the compiler unrolls them
    (two windows per iteration), so `counter < 8` can mean 4 iterations. None when the loop is
    not of that form."""
    cdefs = {i.name: i for i in cond}
    croot = next((i for i in cond if i.root), None)
    if croot is None or croot.op != "compare":
        return None
    direction = re.search(r"direction=([A-Z]+)", croot.rest)
    ops = _operands(croot.rest)
    if direction is None or len(ops) != 2:
        return None
    a, b = (_resolve(cdefs, o) for o in ops)
    d = direction.group(1)
    if a and b and a[0] == "const" and b[0] == "param":  # `N > i` is `i < N`
        a, b, d = b, a, {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE"}.get(d, d)
    if not (a and b and a[0] == "param" and b[0] == "const"):
        return None
    index, limit = a[1], b[1]
    bdefs = {i.name: i for i in body}
    broot = next((i for i in body if i.root), None)
    if broot is None or broot.op != "tuple" or len(_operands(broot.rest)) <= index:
        return None
    upd = bdefs.get(_operands(broot.rest)[index])
    while upd is not None and upd.op in ("copy", "convert", "bitcast"):
        upd = bdefs.get(_operands(upd.rest)[0])
    if upd is None or upd.op not in ("add", "subtract") or len(_operands(upd.rest)) != 2:
        return None
    x, c = (_resolve(bdefs, o) for o in _operands(upd.rest))
    if upd.op == "add" and x and x[0] == "const":
        x, c = c, x
    if x != ("param", index) or not c or c[0] != "const" or c[1] == 0:
        return None
    step = c[1] if upd.op == "add" else -c[1]
    if init is None or init.op != "tuple" or len(_operands(init.rest)) <= index:
        return None
    start = _resolve(caller, _operands(init.rest)[index])
    if not start or start[0] != "const":
        return None
    span = {"LT": limit - start[1], "LE": limit - start[1] + 1, "NE": limit - start[1]}.get(d)
    if span is not None and step > 0 and (d != "NE" or span % step == 0):
        return max(0, -(-span // step))
    span = {"GT": start[1] - limit, "GE": start[1] - limit + 1, "NE": start[1] - limit}.get(d)
    if span is not None and step < 0 and (d != "NE" or span % -step == 0):
        return max(0, -(-span // -step))
    return None


def _multiplicities(entry: str | None, comps: Mapping[str, list[_Instr]]) -> tuple[dict, dict]:
    """(computation -> executions per step, while body -> its trip count, None where the loop
    is not a counted one: then taken as 1)."""
    mult: dict[str, int] = {}
    trips: dict[str, int | None] = {}
    defs = {name: {i.name: i for i in instrs} for name, instrs in comps.items()}

    def visit(name: str, k: int) -> None:
        mult[name] = mult.get(name, 0) + k
        for ins in comps.get(name, ()):
            called = dict(_CALLEES.findall(ins.rest))
            trip = 1
            if ins.op == "while" and "body" in called:
                args = _operands(ins.rest)
                init = defs[name].get(args[0]) if args else None
                n = _trip_count(
                    comps.get(called.get("condition", ""), []), comps.get(called["body"], []),
                    init, defs[name],
                )  # fmt: skip
                trips[called["body"]] = n
                trip = 1 if n is None else n
            for role, callee in called.items():
                visit(callee, k * trip if role == "body" else k)
            for group in _BRANCHES.findall(ins.rest):
                for callee in group.split(","):
                    visit(callee.strip().lstrip("%"), k)

    if entry is not None:
        visit(entry, 1)
    return mult, trips


def _iota(dims: list[int], reshape: list[int] | None, perm: list[int] | None):
    import numpy as np

    a = np.arange(math.prod(reshape or dims)).reshape(reshape or dims)
    if perm:
        a = a.transpose(perm)
    return a.reshape(dims)


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


_MESH_GROUPS = re.compile(
    r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*\)?)\))?\s*\{([^}]*)\}"
)
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_LIST_GROUPS = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")


def replica_groups(rest: str) -> list[list[int]] | None:
    """The device groups of one collective from its HLO text (partition ids, i.e. positions in
    the program's device assignment): the explicit `{{0,1},{2,3}}` form, the iota form
    `[G,S]<=[dims]T(perm)`, the named-mesh form `mesh['axis_0'=4,'axis_1'=2] {'axis_0'}`
    (optionally with `device_ids=([dims]T(perm))`), and a collective-permute's source-target
    pairs. None when no group is given (one group of every device) or the form is unknown."""
    import numpy as np

    m = _MESH_GROUPS.search(rest)
    if m:
        names = re.findall(r"'([^']+)'=(\d+)", m.group(1))
        axes, dims = [n for n, _ in names], [int(d) for _, d in names]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(2):
            dm = re.fullmatch(r"\[([\d,]+)\](?:<=\[([\d,]+)\])?(?:T\(([\d,]+)\))?", m.group(2))
            if dm is None:
                return None
            flat = _iota(
                _ints(dm.group(1)),
                _ints(dm.group(2)) if dm.group(2) else None,
                _ints(dm.group(3)) if dm.group(3) else None,
            ).reshape(-1)
            ids = flat.reshape(dims)
        group_axes = [axes.index(a) for a in re.findall(r"'([^']+)'", m.group(3))]
        keep = [i for i in range(len(dims)) if i not in group_axes]
        size = math.prod(dims[i] for i in group_axes)
        return ids.transpose(keep + group_axes).reshape(-1, size).tolist()
    m = _IOTA_GROUPS.search(rest)
    if m:
        g = _iota(_ints(m.group(1)), _ints(m.group(2)), _ints(m.group(3)) if m.group(3) else None)
        return g.tolist()
    m = _LIST_GROUPS.search(rest)
    if m and m.group(1):
        return [_ints(x) for x in re.findall(r"\{([\d,]*)\}", m.group(1))]
    m = _PAIRS.search(rest)
    if m:
        return [_ints(x) for x in re.findall(r"\{(\d+,\d+)\}", m.group(1))]
    return None


def _crosses(groups: list[list[int]] | None, slice_of: list[int]) -> bool:
    if groups is None:  # every device in one group
        return len(set(slice_of)) > 1
    return any(len({slice_of[i] for i in g}) > 1 for g in groups)


_MEGASCALE = re.compile(r'_xla_host_transfer_rendezvous="([a-z\-]+?)(?:\.\d+)?_\d+"')


def collectives(hlo: str, slice_of: list[int] | None = None) -> dict[str, dict[str, Any]]:
    """Per collective kind: instructions in the program (`static`), and executions and result
    bytes per step (`count`, `bytes`: loop bodies times their trip count).

    Async pairs count once (at `-done`, whose result is the collective's, and whose groups are its
    `-start`'s); collectives wrapped in `async-start` computations count at the wrapped
    instruction. With `slice_of` (the slice of each device of the program's device assignment,
    i.e. of `mesh.devices.flat`), `cross_slice_count` / `cross_slice_bytes` count the traffic
    that crosses slices: the DCN sends the compiler made of a collective (per kind of the
    collective they came from) and any collective whose device groups span slices;
    `cross_slice_shapes` lists the shapes sent (parameters or activations)."""
    entry, comps, _ = _parse_hlo(hlo)
    mult, _ = _multiplicities(entry, comps)
    out: dict[str, dict[str, Any]] = {c: {"static": 0, "count": 0, "bytes": 0} for c in COLLECTIVES}
    if slice_of is not None:
        for c in out.values():
            c.update(cross_slice_count=0, cross_slice_bytes=0, cross_slice_shapes=[])
    # an async pair's groups are on its -start, which the -done names as its operand
    starts = dict(re.findall(r"^\s*%?([\w.\-]+)\s*=.*?-start\((.*)$", hlo, flags=re.M))
    for name, instrs in comps.items():
        k = mult.get(name, 0)
        for op, shape, rest, *_ in instrs:
            if op == "send" and slice_of is not None:
                # A multi-slice program: XLA's TPU compiler turns the part of a collective that
                # crosses slices into host-transfer sends over DCN, each naming the collective
                # it came from (`_xla_host_transfer_rendezvous="all-reduce.12_0"`).
                m = _MEGASCALE.search(rest)
                if m and m.group(1) in out:
                    c = out[m.group(1)]
                    c["cross_slice_count"] += k
                    c["cross_slice_bytes"] += k * _shape_bytes(_ARRAY.search(shape).group(0))
                    arr = _ARRAY.search(shape).group(0)
                    if arr not in c["cross_slice_shapes"]:
                        c["cross_slice_shapes"].append(arr)
                continue
            kind = op[: -len("-done")] if op.endswith("-done") else op
            if kind not in out or op.endswith("-start"):
                continue
            c = out[kind]
            c["static"] += 1
            c["count"] += k
            c["bytes"] += k * _shape_bytes(shape)
            if slice_of is None:
                continue
            text = rest
            if op.endswith("-done"):
                operand = re.match(r"\s*%?([\w.\-]+)", rest)
                text = starts.get(operand.group(1), rest) if operand else rest
            if _crosses(replica_groups(text), slice_of):
                c["cross_slice_count"] += k
                c["cross_slice_bytes"] += k * _shape_bytes(shape)
                for arr in _ARRAY.findall(shape):
                    arr = f"{arr[0]}[{arr[1]}]"
                    if arr not in c["cross_slice_shapes"]:
                        c["cross_slice_shapes"].append(arr)
    return out


def all_gathers(hlo: str) -> list[dict[str, Any]]:
    """Every all-gather of the optimized program: `shape` (the gathered result, e.g.
    `bf16[1,64,256]`), `op_name` (its JAX source: `jvp(` marks the student's forward pass,
    `transpose(` its backward pass, neither the teacher and the rest of the step outside the
    gradient), and `count` (executions per step: loop bodies times their trip count)."""
    entry, comps, _ = _parse_hlo(hlo)
    mult, _ = _multiplicities(entry, comps)
    starts = dict(re.findall(r"^\s*%?([\w.\-]+)\s*=.*?-start\((.*)$", hlo, flags=re.M))
    out = []
    for name, instrs in comps.items():
        for op, shape, rest, *_ in instrs:
            if op not in ("all-gather", "all-gather-done"):
                continue
            text = rest
            if op.endswith("-done"):
                operand = re.match(r"\s*%?([\w.\-]+)", rest)
                text = starts.get(operand.group(1), rest) if operand else rest
            src = re.search(r'op_name="([^"]*)"', text)
            arr = _ARRAY.search(shape)
            out.append({
                "shape": arr.group(0) if arr else shape,
                "op_name": src.group(1) if src else "",
                "count": mult.get(name, 0),
            })  # fmt: skip
    return out


def _hlo_flops(text: str) -> float:
    """XLA's HloCostAnalysis FLOPs of an HLO module's text (run by the CPU client: the analysis
    is target-independent and reads the TPU program's shapes as they are)."""
    import jax
    from jax._src.lib import xla_client
    from jaxlib import _hlo

    module = _hlo.hlo_module_from_text(text)
    cpu = jax.devices("cpu")[0].client
    return float(xla_client._xla.hlo_module_cost_analysis(cpu, module).get("flops", 0.0))


def _module_text(hlo: str, spans: Mapping[str, tuple[int, int]], entry: str) -> str:
    """The optimized program's text with `entry` as its entry computation (for XLA's cost
    analysis of one computation and what it calls)."""
    lines = hlo.splitlines()
    header = lines[0].split(",")[0]  # keep `HloModule name`: the rest describes the old entry
    text = [header]
    for name, (a, b) in spans.items():
        chunk = lines[a : b + 1]
        first = re.sub(r"^ENTRY\s+", "", chunk[0])
        if name == entry:
            first = "ENTRY " + first
        text.extend([first, *chunk[1:]])
    # Stack frames live in a table after the header, which is not copied.
    return re.sub(r"\s*stack_frame_id=\d+", "", "\n".join(text))


def flops_per_step(hlo: str, whole: float) -> float:
    """XLA's FLOPs of one execution of the optimized program.

    `cost_analysis` counts a while loop's body once, whatever its trip count (the block scan runs
    it `depth` times). Each body is analysed alone (XLA's own HloCostAnalysis, on the body as the
    entry of a module, which counts the loops nested in it once) and added as many more times as
    it runs beyond the once already counted: (trip count - 1) times per execution of the
    computation that holds the loop. The trip count comes from the loop's induction variable
    (`_trip_count`), not from the condition's constant alone: XLA's windowed einsum loops count in
    steps of 2."""
    entry, comps, spans = _parse_hlo(hlo)
    mult, trips = _multiplicities(entry, comps)
    total = whole
    for body, trip in trips.items():
        extra = mult.get(body, 0) - mult.get(body, 0) // trip if trip and trip > 1 else 0
        if extra:
            total += extra * _hlo_flops(_module_text(hlo, spans, body))
    return total


_LAYOUT = re.compile(r"\{[^{}]*\}")


def matmul_flops_per_step(hlo: str) -> float:
    """XLA's FLOPs of the matmuls alone (every `dot` and `convolution`: XLA's TPU compiler writes
    matmuls as convolutions), per execution of the optimized program: each one's HloCostAnalysis
    FLOPs (analysed alone, on its operand shapes) times the executions of the computation that
    holds it (loop trip counts as in `flops_per_step`). The analytic count counts matmuls only,
    so this is its like-for-like figure; the rest of `flops_per_step` is elementwise work
    (softmax, norms, activations, losses, the optimizer)."""
    entry, comps, _ = _parse_hlo(hlo)
    mult, _ = _multiplicities(entry, comps)
    total = 0.0
    for name, instrs in comps.items():
        k = mult.get(name, 0)
        if not k:
            continue
        shapes = {i.name: i.shape for i in instrs}
        for ins in instrs:
            if ins.op not in ("dot", "convolution"):
                continue
            ops = _operands(ins.rest)
            if len(ops) != 2 or any(o not in shapes for o in ops):
                raise ValueError(f"cannot read the operands of {ins.name} in {name}")
            args = [_LAYOUT.sub("", shapes[o]) for o in ops]
            attrs = ins.rest.split(")", 1)[1]
            attrs = re.sub(r",\s*(metadata|backend_config|frontend_attributes)=.*$", "", attrs)
            text = "\n".join([
                "HloModule matmul",
                f"ENTRY %e (a: {args[0]}, b: {args[1]}) -> {_LAYOUT.sub('', ins.shape)} {{",
                f"  %a = {args[0]} parameter(0)",
                f"  %b = {args[1]} parameter(1)",
                f"  ROOT %r = {_LAYOUT.sub('', ins.shape)} {ins.op}(%a, %b){attrs}",
                "}",
            ])  # fmt: skip
            total += k * _hlo_flops(text)
    return total


# ------------------------------------------------------------------------------------------------
# The compile
# ------------------------------------------------------------------------------------------------


def compile_for_slice(config, slice_name: str, num_slices: int = 1) -> dict[str, Any]:
    """Compile the recipe's training step for the slice (`num_slices` of them: a multi-slice pod,
    on the trainer's hybrid mesh, `config.mesh.dcn_shape`); returns the result record (and keeps
    the compiled executable, the abstract state and the mesh under `_compiled`, `_state`,
    `_batch`, `_mesh`)."""
    import flax.linen as nn
    import jax

    from dinojax.ssl import step as ssl_step
    from dinojax.train.trainer import resolve_durations

    s = parse_slice(slice_name)
    config = resolve_durations(config)  # the schedules the trainer would run
    if num_slices < 1:
        raise ValueError(f"--num_slices must be >= 1, got {num_slices}")
    devices = topology_devices(s, num_slices)
    mesh = make_slice_mesh(config, s, devices)
    slice_of = [int(getattr(d, "slice_index", 0)) for d in mesh.devices.flat]
    rules = tuple(tuple(r) for r in config.mesh.rules)
    hosts = len({d.process_index for d in devices})
    setup = ssl_step.StepSetup.from_config(config)
    state, shardings = abstract_train_state(config, mesh, setup)
    batch = batch_spec(config, mesh, hosts)
    step_fn = ssl_step.make_train_step(config, mesh, shardings, setup=setup)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        lowered = step_fn.jitted.lower(state, batch)
        try:
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001 - XLA refuses a program that overflows HBM
            need = _OOM.search(str(e))
            if need is None:
                raise
            compiled, oom_bytes = None, int(float(need.group(1)) * _UNIT[need.group(2)])
    compile_s = time.perf_counter() - t0

    n_dev = len(devices)
    state_b, batch_b = bytes_per_chip(state), bytes_per_chip(batch)
    if compiled is not None:
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        hlo = compiled.as_text()
        xla_peak = int(getattr(mem, "peak_memory_in_bytes", 0))
        # The sum of every allocation as if all were live at once (temporaries counted whole);
        # an upper bound only. XLA's peak follows buffer lifetimes, and the TPU compiler itself
        # refuses (RESOURCE_EXHAUSTED, handled above) a program whose peak exceeds the chip's HBM.
        footprint = (
            mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes
        )  # fmt: skip
        peak = xla_peak or footprint
        flops_once = float(cost.get("flops", 0.0))
        memory = {
            "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes),
            "alias_bytes": int(mem.alias_size_in_bytes),
            "temp_bytes": int(mem.temp_size_in_bytes),
            "generated_code_bytes": int(mem.generated_code_size_in_bytes),
            "xla_peak_bytes": xla_peak,
            "footprint_bytes": footprint,
            "peak_bytes_per_chip": peak,
            "xla_flops_per_chip": flops_per_step(hlo, flops_once),
            "xla_matmul_flops_per_chip": matmul_flops_per_step(hlo),
            # loops whose trip count could not be read (counted once): none expected
            "xla_loops_uncounted": [
                b for b, n in _multiplicities(*_parse_hlo(hlo)[:2])[1].items() if n is None
            ],  # fmt: skip
            "xla_flops_loop_bodies_once": flops_once,
            "args_bytes_tiled": tiled_bytes_per_chip((state, batch), compiled.input_formats[0]),
            "collectives": collectives(hlo, slice_of if num_slices > 1 else None),
        }
    else:
        # The compiler stopped at memory assignment: it reports the temporaries it needed; the
        # arguments are the state and the batch.
        peak = oom_bytes + state_b + batch_b
        memory = {
            "argument_bytes": None, "output_bytes": None, "alias_bytes": None,
            "temp_bytes": oom_bytes, "generated_code_bytes": None, "peak_bytes_per_chip": peak,
            "args_bytes_tiled": None,
            "peak_is_estimate": True, "xla_flops_per_chip": None, "xla_matmul_flops_per_chip": None,
            "xla_flops_loop_bodies_once": None, "collectives": None, "xla_loops_uncounted": None,
        }  # fmt: skip
    ov = config.model.overrides
    b = int(config.batch_size)
    # The attention the step was traced with (`auto` resolves on the slice's devices). A Pallas
    # kernel is invisible to `cost_analysis` (splash gives no cost estimate): its matmuls are
    # added to the XLA figure analytically (what the step executes of them).
    from dinojax.models.attention import resolve

    with jax.set_mesh(mesh):
        attention = resolve(ov.get("attention", "xla"), ov.get("dtype", "float32"))
    # What the step executes: the batch-subset drop path draws in the per-device groups, full
    # remat recomputes the student's blocks in the backward pass, and the iBOT heads run on the
    # whole masked-token buffer (the pipeline's per-group bounds, padded to split evenly over
    # the shards: above the global bound the nominal count uses).
    groups = ssl_step.n_batch_shards(config, mesh)
    buffer = int(batch["mask_indices"].shape[0]) if "mask_indices" in batch else None
    executed = dict(setup=setup, executed=True, drop_groups=groups, remat=_counted_remat(ov))
    kernel_flops = 0.0
    if attention == "splash":
        kernel_flops = ssl_step.attention_flops_per_step(config, **executed) / n_dev
        if memory["xla_flops_per_chip"] is not None:
            memory["xla_flops_per_chip"] += kernel_flops
            memory["xla_matmul_flops_per_chip"] += kernel_flops
    rec: dict[str, Any] = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "topology": s.name,
        "topology_name": s.topology_name,
        "chips": s.chips * num_slices,
        "devices": n_dev,
        "hosts": hosts,
        "num_slices": num_slices,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "arch": config.model.arch,
        "global_batch": b,
        "per_chip_batch": b / (s.chips * num_slices),
        "global_crops_size": int(config.data.global_crops_size),
        "local_crops": [int(config.data.local_crops_number), int(config.data.local_crops_size)],
        "mask_buffer": int(batch["mask_indices"].shape[0]) if "mask_indices" in batch else 0,
        "remat_policy": ov.get("remat_policy", "none"),
        "remat_recompute_counted": _counted_remat(ov) == ov.get("remat_policy", "none"),
        "attention": attention,
        "attention_setting": ov.get("attention", "xla"),
        "attention_kernel_flops_per_chip": kernel_flops,
        "dtype": ov.get("dtype", "float32"),
        "compile_s": round(compile_s, 1),
        "state_bytes_per_chip": state_b,
        "batch_bytes_per_chip": batch_b,
        **{
            k: v
            for k, v in memory.items()
            if k not in ("xla_flops_per_chip", "xla_matmul_flops_per_chip", "collectives")
        },
        "hbm_bytes_per_chip": s.hbm_bytes,
        "fits": compiled is not None and peak <= s.hbm_bytes,
        "xla_flops_per_chip": memory["xla_flops_per_chip"],
        "xla_matmul_flops_per_chip": memory["xla_matmul_flops_per_chip"],
        # the trainer's MFU numerator (nominal: every block on the whole batch, no recompute),
        # and the matmuls the step executes: the student's residual branches on the batch-subset
        # drop path's subset, no input gradient of the patch embedding, and the block forward
        # that full remat recomputes
        "analytic_flops_per_chip": float(ssl_step.flops_per_step(config, setup=setup)) / n_dev,
        "analytic_executed_flops_per_chip": float(
            ssl_step.flops_per_step(config, buffer, **executed)
        )
        / n_dev,
        "drop_groups": groups,
        "collectives": memory["collectives"],
        "host": platform.node(),
    }
    rec["_compiled"], rec["_state"], rec["_batch"], rec["_mesh"] = compiled, state, batch, mesh
    return rec


def _where(rec: Mapping[str, Any]) -> str:
    n = rec.get("num_slices", 1)
    return rec["topology"] if n == 1 else f"{n} x {rec['topology']}"


def cross_slice_summary(rec: Mapping[str, Any]) -> str:
    """`all-reduce 12 ops / 1.2 GB per step` for the collectives that cross slices."""
    parts = [
        f"{k} {c['cross_slice_count']} / {c['cross_slice_bytes'] / 1e9:.3g} GB"
        for k, c in (rec.get("collectives") or {}).items()
        if c.get("cross_slice_count")
    ]
    return ", ".join(parts) or "none"


def summary(rec: Mapping[str, Any]) -> str:
    g = lambda x: f"{x / GIB:.2f}"  # noqa: E731
    if rec["xla_flops_per_chip"] is None:
        return (
            f"{rec['arch']} batch {rec['global_batch']} on {_where(rec)} ({rec['chips']} "
            f"chips, mesh {rec['mesh']}), remat {rec['remat_policy']}, {rec['dtype']}: DOES NOT "
            f"FIT: XLA needs {g(rec['temp_bytes'])} GiB of temporaries per chip, HBM "
            f"{g(rec['hbm_bytes_per_chip'])} GiB; {rec['compile_s']:.1f} s"
        )
    ratio = rec["xla_flops_per_chip"] / rec["analytic_executed_flops_per_chip"]
    mm = rec["xla_matmul_flops_per_chip"] / rec["analytic_executed_flops_per_chip"]
    cross = ""
    if rec.get("num_slices", 1) > 1:
        cross = f"; across slices per step: {cross_slice_summary(rec)}"
    return (
        f"{rec['arch']} batch {rec['global_batch']} on {_where(rec)} ({rec['chips']} chips, "
        f"mesh {rec['mesh']}), remat {rec['remat_policy']}, {rec['dtype']}, attention "
        f"{rec['attention']}: peak "
        f"{g(rec['peak_bytes_per_chip'])} / {g(rec['hbm_bytes_per_chip'])} GiB per chip "
        f"({'fits' if rec['fits'] else 'DOES NOT FIT'}; state {g(rec['state_bytes_per_chip'])}, "
        f"temp {g(rec['temp_bytes'])}), {rec['xla_flops_per_chip'] / 1e12:.2f} TFLOP per chip "
        f"(x{ratio:.3f} the analytic count of what it executes, its matmuls x{mm:.3f}){cross}; "
        f"compiled in {rec['compile_s']:.1f} s"
    )


def not_fit_hint(rec: Mapping[str, Any]) -> str:
    # Temporaries grow about linearly with the per-chip batch; the state does not. 5% margin
    # (the arena is not exactly linear), and always below the batch that was refused.
    room = rec["hbm_bytes_per_chip"] - (rec["peak_bytes_per_chip"] - rec["temp_bytes"])
    per_chip = rec["per_chip_batch"]
    est = min(
        math.floor(0.95 * per_chip * room / max(rec["temp_bytes"], 1)), math.ceil(per_chip) - 1
    )
    if est >= 1:
        hint = (
            f"a per-chip batch of about {est} or less (--config.batch_size={est * rec['chips']}; "
            "`--sweep` finds the largest)"
        )
    else:
        hint = "a larger slice (not even one image per chip fits)"
    if rec["remat_policy"] != "full":
        remat = "--config.model.overrides.remat_policy=full"
        hint = f"{remat}, or {hint}" if est >= 1 else remat
    return (
        f"does not fit: peak {rec['peak_bytes_per_chip'] / GIB:.2f} GiB per chip > HBM "
        f"{rec['hbm_bytes_per_chip'] / GIB:.0f} GiB on {_where(rec)} with remat "
        f"{rec['remat_policy']} and {per_chip:g} images per chip; try {hint}"
    )


def _counted_remat(overrides) -> str:
    """The remat policy whose recompute the executed count adds ("none" where the policy's
    recompute is not modelled: `dinojax.ssl.step.REMAT_RECOMPUTE`)."""
    from dinojax.ssl.step import REMAT_RECOMPUTE

    policy = overrides.get("remat_policy", "none")
    return policy if policy in REMAT_RECOMPUTE else "none"


def public(rec: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if not k.startswith("_")}


def sweep(
    config, slice_name: str, policies: list[str], max_per_chip: int, write, num_slices: int = 1
) -> dict:
    """For each remat policy, the largest per-chip batch (a power of two up to `max_per_chip`)
    whose step fits, by bisection on the exponent; every compile is recorded with `write`.
    -> {policy: largest fitting per-chip batch, or 0 when not even 1 fits}."""
    chips = parse_slice(slice_name).chips * num_slices
    best = {}
    for policy in policies:
        lo, hi = -1, int(math.log2(max_per_chip))  # exponents: lo fits (-1: none known), hi+1 not
        hi += 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            c = config.copy_and_resolve_references()
            c.model.overrides.remat_policy = policy
            c.batch_size = (2**mid) * chips
            rec = compile_for_slice(c, slice_name, num_slices)
            write(rec, sweep=True)
            print(summary(rec), flush=True)
            lo, hi = (mid, hi) if rec["fits"] else (lo, mid)
        best[policy] = 2**lo if lo >= 0 else 0
    return best


def analytic_counts(rec: Mapping[str, Any]) -> dict[str, float]:
    """The analytic counts of a recorded compile (`config`, `config_overrides`, `mesh`,
    `devices`, `mask_buffer`, `remat_policy`), recomputed with today's `flops_per_step`:
    `analytic_flops_per_chip` (nominal) and `analytic_executed_flops_per_chip`."""
    import importlib.util
    import types

    from dinojax.ssl import step as ssl_step
    from dinojax.train.trainer import resolve_durations

    path, _, arg = str(rec["config"]).partition(":")
    spec = importlib.util.spec_from_file_location("recorded_config", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    for key, value in (rec.get("config_overrides") or {}).items():
        *parents, leaf = key.split(".")
        node = config
        for k in parents:
            node = node[k]
        node[leaf] = value
    # a sweep sets these itself (not among the flags' overrides)
    config.batch_size = int(rec["global_batch"])
    config.model.overrides.remat_policy = rec["remat_policy"]
    config = resolve_durations(config)
    mesh = types.SimpleNamespace(shape=dict(rec["mesh"]), axis_names=tuple(rec["mesh"]))
    groups = ssl_step.n_batch_shards(config, mesh)
    n = rec["devices"]
    executed = ssl_step.flops_per_step(
        config, rec.get("mask_buffer") or None, executed=True, drop_groups=groups,
        remat=_counted_remat(config.model.overrides),
    )  # fmt: skip
    return {
        "analytic_flops_per_chip": ssl_step.flops_per_step(config) / n,
        "analytic_executed_flops_per_chip": executed / n,
    }


def main(argv: list[str]) -> None:
    del argv
    from absl import flags
    from ml_collections import config_flags

    def write(rec: dict, **extra: Any) -> None:
        rec = public(rec)
        rec["config"] = config_flags.get_config_filename(flags.FLAGS["config"])
        rec["config_overrides"] = config_flags.get_override_values(flags.FLAGS["config"]) or None
        rec["label"] = _LABEL.value
        rec.update(extra)
        out = Path(_OUT.value)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    if _RECOUNT.value:
        # the analytic counts of every recorded compile, recomputed (no compile)
        for line in Path(_OUT.value).read_text().splitlines():
            rec = json.loads(line)
            if not rec.get("config"):
                continue
            counts = analytic_counts(rec)
            xla = rec.get("xla_flops_per_chip")
            ratio = f"x{xla / counts['analytic_executed_flops_per_chip']:.3f}" if xla else "-"
            print(
                f"{rec['time']} {rec['arch']} {_where(rec)} batch {rec['global_batch']} remat "
                f"{rec['remat_policy']} {rec['attention']}: XLA "
                f"{(xla or 0) / 1e12:.2f} TFLOP per chip, analytic "
                f"{counts['analytic_flops_per_chip'] / 1e12:.2f} nominal, "
                f"{counts['analytic_executed_flops_per_chip'] / 1e12:.2f} executed ({ratio})"
            )
        return
    config = _CONFIG.value
    try:
        if _SWEEP.value:
            policies = [p.strip() for p in _POLICIES.value.split(",") if p.strip()]
            best = sweep(
                config, _TOPOLOGY.value, policies, _MAX_PER_CHIP.value, write, _SLICES.value
            )
            print(f"largest per-chip batch that fits {_TOPOLOGY.value}: " + ", ".join(
                f"remat {p}: {b or 'none'}" for p, b in best.items()))  # fmt: skip
            return
        rec = compile_for_slice(config, _TOPOLOGY.value, _SLICES.value)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if _HLO_OUT.value and rec["_compiled"] is not None:
        Path(_HLO_OUT.value).write_text(rec["_compiled"].as_text())
    write(rec)
    print(summary(rec))
    if not rec["fits"]:
        print(not_fit_hint(rec), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file(
        "config", str(REPO / "configs" / "dinov2_vitg14.py"), "Recipe file[:args]"
    )
    _TOPOLOGY = flags.DEFINE_string("topology", "v5p-8", "TPU slice, e.g. v5p-256, v6e-64, v5e-16")
    _SLICES = flags.DEFINE_integer(
        "num_slices", 1, "slices of the multi-slice pod (data parallel across slices over DCN)"
    )
    _OUT = flags.DEFINE_string("out", str(REPO / "bench" / "results" / "compile_tpu.jsonl"), "")
    _LABEL = flags.DEFINE_string("label", "", "free-form label stored with the result")
    _HLO_OUT = flags.DEFINE_string("hlo_out", None, "write the optimized HLO text to this file")
    _SWEEP = flags.DEFINE_bool(
        "sweep", False, "per remat policy, the largest per-chip batch that fits"
    )
    _POLICIES = flags.DEFINE_string("sweep_policies", "none,full", "remat policies to sweep")
    _MAX_PER_CHIP = flags.DEFINE_integer("sweep_max_per_chip", 128, "largest per-chip batch tried")
    _RECOUNT = flags.DEFINE_bool(
        "recount", False, "print the analytic counts of every compile recorded in --out, recomputed"
    )
    app.run(main)
