"""dinojax: exact JAX/Flax DINO and DINOv2."""

__version__ = "0.1.0"
