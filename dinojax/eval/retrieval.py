"""Image retrieval with frozen features: the revisited Oxford / Paris protocol and sharded search.

Protocol (Radenovic et al., "Revisiting Oxford and Paris", as DINO runs it in facebookresearch/dino
`eval_image_retrieval.py`; metrics as in the protocol's `compute_map`, copied into DINO's
`utils.py`):

- Features: each image is shrunk with Pillow's `thumbnail((imsize, imsize), LANCZOS)` (longest side
  `imsize`, never enlarged; 224 and 512 are the published settings), normalised with the ImageNet
  mean / std, and passed through the backbone at its own size, one image shape per compiled
  batch. Pooling: the final-norm CLS token (`cls`, DINO's choice), GeM over the final-norm patch
  tokens (`gem`, p = 3, values clamped at 1e-6 as in GeM), or CLS concatenated with the mean patch
  token (`cls+mean`). Multi-scale (DINO's `utils.multi_scale`): scales 1, 1/sqrt(2), 1/2 by
  bilinear interpolation of the normalised image with PyTorch's `interpolate(scale_factor=s,
  mode="bilinear", align_corners=False)` semantics (output `floor(size * s)`, source coordinates
  from 1/s), mean of the three, then L2 normalisation. Images whose sides are not multiples of the
  patch size lose the bottom / right remainder pixels: exactly what DINO v1's strided patch
  convolution does, and what lets DINOv2 backbones (which require multiples) run at all. Queries
  can be cropped to their `bbx` first (the protocol's rule; DINO's script does not crop).
- Similarity: cosine (dot product of L2-normalised features).
- `compute_map(ranks, gnd, kappas)`: `ranks` is (db_size, n_queries), 0-based database indices
  best first; for each query, `gnd[i]["ok"]` are the positives and `gnd[i]["junk"]` the items to
  ignore. Junk items are removed from the ranking (the positions of the positives move up by the
  number of junk items ranked before them); AP is the trapezoidal area under the precision-recall
  curve with recall steps of 1 / len(ok); queries without positives are excluded from the means
  (their AP and precisions are NaN); precision at k is counted at `min(max positive rank, k)`
  (1-based). Positives missing from a truncated ranking count as never retrieved (they add no
  area; a query with none of its positives ranked has precision 0).
- Setups (`protocol_gnd`): Easy = easy positives, hard and junk ignored; Medium = easy + hard
  positives, junk ignored; Hard = hard positives, easy and junk ignored. mAP and mean precision at
  k = 1, 5, 10.

Search (`search`): the database features are sharded along every mesh axis (padded to a multiple
of the device count), the queries replicated; each device scans its rows in chunks keeping a
running top-k, the per-device top-k lists are all-gathered and merged, all inside one jitted
`shard_map`, so a database larger than one device's memory works. The ranking is exact: by
descending similarity, equal similarities by ascending database index (the order of a stable
numpy `lexsort`), whatever the sharding.

Command line:

    # revisited Oxford / Paris: DATA/roxford5k/gnd_roxford5k.pkl and DATA/roxford5k/jpg/*.jpg
    python -m dinojax.eval.retrieval --checkpoint CKPT --dataset roxford5k --data-path DATA \
        --imsize 512 [--multiscale] [--pooling cls|gem|cls+mean] [--crop-queries]
    # your own images: top-k JSON and a contact sheet PNG per query
    python -m dinojax.eval.retrieval --checkpoint CKPT --queries q1.jpg q2.jpg \
        --gallery folder:/photos --topk 10 --out results/
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import logging
import math
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from dinojax.eval.features import (
    _forward,
    _place_state,
    _to_host,
    batch_sharding,
    default_mesh,
    l2_normalize,
    resolve_source,
)
from dinojax.eval.transforms import load_image, normalize

__all__ = [
    "POOLINGS",
    "SETUPS",
    "RetrievalFeatures",
    "bilinear_resize",
    "compute_map",
    "extract_retrieval_features",
    "main",
    "oxford_paris_eval",
    "protocol_gnd",
    "rank_all",
    "retrieval_eval",
    "search",
    "thumbnail",
]

logger = logging.getLogger("dinojax.eval")

POOLINGS = ("cls", "gem", "cls+mean")
SETUPS = ("easy", "medium", "hard")
MULTISCALE = (1.0, 1.0 / math.sqrt(2.0), 0.5)


# ---------------------------------------------------------------------------------------------
# Metrics: the revisited Oxford / Paris protocol
# ---------------------------------------------------------------------------------------------


def _ids(value: Any) -> np.ndarray:
    return np.asarray(value if value is not None else [], dtype=np.int64).ravel()


def compute_map(
    ranks, gnd: Sequence[dict], kappas: Sequence[int] = (1, 5, 10)
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """(mAP, AP per query (nq,), mean precision at each kappa (len(kappas),), precisions (nq,
    len(kappas))) of `ranks` (db_size, nq), 0-based, best first, under `gnd[i] = {"ok": [...],
    "junk": [...]}`; the revisited protocol's semantics (see the module docstring). mAP and the
    mean precisions are NaN when no query has positives."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be (db_size, n_queries), got shape {ranks.shape}")
    if len(gnd) != ranks.shape[1]:
        raise ValueError(f"ranks has {ranks.shape[1]} queries but gnd has {len(gnd)} entries")
    kappas = [int(k) for k in kappas]
    if any(k <= 0 for k in kappas):
        raise ValueError(f"kappas must be positive, got {kappas}")
    nq = ranks.shape[1]
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    nempty = 0
    for i in range(nq):
        ok = _ids(gnd[i].get("ok"))
        if ok.size == 0:  # no positives: the query is left out of the means
            aps[i], prs[i] = np.nan, np.nan
            nempty += 1
            continue
        column = ranks[:, i]
        pos = np.flatnonzero(np.isin(column, ok))
        junk = np.flatnonzero(np.isin(column, _ids(gnd[i].get("junk"))))
        # Removing the junk items moves each positive up by the junk ranked strictly before it
        # (an item listed as both is a positive at its own place and removed junk for the items
        # after it, as in the reference loop).
        pos = pos - np.searchsorted(junk, pos, side="left")
        j = np.arange(pos.size, dtype=np.float64)
        # Trapezoids of the precision-recall curve: precision just before and at each positive.
        p0 = np.where(pos == 0, 1.0, j / np.maximum(pos, 1))
        p1 = (j + 1.0) / (pos + 1.0)
        aps[i] = float(np.sum((p0 + p1) / 2.0)) / ok.size
        pos1 = pos + 1
        for c, k in enumerate(kappas):
            if pos1.size == 0:
                prs[i, c] = 0.0
                continue
            kq = min(int(pos1.max()), k)
            prs[i, c] = np.count_nonzero(pos1 <= kq) / kq
    valid = nq - nempty
    if valid == 0:
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    return float(np.nansum(aps) / valid), aps, np.nansum(prs, axis=0) / valid, prs


