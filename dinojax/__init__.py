"""dinojax: exact JAX/Flax DINO and DINOv2."""

from dinojax.models import ARCHITECTURES, DinoVisionTransformer, ViTConfig, create_model, get_config

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a converted checkpoint directory (see `dinojax.convert.checkpoint.load`)."""
    from dinojax.convert.checkpoint import load as _load

    return _load(path, **kwargs)


__all__ = [
    "ARCHITECTURES",
    "DinoVisionTransformer",
    "ViTConfig",
    "create_model",
    "get_config",
    "load",
]
