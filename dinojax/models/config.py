"""Architecture configuration and the official hub names.

Every official backbone is a `ViTConfig`; `get_config(name, **overrides)` returns it, so training
recipes override fields (img_size, drop_path_rate, layerscale_init, registers, dtype, ...) instead
of adding flags to the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

FFN_LAYERS = ("mlp", "swiglu")
ATTENTION_IMPLS = ("xla", "cudnn", "splash", "auto")
REMAT_POLICIES = ("none", "full", "dots", "qkv_attn", "qkv_attn_mlp")


@dataclass(frozen=True)
class ViTConfig:
    """Hyper-parameters of a `DinoVisionTransformer` (facebookresearch/dinov2
    `dinov2/models/vision_transformer.py` `DinoVisionTransformer.__init__`); the hub values are
    pinned to the official modules by `tests/models/test_config_official.py`."""

    name: str = "custom"
    family: str = "dinov2"  # "dinov2" or "dino" (v1): v1 has no mask token and floors the grid
    patch_size: int = 14
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    ffn_layer: str = "mlp"
    # Size of the learned pos-embed grid (img_size // patch_size per side). Hub models: 518.
    img_size: int = 518
    num_register_tokens: int = 0
    # None disables LayerScale (DINO v1). Hub v2 models use 1.0, training recipes 1e-5.
    layerscale_init: float | None = 1.0
    # facebookresearch/dinov2 `dinov2/hub/backbones.py` `_make_dinov2_model` (and DINO v1's
    # `vision_transformer.py` `interpolate_pos_encoding`): non-register models use the
    # scale-factor path with +0.1 and no antialias; register models use the size path (offset 0)
    # with antialias.
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    layernorm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    # True: drop_path_rate in every block (v2 recipes); False: linspace(0, rate, depth) (v1).
    drop_path_uniform: bool = True
    # Numerics and performance (not part of the architecture: never stored as "different arch").
    dtype: str = "float32"
    param_dtype: str = "float32"
    # "xla" | "cudnn" | "splash" | "auto" (the device's own: dinojax/models/attention.py)
    attention: str = "xla"
    remat_policy: str = "none"
    scan_layers: bool = True

    def __post_init__(self):
        if self.family not in ("dinov2", "dino"):
            raise ValueError(f"family must be 'dinov2' or 'dino', got {self.family!r}")
        if self.ffn_layer not in FFN_LAYERS:
            raise ValueError(f"ffn_layer must be one of {FFN_LAYERS}, got {self.ffn_layer!r}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        if self.family == "dino" and (self.num_register_tokens or self.layerscale_init):
            raise ValueError("DINO v1 backbones have neither registers nor LayerScale")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def has_mask_token(self) -> bool:
        return self.family == "dinov2"

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_pos_patches(self) -> int:
        return self.grid_size**2

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(self.embed_dim * self.mlp_ratio)
        if self.ffn_layer == "swiglu":
            # facebookresearch/dinov2 `dinov2/layers/swiglu_ffn.py` `SwiGLUFFNFused`: 2/3 of the
            # hidden size, rounded up to a multiple of 8.
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    def replace(self, **overrides) -> ViTConfig:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown ViTConfig fields: {sorted(unknown)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


_WIDTHS = {  # embed_dim, depth, heads (head dim 64 everywhere)
    "s": (384, 12, 6),
    "b": (768, 12, 12),
    "l": (1024, 24, 16),
    "g": (1536, 40, 24),
}


def _v2(size: str, reg: bool) -> ViTConfig:
    d, depth, heads = _WIDTHS[size]
    return ViTConfig(
        name=f"dinov2_vit{size}14" + ("_reg" if reg else ""),
        patch_size=14,
        embed_dim=d,
        depth=depth,
        num_heads=heads,
        ffn_layer="swiglu" if size == "g" else "mlp",
        img_size=518,
        num_register_tokens=4 if reg else 0,
        layerscale_init=1.0,
        interpolate_offset=0.0 if reg else 0.1,
        interpolate_antialias=reg,
    )


def _v1(size: str, patch: int) -> ViTConfig:
    d, depth, heads = _WIDTHS[size]
    return ViTConfig(
        name=f"dino_vit{size}{patch}",
        family="dino",
        patch_size=patch,
        embed_dim=d,
        depth=depth,
        num_heads=heads,
        img_size=224,
        layerscale_init=None,
        # facebookresearch/dino `vision_transformer.py` `VisionTransformer.__init__`: v1 uses the
        # stochastic depth decay rule, linspace(0, drop_path_rate, depth); v2 training recipes
        # use the same rate everywhere.
        drop_path_uniform=False,
    )


ARCHITECTURES: dict[str, ViTConfig] = {
    **{c.name: c for c in (_v2(s, r) for r in (False, True) for s in "sblg")},
    **{c.name: c for c in (_v1(s, p) for s in "sb" for p in (16, 8))},
}
# The hub file names say "reg4"; accept both spellings.
ALIASES = {f"dinov2_vit{s}14_reg4": f"dinov2_vit{s}14_reg" for s in "sblg"}


def get_config(name: str, **overrides):
    """The official architecture `name` (e.g. 'dinov2_vitb14_reg', 'dinov3_vitl16'), with field
    overrides: a `ViTConfig` (DINO, DINOv2), a `DinoV3Config` (DINOv3 ViTs) or, for names starting
    with 'dinov3_convnext', the config of `dinojax.models.convnext`."""
    from dinojax.models.config_v3 import V3_ARCHITECTURES

    key = ALIASES.get(name, name)
    if key in ARCHITECTURES:
        cfg = ARCHITECTURES[key]
    elif key in V3_ARCHITECTURES:
        cfg = V3_ARCHITECTURES[key]
    elif key.startswith("dinov3_convnext"):
        return _convnext_config(key, overrides)
    else:
        known = sorted([*ARCHITECTURES, *V3_ARCHITECTURES, *_convnext_names()])
        raise ValueError(f"unknown architecture {name!r}; known: {known}")
    return cfg.replace(**overrides) if overrides else cfg


def _convnext_names() -> list[str]:
    try:
        from dinojax.models.convnext import CONVNEXT_ARCHITECTURES
    except ImportError:
        return []
    return list(CONVNEXT_ARCHITECTURES)


def _convnext_config(key: str, overrides: dict):
    # The DINOv3 ConvNeXts live in their own module and registry (`CONVNEXT_ARCHITECTURES`).
    try:
        from dinojax.models.convnext import CONVNEXT_ARCHITECTURES
    except ImportError as e:
        raise ValueError(f"{key!r}: the DINOv3 ConvNeXt models are not available ({e})") from e
    if key not in CONVNEXT_ARCHITECTURES:
        raise ValueError(f"unknown architecture {key!r}; known: {sorted(CONVNEXT_ARCHITECTURES)}")
    cfg = CONVNEXT_ARCHITECTURES[key]
    return dataclasses.replace(cfg, **overrides) if overrides else cfg
