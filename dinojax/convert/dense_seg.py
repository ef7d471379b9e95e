"""Released DINOv2 segmentation heads (`{m}_{ade20k,voc2012}_{linear,ms}_head.pth`) <-> dinojax.

The head is facebookresearch/dinov2 `dinov2/eval/segmentation/models/decode_heads/linear_head.py`
`BNHead` (an mmseg 0.27 `BaseDecodeHead`): BatchNorm over the concatenated feature maps, then the
1x1 conv `conv_seg` to K classes. Keys of the file's `state_dict`:

    decode_head.bn.{weight,bias,running_mean,running_var}   (C,)
    decode_head.bn.num_batches_tracked                      () int64
    decode_head.conv_seg.weight                             (K, C, 1, 1)
    decode_head.conv_seg.bias                               (K,)

ours: {"bn": {weight, bias, running_mean, running_var}, "conv_seg": {"kernel": (C, K), "bias"}};
`num_batches_tracked` is kept in the head config so the way back is exact.

Layers (the hosted mmseg configs, read by the notebook `notebooks/semantic_segmentation.ipynb`
through `cfg.model.backbone.out_indices`): the backbone returns its last 4 blocks (S/B [8..11],
L [20..23], g [36..39]); `linear` heads read the last one (in_index [3], C = D), `ms` heads all
four concatenated (C = 4D). Released heads exist for non-register backbones only.
"""

from __future__ import annotations

import jax
import numpy as np

from dinojax.convert.backbone import ConversionError, check_keys

PREFIX = "decode_head."
_BN = ("weight", "bias", "running_mean", "running_var")
DATASETS = {150: "ade20k", 21: "voc2012"}
WIDTHS = {384: "s", 768: "b", 1024: "l", 1536: "g"}  # embed_dim -> official size letter
BN_EPS = 1e-5  # torch BatchNorm default (SyncBatchNorm(in_channels) in BNHead)


def detect(sd: dict) -> bool:
    return f"{PREFIX}conv_seg.weight" in sd


def layers_for(kind: str, depth: int) -> list[int]:
    """Block indices a released head reads: the last block (linear) or the last 4 (ms)."""
    n = 1 if kind == "linear" else 4
    if depth < n:
        raise ConversionError(f"a {kind} segmentation head needs {n} blocks, the backbone has "
                              f"{depth}")  # fmt: skip
    return list(range(depth - n, depth))


