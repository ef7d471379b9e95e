"""Video object segmentation by label propagation (DINO's DAVIS-2017 semi-supervised protocol).

Protocol (facebookresearch/dino `eval_video_segmentation.py`):

- Frames: the shorter side resized to `size` (480) and the longer one to the matching length
  rounded down to a multiple of 64 (`read_frame`: 854x480 -> 832x480); for patch sizes that do not
  divide 64 (DINOv2's 14) both sides are rounded down to multiples of the patch instead. OpenCV's
  bilinear `cv2.resize` on the 8-bit frame (DINO's call), then /255 and normalised with DINO's
  video constants (mean 0.485, 0.456, 0.406; std 0.228, 0.224, 0.225).
- Features: the patch tokens of `get_intermediate_layers(x, n=1)` (final norm applied), each
  L2-normalised.
- The first frame's mask is resized (nearest) to the patch grid and one-hot encoded. Every later
  frame takes its labels from the first frame and the `n_last_frames` (7) previous frames: the
  affinity of a target patch to a source patch is `exp(cosine / temperature)` (0.1), zero outside
  a square of `size_mask_neighborhood` (12) patches around it (0: everywhere); for each target
  patch only the affinities >= its `topk`-th largest (5) over all source patches are kept and
  normalised to sum 1; the target's soft labels are the affinity-weighted sum of the sources'
  labels. The queue stores these soft labels (not their argmax), as DINO does.
- Output labels: the soft labels upsampled by the patch size (bilinear, PyTorch semantics), each
  channel min-max scaled when its maximum is positive, argmax, then resized (nearest) to the
  original frame size and written as palette PNGs (the DAVIS format).

Metrics (the DAVIS 2017 benchmark, davis2017-evaluation `metrics.py` / `evaluation.py`): per object,
region similarity J (IoU; 1 when both masks are empty; void pixels, label 255, excluded) and
contour accuracy F (boundary maps one pixel wide, matched within a disk of radius
`ceil(0.008 * image diagonal)` by `cv2.dilate`; precision / recall / F-measure with the
benchmark's empty-boundary rules), averaged over the frames except the first and the last;
J-Mean and F-Mean average the objects; J&F is their mean. The object count is the largest label
of the first annotation.

Execution: frames are read and embedded in batches (one jitted, sharded forward per batch); the
propagation of each frame is one jitted step holding the first frame and the ring buffer of the
last `n_last_frames` frames on device, so memory does not grow with the video length. The
affinities are computed for `chunk` target patches at a time.

Command line:

    # DAVIS-2017 val: ROOT/JPEGImages/480p/<video>/*.jpg, ROOT/Annotations/480p/<video>/*.png
    python -m dinojax.eval.video --checkpoint CKPT --davis ROOT --out davis_out/ \
        [--videos bike-packing blackswan] [--output results.json]
    # any folder of frames and the first frame's mask
    python -m dinojax.eval.video --checkpoint CKPT --frames DIR --mask first.png --out out/
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import logging
import math
import os
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
)
from dinojax.eval.retrieval import _bilinear_matrix
from dinojax.eval.transforms import load_image

__all__ = [
    "VIDEO_MEAN",
    "VIDEO_STD",
    "PropagationConfig",
    "davis_palette",
    "db_eval_iou",
    "evaluate_video",
    "f_measure",
    "frame_size",
    "main",
    "propagate_video",
    "read_frame",
    "seg2bmap",
]

logger = logging.getLogger("dinojax.eval")

VIDEO_MEAN = (0.485, 0.456, 0.406)
VIDEO_STD = (0.228, 0.224, 0.225)  # DINO's video script uses 0.228 for red
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


@dataclasses.dataclass(frozen=True)
class PropagationConfig:
    """DINO's label-propagation settings (its defaults)."""

    size: int = 480
    n_last_frames: int = 7
    size_mask_neighborhood: int = 12
    topk: int = 5
    temperature: float = 0.1

    def __post_init__(self) -> None:
        if self.size <= 0 or self.n_last_frames < 0 or self.topk <= 0:
            raise ValueError(
                f"size and topk must be positive and n_last_frames >= 0, got {self.size}, "
                f"{self.topk}, {self.n_last_frames}"
            )
        if self.size_mask_neighborhood < 0 or self.temperature <= 0:
            raise ValueError("size_mask_neighborhood must be >= 0 and temperature positive")


