"""Evaluation transforms on the host: the official classification eval transform and exact resizes.

`EvalTransform` is DINOv2's `make_classification_eval_transform` (`dinov2/data/transforms.py`):
`Resize(256, BICUBIC)` (shorter side, torchvision semantics on a PIL image) -> `CenterCrop(224)`
-> `ToTensor` -> `Normalize(ImageNet mean, std)`, with the same Pillow calls torchvision makes,
so the pixels are identical. Outputs are (H, W, 3) float32 NHWC rows, the layout the model takes.

`ResizeTransform` resizes to an exact (height, width) (any resolution, e.g. a multiple of the patch
size for dense features and pictures).

`dinov3_eval_transform` is DINOv3's eval preset (facebookresearch/dinov3 README `make_transform`):
`Resize((256, 256), antialias=True)` (square, bilinear) then ImageNet statistics, or the
satellite statistics for the SAT-493M models. Pillow's antialiased bilinear resize is within
1/255 of torchvision's uint8 kernel (checked in the tests).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np
from PIL import Image

from dinojax.data.augment import IMAGENET_MEAN, IMAGENET_STD, decode_image, normalize_lut

__all__ = [
    "SATELLITE_MEAN",
    "SATELLITE_STD",
    "EvalTransform",
    "ResizeTransform",
    "center_crop",
    "dinov3_eval_transform",
    "fit_to_patch",
    "load_image",
    "normalize",
    "resize_shorter_side",
]


def load_image(data: Any) -> Image.Image:
    """An RGB PIL image from a path, encoded bytes, an array or a PIL image; one-line errors."""
    if isinstance(data, (str, os.PathLike)):
        path = str(data)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise ValueError(f"cannot read image {path!r}: {e.strerror or e}") from None
        try:
            return decode_image(raw)
        except Exception as e:  # noqa: BLE001 - Pillow raises several types for bad files
            raise ValueError(f"cannot decode image {path!r}: {type(e).__name__}: {e}") from None
    try:
        return decode_image(data)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot decode image: {type(e).__name__}: {e}") from None


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """torchvision `Resize(size)` (an int: the shorter side) with bicubic interpolation on PIL.

    The longer side is `int(size * long / short)` (truncated), as in torchvision's
    `_compute_resized_output_size`; an image already at that size is returned unchanged.
    """
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.BICUBIC)


def center_crop(img: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """torchvision `CenterCrop(size)` on PIL: zero-pads first if the image is smaller, then crops at
    `round((H - h) / 2)`, `round((W - w) / 2)`."""
    ch, cw = (size, size) if isinstance(size, int) else size
    w, h = img.size
    if cw > w or ch > h:
        padded = Image.new(img.mode, (max(w, cw), max(h, ch)))
        padded.paste(img, ((cw - w) // 2 if cw > w else 0, (ch - h) // 2 if ch > h else 0))
        img = padded
        w, h = img.size
        if (w, h) == (cw, ch):
            return img
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return img.crop((left, top, left + cw, top + ch))


_LUT_CACHE: dict[tuple, np.ndarray] = {}


def normalize(
    img: Image.Image | np.ndarray,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> np.ndarray:
    """`ToTensor` + `Normalize` -> (H, W, 3) float32, bit-identical to torchvision (a look-up)."""
    key = (tuple(mean), tuple(std))
    if key not in _LUT_CACHE:
        _LUT_CACHE[key] = normalize_lut(mean, std).reshape(256, 3)
    a = np.asarray(img, dtype=np.uint8)
    return _LUT_CACHE[key][a, np.arange(3)]


def fit_to_patch(height: int, width: int, patch_size: int, size: int | None = None) -> tuple:
    """Target (H, W), multiples of `patch_size`: the image scaled so that its shorter side is `size`
    (unchanged when None), each side rounded to the nearest multiple (at least one patch)."""
    if size is not None:
        s = size / min(height, width)
        height, width = height * s, width * s
    fit = lambda v: max(patch_size, int(round(v / patch_size)) * patch_size)  # noqa: E731
    return fit(height), fit(width)


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """Official eval transform: resize the shorter side to `resize_size` (bicubic), center-crop
    `crop_size`, normalise. `EvalTransform.for_crop(c)` keeps the official 256/224 ratio."""

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.resize_size <= 0 or self.crop_size <= 0:
            raise ValueError(
                f"resize and crop sizes must be positive, got {self.resize_size}, {self.crop_size}"
            )

    @classmethod
    def for_crop(cls, crop_size: int, **kwargs: Any) -> EvalTransform:
        return cls(
            resize_size=int(math.floor(crop_size * 256 / 224)), crop_size=crop_size, **kwargs
        )

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (self.crop_size, self.crop_size, 3)

    def __call__(self, data: Any) -> np.ndarray:
        img = data if isinstance(data, Image.Image) else load_image(data)
        img = center_crop(resize_shorter_side(img, self.resize_size), self.crop_size)
        return normalize(img, self.mean, self.std)


# DINOv3 SAT-493M (satellite) models: facebookresearch/dinov3 README, `make_transform`.
SATELLITE_MEAN = (0.430, 0.411, 0.296)
SATELLITE_STD = (0.213, 0.156, 0.143)
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


@dataclasses.dataclass(frozen=True)
class ResizeTransform:
    """Resize to exactly (height, width) (bicubic, or antialiased bilinear), then normalise."""

    height: int
    width: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"image size must be positive, got {self.height}x{self.width}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)

    def __call__(self, data: Any) -> np.ndarray:
        img = data if isinstance(data, Image.Image) else load_image(data)
        if img.size != (self.width, self.height):
            img = img.resize((self.width, self.height), _RESAMPLE[self.resample])
        return normalize(img, self.mean, self.std)


def dinov3_eval_transform(size: int = 256, *, satellite: bool = False) -> ResizeTransform:
    """DINOv3's eval transform: square antialiased bilinear resize to `size` x `size`, then
    ImageNet statistics (or the SAT-493M satellite statistics)."""
    mean, std = (SATELLITE_MEAN, SATELLITE_STD) if satellite else (IMAGENET_MEAN, IMAGENET_STD)
    return ResizeTransform(size, size, mean, std, resample="bilinear")
