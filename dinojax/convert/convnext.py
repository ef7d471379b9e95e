"""DINOv3 ConvNeXt state dicts: official <-> dinojax, Hugging Face <-> official, detection.

Official keys: the `state_dict` of facebookresearch/dinov3 `dinov3/models/convnext.py` `ConvNeXt`
(docs/parity.md "DINOv3 ConvNeXt"):

    downsample_layers.0.0.{weight,bias}     stem conv (d0, 3, 4, 4)
    downsample_layers.0.1.{weight,bias}     stem LayerNorm (channels first)
    downsample_layers.{i}.0.{weight,bias}   LayerNorm (d_{i-1}), i = 1..3
    downsample_layers.{i}.1.{weight,bias}   2x2 stride-2 conv (d_i, d_{i-1}, 2, 2)
    stages.{i}.{j}.dwconv.{weight,bias}     depthwise conv (d_i, 1, 7, 7)
    stages.{i}.{j}.norm.{weight,bias}
    stages.{i}.{j}.pwconv1.{weight,bias}    Linear (4 d_i, d_i)
    stages.{i}.{j}.pwconv2.{weight,bias}    Linear (d_i, 4 d_i)
    stages.{i}.{j}.gamma                    layer scale (d_i,)
    norm.{weight,bias}                      final LayerNorm

dinojax paths are the same with `kernel` (transposed) for conv / linear weights, `scale` for
LayerNorm weights, int keys for the list indices (`nnx.to_pure_dict` of `nnx.List`) and the
blocks of a stage stacked: `stages.{i}.dwconv.kernel[j]` is `stages.{i}.{j}.dwconv.weight`
transposed. Hugging Face `DINOv3ConvNextModel` renames (transformers
`models/dinov3_convnext/modeling_dinov3_convnext.py`): `stages.{i}.downsample_layers.{k}` for
`downsample_layers.{i}.{k}`, `stages.{i}.layers.{j}.{depthwise_conv, layer_norm, pointwise_conv1,
pointwise_conv2, gamma}` and `layer_norm` for the final norm; transformers 5 prefixes the stages
with `model.` in memory and drops it when saving. Every conversion is strict.
"""

from __future__ import annotations

import functools
import re

import numpy as np

from dinojax.convert.backbone import (
    ConversionError,
    _flatten,
    _official_key,
    _official_leaf,
    _to_ours,
    check_keys,
    check_values,
)
from dinojax.models.convnext import (
    CONVNEXT_ARCHITECTURES,
    ConvNeXtConfig,
    abstract_convnext_params,
)

_STAGE_KEY = re.compile(r"^stages\.(\d+)\.(\d+)\.")


def is_convnext(sd: dict) -> bool:
    """True for an official-layout DINOv3 ConvNeXt state dict (`downsample_layers.*` keys)."""
    return any(k.startswith("downsample_layers.") for k in sd)


# ---------------------------------------------------------------------------------------------
# Official <-> dinojax
# ---------------------------------------------------------------------------------------------


def _set(tree: dict, path: str, value) -> None:
    # Digit path parts are list indices: int keys, as `nnx.to_pure_dict` gives for `nnx.List`.
    *parents, leaf = (int(p) if p.isdigit() else p for p in path.split("."))
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


@functools.lru_cache(maxsize=16)
def _abstract_flat(cfg: ConvNeXtConfig) -> dict:
    # Cached (configs are frozen): detection and conversion each need the table; read-only.
    return _flatten(abstract_convnext_params(cfg))


def _stage_path(path: str) -> tuple[int, str] | None:
    """`stages.{i}.rest` (stacked) -> (i, rest); None for the other paths."""
    parts = path.split(".", 2)
    return (int(parts[1]), parts[2]) if parts[0] == "stages" else None


def expected_convnext_shapes(cfg: ConvNeXtConfig) -> dict[str, tuple[int, ...]]:
    """The official key -> shape table of an architecture, without allocating weights."""
    out: dict[str, tuple[int, ...]] = {}
    for path, a in _abstract_flat(cfg).items():
        zero = np.broadcast_to(np.zeros((), np.float32), a.shape)
        st = _stage_path(path)
        if st is None:
            key, v = _official_leaf(path, zero)
            out[key] = tuple(v.shape)
            continue
        i, rest = st
        for j in range(cfg.depths[i]):
            key, v = _official_leaf(rest, zero[j])
            out[f"stages.{i}.{j}.{key}"] = tuple(v.shape)
    return out


