"""Monocular depth from frozen DINOv2 features: the released linear / linear4 / DPT heads
(facebookresearch/dinov2 `dinov2/hub/depth/`), exact in float32, and heads trained in dinojax.

    depther = load_depther("dinov2_vits14", "dinov2_vits14_nyu_dpt_head.pth")
    metres = depther.predict(images)  # (B, H, W, 3) uint8 RGB -> (B, H, W) float32

The pipeline is the hub's `DepthEncoderDecoder.encode_decode` (`dinov2/hub/depth/
encoder_decoder.py`): `CenterPadding(14)`, `get_intermediate_layers(n=out_index, reshape=True,
return_class_token=True, norm=False)` (pre-norm tokens and CLS of the listed blocks), the head,
`clamp(min_depth, max_depth)`, bilinear resize (align_corners=False) to the unpadded input.

Depth range. The released NYU heads were trained on 0.001-10 m and the KITTI heads on 0.001-80 m;
dinojax decodes each head over its dataset's range. The hub's `_make_dinov2_linear_depth_head`
(`dinov2/hub/depthers.py`) builds every linear head with min_depth=0.001, max_depth=80 whatever the
weights (earlier revisions hard-coded 10), so `torch.hub.load(..., "dinov2_vits14_ld")` decodes the
NYU linear heads over 0.001-80 m; `linear_range="hub"` reproduces that. The DPT heads decode over
the dataset's range in the hub too.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dinojax.convert.backbone import ConversionError
from dinojax.convert.dense_depth import DATASET_RANGES, check_backbone, official_shapes
from dinojax.dense.common import center_pad, load_backbone, resize_bilinear

Array = jax.Array

__all__ = [
    "DepthHead",
    "Depther",
    "depth_forward",
    "head_forward",
    "init_head_params",
    "linear_head_config",
    "load_depther",
    "torch_linspace",
]

HUB_LINEAR_RANGE = (0.001, 80.0)  # dinov2/hub/depthers.py `_make_dinov2_linear_depth_head`


# ---------------------------------------------------------------------------------------------
# Layers (NHWC activations; kernels HWIO, see dinojax.convert.dense_depth)
# ---------------------------------------------------------------------------------------------


def _conv(p: dict, x: Array, *, stride: int = 1, padding: int = 0) -> Array:
    """`nn.Conv2d` (zero padding)."""
    y = jax.lax.conv_general_dilated(
        x,
        p["kernel"].astype(x.dtype),
        (stride, stride),
        [(padding, padding)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + p["bias"].astype(x.dtype) if "bias" in p else y


def _conv_transpose(p: dict, x: Array) -> Array:
    """`nn.ConvTranspose2d(kernel_size=k, stride=k, padding=0)`: the windows do not overlap, so
    each input pixel writes one k x k block: out[i*k + a, j*k + c] = x[i, j] @ W[:, :, a, c]."""
    k = p["kernel"].shape[0]
    b, h, w, _ = x.shape
    y = jnp.einsum("bhwi,acio->bhawco", x, p["kernel"].astype(x.dtype))
    return y.reshape(b, h * k, w * k, -1) + p["bias"].astype(x.dtype)


def _linear(p: dict, x: Array) -> Array:
    return x @ p["kernel"].astype(x.dtype) + p["bias"].astype(x.dtype)


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps)` in float32, bit for bit: the CPU kernel fills the first
    half as start + i * step and the second half as end - (steps - 1 - i) * step, each one fused
    multiply-add in float32 (emulated in float64, where a float32 step times an index is exact)."""
    start, end = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start], np.float32)
    step = np.float64(np.float32((end - start) / np.float32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    first = step * i + np.float64(start)
    second = np.float64(end) - step * (steps - 1 - i)
    return np.where(i < steps // 2, first, second).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------


def _linear_logits(params: dict, feats, n_bins: int) -> Array:
    """`BNHead._forward_feature` + `conv_depth` (dinov2/hub/depth/decode_heads.py): per layer
    concat(patch map, CLS broadcast), bilinear x4 (align_corners=False), concat, 1x1 conv.

    The 1x1 conv is applied before the upsampling: both are linear and every bilinear weight row
    sums to one, so conv(resize(x)) == resize(conv(x)) (same value, a different summation order:
    float32 differences of ~1e-7 relative), and the CLS half of the input is constant per image,
    so its contribution is one matmul per image. Memory drops from 2 * D * layers channels at
    4x resolution to `n_bins`."""
    kernel = params["conv_depth"]["kernel"][0, 0]  # (C, n_bins), C = per layer [patch D | cls D]
    d = feats[0][0].shape[-1]
    h, w = feats[0][0].shape[1:3]
    logits = 0.0
    cls_term = params["conv_depth"]["bias"].astype(jnp.float32)
    for i, (patch, cls) in enumerate(feats):
        k = kernel[2 * d * i : 2 * d * (i + 1)].astype(patch.dtype)
        logits = logits + patch @ k[:d]
        cls_term = cls_term + (cls @ k[d:])[:, None, None, :]
    logits = logits + cls_term
    return resize_bilinear(logits.astype(jnp.float32), (4 * h, 4 * w), align_corners=False)


def _decode_bins(logits: Array, min_depth: float, max_depth: float) -> Array:
    """`DepthBaseDecodeHead.depth_pred`, classify with bins "UD" and norm "linear" (Adabins):
    p = relu(logits) + 0.1 normalised over the bins, depth = sum_k p_k * linspace(min, max)_k."""
    p = jax.nn.relu(logits) + 0.1
    p = p / jnp.sum(p, axis=-1, keepdims=True)
    bins = jnp.asarray(torch_linspace(min_depth, max_depth, logits.shape[-1]))
    return jnp.einsum("bhwk,k->bhw", p, bins)[..., None]


def _rcu(p: dict, x: Array) -> Array:
    """`PreActResidualConvUnit` without norm: x + conv2(relu(conv1(relu(x))))."""
    y = _conv(p["conv1"]["conv"], jax.nn.relu(x), padding=1)
    y = _conv(p["conv2"]["conv"], jax.nn.relu(y), padding=1)
    return y + x


def _fusion(p: dict, x: Array, skip: Array | None) -> Array:
    """`FeatureFusionBlock`: add the refined skip (resized to x if needed), refine, x2 bilinear with
    align_corners=True, 1x1 projection."""
    if skip is not None:
        if skip.shape != x.shape:
            skip = resize_bilinear(skip, x.shape[1:3], align_corners=False)
        x = x + _rcu(p["res_conv_unit1"], skip)
    x = _rcu(p["res_conv_unit2"], x)
    h, w = x.shape[1:3]
    x = resize_bilinear(x, (2 * h, 2 * w), align_corners=True, scale_factor=2.0)
    return _conv(p["project"]["conv"], x)


def _dpt_forward(params: dict, feats, min_depth: float) -> Array:
    """`DPTHead.forward` + `depth_pred` (classify=False): relu(head) + min_depth."""
    rb = params["reassemble_blocks"]
    xs = []
    for i, (patch, cls) in enumerate(feats):
        # ReassembleBlocks, readout "project": Linear(2D, D) + GELU (exact) on concat(token, CLS).
        readout = jnp.broadcast_to(cls[:, None, None, :], patch.shape)
        x = _linear(rb["readout_projects"][str(i)]["0"], jnp.concatenate([patch, readout], -1))
        x = jax.nn.gelu(x, approximate=False)
        x = _conv(rb["projects"][str(i)]["conv"], x)
        if i in (0, 1):
            x = _conv_transpose(rb["resize_layers"][str(i)], x)
        elif i == 3:
            x = _conv(rb["resize_layers"]["3"], x, stride=2, padding=1)
        xs.append(_conv(params["convs"][str(i)]["conv"], x, padding=1))
    fb = params["fusion_blocks"]
    out = _fusion(fb["0"], xs[-1], None)
    for i in range(1, len(xs)):
        out = _fusion(fb[str(i)], out, xs[-(i + 1)])
    out = jax.nn.relu(_conv(params["project"]["conv"], out, padding=1))  # ConvModule: conv + ReLU
    hd = params["conv_depth"]["head"]  # HeadDepth
    out = _conv(hd["0"], out, padding=1)
    h, w = out.shape[1:3]
    out = resize_bilinear(out, (2 * h, 2 * w), align_corners=True, scale_factor=2.0)
    out = _conv(hd["4"], jax.nn.relu(_conv(hd["2"], out, padding=1)))
    return jax.nn.relu(out) + min_depth


def head_forward(params: dict, head_cfg: dict, feats, min_depth: float, max_depth: float) -> Array:
    """The head's depth map (B, h', w', 1) before clamping and resizing (what the official
    `forward_train` feeds the losses). `feats`: [(patch (B, h, w, D), cls (B, D))] per block."""
    feats = [(p.astype(jnp.float32), c.astype(jnp.float32)) for p, c in feats]
    if head_cfg["type"] == "dpt":
        return _dpt_forward(params, feats, min_depth)
    logits = _linear_logits(params, feats, int(head_cfg.get("n_bins", 256)))
    return _decode_bins(logits, min_depth, max_depth)


def depth_forward(
    backbone, params: dict, head_cfg: dict, x: Array, min_depth: float, max_depth: float
) -> Array:
    """`DepthEncoderDecoder.encode_decode(img, None)` on normalised NHWC images -> (B, H, W)."""
    h, w = x.shape[1:3]
    xp = center_pad(x, backbone.cfg.patch_size)
    feats = backbone.get_intermediate_layers(
        xp, tuple(head_cfg["out_index"]), reshape=True, return_class_token=True, norm=False
    )
    out = head_forward(params, head_cfg, feats, min_depth, max_depth)
    out = jnp.clip(out, min_depth, max_depth)
    return resize_bilinear(out, (h, w), align_corners=False)[..., 0]


def linear_head_config(
    embed_dim: int,
    out_index,
    *,
    min_depth: float,
    max_depth: float,
    num_register_tokens: int = 0,
    dataset: str | None = None,
    n_bins: int = 256,
) -> dict:
    """Config of a linear head (1 block: "linear", 4 blocks: "linear4", else "linear")."""
    out_index = sorted(int(i) for i in out_index)
    return {
        "type": "linear4" if len(out_index) == 4 else "linear",
        "embed_dim": int(embed_dim),
        "n_bins": int(n_bins),
        "out_index": out_index,
        "dataset": dataset,
        "min_depth": float(min_depth),
        "max_depth": float(max_depth),
        "num_register_tokens": int(num_register_tokens),
    }


def init_head_params(head_cfg: dict, seed: int = 0) -> dict:
    """Fresh weights: torch's default conv / linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for
    weights and biases (fan_in = torch weight.shape[1] * kh * kw)."""
    from dinojax.convert.dense_depth import _path, _set, jax_shape

    tree: dict = {}
    key = jax.random.key(seed)
    shapes = official_shapes(head_cfg)
    for i, (k, shape) in enumerate(shapes.items()):
        w = shapes[k[: -len("bias")] + "weight"] if k.endswith("bias") else shape
        fan_in = int(np.prod(w[1:]))
        bound = 1.0 / math.sqrt(fan_in)
        val = jax.random.uniform(
            jax.random.fold_in(key, i), jax_shape(k, shape), jnp.float32, -bound, bound
        )
        _set(tree, _path(k), np.asarray(val))
    return tree


class DepthHead(nnx.Module):
    """A depth head as an NNX module: parameters at the official paths without `decode_head.`
    (`conv_depth.kernel`, `reassemble_blocks.projects.0.conv.kernel`, ...)."""

    def __init__(self, head_cfg: dict, params: dict):
        # Static attributes are part of the graph definition, which must hash: keep a tuple.
        self.cfg_items = _hashable(head_cfg)
        for k, v in params.items():
            setattr(self, k, _to_nnx(v))

    @property
    def head_cfg(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.cfg_items}

    def params(self) -> dict:
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def __call__(self, feats, min_depth: float, max_depth: float) -> Array:
        return head_forward(self.params(), self.head_cfg, feats, min_depth, max_depth)


def _to_nnx(tree):
    if isinstance(tree, dict):
        return nnx.Dict({k: _to_nnx(v) for k, v in tree.items()})
    return nnx.Param(jnp.asarray(tree, jnp.float32))


# ---------------------------------------------------------------------------------------------
# Depther: backbone + head, jitted and sharded over the mesh
# ---------------------------------------------------------------------------------------------


class _Bundle(nnx.Module):
    def __init__(self, backbone, head):
        self.backbone = backbone
        self.head = head


@dataclasses.dataclass(frozen=True)
class _DepthFn:
    """Static (hashable) description of the forward: the jitted program is cached per value."""

    head_items: tuple
    min_depth: float
    max_depth: float

    def __call__(self, bundle, x):
        cfg = dict(self.head_items)
        cfg["out_index"] = list(cfg["out_index"])
        y = depth_forward(
            bundle.backbone, bundle.head.params(), cfg, x, self.min_depth, self.max_depth
        )
        return {"depth": y.astype(jnp.float32)}


def _hashable(cfg: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()))


class Depther:
    """Backbone + depth head. `predict(images)` -> (B, H, W) float32 metres.

    Images: (B, H, W, 3) or (H, W, 3); uint8 RGB is normalised here (ImageNet mean / std, the
    hub's `make_depth_transform`), floating arrays are taken as already normalised (the layout
    the backbone takes). Any H, W (CenterPadding to a multiple of the patch size)."""

    def __init__(self, backbone, head: DepthHead, *, min_depth: float, max_depth: float, mesh=None):
        from dinojax.eval.features import _place_state, batch_sharding, default_mesh

        if not (0 <= min_depth < max_depth):
            raise ValueError(
                f"depth range must satisfy 0 <= min < max, got {min_depth}-{max_depth}"
            )
        self.backbone, self.head = backbone, head
        self.head_cfg = head.head_cfg
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.mesh = mesh or default_mesh()
        self._sharding = batch_sharding(self.mesh)
        self._graphdef, state = nnx.split(_Bundle(backbone, head))
        self._state = _place_state(state, self.mesh)
        self._fn = _DepthFn(_hashable(self.head_cfg), self.min_depth, self.max_depth)

    @property
    def n_shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.mesh.axis_names)

    def normalize(self, images) -> np.ndarray:
        from dinojax.eval.transforms import normalize

        a = np.asarray(images)
        if a.ndim == 3:
            a = a[None]
        if a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(f"images must be (B, H, W, 3) or (H, W, 3), got shape {a.shape}")
        if a.dtype == np.uint8:
            return normalize(a)
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"images must be uint8 RGB or normalised floats, got {a.dtype}")
        return a.astype(np.float32)

    def predict(self, images, *, batch_size: int | None = None) -> np.ndarray:
        """(B, H, W, 3) images -> (B, H, W) depth in metres (float32 numpy)."""
        from dinojax.eval.features import _forward

        x = self.normalize(images)
        n = x.shape[0]
        step = batch_size or n
        step = -(-step // self.n_shards) * self.n_shards
        outs = []
        for s in range(0, n, step):
            chunk = x[s : s + step]
            rows = -(-chunk.shape[0] // self.n_shards) * self.n_shards
            if rows != chunk.shape[0]:  # pad to a multiple of the device count
                chunk = np.concatenate(
                    [chunk, np.zeros((rows - chunk.shape[0], *chunk.shape[1:]), np.float32)]
                )
            xg = jax.device_put(chunk, self._sharding)
            out = _forward(self._graphdef, self._fn, self._state, xg)["depth"]
            outs.append(np.asarray(out)[: min(step, n - s)])
        return np.concatenate(outs)


def resolve_range(
    head_cfg: dict,
    *,
    dataset: str | None = None,
    min_depth: float | None = None,
    max_depth: float | None = None,
    linear_range: str = "dataset",
    name: str = "head",
) -> tuple[float, float]:
    """The (min, max) depth a head decodes over: explicit values, else the dataset's, else the head
    config's; `linear_range="hub"` gives the hub's 0.001-80 m for linear heads."""
    if linear_range not in ("dataset", "hub"):
        raise ValueError(f"linear_range must be 'dataset' or 'hub', got {linear_range!r}")
    if dataset is not None and dataset not in DATASET_RANGES:
        raise ValueError(f"dataset must be one of {sorted(DATASET_RANGES)}, got {dataset!r}")
    lo, hi = DATASET_RANGES.get(dataset, (head_cfg.get("min_depth"), head_cfg.get("max_depth")))
    if linear_range == "hub" and head_cfg["type"] in ("linear", "linear4"):
        lo, hi = HUB_LINEAR_RANGE
    lo = lo if min_depth is None else min_depth
    hi = hi if max_depth is None else max_depth
    if lo is None or hi is None:
        raise ValueError(
            f"the depth range of {name} is unknown (its file name names neither nyu "
            "nor kitti): pass dataset='nyu' or 'kitti' (--dataset), or min_depth and "
            "max_depth"
        )
    return float(lo), float(hi)


def load_depther(
    backbone,
    head,
    *,
    arch: str | None = None,
    dataset: str | None = None,
    min_depth: float | None = None,
    max_depth: float | None = None,
    linear_range: str = "dataset",
    dtype: str = "float32",
    mesh=None,
) -> Depther:
    """Backbone (checkpoint dir, hub name, official file or a `DinoVisionTransformer`) + depth
    head (head directory or released `.pth`) -> `Depther`.

    `dtype="bfloat16"` runs the backbone in bf16 (the head in float32). `dataset` / `min_depth` /
    `max_depth` override the range; `linear_range="hub"` decodes linear heads over the hub's
    0.001-80 m (module docstring)."""
    from dinojax.convert.dense import load_head

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    overrides = {} if dtype == "float32" else {"dtype": dtype}
    model = load_backbone(backbone, arch=arch, **overrides)
    if not isinstance(backbone, (str, os.PathLike)) and overrides:
        model = _with_dtype(model, dtype)
    bname = str(backbone) if isinstance(backbone, (str, os.PathLike)) else model.cfg.name
    if not isinstance(head, (str, os.PathLike)) or not Path(head).exists():
        raise ConversionError(f"depth head {head}: no such head directory or .pth file")
    params, meta = load_head(head, arch=arch or _arch_name(model))
    if meta["task"] != "depth":
        raise ConversionError(f"{head} is a {meta['task']} head, not a depth head")
    head_cfg = meta["head"]
    check_backbone(
        head_cfg,
        embed_dim=model.cfg.embed_dim,
        num_register_tokens=model.cfg.num_register_tokens,
        depth=model.cfg.depth,
        head_name=str(head),
        backbone_name=bname,
    )
    lo, hi = resolve_range(
        head_cfg,
        dataset=dataset,
        min_depth=min_depth,
        max_depth=max_depth,
        linear_range=linear_range,
        name=str(head),
    )
    return Depther(model, DepthHead(head_cfg, params), min_depth=lo, max_depth=hi, mesh=mesh)


def _arch_name(model) -> str | None:
    from dinojax.models.config import get_config

    try:
        get_config(model.cfg.name)
    except (KeyError, ValueError):
        return None
    return model.cfg.name


def _with_dtype(model, dtype: str):
    from dinojax.eval.features import model_from_params

    return model_from_params(model.cfg.replace(dtype=dtype), model.params())