def protocol_gnd(gnd: Sequence[dict], setup: str) -> list[dict]:
    """The `{"ok", "junk"}` ground truth of a revisited-protocol setup from `{"easy", "hard",
    "junk"}` entries: Easy = easy (hard + junk ignored), Medium = easy + hard (junk ignored),
    Hard = hard (easy + junk ignored)."""
    if setup not in SETUPS:
        raise ValueError(f"setup must be one of {SETUPS}, got {setup!r}")
    out = []
    for i, g in enumerate(gnd):
        missing = {"easy", "hard", "junk"} - set(g)
        if missing:
            raise ValueError(f"gnd entry {i} lacks {sorted(missing)}")
        easy, hard, junk = _ids(g["easy"]), _ids(g["hard"]), _ids(g["junk"])
        if setup == "easy":
            out.append({"ok": easy, "junk": np.concatenate([junk, hard])})
        elif setup == "medium":
            out.append({"ok": np.concatenate([easy, hard]), "junk": junk})
        else:
            out.append({"ok": hard, "junk": np.concatenate([junk, easy])})
    return out


# ---------------------------------------------------------------------------------------------
# Sharded exact top-k search
# ---------------------------------------------------------------------------------------------


def _local_topk(db, ids, q, *, k: int, chunk: int, precision: str):
    """Top-k (scores, ids) of one device's rows; padding rows (id < 0) never win."""
    n, d = db.shape
    chunk = min(chunk, n)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    db = jnp.pad(db, ((0, pad), (0, 0))).reshape(n_chunks, chunk, d)
    ids = jnp.pad(ids, (0, pad), constant_values=-1).reshape(n_chunks, chunk)
    kk = min(k, n)

    def scores_of(rows, row_ids):
        s = jnp.einsum("qd,nd->qn", q, rows, precision=precision).astype(jnp.float32)
        return jnp.where(row_ids[None] >= 0, s, -jnp.inf)

    # lax.top_k puts the lower index first among equal values; running best first, then rows in
    # ascending id order, keeps equal scores in ascending id order.
    init = (
        jnp.full((q.shape[0], kk), -jnp.inf, jnp.float32),
        jnp.full((q.shape[0], kk), -1, jnp.int32),
    )

    def body(carry, block):
        vals, idx = carry
        rows, row_ids = block
        s = scores_of(rows, row_ids)
        all_s = jnp.concatenate([vals, s], axis=1)
        all_i = jnp.concatenate([idx, jnp.broadcast_to(row_ids, s.shape)], axis=1)
        vals, p = jax.lax.top_k(all_s, kk)
        return (vals, jnp.take_along_axis(all_i, p, axis=1)), None

    (vals, idx), _ = jax.lax.scan(body, init, (db, ids))
    return vals, idx