def convnext_from_official(sd: dict[str, np.ndarray], cfg: ConvNeXtConfig) -> dict:
    """Official flat state dict -> dinojax parameters (nested dict of float32 numpy arrays, for
    `nnx.update`). Strict: every missing, unexpected or mis-shaped key is named."""
    check_values(sd)
    check_keys(sd, expected_convnext_shapes(cfg), f"state dict for {cfg.name}")
    params: dict = {}
    for path in _abstract_flat(cfg):
        st = _stage_path(path)
        if st is None:
            value = _to_ours(path, sd[_official_key(path)])
        else:
            i, rest = st
            key = _official_key(rest)
            value = np.stack(
                [_to_ours(rest, sd[f"stages.{i}.{j}.{key}"]) for j in range(cfg.depths[i])]
            )
        _set(params, path, np.ascontiguousarray(value, dtype=np.float32))
    return params


def convnext_to_official(params: dict, cfg: ConvNeXtConfig) -> dict[str, np.ndarray]:
    """dinojax parameters -> official flat state dict (numpy, per-block keys); the exact inverse
    of `convnext_from_official` (transposes only). The tree must match `cfg` exactly."""
    flat = {k: np.asarray(v) for k, v in _flatten(params).items()}
    want = {k: tuple(a.shape) for k, a in _abstract_flat(cfg).items()}
    check_keys(flat, want, f"parameter tree for {cfg.name}")
    out: dict[str, np.ndarray] = {}
    for path, value in flat.items():
        st = _stage_path(path)
        if st is None:
            key, v = _official_leaf(path, value)
            out[key] = v
            continue
        i, rest = st
        for j in range(value.shape[0]):
            key, v = _official_leaf(rest, value[j])
            out[f"stages.{i}.{j}.{key}"] = v
    return out


def convnext_int_keys(tree: dict) -> dict:
    """The list indices of a parameter tree as int keys (`downsample_layers`, `stages`): orbax
    restores dict keys as strings ('0'), which `nnx.update` refuses for an `nnx.List`. Other keys
    and the values are unchanged; int keys stay as they are."""
    return {
        (int(k) if isinstance(k, str) and k.isdigit() else k): (
            convnext_int_keys(v) if isinstance(v, dict) else v
        )
        for k, v in tree.items()
    }


# ---------------------------------------------------------------------------------------------
# Architecture detection
# ---------------------------------------------------------------------------------------------


def _describe(cfg: ConvNeXtConfig) -> str:
    return f"depths {list(cfg.depths)}, dims {list(cfg.dims)}"


