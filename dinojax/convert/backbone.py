"""Official backbone state dicts <-> dinojax parameter trees.

The table below is the whole mapping (official keys: the `state_dict` of facebookresearch/dinov2
`dinov2/models/vision_transformer.py` `DinoVisionTransformer`; docs/parity.md "Checkpoints"): our
paths are the official keys with `kernel` for Linear/Conv weights (transposed) and `scale` for
LayerNorm weights, and all blocks stacked on a leading axis (`blocks.attn.qkv.kernel[i]` is
`blocks.{i}.attn.qkv.weight.T`). Conversion is strict: every missing, unexpected or mis-shaped key
is reported at once.
"""

from __future__ import annotations

import math
import re

import numpy as np

from dinojax.models.config import ARCHITECTURES, ViTConfig, get_config


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names every offending key."""


# our leaf name -> (official leaf name, how the array changes going to the official layout)
LEAF_RULES = {
    "kernel": ("weight", "transpose"),
    "scale": ("weight", None),
    "bias": ("bias", None),
    "gamma": ("gamma", None),
}
# Patch embedding: Flax conv kernel (p, p, 3, D) <-> torch OIHW (D, 3, p, p).
_TO_OIHW, _FROM_OIHW = (3, 2, 0, 1), (2, 3, 1, 0)


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _official_leaf(path: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    *parents, leaf = path.split(".")
    if not parents:  # cls_token, pos_embed, mask_token, register_tokens
        return path, value
    name, transform = LEAF_RULES[leaf]
    if transform == "transpose":
        value = np.transpose(value, _TO_OIHW) if value.ndim == 4 else np.swapaxes(value, -1, -2)
    return ".".join([*parents, name]), value


def to_official(params: dict) -> dict[str, np.ndarray]:
    """dinojax parameters -> official hub-format flat state dict (numpy, per-block keys)."""
    out: dict[str, np.ndarray] = {}
    for path, value in _flatten(params).items():
        value = np.asarray(value)
        if path.startswith("blocks."):
            rest = path[len("blocks.") :]
            for i in range(value.shape[0]):
                key, v = _official_leaf(rest, value[i])
                out[f"blocks.{i}.{key}"] = v
        else:
            key, v = _official_leaf(path, value)
            out[key] = v
    return out


def _official_key(path: str) -> str:
    *parents, leaf = path.split(".")
    return ".".join([*parents, LEAF_RULES[leaf][0]]) if parents else path


def _to_ours(path: str, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)  # a view for arrays; reads an unread tensor
    *parents, leaf = path.split(".")
    if parents and LEAF_RULES[leaf][1] == "transpose":
        return np.transpose(value, _FROM_OIHW) if value.ndim == 4 else np.swapaxes(value, -1, -2)
    return value


def _abstract_flat(cfg: ViTConfig) -> dict:
    from dinojax.models.vit import abstract_params

    return _flatten(abstract_params(cfg))


def expected_official_shapes(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    """The official key -> shape table of an architecture, without allocating weights."""
    zeros = {
        k: np.broadcast_to(np.zeros((), np.float32), v.shape)
        for k, v in _abstract_flat(cfg).items()
    }
    tree: dict = {}
    for k, v in zeros.items():
        _set(tree, k, v)
    return {k: tuple(v.shape) for k, v in to_official(tree).items()}


def check_keys(sd: dict[str, np.ndarray], expected: dict[str, tuple], what: str) -> None:
    """Strict key/shape check, like load_state_dict(strict=True) but naming every problem."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(
        f"{k}: got {tuple(sd[k].shape)}, expected {expected[k]}"
        for k in set(sd) & set(expected)
        if tuple(sd[k].shape) != tuple(expected[k])
    )
    if missing or unexpected or wrong:
        parts = []
        if missing:
            want = "; ".join(f"{k}: expected {tuple(expected[k])}" for k in missing)
            parts.append(f"missing keys [{want}]")
        if unexpected:
            got = "; ".join(f"{k}: got {tuple(np.shape(sd[k]))}" for k in unexpected)
            parts.append(f"unexpected keys [{got}]")
        if wrong:
            parts.append(f"wrong shapes [{'; '.join(wrong)}]")
        raise ConversionError(f"{what} does not match the architecture: " + ", ".join(parts))