@functools.partial(jax.jit, static_argnames=("mesh", "k", "chunk", "precision"))
def _sharded_topk(db, ids, q, *, mesh: Mesh, k: int, chunk: int, precision: str):
    axes = tuple(mesh.axis_names)

    def per_device(db_l, ids_l, q_r):
        vals, idx = _local_topk(db_l, ids_l, q_r, k=k, chunk=chunk, precision=precision)
        vals = jax.lax.all_gather(vals, axes, axis=1, tiled=True)  # (Q, shards * k_local)
        idx = jax.lax.all_gather(idx, axes, axis=1, tiled=True)
        # The merge sorts explicitly by (score desc, id asc): exact whatever the gather order.
        big = jnp.iinfo(jnp.int32).max
        key_i = jnp.where(idx < 0, big, idx)
        neg, key_i = jax.lax.sort((-vals, key_i), dimension=1, num_keys=2)
        return -neg[:, :k], key_i[:, :k]

    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(PartitionSpec(axes), PartitionSpec(axes), PartitionSpec()),
        out_specs=(PartitionSpec(), PartitionSpec()),
        check_vma=False,
    )(db, ids, q)


def _n_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in mesh.axis_names)


def search(
    queries,
    database,
    k: int,
    *,
    mesh: Mesh | None = None,
    chunk: int = 8192,
    query_batch: int = 1024,
    precision: str = "highest",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores (Q, k), indices (Q, k)) of the k most similar database rows for every query, by
    dot product (cosine for L2-normalised features), best first; equal scores in ascending
    database index. The database is sharded over every device of `mesh` and scanned `chunk`
    rows at a time per device; queries go `query_batch` at a time, replicated."""
    queries = np.asarray(queries, np.float32)
    database = np.asarray(database, np.float32)
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(
            f"features must be (N, D) with the same D, got queries {queries.shape} and "
            f"database {database.shape}"
        )
    n = database.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"k must be in [1, {n}] (the database size), got {k}")
    if chunk <= 0 or query_batch <= 0:
        raise ValueError(f"chunk and query_batch must be positive, got {chunk}, {query_batch}")
    mesh = mesh or default_mesh()
    shards = _n_shards(mesh)
    n_pad = -(-n // shards) * shards
    sharding = batch_sharding(mesh)
    db = jax.device_put(np.pad(database, ((0, n_pad - n), (0, 0))), sharding)
    ids = np.arange(n_pad, dtype=np.int32)
    ids = jax.device_put(np.where(ids < n, ids, -1).astype(np.int32), sharding)
    replicated = NamedSharding(mesh, PartitionSpec())
    scores = np.zeros((queries.shape[0], k), np.float32)
    index = np.zeros((queries.shape[0], k), np.int64)
    from tqdm.auto import tqdm

    qb = min(query_batch, max(1, queries.shape[0]))
    for start in tqdm(
        range(0, queries.shape[0], qb), desc="search", unit="batch", disable=not progress
    ):
        q = queries[start : start + qb]
        rows = q.shape[0]
        q = jax.device_put(np.pad(q, ((0, qb - rows), (0, 0))), replicated)
        s, i = _sharded_topk(db, ids, q, mesh=mesh, k=k, chunk=int(chunk), precision=precision)
        scores[start : start + rows] = np.asarray(s)[:rows]
        index[start : start + rows] = np.asarray(i)[:rows]
    return scores, index


def rank_all(queries, database, **kwargs) -> np.ndarray:
    """The full ranking in the protocol's layout: (db_size, n_queries) database indices."""
    return search(queries, database, np.asarray(database).shape[0], **kwargs)[1].T


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------


