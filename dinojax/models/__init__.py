"""Backbones and heads.

`ARCHITECTURES` here lists every ViT name `get_config` / `create_model` accept (DINO, DINOv2,
DINOv3); `dinojax.models.config.ARCHITECTURES` keeps the DINO / DINOv2 ones only. The DINOv3
ConvNeXts have their own registry, `dinojax.models.convnext.CONVNEXT_ARCHITECTURES`.
"""

from dinojax.models.config import ARCHITECTURES as _V1_V2
from dinojax.models.config import ViTConfig, get_config
from dinojax.models.config_v3 import V3_ARCHITECTURES, DinoV3Config
from dinojax.models.vit import DinoVisionTransformer, abstract_params, create_model

ARCHITECTURES = {**_V1_V2, **V3_ARCHITECTURES}

__all__ = [
    "ARCHITECTURES",
    "DinoV3Config",
    "DinoVisionTransformer",
    "V3_ARCHITECTURES",
    "ViTConfig",
    "abstract_params",
    "create_model",
    "get_config",
]