# ---------------------------------------------------------------------------------------------
# Frames and masks
# ---------------------------------------------------------------------------------------------


def frame_size(height: int, width: int, size: int, patch: int) -> tuple[int, int]:
    """(H, W) a frame is resized to: the shorter side `size`, the longer one scaled and rounded
    down to a multiple of 64 (DINO's `read_frame`), or both sides to multiples of the patch when
    it does not divide 64."""
    step = 64 if 64 % patch == 0 else patch
    short = size if size % patch == 0 else size // patch * patch
    if height > width:
        th, tw = int((size * height / width) // step * step), short
    else:
        th, tw = short, int((size * width / height) // step * step)
    if th < patch or tw < patch:
        raise ValueError(f"a {height}x{width} frame at size {size} is smaller than one patch")
    return th, tw


def read_frame(data: Any, th: int, tw: int) -> np.ndarray:
    """An (th, tw, 3) float32 frame: OpenCV's bilinear resize of the 8-bit image (DINO's
    `read_frame` call), then /255 and DINO's video normalisation."""
    import cv2

    img = np.asarray(load_image(data))
    if img.shape[:2] != (th, tw):
        img = cv2.resize(img, (tw, th))  # INTER_LINEAR, per channel: RGB order is irrelevant
    img = img.astype(np.float32) / 255.0
    return (img - np.asarray(VIDEO_MEAN, np.float32)) / np.asarray(VIDEO_STD, np.float32)


def read_mask(data: Any) -> tuple[np.ndarray, Any]:
    """(labels (H, W) uint8, palette or None) of an indexed / grayscale mask PNG or an array."""
    if isinstance(data, np.ndarray):
        return data.astype(np.uint8), None
    try:
        img = Image.open(data)
        img.load()
    except Exception as e:  # noqa: BLE001 - Pillow raises several types for bad files
        raise ValueError(f"cannot read mask {str(data)!r}: {type(e).__name__}: {e}") from None
    if img.mode not in ("P", "L", "1"):
        raise ValueError(
            f"mask {str(data)!r} has mode {img.mode}: expected an indexed (palette) or grayscale "
            "PNG holding object ids"
        )
    palette = img.getpalette() if img.mode == "P" else None
    return np.asarray(img, np.uint8), palette


def davis_palette() -> list[int]:
    """The DAVIS / PASCAL VOC colour map (256 RGB triples, flattened)."""
    out = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out += [r, g, b]
    return out


# ---------------------------------------------------------------------------------------------
# Propagation
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _FramePatches:
    """Last-block patch tokens (final norm) of `get_intermediate_layers(n=1)`, L2-normalised."""

    def __call__(self, model, x):
        (patches,) = model.get_intermediate_layers(x, 1)
        return {"feat": l2_normalize(patches.astype(jnp.float32))}


def _neighbourhood(h: int, w: int, radius: int, rows) -> jax.Array:
    """(len(rows), h*w) mask: source patch within `radius` rows and columns of target `rows`."""
    ys, xs = jnp.arange(h * w) // w, jnp.arange(h * w) % w
    ty, tx = rows // w, rows % w
    near_y = jnp.abs(ty[:, None] - ys[None]) <= radius
    return (near_y & (jnp.abs(tx[:, None] - xs[None]) <= radius)).astype(jnp.float32)


def _propagate_rows(
    target, rows, sources, source_labels, valid, *, h: int, w: int, topk: int,
    temperature: float, radius: int, chunk: int,
):  # fmt: skip
    """Soft labels of the target patches `rows` (their features `target`, (m, D))."""
    n, hw, _ = sources.shape
    m = target.shape[0]
    c = max(1, min(chunk, m))
    n_chunks = -(-m // c)
    pad = n_chunks * c - m
    tgt = jnp.pad(target, ((0, pad), (0, 0))).reshape(n_chunks, c, -1)
    rws = jnp.pad(rows, (0, pad)).reshape(n_chunks, c)
    labels = source_labels.reshape(n * hw, -1)

    def one(args):
        t, r = args
        sims = jnp.einsum("cd,nsd->cns", t, sources, precision="highest")
        aff = jnp.exp(sims / temperature) * valid[None, :, None].astype(jnp.float32)
        if radius > 0:
            aff = aff * _neighbourhood(h, w, radius, jnp.clip(r, 0, hw - 1))[:, None, :]
        aff = aff.reshape(c, n * hw)
        kth = jax.lax.top_k(aff, min(topk, n * hw))[0][:, -1:]
        aff = jnp.where(aff < kth, 0.0, aff)  # every value tied with the k-th is kept
        aff = aff / jnp.sum(aff, axis=1, keepdims=True)
        return jnp.einsum("cs,sl->cl", aff, labels, precision="highest")

    out = jax.lax.map(one, (tgt, rws))
    return out.reshape(n_chunks * c, -1)[:m]


def propagate_labels(
    target, sources, source_labels, valid, *, h: int, w: int, topk: int, temperature: float,
    radius: int, chunk: int = 1024,
):  # fmt: skip
    """Soft labels (h*w, C) of `target` (h*w, D) from `sources` (n, h*w, D) with labels
    (n, h*w, C); `valid` (n,) masks unused queue slots. DINO's `label_propagation`."""
    return _propagate_rows(
        target, jnp.arange(target.shape[0]), sources, source_labels, valid, h=h, w=w,
        topk=topk, temperature=temperature, radius=radius, chunk=chunk,
    )  # fmt: skip


def _labels_from_soft(soft, h: int, w: int, patch: int):
    """Upsample (bilinear, scale = patch), min-max each channel with a positive max, argmax."""
    num = soft.shape[-1]
    grid = soft.reshape(h, w, num)
    mh = jnp.asarray(_bilinear_matrix(h, h * patch, float(patch)))
    mw = jnp.asarray(_bilinear_matrix(w, w * patch, float(patch)))
    up = jnp.einsum("Hh,hwc->Hwc", mh, grid, precision="highest")
    up = jnp.einsum("Ww,Hwc->HWc", mw, up, precision="highest")
    lo, hi = jnp.min(up, axis=(0, 1)), jnp.max(up, axis=(0, 1))
    span = hi - lo
    # A constant channel (span 0) would divide by zero in DINO's `norm_mask`; it is left as is.
    scaled = jnp.where((hi > 0) & (span > 0), (up - lo) / jnp.where(span > 0, span, 1.0), up)
    return jnp.argmax(scaled, axis=-1).astype(jnp.uint8)


@functools.partial(
    jax.jit,
    static_argnames=("mesh", "h", "w", "patch", "topk", "temperature", "radius", "chunk"),
    donate_argnums=(0,),
)
def _step(state, target, *, mesh, h, w, patch, topk, temperature, radius, chunk):
    """One frame: its soft labels (target patches sharded over the mesh, the queue replicated),
    the queue update, and the frame's label map."""
    feats, segs, valid, slot = state  # slot 0: the first frame; 1..n_last: ring buffer
    hw = h * w
    axes = tuple(mesh.axis_names)
    shards = math.prod(mesh.shape[a] for a in axes)
    padded = -(-hw // shards) * shards
    spec, rep = PartitionSpec(axes), PartitionSpec()

    def local(t, r, f, s, v):
        return _propagate_rows(
            t, r, f, s, v, h=h, w=w, topk=topk, temperature=temperature, radius=radius,
            chunk=chunk,
        )  # fmt: skip

    soft = jax.shard_map(
        local, mesh=mesh, in_specs=(spec, spec, rep, rep, rep), out_specs=spec, check_vma=False
    )(jnp.pad(target, ((0, padded - hw), (0, 0))), jnp.arange(padded), feats, segs, valid)
    soft = soft[:hw]
    n_slots = feats.shape[0]
    if n_slots > 1:
        feats = feats.at[slot].set(target)
        segs = segs.at[slot].set(soft)
        valid = valid.at[slot].set(True)
        slot = jnp.where(slot + 1 >= n_slots, 1, slot + 1)
    # The queue stays replicated, so every call sees the same input layout (one compilation).
    state = jax.lax.with_sharding_constraint((feats, segs, valid, slot), NamedSharding(mesh, rep))
    return state, _labels_from_soft(soft, h, w, patch), soft


def _frame_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ValueError(f"frame folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if len(files) < 2:
        raise ValueError(f"{str(folder)!r} holds {len(files)} frames; propagation needs 2 or more")
    return files


def propagate_video(
    model,
    frames: Sequence[Any],
    first_mask,
    *,
    config: PropagationConfig = PropagationConfig(),
    batch_size: int = 8,
    chunk: int = 1024,
    mesh: Mesh | None = None,
    progress: bool = True,
    desc: str = "frames",
    soft: bool = False,
):
    """Yield (frame index, labels (H, W) uint8 at the original frame size) for every frame:
    frame 0 gives `first_mask` back (as DINO saves it), later frames their propagated labels.
    `frames` are paths, encoded images or arrays; `first_mask` a mask file or (H, W) array.
    With `soft`, (index, labels, soft labels (h*w, C) on the patch grid; None for frame 0)."""
    if len(frames) < 1:
        raise ValueError("no frames")
    if batch_size <= 0 or chunk <= 0:
        raise ValueError(f"batch_size and chunk must be positive, got {batch_size}, {chunk}")
    seg, _ = read_mask(first_mask)
    first = load_image(frames[0])
    ori_h, ori_w = first.height, first.width
    if seg.shape != (ori_h, ori_w):
        raise ValueError(f"first mask is {seg.shape[1]}x{seg.shape[0]} but the frames are "
                         f"{ori_w}x{ori_h}")  # fmt: skip
    p = model.cfg.patch_size
    th, tw = frame_size(ori_h, ori_w, config.size, p)
    h, w = th // p, tw // p
    labels0 = np.where(seg == 255, 0, seg)  # void is background for propagation
    # DINO counts the channels on the patch-grid mask; counting them on the full mask only adds
    # all-zero channels for objects too small for the grid, which never win the argmax.
    num = int(labels0.max()) + 1
    small = np.asarray(Image.fromarray(labels0).resize((w, h), Image.NEAREST)).reshape(-1)
    onehot = np.eye(num, dtype=np.float32)[small]

    mesh = mesh or default_mesh()
    shards = math.prod(mesh.shape[a] for a in mesh.axis_names)
    gb = -(-batch_size // shards) * shards
    sharding = batch_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    graphdef, params = nnx.split(model)
    params = _place_state(params, mesh)
    fn = _FramePatches()
    step = functools.partial(
        _step, mesh=mesh, h=h, w=w, patch=p, topk=config.topk,
        temperature=float(config.temperature), radius=config.size_mask_neighborhood, chunk=chunk,
    )  # fmt: skip

    def embed(loaded: list) -> np.ndarray:
        x = np.zeros((gb, th, tw, 3), np.float32)
        for i, fut in enumerate(loaded):
            x[i] = fut.result()
        xg = jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
        return _to_host(_forward(graphdef, fn, params, xg))["feat"][: len(loaded)]

    from tqdm.auto import tqdm

    bar = tqdm(total=len(frames), desc=desc, unit="frame", disable=not progress)
    pool = concurrent.futures.ThreadPoolExecutor(min(8, gb))
    submit = lambda b0: [pool.submit(read_frame, f, th, tw) for f in frames[b0 : b0 + gb]]  # noqa: E731
    try:
        yield (0, seg, None) if soft else (0, seg)
        bar.update(1)
        state = None
        pending = submit(0)
        for b0 in range(0, len(frames), gb):
            loaded = pending
            if b0 + gb < len(frames):
                pending = submit(b0 + gb)  # decode the next frames while these propagate
            feats = embed(loaded)
            for j, feat in enumerate(feats):
                t = b0 + j
                if t == 0:
                    n_slots = 1 + config.n_last_frames
                    d = feat.shape[-1]
                    f0 = np.zeros((n_slots, h * w, d), np.float32)
                    s0 = np.zeros((n_slots, h * w, num), np.float32)
                    f0[0], s0[0] = feat, onehot
                    valid = np.zeros(n_slots, bool)
                    valid[0] = True
                    state = jax.device_put((f0, s0, valid, np.int32(1)), replicated)
                    continue
                state, lab, probs = step(state, jax.device_put(feat, replicated))
                lab = np.asarray(lab)
                if lab.shape != (ori_h, ori_w):
                    lab = np.asarray(Image.fromarray(lab).resize((ori_w, ori_h), Image.NEAREST))
                yield (t, lab, np.asarray(probs)) if soft else (t, lab)
                bar.update(1)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()


# ---------------------------------------------------------------------------------------------
# DAVIS metrics
# ---------------------------------------------------------------------------------------------


def db_eval_iou(annotation, segmentation, void_pixels=None) -> float:
    """Region similarity J of two binary masks: IoU over non-void pixels, 1 if both are empty."""
    a, s = np.asarray(annotation, bool), np.asarray(segmentation, bool)
    keep = np.ones_like(a) if void_pixels is None else ~np.asarray(void_pixels, bool)
    inter = np.count_nonzero(a & s & keep)
    union = np.count_nonzero((a | s) & keep)
    return 1.0 if union == 0 else inter / union


def seg2bmap(seg) -> np.ndarray:
    """One-pixel-wide boundary map of a binary mask (a pixel differing from its east, south or
    south-east neighbour; the last row / column compare east / south only)."""
    seg = np.asarray(seg, bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def _disk(radius: float) -> np.ndarray:
    r = int(radius)
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= radius * radius


def f_measure(foreground_mask, gt_mask, void_pixels=None, bound_th: float = 0.008) -> float:
    """Contour accuracy F of a predicted mask against the annotation (the DAVIS definition)."""
    import cv2

    fg, gt = np.asarray(foreground_mask, bool), np.asarray(gt_mask, bool)
    keep = np.ones_like(fg) if void_pixels is None else ~np.asarray(void_pixels, bool)
    bound_pix = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*fg.shape))
    fg_b, gt_b = seg2bmap(fg & keep), seg2bmap(gt & keep)
    disk = _disk(bound_pix).astype(np.uint8)
    fg_dil = cv2.dilate(fg_b.astype(np.uint8), disk) > 0
    gt_dil = cv2.dilate(gt_b.astype(np.uint8), disk) > 0
    n_fg, n_gt = np.count_nonzero(fg_b), np.count_nonzero(gt_b)
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = np.count_nonzero(fg_b & gt_dil) / n_fg
        recall = np.count_nonzero(gt_b & fg_dil) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def evaluate_video(annotations: Sequence[np.ndarray], predictions: Sequence[np.ndarray]) -> dict:
    """Per-object J and F means (and recalls: share of frames above 0.5) of a video's predicted
    label maps against its annotations, over the frames except the first and the last (fewer
    than 3 frames: every frame but the first). Objects are 1..max label of the first annotation;
    label 255 is void."""
    if len(annotations) != len(predictions):
        raise ValueError(f"{len(annotations)} annotations but {len(predictions)} predictions")
    if len(annotations) < 2:
        raise ValueError("evaluation needs at least 2 frames")
    frames = range(1, len(annotations) - 1) if len(annotations) >= 3 else range(1, 2)
    n_obj = int(np.max(np.where(annotations[0] == 255, 0, annotations[0])))
    if any(np.max(np.where(p == 255, 0, p)) > n_obj for p in predictions[1:]):
        logger.warning("predictions hold object ids above the %d annotated objects", n_obj)
    objects = {}
    for o in range(1, n_obj + 1):
        js, fs = [], []
        for t in frames:
            gt, pred = np.asarray(annotations[t]), np.asarray(predictions[t])
            if gt.shape != pred.shape:
                raise ValueError(f"frame {t}: annotation {gt.shape} vs prediction {pred.shape}")
            void = gt == 255
            js.append(db_eval_iou(gt == o, pred == o, void))
            fs.append(f_measure(pred == o, gt == o, void))
        objects[o] = {
            "J": float(np.mean(js)), "F": float(np.mean(fs)),
            "J_recall": float(np.mean(np.asarray(js) > 0.5)),
            "F_recall": float(np.mean(np.asarray(fs) > 0.5)),
        }  # fmt: skip
    return objects


def summarize(per_video: dict[str, dict]) -> dict:
    """J-Mean, F-Mean (over every object of every video) and J&F-Mean."""
    objs = [o for v in per_video.values() for o in v.values()]
    if not objs:
        return {"J&F": float("nan"), "J": float("nan"), "F": float("nan"), "objects": 0}
    j = float(np.mean([o["J"] for o in objs]))
    f = float(np.mean([o["F"] for o in objs]))
    return {"J&F": (j + f) / 2, "J": j, "F": f, "objects": len(objs)}


# ---------------------------------------------------------------------------------------------
# Outputs and the command line
# ---------------------------------------------------------------------------------------------


def _overlay(frame: Any, labels: np.ndarray, palette: list[int], width: int) -> Image.Image:
    img = load_image(frame)
    scale = min(1.0, width / img.width)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img = np.asarray(img.resize(size, Image.BILINEAR), np.float32)
    lab = np.asarray(Image.fromarray(labels).resize(size, Image.NEAREST))
    colours = np.asarray(palette[: 256 * 3], np.float32).reshape(-1, 3)[lab]
    alpha = np.where(lab[..., None] > 0, 0.5, 0.0)
    return Image.fromarray(np.round(img * (1 - alpha) + colours * alpha).astype(np.uint8))


def run_video(
    model,
    frames: Sequence[Any],
    first_mask,
    out_dir: str | os.PathLike,
    *,
    names: Sequence[str] | None = None,
    annotations: Sequence[Any] | None = None,
    config: PropagationConfig = PropagationConfig(),
    batch_size: int = 8,
    gif: bool = True,
    gif_width: int = 320,
    progress: bool = True,
    desc: str = "frames",
) -> dict | None:
    """Propagate, write `<out_dir>/<name>.png` palette masks (and `<out_dir>.gif` overlays, kept
    as small thumbnails until the end); with `annotations` (one per frame), return the
    per-object J / F."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _, palette = read_mask(first_mask)
    palette = palette or davis_palette()
    names = list(names) if names is not None else [
        Path(f).stem if isinstance(f, (str, os.PathLike)) else f"{i:05d}"
        for i, f in enumerate(frames)
    ]  # fmt: skip
    preds, thumbs = [], []
    for t, lab in propagate_video(
        model, frames, first_mask, config=config, batch_size=batch_size, progress=progress,
        desc=desc,
    ):  # fmt: skip
        im = Image.fromarray(lab, mode="P")
        im.putpalette(palette)
        im.save(out_dir / f"{names[t]}.png")
        if annotations is not None:
            preds.append(lab)
        if gif:
            thumbs.append(_overlay(frames[t], lab, palette, gif_width))
    if gif and thumbs:
        thumbs[0].save(
            out_dir.parent / f"{out_dir.name}.gif", save_all=True, append_images=thumbs[1:],
            duration=100, loop=0,
        )  # fmt: skip
    if annotations is None:
        return None
    return evaluate_video([read_mask(a)[0] for a in annotations], preds)


def _davis_videos(root: Path, videos: Sequence[str] | None, split: str) -> list[str]:
    if not (root / "JPEGImages" / "480p").is_dir():
        raise ValueError(f"{str(root)!r} is not a DAVIS folder (no JPEGImages/480p)")
    if videos:
        return list(videos)
    listing = root / "ImageSets" / "2017" / f"{split}.txt"
    if not listing.is_file():
        raise ValueError(f"{str(listing)!r} not found: give --videos NAME ...")
    return [v.strip() for v in listing.read_text().splitlines() if v.strip()]


def _parser() -> argparse.ArgumentParser:
    from dinojax.eval import cli

    p = argparse.ArgumentParser(
        prog="python -m dinojax.eval.video",
        description="Video object segmentation by label propagation of frozen patch features "
        "(DINO's DAVIS-2017 protocol), with the DAVIS J and F metrics.",
    )
    cli.add_model_args(p)
    d = p.add_argument_group("input")
    d.add_argument("--davis", default=None, help="DAVIS 2017 root (JPEGImages/480p, Annotations)")
    d.add_argument("--videos", nargs="+", default=None, help="DAVIS videos (default: the split)")
    d.add_argument("--split", default="val", help="DAVIS ImageSets/2017 split (default val)")
    d.add_argument("--frames", default=None, help="or a folder of frames (sorted by name)")
    d.add_argument("--mask", default=None, help="the first frame's mask (indexed PNG)")
    d.add_argument("--annotations", default=None, help="folder of per-frame masks, for J&F")
    g = p.add_argument_group("propagation (DINO's defaults)")
    g.add_argument("--size", type=int, default=480, help="shorter side of the frames")
    g.add_argument("--n-last-frames", type=int, default=7)
    g.add_argument("--size-mask-neighborhood", type=int, default=12)
    g.add_argument("--topk", type=int, default=5)
    g.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=8, help="frames embedded per forward")
    p.add_argument("--out", required=True, help="output folder (palette PNGs, GIF overlays)")
    p.add_argument("--no-gif", action="store_true")
    p.add_argument("--output", default=None, help="write the J&F results as JSON here")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from dinojax.eval import cli

    args = _parser().parse_args(argv)

    def run():
        if bool(args.davis) == bool(args.frames):
            raise ValueError("give either --davis ROOT or --frames DIR --mask FIRST.png")
        config = PropagationConfig(
            args.size, args.n_last_frames, args.size_mask_neighborhood, args.topk,
            args.temperature,
        )  # fmt: skip
        jobs = []  # (name, frames, first mask, annotations or None)
        if args.davis:
            root = Path(args.davis)
            for v in _davis_videos(root, args.videos, args.split):
                frames = _frame_files(root / "JPEGImages" / "480p" / v)
                ann = [root / "Annotations" / "480p" / v / f"{f.stem}.png" for f in frames]
                if not ann[0].is_file():
                    raise ValueError(f"first-frame mask {str(ann[0])!r} not found")
                jobs.append((v, frames, ann[0], ann if all(a.is_file() for a in ann) else None))
        else:
            if not args.mask:
                raise ValueError("--frames needs --mask FIRST.png")
            frames = _frame_files(Path(args.frames))
            read_mask(args.mask)
            ann = None
            if args.annotations:
                ann = [Path(args.annotations) / f"{f.stem}.png" for f in frames]
                missing = [str(a) for a in ann if not a.is_file()]
                if missing:
                    raise ValueError(f"{len(missing)} annotations missing, e.g. {missing[0]!r}")
            jobs.append((Path(args.frames).name or "video", frames, args.mask, ann))
        model = cli.load_model(args)
        per_video = {}
        for name, frames, mask, ann in jobs:
            res = run_video(
                model, frames, mask, Path(args.out) / name, annotations=ann, config=config,
                batch_size=args.batch_size, gif=not args.no_gif, progress=not args.no_progress,
                desc=name,
            )  # fmt: skip
            if res is not None:
                per_video[name] = res
                j = np.mean([o["J"] for o in res.values()]) if res else float("nan")
                f = np.mean([o["F"] for o in res.values()]) if res else float("nan")
                print(f"{name}: J {j:.4f}  F {f:.4f}  ({len(res)} objects)")
            print(f"wrote {Path(args.out) / name}")
        if per_video:
            s = summarize(per_video)
            print(f"J&F-Mean {s['J&F']:.4f}   J-Mean {s['J']:.4f}   F-Mean {s['F']:.4f}")
            if args.output:
                cli.write_json(args.output, {"summary": s, "videos": per_video,
                                             "args": vars(args)})  # fmt: skip
        return 0

    return cli.run_main(run)


if __name__ == "__main__":
    raise SystemExit(main())
