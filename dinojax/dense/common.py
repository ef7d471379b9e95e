"""What the segmentation and depth heads share: the backbone, centre padding, torch-exact
bilinear resizing."""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from jax import Array


def load_backbone(spec, *, arch: str | None = None, **overrides):
    """A dinojax checkpoint directory, a hub name ("dinov2_vits14"), or an official backbone
    file (`.pth` / `.safetensors`, converted in memory) -> `DinoVisionTransformer`.

    `overrides` change run-time fields (dtype="bfloat16", attention=...)."""
    import dinojax
    from dinojax import hub
    from dinojax.convert.backbone import ConversionError, detect_config, from_official
    from dinojax.convert.checkpoint import split_checkpoint
    from dinojax.convert.io import read_file
    from dinojax.eval.features import model_from_params

    if not isinstance(spec, (str, os.PathLike)):
        return spec  # already a model
    if hub.is_name(str(spec)) or Path(spec).is_dir():
        return dinojax.load(spec, **overrides)
    if not Path(spec).is_file():
        raise ConversionError(f"{spec}: no such backbone (a checkpoint directory, a hub name or "
                              "an official .pth / .safetensors file)")  # fmt: skip
    _, sd, _, _ = split_checkpoint(read_file(spec))
    cfg = detect_config(sd, arch)
    if overrides:
        cfg = cfg.replace(**overrides)
    return model_from_params(cfg, jnp_tree(from_official(sd, cfg)))


def jnp_tree(tree):
    import jax

    return jax.tree.map(jnp.asarray, tree)


def center_pad(x: Array, multiple: int) -> Array:
    """Zero-pad H and W of an NHWC batch up to a multiple of `multiple`, the extra split as
    left = pad // 2, right = the rest (facebookresearch/dinov2 `dinov2/hub/utils.py`
    `CenterPadding`)."""
    h, w = x.shape[1:3]

    def split(n):
        pad = -(-n // multiple) * multiple - n
        return pad // 2, pad - pad // 2

    return jnp.pad(x, ((0, 0), split(h), split(w), (0, 0)))


def _source_index(n_in: int, n_out: int, align_corners: bool, scale: float | None):
    # torch `upsample_bilinear2d` (aten/src/ATen/native/UpSample.h `area_pixel_compute_source_index`
    # with `area_pixel_compute_scale`): align_corners maps the corner pixels onto each other;
    # otherwise pixel centres, with the source coordinate clamped at 0. A given scale_factor
    # is used as 1/scale (torch's recompute_scale_factor=None path); else in/out.
    dst = np.arange(n_out, dtype=np.float64)
    if align_corners:
        ratio = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        src = dst * np.float32(ratio)
    else:
        ratio = np.float32(1.0 / scale) if scale else np.float32(n_in / n_out)
        src = np.maximum((dst + 0.5) * ratio - 0.5, 0.0)
    src = src.astype(np.float32)
    i0 = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = (src - i0).astype(np.float32)
    return i0, i1, lam


def resize_bilinear(
    x: Array, size: tuple[int, int], *, align_corners: bool = False,
    scale_factor: float | None = None,
) -> Array:  # fmt: skip
    """Bilinear resize of an NHWC batch with `torch.nn.functional.interpolate(mode="bilinear",
    antialias=False)` semantics (what mmseg's `resize` and the official heads call)."""
    h_in, w_in = x.shape[1:3]
    h, w = size
    if (h, w) == (h_in, w_in) and scale_factor in (None, 1.0):
        return x
    y0, y1, ly = _source_index(h_in, h, align_corners, scale_factor)
    x0, x1, lx = _source_index(w_in, w, align_corners, scale_factor)
    ly = jnp.asarray(ly, x.dtype)[None, :, None, None]
    lx = jnp.asarray(lx, x.dtype)[None, None, :, None]
    rows = x[:, y0] * (1 - ly) + x[:, y1] * ly
    return rows[:, :, x0] * (1 - lx) + rows[:, :, x1] * lx
