"""Input pipeline: sources, multi-crop augmentation, iBOT masking, grain -> global jax.Arrays."""

from dinojax.data.augment import AugmentConfig, MultiCropAugmentation, decode_image
from dinojax.data.masking import MaskingConfig, MaskingGenerator, collate_masks, sample_masks
from dinojax.data.pipeline import DataConfig, DinoDataIterator, DinoDataPipeline, normalize_images
from dinojax.data.sources import DigitsSource, ImageFolderSource, TfdsSource, make_source

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "DigitsSource",
    "DinoDataIterator",
    "DinoDataPipeline",
    "ImageFolderSource",
    "MaskingConfig",
    "MaskingGenerator",
    "MultiCropAugmentation",
    "TfdsSource",
    "collate_masks",
    "decode_image",
    "make_source",
    "normalize_images",
    "sample_masks",
]
