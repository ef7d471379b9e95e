"""dinojax: exact JAX/Flax DINO, DINOv2 and DINOv3."""

from dinojax.models import (
    ARCHITECTURES,
    DinoV3Config,
    DinoVisionTransformer,
    ViTConfig,
    create_model,
    get_config,
)

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a converted checkpoint directory (see `dinojax.convert.checkpoint.load`), or a model
    by name: an official hub name ("dinov2_vitb14_reg", "dino_vits16",
    "dinov2_vits14_linear4_head") or "hf:owner/repo", downloaded, verified, converted and cached
    once (see `dinojax.hub`).

    The parameters are restored straight into arrays sharded over `mesh=` (default: every
    device, FSDP as in training; `rules=` default `dinojax.sharding.FSDP_RULES`): each device
    reads only its shards, so no device or host array holds the whole model."""
    from dinojax import hub

    if hub.is_name(path):
        return hub.load(path, **kwargs)
    from dinojax.convert.checkpoint import load as _load

    return _load(path, **kwargs)


__all__ = [
    "ARCHITECTURES",
    "DinoV3Config",
    "DinoVisionTransformer",
    "ViTConfig",
    "create_model",
    "get_config",
    "load",
]
