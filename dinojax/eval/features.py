"""Sharded, batched feature extraction over any dataset source.

Records come from any source of the input pipeline (`dinojax.data.sources.make_source`: digits,
image folders, TFDS). The host decodes and transforms them in a thread pool (Pillow releases the
GIL), one batch ahead of the device. Each global batch is padded to a fixed size that is a multiple
of the number of devices (so the jitted forward compiles once), sharded over every device of the
mesh, and the padding rows are dropped from the outputs. With several processes each one loads only
the rows of its own devices and the outputs are gathered on every host.

A feature function `fn(model, images) -> dict of (B, ...) arrays` runs inside `jax.jit` with the
model's graph definition and `fn` as static arguments: the compiled forward is cached across calls
(e.g. the trainer's periodic kNN evaluation reuses it). `fn` must therefore be hashable by value:
module-level functions or frozen dataclasses such as `Cls`, `Tokens` and `LinearInputs`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from dinojax.data.sources import make_source
from dinojax.eval.transforms import load_image

__all__ = [
    "Cls",
    "FeatureBatch",
    "LinearInputs",
    "Tokens",
    "batch_sharding",
    "default_mesh",
    "extract_features",
    "iter_features",
    "l2_normalize",
    "model_from_params",
    "resolve_source",
]

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# Feature functions (hashable: they are static arguments of the jitted forward)
# ---------------------------------------------------------------------------------------------


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """`torch.nn.functional.normalize(x, p=2, dim=-1)`: x / max(||x||, eps)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
    return (x / jnp.maximum(norm, eps)).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Cls:
    """The final-norm CLS token, `model(x)` (official `forward`); L2-normalised if `normalize`
    (the kNN protocol's `ModelWithNormalize`, `dinov2/eval/utils.py`)."""

    normalize: bool = False

    def __call__(self, model, x: Array) -> dict[str, Array]:
        cls = model(x).astype(jnp.float32)
        return {"cls": l2_normalize(cls) if self.normalize else cls}


@dataclasses.dataclass(frozen=True)
class Tokens:
    """Any of: `cls` (final-norm CLS), `patch` ((B, h, w, D) final-norm patch tokens, registers
    excluded), `layers` (the blocks in `layers`, an int = the last n or a tuple of 0-based indices,
    normed like `get_intermediate_layers(norm=True)`): `layers_cls` (B, L, D) and, if
    `layer_patches`, `layers_patch` (B, L, h, w, D)."""

    cls: bool = True
    patch: bool = False
    layers: int | tuple[int, ...] | None = None
    layer_patches: bool = False

    def __call__(self, model, x: Array) -> dict[str, Array]:
        out: dict[str, Array] = {}
        if self.cls or self.patch:
            f = model.forward_features(x)
            if self.cls:
                out["cls"] = f["x_norm_clstoken"]
            if self.patch:
                p = model.cfg.patch_size
                h0, w0 = x.shape[1] // p, x.shape[2] // p
                out["patch"] = f["x_norm_patchtokens"].reshape(x.shape[0], h0, w0, -1)
        if self.layers is not None:
            res = model.get_intermediate_layers(
                x, self.layers, reshape=True, return_class_token=True
            )
            out["layers_cls"] = jnp.stack([c for _, c in res], axis=1)
            if self.layer_patches:
                out["layers_patch"] = jnp.stack([p for p, _ in res], axis=1)
        return {k: v.astype(jnp.float32) for k, v in out.items()}


@dataclasses.dataclass(frozen=True)
class LinearInputs:
    """What the linear evaluation needs from the frozen backbone (`dinov2/eval/linear.py`):
    `cls` = the CLS tokens of the last `n_blocks` blocks (B, n, D) and `avgpool` = the mean patch
    token of the last block (B, D), from `get_intermediate_layers(n, return_class_token=True)`."""

    n_blocks: int = 4

    def __call__(self, model, x: Array) -> dict[str, Array]:
        res = model.get_intermediate_layers(x, self.n_blocks, return_class_token=True)
        cls = jnp.stack([c for _, c in res], axis=1)
        avg = jnp.mean(res[-1][0].astype(jnp.float32), axis=1)
        return {"cls": cls.astype(jnp.float32), "avgpool": avg}


