"""DINOv3 state dicts <-> dinojax parameter trees, and the family routing of the converter.

Official keys: the `state_dict` of facebookresearch/dinov3 `dinov3/models/vision_transformer.py`
`DinoVisionTransformer` (docs/parity.md "DINOv3 backbones"). The parameter mapping is the DINOv2
one (`dinojax.convert.backbone.LEAF_RULES`: `kernel` = weight transposed, `scale` = LayerNorm
weight, blocks stacked); two official entries are buffers fixed by the architecture and not
parameters in dinojax: `rope_embed.periods` (`dinojax.models.vit3.rope_periods`) and
`blocks.{i}.attn.qkv.bias_mask` ([1 | 0 | 1] over q, k, v). Reading checks both against the
architecture; writing regenerates them, bit for bit.

Hugging Face `DINOv3ViTModel` splits q/k/v, has no key bias (its conversion drops it: the mask
zeroes it anyway), names the storage tokens `register_tokens` and keeps no `cls_norm` /
`local_cls_norm`.

The ConvNeXt family is converted by `dinojax.convert.convnext` (imported lazily); this module
only routes to it.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from dinojax.convert.backbone import (
    ConversionError,
    _dim,
    _flatten,
    _official_key,
    _set,
    _to_ours,
    check_keys,
    check_values,
)
from dinojax.convert.backbone import to_official as _tree_to_official
from dinojax.models.config_v3 import FFN_ALIGN, V3_ARCHITECTURES, DinoV3Config

VIT_V2 = "dinov2_vit"  # meta "model" absent: the DINO / DINOv2 ViT
VIT_V3 = "dinov3_vit"
CONVNEXT = "dinov3_convnext"
MODELS = (VIT_V2, VIT_V3, CONVNEXT)

_BUFFERS = ("rope_embed.periods",)
_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")
_V3_ONLY = ("rope_embed.periods", "storage_tokens")
_CONVNEXT_PREFIXES = ("stages.", "downsample_layers.")

# ---------------------------------------------------------------------------------------------
# Which family
# ---------------------------------------------------------------------------------------------


def is_convnext_like(sd: dict) -> bool:
    """Official or Hugging Face ConvNeXt keys (`stages.*`, `downsample_layers.*`)."""
    return any(k.removeprefix("model.").startswith(_CONVNEXT_PREFIXES) for k in sd)


def is_v3_vit(sd: dict) -> bool:
    """An official-format DINOv3 ViT state dict: RoPE periods or storage tokens, no pos-embed."""
    return "pos_embed" not in sd and (
        any(k in sd for k in _V3_ONLY) or any(k.endswith(".attn.qkv.bias_mask") for k in sd)
    )


def _describe(sd: dict) -> str:
    if is_convnext_like(sd):
        return "a DINOv3 ConvNeXt"
    if is_v3_vit(sd):
        return "a DINOv3 ViT"
    if "pos_embed" in sd:
        return "a DINO / DINOv2 ViT (it has a learned pos_embed)"
    return "an unknown model"


def kind_of_arch(arch: str) -> str:
    if arch.startswith("dinov3_convnext"):
        return CONVNEXT
    return VIT_V3 if arch.startswith("dinov3_") else VIT_V2


def backbone_kind(sd: dict, arch: str | None = None) -> str:
    """The family of an official-format backbone state dict; with `arch`, a mismatch between the
    two is one error naming what was found and what was expected."""
    found = CONVNEXT if is_convnext_like(sd) else VIT_V3 if is_v3_vit(sd) else VIT_V2
    if arch is not None and kind_of_arch(arch) != found:
        want = {
            VIT_V2: "a DINO / DINOv2 ViT",
            VIT_V3: "a DINOv3 ViT",
            CONVNEXT: "a DINOv3 ConvNeXt",
        }
        raise ConversionError(
            f"the checkpoint is {_describe(sd)}, but --arch {arch} expects "
            f"{want[kind_of_arch(arch)]}"
        )
    return found


def convnext_module():
    """`dinojax.convert.convnext`, or one ConversionError line when it is not there."""
    try:
        from dinojax.convert import convnext
    except ImportError as e:
        raise ConversionError(
            f"DINOv3 ConvNeXt checkpoints need dinojax.convert.convnext, which is unavailable ({e})"
        ) from e
    return convnext


# ---------------------------------------------------------------------------------------------
# Official <-> dinojax
# ---------------------------------------------------------------------------------------------


def _abstract_flat(cfg: DinoV3Config) -> dict:
    from dinojax.models.vit3 import abstract_params

    return _flatten(abstract_params(cfg))


def bias_mask(cfg: DinoV3Config) -> np.ndarray:
    """The `qkv.bias_mask` buffer (`init_weights_vit`): ones, zero on the key third."""
    d = cfg.embed_dim
    return np.concatenate([np.ones(d), np.zeros(d), np.ones(d)]).astype(np.float32)


def to_official(params: dict, cfg: DinoV3Config) -> dict[str, np.ndarray]:
    """dinojax parameters -> the official flat state dict, buffers included."""
    from dinojax.models.vit3 import rope_periods

    out = _tree_to_official(params)
    out["rope_embed.periods"] = rope_periods(cfg)
    if cfg.has_bias_mask:
        for i in range(cfg.depth):
            out[f"blocks.{i}.attn.qkv.bias_mask"] = bias_mask(cfg)
    return out


def expected_official_shapes(cfg: DinoV3Config) -> dict[str, tuple[int, ...]]:
    zeros: dict = {}
    for k, v in _abstract_flat(cfg).items():
        _set(zeros, k, np.broadcast_to(np.zeros((), np.float32), v.shape))
    return {k: tuple(v.shape) for k, v in to_official(zeros, cfg).items()}


def _check_buffers(sd: dict, cfg: DinoV3Config) -> None:
    from dinojax.models.vit3 import rope_periods

    want = rope_periods(cfg)
    got = np.asarray(sd["rope_embed.periods"], np.float64)
    if not np.allclose(got, want, rtol=1e-6, atol=0):
        raise ConversionError(
            f"rope_embed.periods {np.array2string(got[:4], precision=4)}... are not base "
            f"{cfg.rope_base} ** (2k / {cfg.head_dim // 2}) for head dim {cfg.head_dim} "
            f"(expected {np.array2string(want[:4].astype(np.float64), precision=4)}...)"
        )
    if cfg.has_bias_mask:
        mask = bias_mask(cfg)
        bad = [i for i in range(cfg.depth)
               if not np.array_equal(sd[f"blocks.{i}.attn.qkv.bias_mask"], mask)]  # fmt: skip
        if bad:
            raise ConversionError(
                f"attn.qkv.bias_mask of blocks {bad} is not [1 | 0 | 1] over q, k, v (the "
                "official key-bias mask)"
            )


def from_official(sd: dict[str, np.ndarray], cfg: DinoV3Config) -> dict:
    """Official flat DINOv3 state dict -> dinojax parameters (strict: errors name every bad key;
    the buffers must match the architecture)."""
    check_values(sd)
    check_keys(sd, expected_official_shapes(cfg), f"state dict for {cfg.name}")
    _check_buffers(sd, cfg)
    params: dict = {}
    for path in _abstract_flat(cfg):
        if path.startswith("blocks."):
            rest = path[len("blocks.") :]
            key = _official_key(rest)
            value = np.stack([_to_ours(rest, sd[f"blocks.{i}.{key}"]) for i in range(cfg.depth)])
        else:
            value = _to_ours(path, sd[_official_key(path)])
        _set(params, path, np.ascontiguousarray(value, dtype=np.float32))
    return params


# ---------------------------------------------------------------------------------------------
# Architecture detection
# ---------------------------------------------------------------------------------------------

_SWIGLU_RATIOS = (4.0, 6.0, 3.0, 2.0, 8.0, 16 / 3)


def _swiglu(d: int, hidden: int) -> tuple[float, str]:
    for ffn in FFN_ALIGN:
        for ratio in _SWIGLU_RATIOS:
            if DinoV3Config(embed_dim=d, num_heads=1, mlp_ratio=ratio,
                            ffn_layer=ffn).ffn_hidden_dim == hidden:  # fmt: skip
                return ratio, ffn
    raise ConversionError(f"cannot infer the SwiGLU ratio from hidden size {hidden}; pass --arch")


def _same_arch(a: DinoV3Config, b: DinoV3Config) -> bool:
    """Same architecture up to the name, to how the FFN width is spelled (ratio x alignment
    giving the same hidden size) and to a key-bias mask flag without a qkv bias to mask."""
    skip = {"name", "mlp_ratio", "ffn_layer", "mask_k_bias"}
    da = {k: v for k, v in a.to_dict().items() if k not in skip}
    db = {k: v for k, v in b.to_dict().items() if k not in skip}
    ffn = (a.ffn_layer == "mlp") == (b.ffn_layer == "mlp") and a.ffn_hidden_dim == b.ffn_hidden_dim
    return da == db and ffn and a.has_bias_mask == b.has_bias_mask


def detect_v3_config(sd: dict[str, np.ndarray], arch: str | None = None) -> DinoV3Config:
    """The architecture of an official-format DINOv3 ViT state dict, from its tensors: width
    (cls_token), patch (patch_embed), depth (block indices), heads (head dim = 4 x the number
    of RoPE periods), FFN type and hidden size, storage tokens, biases, LayerScale and the
    untied norms. `arch` (a hub name) forces the architecture; a SAT-493M ViT-L file (with a
    `local_cls_norm`) given as dinov3_vitl16 is read as dinov3_vitl16_sat493m."""
    check_values(sd)
    backbone_kind(sd, arch)
    if arch is not None:
        from dinojax.models.config import get_config

        try:
            cfg = get_config(arch)
        except ValueError as e:
            raise ConversionError(str(e)) from e
        if arch == "dinov3_vitl16" and "local_cls_norm.weight" in sd:
            cfg = V3_ARCHITECTURES["dinov3_vitl16_sat493m"]
        return cfg
    for key in ("cls_token", "patch_embed.proj.weight", "rope_embed.periods"):
        if key not in sd:
            raise ConversionError(f"not a DINOv3 ViT state dict: no {key!r} key")
    d = _dim(sd, "cls_token", (1, 1, None), "(1, 1, embed_dim)")[2]
    p = _dim(sd, "patch_embed.proj.weight", (d, 3, None, None), f"({d}, 3, patch, patch)")[3]
    n_periods = _dim(sd, "rope_embed.periods", (None,), "(head_dim / 4,)")[0]
    head_dim = 4 * n_periods
    if d % head_dim:
        raise ConversionError(
            f"rope_embed.periods has {n_periods} entries (head dim {head_dim}), which does not "
            f"divide the width {d}"
        )
    idx = {int(m.group(1)) for k in sd if (m := _BLOCK_INDEX.match(k))}
    if not idx:
        raise ConversionError("no transformer blocks: the state dict has no 'blocks.{i}.*' keys")
    depth = max(idx) + 1
    if sorted(idx) != list(range(depth)):
        raise ConversionError(f"block indices are not contiguous: {sorted(idx)}")
    storage = 0
    if "storage_tokens" in sd:
        storage = _dim(sd, "storage_tokens", (1, None, d), f"(1, n_storage, {d})")[1]
    ratio, ffn = 4.0, "mlp"
    if "blocks.0.mlp.w1.weight" in sd:
        hidden = _dim(sd, "blocks.0.mlp.w1.weight", (None, d), f"(hidden, {d})")[0]
        ratio, ffn = _swiglu(d, hidden)
    elif "blocks.0.mlp.fc1.weight" in sd:
        ratio = _dim(sd, "blocks.0.mlp.fc1.weight", (None, d), f"(hidden, {d})")[0] / d
    try:
        cfg = DinoV3Config(
            name="custom",
            patch_size=p,
            embed_dim=d,
            depth=depth,
            num_heads=d // head_dim,
            mlp_ratio=ratio,
            ffn_layer=ffn,
            num_storage_tokens=storage,
            layerscale_init=1e-5 if "blocks.0.ls1.gamma" in sd else None,
            qkv_bias="blocks.0.attn.qkv.bias" in sd,
            proj_bias="blocks.0.attn.proj.bias" in sd,
            ffn_bias=any(k.startswith("blocks.0.mlp.") and k.endswith(".bias") for k in sd),
            mask_k_bias="blocks.0.attn.qkv.bias_mask" in sd,
            untie_cls_and_patch_norms="cls_norm.weight" in sd,
            untie_global_and_local_cls_norm="local_cls_norm.weight" in sd,
        )
    except ValueError as e:
        raise ConversionError(f"inconsistent DINOv3 state dict: {e}") from e
    for official in V3_ARCHITECTURES.values():
        if _same_arch(official, cfg):
            return official
    return cfg


# ---------------------------------------------------------------------------------------------
# Hugging Face DINOv3ViTModel
# ---------------------------------------------------------------------------------------------

_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "storage_tokens",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}
_HF_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.o_proj": "attn.proj",
    "layer_scale1": "ls1",
    "layer_scale2": "ls2",
    "mlp.gate_proj": "mlp.w1",
    "mlp.down_proj": "mlp.w3",  # "mlp.fc2" for the GELU MLP, resolved in from_hf
}
_HF_LAYER = re.compile(r"^(?:model\.)?layer\.(\d+)\.(.*)\.(weight|bias|lambda1)$")


def is_hf_v3(sd: dict) -> bool:
    """Hugging Face DINOv3ViTModel names: `embeddings.*` without a position embedding, blocks
    under `layer.{i}` (hub files) or `model.layer.{i}` (transformers 5)."""
    return (
        "embeddings.cls_token" in sd
        and "embeddings.position_embeddings" not in sd
        and any(_HF_LAYER.match(k) for k in sd)
    )


def _lazy_concat(parts: list):
    """Row-wise concatenation, read only when the converter asks for it."""
    from dinojax.convert.io import LazyTensor

    shapes = [tuple(p.shape) for p in parts]
    if len({s[1:] for s in shapes}) != 1:
        raise ConversionError(f"q / k / v projections of different shapes {shapes}")
    shape = (sum(s[0] for s in shapes), *shapes[0][1:])
    dtype = np.result_type(*[p.dtype for p in parts])
    return LazyTensor(shape, dtype, lambda: np.concatenate([np.asarray(p) for p in parts]))


def from_hf(sd: dict[str, np.ndarray], config: dict | None = None) -> dict[str, np.ndarray]:
    """Hugging Face DINOv3ViTModel keys -> official keys: q/k/v packed into qkv with a zero key
    bias and the key-bias mask, `register_tokens` -> `storage_tokens`, RoPE periods from the
    head dim (HF keeps only non-persistent inverse frequencies).

    `config`: the model's `config.json` (a dict) when there is one; every field that disagrees
    with the tensors or with DINOv3 is reported in one error. Without it the head dim is 64
    (128 at the ViT-7B width 4096), as in every released DINOv3 ViT."""
    from dinojax.models.vit3 import rope_periods

    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    unknown = []
    gated = any(".mlp.gate_proj." in k for k in sd)
    for k, v in sd.items():
        # Tensors stay unread (`dinojax.convert.io.LazyTensor`) until conversion places them: the
        # converter's peak memory stays near one copy of the model (README "Memory").
        if k in _HF_TOP:
            out[_HF_TOP[k]] = np.asarray(v).reshape(1, -1) if k == "embeddings.mask_token" else v
            continue
        if k == "rope_embeddings.inv_freq":  # non-persistent in HF; tolerated if saved
            continue
        m = _HF_LAYER.match(k)
        if not m:
            unknown.append(k)
            continue
        i, mid, leaf = int(m.group(1)), m.group(2), m.group(3)
        if mid in ("attention.q_proj", "attention.k_proj", "attention.v_proj"):
            qkv.setdefault((i, leaf), {})[mid[len("attention.")]] = v
            continue
        if mid == "mlp.up_proj":
            name = "mlp.w2" if gated else "mlp.fc1"
        elif mid == "mlp.down_proj":
            name = "mlp.w3" if gated else "mlp.fc2"
        elif mid in _HF_BLOCK:
            name = _HF_BLOCK[mid]
        else:
            unknown.append(k)
            continue
        out[f"blocks.{i}.{name}." + ("gamma" if leaf == "lambda1" else leaf)] = v
    if unknown:
        raise ConversionError(f"unknown Hugging Face DINOv3 ViT keys: {sorted(unknown)}")
    if "cls_token" not in out:
        raise ConversionError("Hugging Face DINOv3 ViT state dict has no embeddings.cls_token")
    d = out["cls_token"].shape[-1]
    weights_seen = False
    for (i, leaf), parts in sorted(qkv.items()):
        if leaf == "weight":
            weights_seen = True
            if sorted(parts) != ["k", "q", "v"]:
                raise ConversionError(
                    f"layer {i}: attention projections {sorted(parts)}, expected q, k and v"
                )
            out[f"blocks.{i}.attn.qkv.weight"] = _lazy_concat([parts[c] for c in "qkv"])
            continue
        parts = {c: np.asarray(t) for c, t in parts.items()}  # biases: small
        # Biases: HF DINOv3 has query/value biases and no key bias (`key_bias=False`); the
        # official qkv packs a key bias that `bias_mask` zeroes.
        if sorted(parts) != ["q", "v"] and sorted(parts) != ["k", "q", "v"]:
            raise ConversionError(
                f"layer {i}: attention biases {sorted(parts)}, expected query and value biases "
                "(or none)"
            )
        k_bias = parts.get("k")
        if k_bias is not None and np.any(k_bias != 0):
            raise ConversionError(
                f"layer {i}: the Hugging Face model has a non-zero key bias (key_bias=True), "
                "which DINOv3 masks out; expected key_bias=False"
            )
        zero = np.zeros_like(parts["q"])
        out[f"blocks.{i}.attn.qkv.bias"] = np.concatenate([parts["q"], zero, parts["v"]])
        out[f"blocks.{i}.attn.qkv.bias_mask"] = np.concatenate(
            [np.ones(d), np.zeros(d), np.ones(d)]
        ).astype(np.float32)
    if not weights_seen:
        raise ConversionError("Hugging Face DINOv3 ViT state dict has no attention projections")
    if config is not None:
        check_hf_config(out, config)
        head_dim = int(config["hidden_size"]) // int(config["num_attention_heads"])
    else:
        head_dim = 128 if d == 4096 else 64
    out["rope_embed.periods"] = rope_periods(DinoV3Config(embed_dim=d, num_heads=d // head_dim))
    return out


def check_hf_config(sd: dict, config: dict) -> None:
    """An HF DINOv3ViTConfig dict against the (official-layout) tensors and DINOv3's fixed
    choices; one error listing every disagreement."""
    d = sd["cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK_INDEX.match(k)))
    gated = "blocks.0.mlp.w1.weight" in sd
    hidden = sd["blocks.0.mlp.w1.weight" if gated else "blocks.0.mlp.fc1.weight"].shape[0]
    found = {
        "hidden_size": d,
        "num_hidden_layers": depth,
        "num_register_tokens": sd["storage_tokens"].shape[1] if "storage_tokens" in sd else 0,
        "use_gated_mlp": gated,
        "intermediate_size": hidden,
        "patch_size": sd["patch_embed.proj.weight"].shape[-1],
        "key_bias": False,
        "layer_norm_eps": 1e-5,
        "rope_theta": 100.0,
    }
    bad = []
    for field, want in found.items():
        if field in config and config[field] != want:
            fixed = field in ("key_bias", "layer_norm_eps", "rope_theta")
            what = "DINOv3 uses" if fixed else "the tensors have"
            bad.append(f"{field}={config[field]!r} ({what} {want!r})")
    heads = config.get("num_attention_heads")
    if not isinstance(heads, int) or heads <= 0 or d % heads or (d // heads) % 4:
        bad.append(
            f"num_attention_heads={heads!r} (needs a head dim of {d} / heads, a multiple of 4)"
        )
    if bad:
        raise ConversionError(
            "Hugging Face config does not match the checkpoint: " + "; ".join(bad)
        )


def to_hf(sd: dict[str, np.ndarray], cfg: DinoV3Config) -> dict[str, np.ndarray]:
    """Official DINOv3 ViT keys -> Hugging Face DINOv3ViTModel (transformers 5 names: blocks under
    `model.layer.{i}`). The masked key bias and the buffers are dropped; a model with an untied
    `cls_norm` has no HF equivalent (its outputs would change); `local_cls_norm` is
    training-only and dropped."""
    if cfg.untie_cls_and_patch_norms:
        raise ConversionError(
            "this model has an untied cls_norm, which Hugging Face DINOv3ViTModel cannot hold"
        )
    top = {v: k for k, v in _HF_TOP.items()}
    out: dict[str, np.ndarray] = {}
    block_names = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attn.proj": "attention.o_proj",
        "ls1": "layer_scale1",
        "ls2": "layer_scale2",
        "mlp.w1": "mlp.gate_proj",
        "mlp.w2": "mlp.up_proj",
        "mlp.w3": "mlp.down_proj",
        "mlp.fc1": "mlp.up_proj",
        "mlp.fc2": "mlp.down_proj",
    }
    key_re = re.compile(r"^blocks\.(\d+)\.(.*)\.(weight|bias|gamma|bias_mask)$")
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v.reshape(1, 1, -1) if k == "mask_token" else v
            continue
        if k in ("rope_embed.periods",) or k.startswith("local_cls_norm."):
            continue
        m = key_re.match(k)
        if not m:
            raise ConversionError(f"no Hugging Face name for the official key {k!r}")
        i, mid, leaf = m.groups()
        pre = f"model.layer.{i}."
        if leaf == "bias_mask":
            continue
        if mid == "attn.qkv":
            q, kk, vv = np.split(np.asarray(v), 3, axis=0)
            out[pre + "attention.q_proj." + leaf] = q
            out[pre + "attention.v_proj." + leaf] = vv
            if leaf == "weight":
                out[pre + "attention.k_proj.weight"] = kk
            continue
        if mid not in block_names:
            raise ConversionError(f"no Hugging Face name for the official key {k!r}")
        out[pre + block_names[mid] + "." + ("lambda1" if leaf == "gamma" else leaf)] = v
    return out


def hf_config_kwargs(cfg: DinoV3Config) -> dict:
    """`transformers.DINOv3ViTConfig` keyword arguments describing `cfg` (for `to_hf` users and
    the parity tests)."""
    return dict(
        patch_size=cfg.patch_size,
        hidden_size=cfg.embed_dim,
        intermediate_size=cfg.ffn_hidden_dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        layer_norm_eps=cfg.layernorm_eps,
        rope_theta=cfg.rope_base,
        query_bias=cfg.qkv_bias,
        key_bias=False,
        value_bias=cfg.qkv_bias,
        proj_bias=cfg.proj_bias,
        mlp_bias=cfg.ffn_bias,
        layerscale_value=cfg.layerscale_init or 1.0,
        use_gated_mlp=cfg.ffn_layer in FFN_ALIGN,
        hidden_act="silu" if cfg.ffn_layer in FFN_ALIGN else "gelu",
        num_register_tokens=cfg.num_storage_tokens,
        pos_embed_shift=cfg.rope_shift_coords,
        pos_embed_jitter=cfg.rope_jitter_coords,
        pos_embed_rescale=cfg.rope_rescale_coords,
    )


# ---------------------------------------------------------------------------------------------
# Routing used by dinojax.convert.checkpoint (meta "model")
# ---------------------------------------------------------------------------------------------


def split_flat(flat: dict, hf_config: dict | None = None) -> tuple[str, dict] | None:
    """A flat state dict of the DINOv3 families -> (format, official-layout state dict); None for
    DINO / DINOv2 (left to `dinojax.convert.backbone`). `hf_config`: a Hugging Face config.json
    found next to the file."""
    if is_convnext_like(flat):
        cv = convnext_module()
        if cv.is_hf_convnext(flat):
            return "hf", cv.convnext_from_hf(flat)
        return "hub", flat
    if is_hf_v3(flat):
        return "hf", from_hf(flat, hf_config)
    if is_v3_vit(flat):
        return "hub", flat
    return None


def convert_backbone(sd: dict, arch: str | None):
    """(model kind, config, params) for a DINOv3 backbone state dict."""
    kind = backbone_kind(sd, arch)
    if kind == CONVNEXT:
        cv = convnext_module()
        cfg = cv.detect_convnext_config(sd, arch)
        return kind, cfg, cv.convnext_from_official(sd, cfg)
    cfg = detect_v3_config(sd, arch)
    return kind, cfg, from_official(sd, cfg)


def kind_of_config(cfg) -> str:
    from dinojax.models.config import ViTConfig

    if isinstance(cfg, ViTConfig):
        return VIT_V2
    return VIT_V3 if isinstance(cfg, DinoV3Config) else CONVNEXT


def meta_kind(meta: dict) -> str:
    kind = meta.get("model", VIT_V2)
    if kind not in MODELS:
        raise ConversionError(f"unknown model kind {kind!r} in the metadata (expected {MODELS})")
    return kind


def config_from_dict(kind: str, d: dict):
    if kind == VIT_V3:
        return DinoV3Config.from_dict(d)
    if kind == CONVNEXT:
        from dinojax.models.convnext import CONVNEXT_ARCHITECTURES

        template = next(iter(CONVNEXT_ARCHITECTURES.values()))
        known = {f.name for f in dataclasses.fields(template)}
        return dataclasses.replace(template, **{k: v for k, v in d.items() if k in known})
    from dinojax.models.config import ViTConfig

    return ViTConfig.from_dict(d)


def build_abstract(kind: str, cfg):
    """An abstract (eval_shape) model of the family, to restore into."""
    from flax import nnx

    if kind == VIT_V3:
        from dinojax.models.vit3 import DinoV3VisionTransformer

        return nnx.eval_shape(lambda: DinoV3VisionTransformer(cfg, rngs=nnx.Rngs(0)))
    if kind == CONVNEXT:
        from dinojax.models import convnext

        return nnx.eval_shape(lambda: convnext.create_model(cfg))
    from dinojax.models.vit import DinoVisionTransformer

    return nnx.eval_shape(lambda: DinoVisionTransformer(cfg, rngs=nnx.Rngs(0)))


def backbone_to_official(kind: str, params: dict, cfg) -> dict:
    if kind == VIT_V3:
        return to_official(params, cfg)
    if kind == CONVNEXT:
        return convnext_module().convnext_to_official(params, cfg)
    return _tree_to_official(params)
