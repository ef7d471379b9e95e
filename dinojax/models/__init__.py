"""Backbones and heads."""

from dinojax.models.config import ARCHITECTURES, ViTConfig, get_config
from dinojax.models.vit import DinoVisionTransformer, abstract_params, create_model

__all__ = [
    "ARCHITECTURES",
    "DinoVisionTransformer",
    "ViTConfig",
    "abstract_params",
    "create_model",
    "get_config",
]