def _bilinear_matrix(n_in: int, n_out: int, scale: float | None) -> np.ndarray:
    """(n_out, n_in) weights of PyTorch's bilinear `interpolate(align_corners=False)` along one
    axis: source = max(0, (dst + 0.5) * r - 0.5) with r = 1 / scale when a scale factor is given
    (PyTorch keeps it rather than recomputing n_in / n_out), else n_in / n_out. Float32 index
    arithmetic, as PyTorch's CPU kernel does it for float32 images."""
    f = np.float32
    r = f(1.0 / scale) if scale else f(n_in / n_out)
    src = np.maximum(r * (np.arange(n_out, dtype=f) + f(0.5)) - f(0.5), f(0.0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = (src - i0.astype(f)).astype(f)
    m = np.zeros((n_out, n_in), f)
    np.add.at(m, (np.arange(n_out), i0), f(1.0) - lam)
    np.add.at(m, (np.arange(n_out), i1), lam)
    return m


def bilinear_resize(x, scale: float | None = None, size: tuple[int, int] | None = None):
    """Bilinear resize of NHWC images, `torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False)` without antialiasing: by `scale` (output `floor(side * scale)`) or to
    `size` (height, width)."""
    h, w = x.shape[1], x.shape[2]
    if size is None:
        if scale is None:
            raise ValueError("give a scale or a size")
        size = (int(math.floor(h * scale)), int(math.floor(w * scale)))
    mh = jnp.asarray(_bilinear_matrix(h, size[0], scale))
    mw = jnp.asarray(_bilinear_matrix(w, size[1], scale))
    y = jnp.einsum("oh,bhwc->bowc", mh, x.astype(jnp.float32), precision="highest")
    return jnp.einsum("pw,bowc->bopc", mw, y, precision="highest")


def _crop_to_patch(x, p: int):
    h, w = (x.shape[1] // p) * p, (x.shape[2] // p) * p
    if h == 0 or w == 0:
        raise ValueError(f"image of {x.shape[1]}x{x.shape[2]} pixels is smaller than a patch ({p})")
    return x[:, :h, :w]


@dataclasses.dataclass(frozen=True)
class RetrievalFeatures:
    """Global descriptor of a batch of same-size images (hashable: a static jit argument).
    `pooling`: "cls", "gem" or "cls+mean"; `multiscale`: DINO's three-scale mean."""

    pooling: str = "cls"
    multiscale: bool = False
    gem_p: float = 3.0

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.gem_p <= 0:
            raise ValueError(f"GeM p must be positive, got {self.gem_p}")

    def _single(self, model, x):
        f = model.forward_features(_crop_to_patch(x, model.cfg.patch_size))
        cls = f["x_norm_clstoken"].astype(jnp.float32)
        patch = f["x_norm_patchtokens"].astype(jnp.float32)
        if self.pooling == "cls":
            return cls
        if self.pooling == "gem":
            m = jnp.mean(jnp.maximum(patch, 1e-6) ** self.gem_p, axis=1)
            return m ** (1.0 / self.gem_p)
        return jnp.concatenate([cls, jnp.mean(patch, axis=1)], axis=-1)

    def __call__(self, model, x) -> dict:
        if not self.multiscale:
            return {"feat": l2_normalize(self._single(model, x))}
        v = sum(self._single(model, x if s == 1.0 else bilinear_resize(x, s)) for s in MULTISCALE)
        return {"feat": l2_normalize(v / len(MULTISCALE))}


def thumbnail(img: Image.Image, imsize: int | None) -> Image.Image:
    """Pillow's `thumbnail((imsize, imsize), LANCZOS)`, as DINO's retrieval loader: the longest
    side becomes at most `imsize`, aspect kept, never enlarged."""
    if imsize is None:
        return img
    img = img.copy()
    img.thumbnail((imsize, imsize), Image.LANCZOS)
    return img


def _prepare(record: dict, imsize: int | None, bbx) -> np.ndarray:
    try:
        img = load_image(record["image"])
    except ValueError as e:
        raise ValueError(f"{record.get('key', 'image')}: {e}") from None
    if bbx is not None:
        img = img.crop(tuple(float(v) for v in bbx))
    return normalize(thumbnail(img, imsize))


class _ListSource:
    """Records from a list of image paths or arrays (keys: file stems or positions)."""

    def __init__(self, images: Sequence[Any], keys: Sequence[str] | None = None) -> None:
        self.images = list(images)
        self.keys = list(keys) if keys is not None else [
            Path(x).name if isinstance(x, (str, os.PathLike)) else str(i)
            for i, x in enumerate(self.images)
        ]  # fmt: skip

    def __len__(self) -> int:
        return len(self.images)

    def key(self, i: int) -> str:
        return self.keys[i]

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": -1, "key": self.keys[i]}


def extract_retrieval_features(
    model,
    source,
    features: RetrievalFeatures = RetrievalFeatures(),
    *,
    imsize: int | None = 224,
    boxes: Sequence[Any] | None = None,
    batch_size: int = 32,
    mesh: Mesh | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    desc: str = "features",
    data_dir: str | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(L2-normalised descriptors (N, D), labels (N,), keys) of every record of `source` (any
    `make_source` spec or a sequence of records), each image at its own thumbnail size.

    Images are decoded in a thread pool a window at a time, grouped by size, and each group runs
    in batches sharded over the mesh (padded to a multiple of the device count; one compilation
    per image size). `boxes[i]` (x1, y1, x2, y2) or None crops record i first. With several
    processes, every process decodes every image of a batch (each keeps its devices' rows)."""
    source = resolve_source(source, data_dir)
    n = len(source)
    if boxes is not None and len(boxes) != n:
        raise ValueError(f"{len(boxes)} boxes for {n} images")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if imsize is not None and imsize <= 0:
        raise ValueError(f"imsize must be positive, got {imsize}")
    mesh = mesh or default_mesh()
    shards = _n_shards(mesh)
    sharding = batch_sharding(mesh)
    gb = -(-batch_size // shards) * shards
    graphdef, state = nnx.split(model)
    state = _place_state(state, mesh)
    out: np.ndarray | None = None
    labels = np.full(n, -1, np.int64)
    keys = [""] * n
    window = max(4 * gb, 64)
    workers = num_workers or min(16, (os.cpu_count() or 2) * 2)

    def load(i: int):
        rec = source[int(i)]
        x = _prepare(rec, imsize, None if boxes is None else boxes[i])
        return x, int(rec.get("label", -1)), str(rec.get("key", i))

    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress or jax.process_index() != 0)
    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for w0 in range(0, n, window):
                rows = list(range(w0, min(n, w0 + window)))
                loaded = list(pool.map(load, rows))
                groups: dict[tuple, list[int]] = {}
                for j, (x, label, key) in enumerate(loaded):
                    labels[rows[j]], keys[rows[j]] = label, key
                    groups.setdefault(x.shape, []).append(j)
                for shape, members in groups.items():
                    for b0 in range(0, len(members), gb):
                        part = members[b0 : b0 + gb]
                        x = np.zeros((gb, *shape), np.float32)
                        for r, j in enumerate(part):
                            x[r] = loaded[j][0]
                        xg = jax.make_array_from_callback(
                            x.shape, sharding, lambda idx, x=x: x[idx]
                        )
                        feat = _to_host(_forward(graphdef, features, state, xg))["feat"]
                        if out is None:
                            out = np.zeros((n, feat.shape[1]), np.float32)
                        out[[rows[j] for j in part]] = feat[: len(part)]
                        bar.update(len(part))
    finally:
        bar.close()
    assert out is not None
    return out, labels, keys


# ---------------------------------------------------------------------------------------------
# Evaluations
# ---------------------------------------------------------------------------------------------


def retrieval_eval(
    ranks, gnd: Sequence[dict], kappas: Sequence[int] = (1, 5, 10), setups=SETUPS
) -> dict[str, dict]:
    """{setup: {"map": %, "mp@k": {k: %}}} of a full ranking under revisited-protocol `gnd`."""
    res = {}
    for setup in setups:
        m, _, pr, _ = compute_map(ranks, protocol_gnd(gnd, setup), kappas)
        res[setup] = {
            "map": 100.0 * m,
            "mp@k": {int(k): 100.0 * float(p) for k, p in zip(kappas, pr)},
        }
    return res


def load_revisited(data_path: str | os.PathLike, dataset: str) -> dict:
    """The revisited dataset's `gnd_<dataset>.pkl` (imlist, qimlist, gnd) and its `jpg/` dir."""
    root = Path(data_path).expanduser() / dataset
    gnd_file = root / f"gnd_{dataset}.pkl"
    if not gnd_file.is_file():
        raise ValueError(f"ground truth {str(gnd_file)!r} not found (expected DATA/{dataset}/)")
    with open(gnd_file, "rb") as f:
        try:
            cfg = pickle.load(f)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is bad input
            raise ValueError(f"cannot read {str(gnd_file)!r}: {type(e).__name__}: {e}") from None
    for key in ("imlist", "qimlist", "gnd"):
        if key not in cfg:
            raise ValueError(f"{str(gnd_file)!r} has no {key!r} entry")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise ValueError(f"{str(gnd_file)!r}: {len(cfg['gnd'])} gnd entries for "
                         f"{len(cfg['qimlist'])} queries")  # fmt: skip
    images = root / "jpg"
    for name in (cfg["qimlist"][0], cfg["imlist"][0]):
        if not (images / f"{name}.jpg").is_file():
            raise ValueError(f"image {str(images / (name + '.jpg'))!r} not found")
    cfg["dir_images"] = str(images)
    return cfg


def oxford_paris_eval(
    model,
    data_path: str | os.PathLike,
    dataset: str = "roxford5k",
    *,
    features: RetrievalFeatures = RetrievalFeatures(),
    imsize: int | None = 224,
    crop_queries: bool = False,
    kappas: Sequence[int] = (1, 5, 10),
    batch_size: int = 32,
    mesh: Mesh | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Revisited Oxford / Paris evaluation of `model`: E / M / H mAP and mP@k (percent)."""
    cfg = load_revisited(data_path, dataset)
    d = cfg["dir_images"]
    db_src = _ListSource([os.path.join(d, f"{x}.jpg") for x in cfg["imlist"]], cfg["imlist"])
    q_src = _ListSource([os.path.join(d, f"{x}.jpg") for x in cfg["qimlist"]], cfg["qimlist"])
    boxes = [g.get("bbx") for g in cfg["gnd"]] if crop_queries else None
    common = dict(features=features, imsize=imsize, batch_size=batch_size, mesh=mesh,
                  progress=progress)  # fmt: skip
    db, _, _ = extract_retrieval_features(model, db_src, desc="database", **common)
    q, _, _ = extract_retrieval_features(model, q_src, boxes=boxes, desc="queries", **common)
    ranks = rank_all(q, db, mesh=mesh)
    return retrieval_eval(ranks, cfg["gnd"], kappas)


def label_gnd(query_labels, gallery_labels) -> list[dict]:
    """Class-level ground truth: a query's positives are the gallery items with its label."""
    gallery_labels = np.asarray(gallery_labels)
    return [{"ok": np.flatnonzero(gallery_labels == q), "junk": []} for q in query_labels]


def contact_sheet(
    query: Any, results: Sequence[Any], *, cell: int = 128, marks: Sequence[bool | None] = ()
) -> Image.Image:
    """One row: the query (blue frame) then its results (green / red frames when `marks` says
    whether each result is relevant)."""
    pad = 4
    sheet = Image.new("RGB", ((len(results) + 1) * (cell + pad) + pad, cell + 2 * pad), "white")
    colours = {None: (160, 160, 160), True: (40, 170, 60), False: (210, 40, 40)}
    items = [(query, (40, 90, 220))] + [
        (r, colours[marks[i] if i < len(marks) else None]) for i, r in enumerate(results)
    ]
    inner = cell - 8  # a 4-pixel coloured frame around each picture
    for c, (data, colour) in enumerate(items):
        img = load_image(data)
        s = inner / max(img.width, img.height)  # fit, enlarging small images too
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))),
                         Image.BICUBIC)  # fmt: skip
        frame = Image.new("RGB", (cell, cell), colour)
        frame.paste(Image.new("RGB", (inner, inner), "white"), (4, 4))
        frame.paste(img, ((cell - img.width) // 2, (cell - img.height) // 2))
        sheet.paste(frame, (pad + c * (cell + pad), pad))
    return sheet


def _query_source(items: Sequence[str], data_dir: str | None):
    if len(items) > 1 or Path(items[0]).is_file():
        for path in items:
            if not Path(path).is_file():
                raise ValueError(f"query image {path!r} does not exist")
        return _ListSource(list(items))
    return resolve_source(items[0], data_dir, "queries")


def retrieve(
    model,
    queries,
    gallery,
    *,
    topk: int = 10,
    out_dir: str | os.PathLike | None = None,
    features: RetrievalFeatures = RetrievalFeatures(),
    imsize: int | None = 224,
    batch_size: int = 32,
    mesh: Mesh | None = None,
    sheets: bool = True,
    progress: bool = True,
    data_dir: str | None = None,
) -> dict:
    """Top-k gallery matches of every query (sources or record sequences). With labels on both
    sides, also class-level mAP / mP@k over the full ranking. With `out_dir`, writes
    `retrieval.json` and `sheets/<i>_<query>.png` contact sheets."""
    q_src = resolve_source(queries, data_dir, "queries")
    g_src = resolve_source(gallery, data_dir, "gallery")
    if not 0 < topk <= len(g_src):
        raise ValueError(f"--topk must be in [1, {len(g_src)}] (the gallery size), got {topk}")
    common = dict(features=features, imsize=imsize, batch_size=batch_size, mesh=mesh,
                  progress=progress)  # fmt: skip
    g, g_labels, g_keys = extract_retrieval_features(model, g_src, desc="gallery", **common)
    q, q_labels, q_keys = extract_retrieval_features(model, q_src, desc="queries", **common)
    labelled = bool((q_labels >= 0).all() and (g_labels >= 0).all())
    depth = len(g_src) if labelled else topk
    scores, index = search(q, g, depth, mesh=mesh, progress=progress)
    results = []
    for i in range(len(q_src)):
        hits = []
        for r in range(topk):
            j = int(index[i, r])
            hit = {"rank": r + 1, "index": j, "key": g_keys[j], "score": float(scores[i, r])}
            if labelled:
                hit["label"] = int(g_labels[j])
            hits.append(hit)
        entry = {"index": i, "query": q_keys[i], "results": hits}
        if labelled:
            entry["label"] = int(q_labels[i])
        results.append(entry)
    out: dict = {"queries": results}
    if labelled:
        kappas = tuple(k for k in (1, 5, 10) if k <= len(g_src))
        m, aps, pr, _ = compute_map(index.T, label_gnd(q_labels, g_labels), kappas)
        out["metrics"] = {"map": 100.0 * m, "mp@k": {k: 100.0 * float(p) for k, p in
                                                      zip(kappas, pr)}}  # fmt: skip
        for entry, ap in zip(results, aps):
            entry["ap"] = float(ap)
    if out_dir is not None:
        from dinojax.eval.cli import write_json

        out_dir = Path(out_dir)
        write_json(out_dir / "retrieval.json", out)
        if sheets:
            (out_dir / "sheets").mkdir(parents=True, exist_ok=True)
            for i, entry in enumerate(results):
                marks = [h["label"] == entry["label"] for h in entry["results"]] if labelled else ()
                sheet = contact_sheet(
                    q_src[i]["image"], [g_src[h["index"]]["image"] for h in entry["results"]],
                    marks=marks,
                )  # fmt: skip
                stem = Path(entry["query"]).stem.replace(os.sep, "_") or str(i)
                sheet.save(out_dir / "sheets" / f"{i:04d}_{stem}.png")
    return out


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from dinojax.eval import cli

    p = argparse.ArgumentParser(
        prog="python -m dinojax.eval.retrieval",
        description="Image retrieval with frozen features: revisited Oxford / Paris (mAP, mP@k "
        "for Easy / Medium / Hard) or your own queries against a gallery (top-k JSON, contact "
        "sheets).",
    )
    cli.add_model_args(p)
    g = p.add_argument_group("revisited Oxford / Paris")
    g.add_argument("--dataset", choices=["roxford5k", "rparis6k"], default=None)
    g.add_argument("--data-path", default=None,
                   help="folder holding DATASET/gnd_DATASET.pkl and DATASET/jpg/")  # fmt: skip
    g.add_argument("--crop-queries", action="store_true", help="crop queries to their bbx")
    u = p.add_argument_group("your own images")
    u.add_argument(
        "--queries", nargs="+", default=None,
        help="query image files, or one source: folder:DIR, tfds:NAME:SPLIT, digits",
    )  # fmt: skip
    u.add_argument("--gallery", default=None, help="gallery source (folder:DIR, tfds:..., digits)")
    u.add_argument("--data-dir", default=None, help="TFDS data_dir")
    u.add_argument("--topk", type=int, default=10)
    u.add_argument("--out", default=None, help="output folder (retrieval.json, sheets/)")
    u.add_argument("--no-sheets", action="store_true", help="skip the contact-sheet PNGs")
    f = p.add_argument_group("features")
    f.add_argument(
        "--imsize", type=int, default=224,
        help="longest side of the thumbnail (224 or 512 published; 0: keep)",
    )  # fmt: skip
    f.add_argument("--pooling", choices=POOLINGS, default="cls")
    f.add_argument("--gem-p", type=float, default=3.0)
    f.add_argument("--multiscale", action="store_true", help="mean over scales 1, 1/sqrt2, 1/2")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--output", default=None, help="write the Oxford / Paris results as JSON here")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from dinojax.eval import cli

    args = _parser().parse_args(argv)

    def run():
        oxford = args.dataset is not None or args.data_path is not None
        own = args.queries is not None or args.gallery is not None
        if oxford == own:
            raise ValueError(
                "give either --dataset NAME --data-path DIR or --queries ... --gallery SOURCE"
            )
        features = RetrievalFeatures(args.pooling, args.multiscale, args.gem_p)
        imsize = args.imsize or None
        progress = not args.no_progress
        if oxford:
            if not (args.dataset and args.data_path):
                raise ValueError("the Oxford / Paris mode needs --dataset and --data-path")
            load_revisited(args.data_path, args.dataset)  # bad data fails before compiling
            model = cli.load_model(args)
            res = oxford_paris_eval(
                model, args.data_path, args.dataset, features=features, imsize=imsize,
                crop_queries=args.crop_queries, batch_size=args.batch_size, progress=progress,
            )  # fmt: skip
            for setup in SETUPS:
                r = res[setup]
                mp = "  ".join(f"mP@{k} {v:6.2f}" for k, v in r["mp@k"].items())
                print(f"{args.dataset} {setup:<6s} mAP {r['map']:6.2f}   {mp}")
            if args.output:
                cli.write_json(args.output, {"retrieval": res, "args": vars(args)})
            return 0
        if not (args.queries and args.gallery):
            raise ValueError("your-own-images mode needs --queries and --gallery")
        queries = _query_source(args.queries, args.data_dir)
        gallery = resolve_source(args.gallery, args.data_dir, "gallery")
        model = cli.load_model(args)
        res = retrieve(
            model, queries, gallery, topk=args.topk, out_dir=args.out, features=features,
            imsize=imsize, batch_size=args.batch_size, sheets=not args.no_sheets,
            progress=progress, data_dir=args.data_dir,
        )  # fmt: skip
        for entry in res["queries"][:20]:
            best = ", ".join(f"{h['key']} ({h['score']:.3f})" for h in entry["results"][:3])
            print(f"{entry['query']}: {best}")
        if "metrics" in res:
            m = res["metrics"]
            mp = "  ".join(f"mP@{k} {v:6.2f}" for k, v in m["mp@k"].items())
            print(f"label mAP {m['map']:6.2f}   {mp}")
        if args.out:
            print(f"wrote {Path(args.out) / 'retrieval.json'}")
        if args.output:
            cli.write_json(args.output, {"retrieval": res.get("metrics"), "args": vars(args)})
        return 0

    return cli.run_main(run)


if __name__ == "__main__":
    raise SystemExit(main())