def detect_convnext_config(sd: dict[str, np.ndarray], arch: str | None = None) -> ConvNeXtConfig:
    """The architecture of an official-layout ConvNeXt state dict, from the tensor shapes (stage
    widths from the stem / downsampling convs, depths from the `stages.{i}.{j}` indices).

    `arch` (an official name) must agree with what the tensors say. The result is checked
    strictly by `convnext_from_official`; anything that makes detection impossible is a one-line
    `ConversionError` naming what was found and what was expected."""
    check_values(sd)
    if not is_convnext(sd):
        if is_hf_convnext(sd):
            found = "Hugging Face DINOv3ConvNextModel keys (convert them with convnext_from_hf)"
        elif any(k in sd for k in ("cls_token", "patch_embed.proj.weight")):
            found = "a ViT state dict (cls_token / patch_embed / blocks keys)"
        else:
            found = f"keys {sorted(sd)[:4]}{' ...' if len(sd) > 4 else ''}"
        raise ConversionError(
            f"not a DINOv3 ConvNeXt state dict: found {found}, expected the official "
            "'downsample_layers.*' and 'stages.{i}.{j}.*' keys"
        )
    dims = []
    for i in range(4):
        key = f"downsample_layers.{i}.{0 if i == 0 else 1}.weight"
        if key not in sd:
            raise ConversionError(f"ConvNeXt state dict has no {key!r} (the stage-{i} conv)")
        shape = tuple(int(s) for s in sd[key].shape)
        k = 4 if i == 0 else 2
        d_in = 3 if i == 0 else dims[-1]
        if len(shape) != 4 or shape[1:] != (d_in, k, k) or shape[0] <= 0:
            raise ConversionError(f"{key}: got shape {shape}, expected (dim, {d_in}, {k}, {k})")
        dims.append(shape[0])
    blocks: dict[int, set[int]] = {}
    for k in sd:
        m = _STAGE_KEY.match(k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if sorted(blocks) != [0, 1, 2, 3]:
        raise ConversionError(
            f"ConvNeXt blocks found in stages {sorted(blocks)}, expected stages [0, 1, 2, 3]"
        )
    depths = []
    for i in range(4):
        idx = sorted(blocks[i])
        if idx != list(range(len(idx))):
            raise ConversionError(f"stage {i} block indices are not contiguous: {idx}")
        depths.append(len(idx))
    cfg = ConvNeXtConfig(depths=tuple(depths), dims=tuple(dims))
    match = next(
        (name for name, c in CONVNEXT_ARCHITECTURES.items()
         if (c.depths, c.dims) == (cfg.depths, cfg.dims)),
        None,
    )  # fmt: skip
    if arch is not None:
        if arch not in CONVNEXT_ARCHITECTURES:
            raise ConversionError(
                f"unknown ConvNeXt architecture {arch!r}; known: {sorted(CONVNEXT_ARCHITECTURES)}"
            )
        want = CONVNEXT_ARCHITECTURES[arch]
        if (want.depths, want.dims) != (cfg.depths, cfg.dims):
            raise ConversionError(
                f"state dict is a ConvNeXt with {_describe(cfg)} ({match or 'no official name'}), "
                f"expected {arch} ({_describe(want)})"
            )
        return want
    return cfg.replace(name=match) if match else cfg


# ---------------------------------------------------------------------------------------------
# Hugging Face <-> official
# ---------------------------------------------------------------------------------------------

_HF_BLOCK = {
    "depthwise_conv": "dwconv",
    "layer_norm": "norm",
    "pointwise_conv1": "pwconv1",
    "pointwise_conv2": "pwconv2",
}
_HF_DOWNSAMPLE = re.compile(r"^stages\.(\d+)\.downsample_layers\.(\d+)\.(weight|bias)$")
_HF_LAYER = re.compile(r"^stages\.(\d+)\.layers\.(\d+)\.(?:(\w+)\.(weight|bias)|(gamma))$")
_HF_ANY = re.compile(r"^(model\.)?stages\.\d+\.(downsample_layers|layers)\.")


def is_hf_convnext(sd: dict) -> bool:
    """True for Hugging Face `DINOv3ConvNextModel` keys (hub files or transformers 5's
    `model.`-prefixed in-memory names)."""
    return any(_HF_ANY.match(k) for k in sd)


def convnext_from_hf(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hugging Face `DINOv3ConvNextModel` keys -> official keys (values unchanged: both are
    PyTorch layouts). Unknown keys, and one key given both with and without the transformers-5
    `model.` prefix, are errors."""
    out: dict[str, np.ndarray] = {}
    unknown, twice = [], []
    for k, v in sd.items():
        name = k.removeprefix("model.") if k.startswith("model.stages.") else k
        if name in ("layer_norm.weight", "layer_norm.bias"):
            new = "norm." + name.rsplit(".", 1)[1]
        elif m := _HF_DOWNSAMPLE.match(name):
            new = f"downsample_layers.{m.group(1)}.{m.group(2)}.{m.group(3)}"
        elif (m := _HF_LAYER.match(name)) and (m.group(5) or m.group(3) in _HF_BLOCK):
            i, j = m.group(1), m.group(2)
            leaf = m.group(5) or f"{_HF_BLOCK[m.group(3)]}.{m.group(4)}"
            new = f"stages.{i}.{j}.{leaf}"
        else:
            unknown.append(k)
            continue
        if new in out:
            twice.append(k)
        out[new] = v
    if unknown:
        raise ConversionError(
            f"unknown Hugging Face DINOv3ConvNextModel keys: {sorted(unknown)} (expected "
            "stages.{i}.downsample_layers.*, stages.{i}.layers.{j}.*, layer_norm.*)"
        )
    if twice:
        raise ConversionError(f"Hugging Face keys given twice (with and without 'model.'): "
                              f"{sorted(twice)}")  # fmt: skip
    return out


_OFFICIAL_DOWNSAMPLE = re.compile(r"^downsample_layers\.(\d+)\.(\d+)\.(weight|bias)$")
_OFFICIAL_BLOCK = re.compile(r"^stages\.(\d+)\.(\d+)\.(?:(\w+)\.(weight|bias)|(gamma))$")
_TO_HF_BLOCK = {v: k for k, v in _HF_BLOCK.items()}


def convnext_to_hf(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Official keys -> the Hugging Face hub-file names (what `save_pretrained` writes and every
    transformers version with DINOv3 loads); the inverse of `convnext_from_hf`."""
    out: dict[str, np.ndarray] = {}
    bad = []
    for k, v in sd.items():
        if k in ("norm.weight", "norm.bias"):
            out["layer_norm." + k.rsplit(".", 1)[1]] = v
        elif m := _OFFICIAL_DOWNSAMPLE.match(k):
            out[f"stages.{m.group(1)}.downsample_layers.{m.group(2)}.{m.group(3)}"] = v
        elif (m := _OFFICIAL_BLOCK.match(k)) and (m.group(5) or m.group(3) in _TO_HF_BLOCK):
            leaf = m.group(5) or f"{_TO_HF_BLOCK[m.group(3)]}.{m.group(4)}"
            out[f"stages.{m.group(1)}.layers.{m.group(2)}.{leaf}"] = v
        else:
            bad.append(k)
    if bad:
        raise ConversionError(f"no Hugging Face DINOv3ConvNextModel name for the official keys "
                              f"{sorted(bad)}")  # fmt: skip
    return out