def check_values(sd: dict) -> None:
    """Every value a floating-point array (a backbone has no integer buffers). Only dtypes are
    looked at: unread tensors (`dinojax.convert.io.LazyTensor`) stay unread."""
    from dinojax.convert.io import is_tensor

    bad = []
    for k, v in sd.items():
        if not is_tensor(v):
            bad.append(f"{k}: {type(v).__name__}, not a tensor")
        elif v.dtype.kind != "f":
            bad.append(f"{k}: dtype {v.dtype}")
    if bad:
        raise ConversionError(f"backbone values must be floating-point tensors: [{'; '.join(bad)}]")


def from_official(sd: dict[str, np.ndarray], cfg: ViTConfig) -> dict:
    """Official flat state dict -> dinojax parameters (strict: errors name every bad key).

    Keys, shapes and dtypes are all checked before any value is read, so unread tensors
    (`dinojax.convert.io.read_file`) are read only for a valid checkpoint, one at a time, each
    placed into its slot of the pre-allocated stacked block arrays: at most one copy of the model
    plus one tensor is held."""
    from dinojax.convert.io import materialize

    check_values(sd)
    check_keys(sd, expected_official_shapes(cfg), f"state dict for {cfg.name}")
    params: dict = {}
    for path, spec in _abstract_flat(cfg).items():
        if path.startswith("blocks."):
            rest = path[len("blocks.") :]
            key = _official_key(rest)
            value = np.empty(spec.shape, np.float32)
            for i in range(cfg.depth):
                value[i] = _to_ours(rest, materialize(sd[f"blocks.{i}.{key}"]))
        else:
            value = np.ascontiguousarray(_to_ours(path, materialize(sd[_official_key(path)])),
                                         dtype=np.float32)  # fmt: skip
        _set(params, path, value)
    return params


# ---------------------------------------------------------------------------------------------
# Key normalisation of the other official layouts
# ---------------------------------------------------------------------------------------------

_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.*)$")


def dechunk(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`blocks.{chunk}.{i}.x` (block_chunks > 0, training checkpoints) -> `blocks.{i}.x`.

    Chunked blocks (`BlockChunk` in `dinov2/models/vision_transformer.py`) keep global block
    indices, so dropping the chunk index is enough."""
    out = {}
    for k, v in sd.items():
        m = _CHUNKED.match(k)
        out[f"blocks.{m.group(2)}.{m.group(3)}" if m else k] = v
    return out


_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_BLOCK = {  # both the hub files' names and the names transformers 5 saves
    "norm1": "norm1",
    "norm2": "norm2",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",
    "mlp.weights_out": "mlp.w3",
    "mlp.down_proj": "mlp.w3",
}
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.*)\.(weight|bias|lambda1)$")


def is_hf(sd: dict) -> bool:
    return any(k.startswith(("embeddings.", "dinov2.embeddings.")) for k in sd)


def from_hf(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hugging Face Dinov2Model / Dinov2WithRegistersModel keys -> official keys. Unread tensors
    stay unread (the packed q/k/v concatenation happens when the result is read)."""
    from dinojax.convert.io import lazy_concatenate

    sd = {k.removeprefix("dinov2."): v for k, v in sd.items()}
    out: dict[str, np.ndarray] = {}
    parts: dict[tuple[int, str, str], dict[str, np.ndarray]] = {}
    unknown = []
    for k, v in sd.items():
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
            continue
        m = _HF_LAYER.match(k)
        if not m:
            unknown.append(k)
            continue
        i, mid, leaf = int(m.group(1)), m.group(2), m.group(3)
        if leaf == "lambda1":
            mid, leaf = mid + ".lambda1", ""
        # q/k/v (and SwiGLU gate/up) are separate Linears in HF; official packs them row-wise.
        for group, names in (
            ("attn.qkv", (("attention.attention.query", "attention.q_proj"),
                          ("attention.attention.key", "attention.k_proj"),
                          ("attention.attention.value", "attention.v_proj"))),
            ("mlp.w12", (("mlp.gate_proj",), ("mlp.up_proj",))),
        ):  # fmt: skip
            slot = next((j for j, alts in enumerate(names) if mid in alts), None)
            if slot is not None:
                parts.setdefault((i, group, leaf), {})[slot] = v
                break
        else:
            if mid not in _HF_BLOCK:
                unknown.append(k)
                continue
            name = _HF_BLOCK[mid]
            out[f"blocks.{i}.{name}" + (f".{leaf}" if leaf else "")] = v
    if unknown:
        raise ConversionError(f"unknown Hugging Face DINOv2 keys: {sorted(unknown)}")
    for (i, group, leaf), slots in parts.items():
        n = 3 if group == "attn.qkv" else 2
        if sorted(slots) != list(range(n)):
            raise ConversionError(f"incomplete {group} projections in HF layer {i} ({leaf})")
        pieces = [slots[j] for j in range(n)]  # arrays or unread tensors: only shapes here
        if len({tuple(p.shape) for p in pieces}) != 1:
            raise ConversionError(
                f"{group} projections in HF layer {i} ({leaf}) have different shapes: "
                f"{[tuple(p.shape) for p in pieces]}"
            )
        out[f"blocks.{i}.{group}.{leaf}"] = lazy_concatenate(pieces, axis=0)
    return out


# Names the installed transformers (5.x) gives Dinov2Model / Dinov2WithRegistersModel parameters;
# `from_hf` also reads the older hub names (attention.attention.query, mlp.weights_in, ...).
_HF_OUT_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "ls1.gamma": "layer_scale1.lambda1",
    "ls2.gamma": "layer_scale2.lambda1",
    "attn.proj": "attention.o_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.w3": "mlp.down_proj",
}
_SPLIT = {"attn.qkv": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
          "mlp.w12": ("mlp.gate_proj", "mlp.up_proj")}  # fmt: skip
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.*)\.(weight|bias|gamma)$")