def expected_shapes(in_channels: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    c, k = in_channels, num_classes
    shapes = {f"{PREFIX}bn.{n}": (c,) for n in _BN}
    shapes[f"{PREFIX}bn.num_batches_tracked"] = ()
    shapes[f"{PREFIX}conv_seg.weight"] = (k, c, 1, 1)
    shapes[f"{PREFIX}conv_seg.bias"] = (k,)
    return shapes


def _sizes(sd: dict) -> tuple[int, int]:
    w = sd.get(f"{PREFIX}conv_seg.weight")
    if w is None or w.ndim != 4:
        got = None if w is None else tuple(w.shape)
        raise ConversionError(f"{PREFIX}conv_seg.weight: got {got}, expected (K, C, 1, 1)")
    return int(w.shape[1]), int(w.shape[0])


def head_config(
    kind: str, in_channels: int, num_classes: int, layers: list[int], *,
    embed_dim: int, backbone: str | None = None, num_batches_tracked: int = 0,
    class_names: list[str] | None = None,
) -> dict:  # fmt: skip
    """The head config stored in a head directory (also what training writes)."""
    if kind not in ("linear", "ms"):
        raise ConversionError(f"segmentation head type {kind!r}: expected 'linear' or 'ms'")
    if in_channels != embed_dim * len(layers):
        raise ConversionError(f"{in_channels} head channels do not match {len(layers)} layer(s) "
                              f"of width {embed_dim}")  # fmt: skip
    if class_names is not None and len(class_names) != num_classes:
        raise ConversionError(f"{len(class_names)} class names for {num_classes} classes")
    return {
        "type": kind,
        "in_channels": int(in_channels),
        "num_classes": int(num_classes),
        "embed_dim": int(embed_dim),
        "layers": [int(i) for i in layers],
        "dataset": DATASETS.get(int(num_classes)),
        "backbone": backbone,
        "bn_eps": BN_EPS,
        "align_corners": False,
        "num_batches_tracked": int(num_batches_tracked),
        "class_names": class_names,
    }


def _infer_arch(c: int) -> str:
    """The official backbone of a released head from its width alone (1536 is ambiguous)."""
    linear, ms = WIDTHS.get(c), WIDTHS.get(c // 4) if c % 4 == 0 else None
    if linear and ms:
        raise ConversionError(
            f"a segmentation head of width {c} is either a dinov2_vit{linear}14 linear head or a "
            f"dinov2_vit{ms}14 ms head: pass --arch (or keep the released file name)"
        )
    if not (linear or ms):
        raise ConversionError(
            f"segmentation head width {c} fits no official backbone (linear: 384/768/1024/1536, "
            "ms: 4x those): pass --arch, or load it with its backbone"
        )
    return f"dinov2_vit{linear or ms}14"


def from_backbone_config(sd: dict, cfg, source: str = "head") -> tuple[dict, dict]:
    """Official head state dict + the backbone's `ViTConfig` -> (params, head_cfg). The head
    type comes from its width (C = D linear, 4D ms); anything else is one line naming both."""
    c, k = _sizes(sd)
    d = cfg.embed_dim
    if cfg.num_register_tokens:
        raise ConversionError(
            f"{source}: the released segmentation heads were trained on non-register backbones "
            f"(dinov2_vit{WIDTHS.get(d, '?')}14), not on {cfg.name} ({cfg.num_register_tokens} "
            "registers)"
        )
    if cfg.family != "dinov2":
        raise ConversionError(f"{source}: released segmentation heads are for DINOv2 backbones, "
                              f"not {cfg.name}")  # fmt: skip
    if c == d:
        kind = "linear"
    elif c == 4 * d:
        kind = "ms"
    else:
        raise ConversionError(
            f"{source}: segmentation head of width {c} (a {_guess(c)} head) does not fit the "
            f"backbone {cfg.name} (embed dim {d}: linear {d} or ms {4 * d})"
        )
    check_keys(sd, expected_shapes(c, k), f"{source} (segmentation {kind} head, C={c}, K={k})")
    n = np.asarray(sd[f"{PREFIX}bn.num_batches_tracked"])
    if n.dtype.kind not in "iu":
        raise ConversionError(f"{PREFIX}bn.num_batches_tracked: dtype {n.dtype}, expected int64")
    bad = [k_ for k_, v in sd.items() if k_ != f"{PREFIX}bn.num_batches_tracked" and
           np.asarray(v).dtype.kind != "f"]  # fmt: skip
    if bad:
        raise ConversionError(f"segmentation head values must be floating point: {bad}")
    f32 = lambda key: np.asarray(sd[PREFIX + key], np.float32)  # noqa: E731
    params = {
        "bn": {n_: f32(f"bn.{n_}") for n_ in _BN},
        "conv_seg": {
            "kernel": np.ascontiguousarray(f32("conv_seg.weight")[:, :, 0, 0].T),
            "bias": f32("conv_seg.bias"),
        },
    }
    name = cfg.name if cfg.name != "custom" else None
    head_cfg = head_config(
        kind, c, k, layers_for(kind, cfg.depth), embed_dim=d, backbone=name,
        num_batches_tracked=int(n),
    )  # fmt: skip
    return params, head_cfg


def _guess(c: int) -> str:
    try:
        arch = _infer_arch(c)
    except ConversionError:
        return "non-official"
    return f"{arch} {'linear' if c in WIDTHS else 'ms'}"


def from_official(sd: dict, arch: str | None) -> tuple[dict, dict]:
    """Official head state dict -> (params, head_cfg). `arch` (official backbone name) picks the
    layer indices and checks the width; without it the backbone is inferred from the width."""
    from dinojax.models.config import get_config

    c, _ = _sizes(sd)
    try:
        cfg = get_config(arch or _infer_arch(c))
    except ValueError as e:
        raise ConversionError(str(e)) from None
    return from_backbone_config(sd, cfg, source=f"segmentation head for {cfg.name}")


def to_official(params: dict, head_cfg: dict) -> dict:
    out = {f"{PREFIX}bn.{n}": np.asarray(params["bn"][n], np.float32) for n in _BN}
    out[f"{PREFIX}bn.num_batches_tracked"] = np.asarray(head_cfg.get("num_batches_tracked", 0),
                                                       np.int64)  # fmt: skip
    kernel = np.asarray(params["conv_seg"]["kernel"], np.float32)
    out[f"{PREFIX}conv_seg.weight"] = np.ascontiguousarray(kernel.T[:, :, None, None])
    out[f"{PREFIX}conv_seg.bias"] = np.asarray(params["conv_seg"]["bias"], np.float32)
    return out


def abstract_params(head_cfg: dict) -> dict:
    c, k = int(head_cfg["in_channels"]), int(head_cfg["num_classes"])
    s = lambda *shape: jax.ShapeDtypeStruct(shape, np.float32)  # noqa: E731
    return {"bn": {n: s(c) for n in _BN}, "conv_seg": {"kernel": s(c, k), "bias": s(k)}}
