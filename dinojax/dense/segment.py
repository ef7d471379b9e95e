"""Semantic segmentation with a frozen DINOv2 backbone and a linear (BatchNorm + 1x1 conv) head.

What runs (the official path: facebookresearch/dinov2 `notebooks/semantic_segmentation.ipynb`
`create_segmenter`, `dinov2/eval/segmentation/models/decode_heads/linear_head.py` `BNHead`, mmseg
0.27 `EncoderDecoder`; docs/parity.md "Segmentation heads"):

1. `CenterPadding(14)` zero-pads the (normalised) image to a multiple of the patch size;
2. `get_intermediate_layers(n=layers, reshape=True)` (final norm, no CLS, registers dropped);
   the maps are resized to the first one's grid and concatenated (`BNHead._transform_inputs`,
   "resize_concat");
3. BatchNorm in eval mode (eps 1e-5), then the 1x1 conv `conv_seg` -> logits on the patch grid;
4. the logits are resized bilinearly (align_corners=False) to the size of the image given to the
   backbone *before* padding (`EncoderDecoder.encode_decode`), so the padding is stretched over
   the image as in the official code, not cropped.

Modes (`Segmenter.predict`), mmseg 0.27 `EncoderDecoder.whole_inference` / `slide_inference` /
`aug_test`:
- "whole": one pass; returns the logits (B, H, W, K);
- "slide": windows of `crop_size` every `stride` pixels (the last window flush with the border),
  each padded and decoded on its own; returns the sum of window logits divided by the count map;
- "ms": test-time augmentation: the image is resized (keep ratio) to a short side of
  `ms_size * r` for r in `scales` (mmcv `rescale_size` arithmetic), and flipped if `flip`; each
  view runs in `ms_mode` ("slide" or "whole"), its logits are resized back to the input size,
  softmaxed and flipped back; returns the MEAN OF THE SOFTMAX over the views.

So "whole"/"slide" give logits and "ms" probabilities, as those functions do; `probs=True` gives
softmax probabilities in every mode (what mmseg's `EncoderDecoder.inference` returns). Argmax is
the same either way.

Images: NHWC, any size. uint8 arrays are RGB 0-255 and are normalised with the ImageNet mean and
std (the configs' `img_norm_cfg`); float arrays are taken as already normalised, like every
dinojax backbone input. Every call is jitted (one compilation per input shape) and the batch is
sharded over all devices of the mesh (padded to a multiple of the device count).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from dinojax.dense.common import center_pad, load_backbone, resize_bilinear

__all__ = [
    "BNHead",
    "MS_SCALES",
    "Segmenter",
    "head_logits",
    "load_segmenter",
    "normalize_images",
    "rescale_size",
    "seg_features",
    "slide_windows",
]

Array = jax.Array
MS_SCALES = (1.0, 1.32, 1.73, 2.28, 3.0)  # the hosted ms configs' MultiScaleFlipAug img_ratios
IMAGENET_MEAN = (123.675, 116.28, 103.53)  # img_norm_cfg of the segmentation configs (0-255)
IMAGENET_STD = (58.395, 57.12, 57.375)


# ---------------------------------------------------------------------------------------------
# The head
# ---------------------------------------------------------------------------------------------


class BNHead(nnx.Module):
    """`BNHead` of the official code: `bn` (BatchNorm, statistics as BatchStat) and `conv_seg`
    (1x1 conv as a (C, K) kernel). Initialised like mmseg (`conv_seg` Normal std 0.01, bias 0;
    BN weight 1, bias 0, running mean 0, running var 1)."""

    def __init__(self, in_channels: int, num_classes: int, *, rngs: nnx.Rngs):
        c, k = in_channels, num_classes
        self.bn = nnx.Dict(
            weight=nnx.Param(jnp.ones((c,))), bias=nnx.Param(jnp.zeros((c,))),
            running_mean=nnx.BatchStat(jnp.zeros((c,))), running_var=nnx.BatchStat(jnp.ones((c,))),
        )  # fmt: skip
        self.conv_seg = nnx.Dict(
            kernel=nnx.Param(0.01 * jax.random.normal(rngs.params(), (c, k))),
            bias=nnx.Param(jnp.zeros((k,))),
        )

    def __call__(self, feats: Array, eps: float = 1e-5) -> Array:
        return head_logits(self.tree(), feats, eps)

    def tree(self) -> dict:
        """The parameters and statistics as the head-directory dict."""
        return nnx.to_pure_dict(nnx.state(self))


def batch_norm_eval(bn: dict, x: Array, eps: float = 1e-5) -> Array:
    """`nn.BatchNorm2d` in eval mode over the channel (last) axis."""
    inv = jax.lax.rsqrt(bn["running_var"].astype(jnp.float32) + eps)
    return (x - bn["running_mean"]) * inv * bn["weight"] + bn["bias"]


def head_logits(head: dict, feats: Array, eps: float = 1e-5) -> Array:
    """BN (eval) + `conv_seg` on (B, h, w, C) features -> (B, h, w, K) logits, float32. No
    dropout: the released configs set dropout_ratio=0."""
    x = batch_norm_eval(head["bn"], feats.astype(jnp.float32), eps)
    k = head["conv_seg"]
    return jnp.einsum("bhwc,ck->bhwk", x, k["kernel"].astype(jnp.float32)) + k["bias"]


def seg_features(model, x: Array, layers: Sequence[int]) -> Array:
    """The head's input: `get_intermediate_layers(n=layers, reshape=True)` (final norm), each map
    resized to the first one's grid (`BNHead._transform_inputs` "resize_concat") and
    concatenated on channels, float32. `x` must already be padded to the patch size."""
    outs = model.get_intermediate_layers(x, n=list(layers), reshape=True)
    grid = outs[0].shape[1:3]
    outs = [resize_bilinear(o.astype(jnp.float32), grid) for o in outs]
    return jnp.concatenate(outs, axis=-1)


# ---------------------------------------------------------------------------------------------
# Geometry (static Python: sizes decide the compiled program)
# ---------------------------------------------------------------------------------------------


def slide_windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of mmseg's `slide_inference` windows, row-major; each window is
    (min(crop, h), min(crop, w)) and the last one in a row / column ends at the border."""
    if crop <= 0 or stride <= 0:
        raise ValueError(f"slide crop_size and stride must be positive, got {crop}, {stride}")
    h_grids = max(h - crop + stride - 1, 0) // stride + 1
    w_grids = max(w - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(h_grids):
        for j in range(w_grids):
            y2, x2 = min(i * stride + crop, h), min(j * stride + crop, w)
            out.append((max(y2 - crop, 0), max(x2 - crop, 0)))
    return out


def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv `rescale_size` / `imrescale` (what mmseg's `Resize(keep_ratio=True)` calls): the
    largest size with the long edge <= max(scale) and the short edge <= min(scale), rounded as
    `int(x * factor + 0.5)`. Returns (h, w)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * float(factor) + 0.5), int(w * float(factor) + 0.5)


def ms_sizes(h: int, w: int, scales: Sequence[float], ms_size: int) -> list[tuple[int, int]]:
    """The view sizes of mmseg's `MultiScaleFlipAug(img_scale=(99999999, ms_size),
    img_ratios=scales)` then `Resize(keep_ratio=True)`: scale (int(99999999 r), int(ms_size r))."""
    return [rescale_size(h, w, (int(99999999 * r), int(ms_size * r))) for r in scales]


# ---------------------------------------------------------------------------------------------
# The jitted programs
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _View:
    """One static inference program: resize the input to `size` (None: as is), flip, run
    `mode`, resize the result back to the input size, softmax if `probs`, flip back."""

    layers: tuple[int, ...]
    eps: float
    mode: str
    crop: int
    stride: int
    size: tuple[int, int] | None = None
    flip: bool = False
    probs: bool = False


def _encode_decode(model, head: dict, x: Array, view: _View) -> Array:
    # EncoderDecoder.encode_decode with the notebook's CenterPadding pre-hook on the backbone.
    h, w = x.shape[1:3]
    feats = seg_features(model, center_pad(x, model.cfg.patch_size), view.layers)
    return resize_bilinear(head_logits(head, feats, view.eps), (h, w))


def _slide(model, head: dict, x: Array, view: _View) -> Array:
    b, h, w, _ = x.shape
    hc, wc = min(view.crop, h), min(view.crop, w)
    corners = slide_windows(h, w, view.crop, view.stride)
    count = np.zeros((h, w), np.float32)
    for y1, x1 in corners:
        count[y1 : y1 + hc, x1 : x1 + wc] += 1
    k = head["conv_seg"]["bias"].shape[0]

    def body(preds, corner):
        y1, x1 = corner[0], corner[1]
        win = jax.lax.dynamic_slice(x, (0, y1, x1, 0), (b, hc, wc, x.shape[3]))
        logits = _encode_decode(model, head, win, view)
        old = jax.lax.dynamic_slice(preds, (0, y1, x1, 0), (b, hc, wc, k))
        return jax.lax.dynamic_update_slice(preds, old + logits, (0, y1, x1, 0)), None

    # One window at a time (a scan compiles the backbone once), summed in mmseg's order.
    preds, _ = jax.lax.scan(body, jnp.zeros((b, h, w, k), jnp.float32),
                            jnp.asarray(corners, jnp.int32))  # fmt: skip
    return preds / count[None, :, :, None]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _run_view(graphdef, view: _View, state, head: dict, x: Array) -> Array:
    model = nnx.merge(graphdef, state)
    h, w = x.shape[1:3]
    if view.size is not None and view.size != (h, w):
        x = resize_bilinear(x, view.size)
    if view.flip:
        x = x[:, :, ::-1]
    out = (_slide if view.mode == "slide" else _encode_decode)(model, head, x, view)
    out = resize_bilinear(out, (h, w))  # `rescale` to the input (ori_shape): identity if equal
    if view.probs:
        out = jax.nn.softmax(out, axis=-1)
    if view.flip:
        out = out[:, :, ::-1]
    return out


def global_array(x: np.ndarray, sharding) -> Array:
    """A batch every process holds in full -> one global array laid out by `sharding` (each
    device takes its rows; with several processes each fills only its own devices)."""
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def host_array(x: Array) -> np.ndarray:
    """The whole of a (possibly multi-host) sharded array on every host."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@jax.jit
def _accumulate(total, x):
    return total + x


def normalize_images(images) -> np.ndarray:
    """uint8 RGB 0-255 -> normalised float32 (ImageNet mean / std); float input as is. One
    (H, W, 3) image is a batch of one."""
    if isinstance(images, (list, tuple)):
        shapes = sorted({np.shape(im) for im in images})
        if len(shapes) > 1:
            raise ValueError(f"images of different sizes {shapes[:3]} in one batch: call predict "
                             "once per size (or per image)")  # fmt: skip
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected NHWC RGB images (B, H, W, 3), got shape {x.shape}")
    if x.dtype == np.uint8:
        mean, std = np.float32(IMAGENET_MEAN), np.float32(IMAGENET_STD)
        return (x.astype(np.float32) - mean) / std
    if x.dtype.kind != "f":
        raise ValueError(f"images must be uint8 (0-255) or float (normalised), got {x.dtype}")
    return x.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The segmenter
# ---------------------------------------------------------------------------------------------


class Segmenter:
    """A frozen backbone + a segmentation head. `head` is the head-directory params dict
    ({"bn": ..., "conv_seg": ...}) and `head_cfg` its config (`dinojax.convert.dense_seg`)."""

    def __init__(self, model, head: dict, head_cfg: dict, *, mesh: Mesh | None = None):
        from dinojax.eval.features import _place_state, default_mesh

        check_head(head_cfg, model.cfg)
        self.model = model
        self.head_cfg = dict(head_cfg)
        self.mesh = mesh or default_mesh()
        self.num_classes = int(head_cfg["num_classes"])
        self.layers = tuple(int(i) for i in head_cfg["layers"])
        self._graphdef, state = nnx.split(model)
        self._state = _place_state(state, self.mesh)
        self._head = _place_state(jax.tree.map(jnp.asarray, head), self.mesh)

    @property
    def class_names(self) -> list[str] | None:
        return self.head_cfg.get("class_names")

    def _view(self, mode: str, crop: int, stride: int, **kw) -> _View:
        return _View(self.layers, float(self.head_cfg.get("bn_eps", 1e-5)), mode, int(crop),
                     int(stride), **kw)  # fmt: skip

    def predict(
        self,
        images,
        mode: str = "whole",
        *,
        crop_size: int | None = None,
        stride: int | None = None,
        probs: bool = False,
        resize: tuple[int, int] | None = None,
        scales: Sequence[float] = MS_SCALES,
        ms_size: int = 640,
        flip: bool = True,
        ms_mode: str = "slide",
        batch_size: int = 8,
    ) -> np.ndarray:
        """Class scores (B, H, W, K) float32 at the input resolution.

        mode "whole" / "slide": logits (softmax probabilities with `probs`); slide windows are
        `crop_size` (512) every `stride` (341) pixels. `resize=(long, short)` first resizes the
        images like mmseg's `Resize(img_scale=resize, keep_ratio=True)` test pipeline (e.g.
        (2048, 512), the linear configs) and brings the scores back to the input size.
        mode "ms": mean softmax over `scales` x (`flip`) views of short side `ms_size * r`, each
        run in `ms_mode` (crop_size 640 / stride 426 by default for "slide": the ms heads were
        trained on 640 crops; the hosted config's exact test window is not in the public code).
        `batch_size` images run at once (rounded up to the device count)."""
        if mode not in ("whole", "slide", "ms"):
            raise ValueError(f"mode must be 'whole', 'slide' or 'ms', got {mode!r}")
        if mode == "ms" and ms_mode not in ("whole", "slide"):
            raise ValueError(f"ms_mode must be 'whole' or 'slide', got {ms_mode!r}")
        x = normalize_images(images)
        n, h, w, _ = x.shape
        if n == 0 or h == 0 or w == 0:
            raise ValueError(f"no pixels to segment: images of shape {x.shape}")
        default_crop, default_stride = (640, 426) if mode == "ms" else (512, 341)
        crop, stride = crop_size or default_crop, stride or default_stride
        if mode == "ms":
            if not scales:
                raise ValueError("ms mode needs at least one scale")
            views = [
                self._view(ms_mode, crop, stride, size=s, flip=f, probs=True)
                for s in ms_sizes(h, w, scales, ms_size)
                for f in ((False, True) if flip else (False,))
            ]
        else:
            size = rescale_size(h, w, resize) if resize else None
            views = [self._view(mode, crop, stride, size=size, probs=probs)]
        return self._run(x, views, batch_size)

    def _run(self, x: np.ndarray, views: list[_View], batch_size: int) -> np.ndarray:
        from dinojax.eval.features import batch_sharding

        sharding = batch_sharding(self.mesh)
        n_dev = math.prod(self.mesh.shape.values())
        gb = -(-max(1, min(batch_size, len(x))) // n_dev) * n_dev
        out = np.empty((*x.shape[:3], self.num_classes), np.float32)
        for start in range(0, len(x), gb):
            chunk = x[start : start + gb]
            m = len(chunk)
            if m < gb:
                chunk = np.concatenate([chunk, np.zeros((gb - m, *chunk.shape[1:]), np.float32)])
            xg = global_array(chunk, sharding)
            total = None
            for view in views:
                y = _run_view(self._graphdef, view, self._state, self._head, xg)
                total = y if total is None else _accumulate(total, y)
            if len(views) > 1:
                total = total / len(views)
            out[start : start + m] = host_array(total)[:m]
        return out

    def segment(self, images, **kw) -> np.ndarray:
        """Class index maps (B, H, W) int32: argmax of `predict`."""
        return np.argmax(self.predict(images, **kw), axis=-1).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def check_head(head_cfg: dict, cfg, source: str = "segmentation head") -> None:
    """A head config against the backbone config: one line naming both on any mismatch."""
    from dinojax.convert.backbone import ConversionError

    want = head_cfg.get("backbone")
    d, layers = int(head_cfg["embed_dim"]), [int(i) for i in head_cfg["layers"]]
    for_ = f"{source} (for {want or f'a backbone of width {d}'}, layers {layers})"
    if d != cfg.embed_dim:
        raise ConversionError(f"{for_} does not fit the backbone {cfg.name} (embed dim "
                              f"{cfg.embed_dim})")  # fmt: skip
    if max(layers) >= cfg.depth or min(layers) < 0:
        raise ConversionError(f"{for_} reads blocks the backbone {cfg.name} (depth {cfg.depth}) "
                              "does not have")  # fmt: skip
    if want and cfg.name != "custom":
        reg = lambda name: "_reg" in name  # noqa: E731
        if reg(want) != reg(cfg.name) or want.split("_reg")[0] != cfg.name.split("_reg")[0]:
            raise ConversionError(f"{for_} does not fit the backbone {cfg.name}")
    if int(head_cfg["in_channels"]) != d * len(layers):
        raise ConversionError(f"{for_}: {head_cfg['in_channels']} channels for {len(layers)} "
                              f"layer(s) of width {d}")  # fmt: skip


def load_head_for(head, cfg) -> tuple[dict, dict]:
    """A segmentation head (head directory, or official `.pth` converted in memory against the
    backbone `cfg`) -> (params, head_cfg)."""
    from dinojax.convert import dense, dense_seg
    from dinojax.convert.backbone import ConversionError
    from dinojax.convert.io import read_file

    path = Path(head)
    if path.is_dir():
        params, meta = dense.load_head(path)
        if meta["task"] != "segmentation":
            raise ConversionError(f"{path} is a {meta['task']} head, not a segmentation head")
        check_head(meta["head"], cfg, source=f"segmentation head {path}")
        return params, meta["head"]
    named = dense.arch_from_name(path)  # a released file names its backbone
    if named and cfg.name != "custom" and named != cfg.name:
        raise ConversionError(f"segmentation head {path.name} is for {named}, the backbone is "
                              f"{cfg.name}")  # fmt: skip
    sd = dense.head_state_dict(read_file(path))
    if not dense_seg.detect(sd):
        raise ConversionError(f"{path} is not a segmentation head (no decode_head.conv_seg)")
    return dense_seg.from_backbone_config(sd, cfg, source=f"segmentation head {path.name}")


def load_segmenter(
    backbone, head: str | os.PathLike, *, arch: str | None = None, mesh: Mesh | None = None,
    **overrides,
) -> Segmenter:  # fmt: skip
    """Backbone (checkpoint directory, hub name, official file or a model) + segmentation head
    (head directory or official `.pth`) -> `Segmenter`. `overrides` change backbone run-time
    fields, e.g. dtype="bfloat16"."""
    model = load_backbone(backbone, arch=arch, **overrides)
    if overrides and not isinstance(backbone, (str, os.PathLike)):  # a model object: rebuild it
        from dinojax.eval.features import model_from_params

        model = model_from_params(model.cfg.replace(**overrides), model.params())
    params, head_cfg = load_head_for(head, model.cfg)
    return Segmenter(model, params, head_cfg, mesh=mesh)