def to_hf(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Official flat backbone keys -> Hugging Face Dinov2Model / Dinov2WithRegistersModel keys
    (the inverse of `from_hf`): packed qkv and SwiGLU w12 are split row-wise again."""
    top = {v: k for k, v in _HF_TOP.items()}
    out: dict[str, np.ndarray] = {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
            continue
        m = _BLOCK_KEY.match(k)
        if not m:
            raise ConversionError(f"no Hugging Face name for the official key {k!r}")
        i, mid, leaf = m.groups()
        prefix = f"encoder.layer.{i}."
        if mid in _SPLIT:
            names = _SPLIT[mid]
            for name, part in zip(names, np.split(np.asarray(v), len(names), axis=0)):
                out[f"{prefix}{name}.{leaf}"] = part
        elif leaf == "gamma":
            out[prefix + _HF_OUT_BLOCK[f"{mid}.gamma"]] = v
        elif mid in _HF_OUT_BLOCK:
            out[f"{prefix}{_HF_OUT_BLOCK[mid]}.{leaf}"] = v
        else:
            raise ConversionError(f"no Hugging Face name for the official key {k!r}")
    return out


# ---------------------------------------------------------------------------------------------
# Architecture detection
# ---------------------------------------------------------------------------------------------


def detect_config(sd: dict[str, np.ndarray], arch: str | None = None) -> ViTConfig:
    """The architecture of an official-format backbone state dict.

    Detected from the tensors (width, depth, patch, registers, FFN type, LayerScale, mask token,
    pos-embed grid). Heads are not visible in the weights: every official model uses head dim 64.
    `arch` (an official name) forces the architecture; the pos-embed grid still comes from the
    weights. The result is checked strictly by `from_official`; anything that makes detection
    itself impossible is a `ConversionError` naming the key.
    """
    check_values(sd)
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in sd:
            raise ConversionError(f"not a DINO/DINOv2 backbone state dict: no {key!r} key")
    d = _dim(sd, "cls_token", (1, 1, None), "(1, 1, embed_dim)")[2]
    n_pos = _dim(sd, "pos_embed", (1, None, d), f"(1, 1 + grid**2, {d})")[1] - 1
    p = _dim(sd, "patch_embed.proj.weight", (d, 3, None, None), f"({d}, 3, patch, patch)")[3]
    m = math.isqrt(max(n_pos, 0))
    if n_pos <= 0 or m * m != n_pos:
        raise ConversionError(f"pos_embed has {n_pos} patch positions, not a square grid")
    if arch is not None:
        try:
            return get_config(arch, img_size=m * p)
        except ValueError as e:
            raise ConversionError(str(e)) from e
    # Keys under `blocks.` without an index (`blocks.extra`) are left to from_official, which
    # names them as unexpected together with every other problem.
    idx = {int(mt.group(1)) for k in sd if (mt := _BLOCK_INDEX.match(k))}
    if not idx:
        raise ConversionError("no transformer blocks: the state dict has no 'blocks.{i}.*' keys")
    depth = max(idx) + 1
    if sorted(idx) != list(range(depth)):
        raise ConversionError(f"block indices are not contiguous: {sorted(idx)}")
    regs = 0
    if "register_tokens" in sd:
        regs = _dim(sd, "register_tokens", (1, None, d), f"(1, num_registers, {d})")[1]
    swiglu = "blocks.0.mlp.w12.weight" in sd
    has_ls = "blocks.0.ls1.gamma" in sd
    v2 = "mask_token" in sd
    if not v2 and (regs or has_ls):
        # ViTConfig refuses this combination; say which keys make the state dict inconsistent.
        what = " and ".join(
            w for w, on in (("register_tokens", regs), ("LayerScale (ls1.gamma)", has_ls)) if on
        )
        raise ConversionError(
            f"state dict has {what} but no mask_token: DINOv2 backbones have a mask_token and "
            "DINO v1 backbones have neither registers nor LayerScale"
        )
    # Without the FFN key that carries the hidden size, assume ratio 4 and let from_official name
    # every missing key with its expected shape.
    mlp_ratio = 4.0
    if swiglu and "blocks.0.mlp.w3.weight" in sd:
        hidden = _dim(sd, "blocks.0.mlp.w3.weight", (d, None), f"({d}, hidden)")[1]
        mlp_ratio = _swiglu_ratio(d, hidden)
    elif not swiglu and "blocks.0.mlp.fc1.weight" in sd:
        mlp_ratio = _dim(sd, "blocks.0.mlp.fc1.weight", (None, d), f"(hidden, {d})")[0] / d
    if d % 64:
        raise ConversionError(
            f"embed dim {d} is not a multiple of 64: cannot infer the head count; pass --arch"
        )
    try:
        cfg = ViTConfig(
            name="custom",
            family="dinov2" if v2 else "dino",
            patch_size=p,
            embed_dim=d,
            depth=depth,
            num_heads=d // 64,
            mlp_ratio=mlp_ratio,
            ffn_layer="swiglu" if swiglu else "mlp",
            img_size=m * p,
            num_register_tokens=regs,
            layerscale_init=1.0 if has_ls else None,
            interpolate_offset=0.0 if regs else 0.1,
            interpolate_antialias=bool(regs),
            qkv_bias="blocks.0.attn.qkv.bias" in sd,
            proj_bias="blocks.0.attn.proj.bias" in sd,
            ffn_bias=any(k.startswith("blocks.0.mlp.") and k.endswith(".bias") for k in sd),
            # v1 stochastic depth is linspace(0, rate, depth) (facebookresearch/dino
            # `vision_transformer.py`); v2 recipes use uniform (`drop_path_uniform: true`).
            drop_path_uniform=v2,
        )
    except ValueError as e:  # any combination ViTConfig refuses that the checks above missed
        raise ConversionError(f"inconsistent backbone state dict: {e}") from e
    # Name it after the official architecture it is (ignoring the pos-embed grid size).
    for name, official in ARCHITECTURES.items():
        if official.replace(img_size=cfg.img_size, name="custom") == cfg:
            return cfg.replace(name=name)
    return cfg


_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")


def _dim(sd: dict, key: str, pattern: tuple, expected: str) -> tuple[int, ...]:
    """sd[key].shape, checked against `pattern` (None = any positive size)."""
    shape = tuple(int(s) for s in sd[key].shape)
    if len(shape) != len(pattern) or any(
        s <= 0 if want is None else s != want for s, want in zip(shape, pattern)
    ):
        raise ConversionError(f"{key}: got shape {shape}, expected {expected}")
    return shape


def _swiglu_ratio(d: int, hidden: int) -> float:
    for ratio in (4.0, 2.0, 3.0, 6.0, 8.0, 16 / 3):
        if (
            ViTConfig(embed_dim=d, num_heads=1, ffn_layer="swiglu", mlp_ratio=ratio).ffn_hidden_dim
            == hidden
        ):
            return ratio
    raise ConversionError(
        f"cannot infer the SwiGLU mlp_ratio from hidden size {hidden}; pass --arch"
    )
