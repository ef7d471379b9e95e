"""Configuration of the DINOv3 ViTs and their official hub names.

`DinoV3Config` shares the field names of `ViTConfig` where the two mean the same thing (name,
patch_size, embed_dim, depth, num_heads, mlp_ratio, ffn_layer, layerscale_init, biases, eps,
drop path, dtype, attention, remat_policy, scan_layers), so code that reads those fields works on
both; the v3-only fields describe RoPE, storage tokens and the untied norms. Hub values:
facebookresearch/dinov3 `dinov3/hub/backbones.py` (`dinov3_vits16` ... `dinov3_vit7b16`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dinojax.models.config import ATTENTION_IMPLS, REMAT_POLICIES

# `dinov3/models/vision_transformer.py` `ffn_layer_dict`: SwiGLU variants differ only in the
# multiple the hidden size is rounded up to.
FFN_ALIGN = {"swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}
FFN_LAYERS_V3 = ("mlp", *FFN_ALIGN)
NORMALIZE_COORDS = ("separate", "min", "max")


@dataclass(frozen=True)
class DinoV3Config:
    """Hyper-parameters of a `DinoV3VisionTransformer` (facebookresearch/dinov3
    `dinov3/models/vision_transformer.py` `DinoVisionTransformer.__init__`)."""

    name: str = "custom"
    family: str = "dinov3"
    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0  # upstream `ffn_ratio`
    ffn_layer: str = "mlp"
    # Nominal training resolution; nothing depends on it (no learned position embedding).
    img_size: int = 224
    num_storage_tokens: int = 4  # upstream `n_storage_tokens` (the "registers")
    layerscale_init: float | None = 1e-5
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    mask_k_bias: bool = True  # `qkv.bias_mask` zeroes the key third of the qkv bias
    layernorm_eps: float = 1e-5  # `norm_layer="layernormbf16"`: nn.LayerNorm(eps=1e-5)
    # Untied norms: `cls_norm` normalises CLS + storage tokens in eval and in
    # get_intermediate_layers; `local_cls_norm` only the local crops' in training.
    untie_cls_and_patch_norms: bool = False
    untie_global_and_local_cls_norm: bool = False
    # RoPE (`dinov3/layers/rope_position_encoding.py` `RopePositionEmbedding`).
    rope_base: float = 100.0
    rope_normalize_coords: str = "separate"
    rope_shift_coords: float | None = None
    rope_jitter_coords: float | None = None
    rope_rescale_coords: float | None = 2.0
    drop_path_rate: float = 0.0  # the same rate in every block (`ffn_ratio_sequence` etc.)
    # Numerics and performance (not part of the architecture).
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "xla"
    remat_policy: str = "none"
    scan_layers: bool = True

    def __post_init__(self):
        if self.family != "dinov3":
            raise ValueError(f"family must be 'dinov3', got {self.family!r}")
        if self.ffn_layer not in FFN_LAYERS_V3:
            raise ValueError(f"ffn_layer must be one of {FFN_LAYERS_V3}, got {self.ffn_layer!r}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}"
            )
        if self.rope_normalize_coords not in NORMALIZE_COORDS:
            raise ValueError(
                f"rope_normalize_coords must be one of {NORMALIZE_COORDS}, "
                f"got {self.rope_normalize_coords!r}"
            )
        # `RopePositionEmbedding.__init__` asserts embed_dim % (4 * num_heads) == 0: the head
        # dim splits into [y | x] halves of sin/cos pairs.
        if self.embed_dim % (4 * self.num_heads):
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by 4 * num_heads "
                f"({4 * self.num_heads}): RoPE needs a head dim that is a multiple of 4"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_register_tokens(self) -> int:
        """The storage tokens under the v2 name, for tools written for both families."""
        return self.num_storage_tokens

    @property
    def has_bias_mask(self) -> bool:
        # `dinov3/layers/attention.py` `LinearKMaskedBias` registers `bias_mask` only when the qkv
        # Linear has a bias (ViT-7B: mask_k_bias=True but qkv_bias=False, so no mask).
        return self.mask_k_bias and self.qkv_bias

    @property
    def has_mask_token(self) -> bool:
        return True

    @property
    def drop_path_uniform(self) -> bool:
        return True

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(self.embed_dim * self.mlp_ratio)
        if self.ffn_layer in FFN_ALIGN:
            # `dinov3/layers/ffn_layers.py` `SwiGLUFFN`: 2/3 of the hidden size, rounded up to a
            # multiple of `align_to`.
            d = int(hidden * 2 / 3)
            hidden = d + (-d % FFN_ALIGN[self.ffn_layer])
        return hidden

    def replace(self, **overrides) -> DinoV3Config:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown DinoV3Config fields: {sorted(unknown)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DinoV3Config:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _v3(name, d, depth, heads, ratio, ffn, **kw) -> DinoV3Config:
    return DinoV3Config(
        name=name, embed_dim=d, depth=depth, num_heads=heads, mlp_ratio=ratio, ffn_layer=ffn, **kw
    )


# facebookresearch/dinov3 `dinov3/hub/backbones.py`: every hub ViT has patch 16, 4 storage
# tokens, LayerScale, masked key bias, eps 1e-5, RoPE base 100 "separate", rescale 2.
# fmt: off
V3_ARCHITECTURES: dict[str, DinoV3Config] = {
    c.name: c
    for c in (
        _v3("dinov3_vits16", 384, 12, 6, 4.0, "mlp"),
        _v3("dinov3_vits16plus", 384, 12, 6, 6.0, "swiglu"),
        _v3("dinov3_vitb16", 768, 12, 12, 4.0, "mlp"),
        _v3("dinov3_vitl16", 1024, 24, 16, 4.0, "mlp"),
        # The SAT-493M ViT-L file carries a `local_cls_norm` (`dinov3_vitl16` with
        # weights=SAT493M sets untie_global_and_local_cls_norm); the eval forward is the same.
        _v3("dinov3_vitl16_sat493m", 1024, 24, 16, 4.0, "mlp",
            untie_global_and_local_cls_norm=True),
        _v3("dinov3_vitl16plus", 1024, 24, 16, 6.0, "swiglu"),
        _v3("dinov3_vith16plus", 1280, 32, 20, 6.0, "swiglu"),
        _v3("dinov3_vit7b16", 4096, 40, 32, 3.0, "swiglu64", qkv_bias=False,
            untie_global_and_local_cls_norm=True),
    )
}
# fmt: on