# ---------------------------------------------------------------------------------------------
# Mesh, model placement, the jitted forward
# ---------------------------------------------------------------------------------------------


def default_mesh() -> Mesh:
    """A 1-D mesh named "data" over every device. Auto axes: `jax.make_mesh` now defaults to
    Explicit axes (https://docs.jax.dev/en/latest/_autosummary/jax.make_mesh.html)."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows sharded over every axis of `mesh` (all devices hold a distinct slice of the batch)."""
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def _place_state(state, mesh: Mesh):
    """Replicate the parameters on `mesh`, keeping leaves already laid out over its devices
    (e.g. the trainer's FSDP-sharded teacher)."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(a):
        sharding = getattr(a, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return a  # already laid out on this mesh: no copy
        return jax.device_put(a, replicated)

    return jax.tree.map(place, state)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(graphdef, fn, state, x):
    return fn(nnx.merge(graphdef, state), x)


def model_from_params(cfg, params: dict):
    """A `DinoVisionTransformer` (or, for a `DinoV3Config`, a `DinoV3VisionTransformer`) holding
    `params` (the plain dict of `model.params()`, e.g. the trainer's teacher backbone), without
    allocating random weights first."""
    from dinojax.models.config_v3 import DinoV3Config
    from dinojax.models.vit import DinoVisionTransformer
    from dinojax.models.vit3 import DinoV3VisionTransformer

    cls = DinoV3VisionTransformer if isinstance(cfg, DinoV3Config) else DinoVisionTransformer
    model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    nnx.update(model, params)
    return model


# ---------------------------------------------------------------------------------------------
# Host loading
# ---------------------------------------------------------------------------------------------


def resolve_source(spec, data_dir: str | None = None, what: str = "dataset"):
    """`make_source` with the error naming which dataset is bad; rejects empty sources."""
    try:
        src = make_source(spec, data_dir=data_dir)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    if len(src) == 0:
        raise ValueError(f"{what}: the data source {spec!r} is empty")
    return src


def _load_record(source, index: int, transform) -> tuple[np.ndarray, int, str]:
    rec = source[int(index)]
    key = str(rec.get("key", index))
    try:
        img = load_image(rec["image"])
    except ValueError as e:
        raise ValueError(f"record {index} ({key}): {e}") from None
    return transform(img), int(rec.get("label", -1)), key


def _local_rows(sharding: NamedSharding, rows: int) -> np.ndarray:
    """The rows of a (rows, ...) global array held by this process's devices."""
    idx = sharding.addressable_devices_indices_map((rows,))
    local = set()
    for sl in idx.values():
        local.update(range(*sl[0].indices(rows)))
    return np.array(sorted(local), dtype=np.int64)


@dataclasses.dataclass
class FeatureBatch:
    """One batch of outputs, padding removed: rows [start, start + len(labels)) of the dataset
    order (`indices` are the source indices of those rows)."""

    start: int
    indices: np.ndarray
    labels: np.ndarray
    keys: list[str]
    features: dict[str, np.ndarray]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def iter_features(
    model,
    source,
    fn: Callable[[Any, Array], dict[str, Array]],
    *,
    transform: Callable[[Any], np.ndarray],
    batch_size: int = 64,
    indices: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    desc: str = "features",
    data_dir: str | None = None,
) -> Iterator[FeatureBatch]:
    """Yield `FeatureBatch`es of `fn(model, images)` over `source` (in order, or over `indices`).

    `transform(image) -> (H, W, 3) float32` must give the same shape for every record (e.g.
    `EvalTransform`). The global batch is `batch_size` rounded up to a multiple of the device
    count (capped by the dataset size rounded the same way); the last batch is padded.
    """
    source = resolve_source(source, data_dir)
    mesh = mesh or default_mesh()
    sharding = batch_sharding(mesh)
    n_shards = math.prod(mesh.shape[a] for a in mesh.axis_names)
    order = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64)
    if order.size == 0:
        raise ValueError(f"nothing to extract: no records selected from {source!r}")
    if order.min() < 0 or order.max() >= len(source):
        raise ValueError(f"record indices out of range for a source of {len(source)} records")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    gb = min(_round_up(batch_size, n_shards), _round_up(order.size, n_shards))
    local = _local_rows(sharding, gb)
    shape = tuple(getattr(transform, "output_shape", ()))
    if not shape:  # a transform without a declared size: the first record decides
        shape = _load_record(source, order[0], transform)[0].shape
    graphdef, state = nnx.split(model)
    state = _place_state(state, mesh)
    n_batches = -(-order.size // gb)
    workers = num_workers or min(16, (os.cpu_count() or 2) * 2)
    # Names of rows loaded by other processes (no file read); loaded records overwrite them.
    key_of = getattr(source, "key", str)

    def submit(pool, b):
        rows = order[b * gb : (b + 1) * gb]
        futs = [
            pool.submit(_load_record, source, rows[i], transform) for i in local if i < rows.size
        ]
        return rows, futs

    from tqdm.auto import tqdm

    bar = tqdm(
        total=order.size, desc=desc, unit="img", disable=not progress or jax.process_index() != 0
    )
    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            pending = submit(pool, 0)
            for b in range(n_batches):
                rows, futs = pending
                if b + 1 < n_batches:
                    pending = submit(pool, b + 1)  # load the next batch while this one runs
                loaded = [f.result() for f in futs]
                x = np.zeros((local.size, *shape), np.float32)  # padding rows stay zero
                labels = np.full(gb, -1, np.int64)
                keys = [key_of(i) for i in rows] + [""] * (gb - rows.size)
                for j, (img, label, key) in enumerate(loaded):
                    if img.shape != shape:
                        raise ValueError(
                            f"record {rows[local[j]]} ({key}) transformed to shape {img.shape}, "
                            f"expected {shape}: use a transform with a fixed output size"
                        )
                    x[j] = img
                    labels[local[j]], keys[local[j]] = label, key
                xg = jax.make_array_from_process_local_data(sharding, x, (gb, *shape))
                out = _forward(graphdef, fn, state, xg)
                out = _to_host(out)
                n = rows.size
                if jax.process_count() > 1:
                    labels, keys = _gather_meta(labels, keys, local)
                yield FeatureBatch(
                    start=b * gb,
                    indices=rows,
                    labels=labels[:n],
                    keys=keys[:n],
                    features={k: v[:n] for k, v in out.items()},
                )
                bar.update(n)
    finally:
        bar.close()


def _to_host(out: dict[str, Array]) -> dict[str, np.ndarray]:
    if jax.process_count() == 1:
        return {k: np.asarray(v) for k, v in out.items()}
    from jax.experimental import multihost_utils

    return {k: np.asarray(v) for k, v in multihost_utils.process_allgather(out, tiled=True).items()}


def _gather_meta(labels: np.ndarray, keys: list[str], local: np.ndarray):
    # Labels of other processes' rows: every process fills its own rows, the rest -1.
    from jax.experimental import multihost_utils

    mine = np.zeros(labels.shape, bool)
    mine[local] = True
    all_labels = multihost_utils.process_allgather(np.where(mine, labels, -(2**31)))
    merged = np.max(np.asarray(all_labels).reshape(-1, labels.size), axis=0)
    return merged.astype(np.int64), keys


def extract_features(
    model,
    source,
    fn: Callable[[Any, Array], dict[str, Array]] = Cls(),
    *,
    transform: Callable[[Any], np.ndarray],
    batch_size: int = 64,
    indices: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    desc: str = "features",
    data_dir: str | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """All outputs of `fn` over the dataset, concatenated -> ({name: (N, ...)}, labels (N,))."""
    parts: dict[str, list[np.ndarray]] = {}
    labels: list[np.ndarray] = []
    for batch in iter_features(
        model, source, fn, transform=transform, batch_size=batch_size, indices=indices,
        mesh=mesh, num_workers=num_workers, progress=progress, desc=desc, data_dir=data_dir,
    ):  # fmt: skip
        for k, v in batch.features.items():
            parts.setdefault(k, []).append(v)
        labels.append(batch.labels)
    return {k: np.concatenate(v) for k, v in parts.items()}, np.concatenate(labels)
