"""DINO / DINOv2 multi-crop augmentation on the CPU, in numpy, Pillow and OpenCV.

Semantics of `DataAugmentationDINO` (facebookresearch/dinov2 `dinov2/data/augmentations.py`;
v1: facebookresearch/dino `main_dino.py`; docs/parity.md "Data"): per image, 2 global and n local
crops, each with its own RandomResizedCrop (bicubic), horizontal flip, colour jitter (brightness,
contrast, saturation, hue in random order, p=0.8), grayscale (p=0.2), Gaussian blur, solarisation
on the second global crop, and ImageNet normalisation.

Where each operation comes from, and how exact it is against torchvision's PIL path:
- decode, crop and bicubic resize: Pillow, the same calls torchvision makes -> identical;
- brightness and contrast: Pillow's `ImageEnhance` blend formula evaluated as a 256-entry lookup
  table -> identical, several times faster;
- saturation: `Image.blend` with the grayscale image, as `ImageEnhance.Color` does -> identical;
- grayscale: Pillow's ITU-R 601 luma -> identical;
- hue: OpenCV's 8-bit HSV round trip instead of Pillow's (about 15x faster); the two quantise hue
  a little differently (256 vs 255 steps per turn), so a pixel differs by at most 13 levels per
  channel over every RGB colour (mean 1.1; `HUE_BOUND` in tests/data/test_augment.py);
- Gaussian blur (kernel 9, reflect padding, torchvision's float32 kernel): separable OpenCV filter
  instead of a 9x9 conv2d; float rounding differs only in the last bit -> at most 1 level;
- normalisation: a float32 lookup table holding `(v/255 - mean)/std` computed like ToTensor +
  Normalize -> identical.

Randomness comes from an explicit `np.random.Generator`; the pipeline seeds it per record.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageFilter

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugmentConfig",
    "MultiCropAugmentation",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "decode_image",
    "gaussian_blur",
    "normalize_lut",
    "random_resized_crop_params",
    "resized_crop",
    "to_grayscale",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Multi-crop settings. Defaults: DINOv2 as released (`dinov2/configs/ssl_default_config.yaml`
    `crops`, `dinov2/data/augmentations.py`).

    `blur_p` holds the effective blur probabilities of (global crop 1, global crop 2, local
    crops). The released DINOv2 code inverts the nominal ones (1.0, 0.1, 0.5) by mistake, so its
    models were trained with (0.0, 0.9, 0.5); `dinov2_documented()` gives the nominal ones.
    """

    global_crops_size: int = 224
    local_crops_size: int = 96
    local_crops_number: int = 8
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: tuple[float, float, float] = (0.0, 0.9, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int = 9
    # "torchvision": GaussianBlur(kernel 9, sigma) as in DINOv2; "pil": ImageFilter.GaussianBlur
    # (radius = sigma) as in DINO v1.
    blur_impl: str = "torchvision"
    solarize_p: tuple[float, float] = (0.0, 0.2)  # (global crop 1, global crop 2)
    solarize_threshold: int = 128
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # False: crops stay uint8 (4x less host memory traffic); normalise on the device.
    normalize: bool = True

    def __post_init__(self) -> None:
        for name in ("global_crops_scale", "local_crops_scale", "ratio", "blur_sigma"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < min <= max, got {(lo, hi)}")
        if self.global_crops_size <= 0 or self.local_crops_size <= 0:
            raise ValueError("crop sizes must be positive")
        if self.local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {self.local_crops_number}")
        if self.blur_impl not in ("torchvision", "pil"):
            raise ValueError(f"blur_impl must be 'torchvision' or 'pil', got {self.blur_impl!r}")
        if self.blur_kernel_size % 2 != 1:
            raise ValueError(f"blur_kernel_size must be odd, got {self.blur_kernel_size}")
        b, c, s, h = self.color_jitter
        if min(b, c, s) < 0 or not 0 <= h <= 0.5:
            raise ValueError(
                f"color_jitter must be non-negative with hue <= 0.5, got {(b, c, s, h)}"
            )
        if len(self.blur_p) != 3 or len(self.solarize_p) != 2:
            raise ValueError("blur_p needs 3 entries (g1, g2, local), solarize_p 2 (g1, g2)")

    @classmethod
    def dinov2(cls, **overrides: Any) -> AugmentConfig:
        """Official DINOv2 as released, blur probabilities included (0, 0.9, 0.5)."""
        return cls(**overrides)

    @classmethod
    def dinov2_documented(cls, **overrides: Any) -> AugmentConfig:
        """DINOv2 with the blur probabilities its code documents: (1.0, 0.1, 0.5)."""
        return cls(**{"blur_p": (1.0, 0.1, 0.5), **overrides})

    @classmethod
    def dino_v1(cls, **overrides: Any) -> AugmentConfig:
        """DINO v1 (`main_dino.py`): scales (0.4, 1) / (0.05, 0.4), 96 px, PIL blur 1/0.1/0.5."""
        return cls(
            **{
                "global_crops_scale": (0.4, 1.0),
                "local_crops_scale": (0.05, 0.4),
                "local_crops_size": 96,
                "blur_p": (1.0, 0.1, 0.5),
                "blur_impl": "pil",
                **overrides,
            }
        )


PRESETS = {
    "dinov2": AugmentConfig.dinov2,
    "dinov2_documented": AugmentConfig.dinov2_documented,
    "dino_v1": AugmentConfig.dino_v1,
}


# ----------------------------------------------------------------------------------------------
# Decoding


# 16-bit data keeps its high byte (v >> 8), chosen by mode / dtype, never by pixel values. This is
# what the libraries do where they scale at all: Pillow decodes 16-bit RGB, RGBA and LA PNGs to
# 8 bits by keeping the most significant byte ("RGB;16B" unpackers), and torchvision's
# `to_dtype(uint16 -> uint8, scale=True)` is a right shift by 8. (Pillow's convert("RGB") of a
# 16-bit *grayscale* image clips at 255 instead, turning most of the image white; the official
# loader's `convert("RGB")` inherits that, which we do not copy.) Rounding v/257 would differ
# from v >> 8 by one level on about half the values.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _sixteen_to_uint8(a: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 by the high byte; "I" (32-bit) data is clipped to 16 bits first."""
    return (np.clip(a.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)


def _to_uint8_array(arr: np.ndarray) -> np.ndarray:
    """An image array to uint8, by dtype: uint8 as is, bool -> {0, 255}, uint16 and int32 (the
    arrays of Pillow's 16-bit modes "I;16*" and "I") -> high byte, float -> [0, 1] scaled by 255
    (torchvision's float-image convention), rounded and clipped."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        return np.clip(np.rint(finite * np.float32(255.0)), 0, 255).astype(np.uint8)
    if (arr.dtype.kind, arr.dtype.itemsize) in (("u", 2), ("i", 4)):
        return _sixteen_to_uint8(arr)
    raise ValueError(
        f"unsupported image dtype {arr.dtype} (expected uint8, bool, uint16, int32 or float)"
    )


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    arr = _to_uint8_array(np.asarray(arr))
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected an image array (H, W[, 1|2|3|4]), got shape {arr.shape}")
    if arr.shape[2] in (1, 2):  # gray, gray + alpha
        arr = np.repeat(arr[:, :, :1], 3, axis=2)
    elif arr.shape[2] == 4:  # RGBA: drop alpha like PIL's convert("RGB")
        arr = arr[:, :, :3]
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"empty image of shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        # convert("RGB") would clip 16-bit values at 255; keep the high byte instead (see above)
        g = _sixteen_to_uint8(np.asarray(img))
        return Image.fromarray(np.ascontiguousarray(np.repeat(g[:, :, None], 3, axis=2)), "RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # palette transparency: through RGBA, alpha then dropped
    # L, LA, RGBA, CMYK, YCbCr, 1, P, F: Pillow's own conversions (the official loader's
    # convert("RGB"); alpha is dropped, not composited; F values are clipped to 0..255 and
    # truncated, as Pillow does)
    return img.convert("RGB")


def decode_image(data: Any) -> Image.Image:
    """Decode encoded bytes, an array (TFDS Tensor feature) or a PIL image to an RGB PIL image.

    Grayscale, palette, CMYK and alpha images give what `convert("RGB")` gives (alpha dropped, as
    in the official loaders); 16-bit images keep their high byte. Corrupt or truncated files
    raise (`PIL.UnidentifiedImageError` / `OSError`), so the caller can skip and count them
    (unless the program set Pillow's global `ImageFile.LOAD_TRUNCATED_IMAGES`).
    """
    if isinstance(data, Image.Image):
        img = data
        img.load()
    elif isinstance(data, (bytes, bytearray, memoryview, np.bytes_)):
        img = Image.open(io.BytesIO(bytes(data)))
        img.load()  # force the full decode so a truncated file fails here
    elif isinstance(data, np.ndarray) and data.dtype.kind in ("S", "O") and data.ndim == 0:
        return decode_image(data.item())
    elif isinstance(data, np.ndarray):
        return Image.fromarray(_array_to_rgb(data), "RGB")
    else:
        raise TypeError(f"cannot decode an image from {type(data).__name__}")
    if img.width == 0 or img.height == 0:
        raise ValueError(f"empty image of size {img.size}")
    return _pil_to_rgb(img)


# ----------------------------------------------------------------------------------------------
# Geometry


def random_resized_crop_params(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
) -> tuple[int, int, int, int]:
    """(top, left, h, w) with the law of torchvision's `RandomResizedCrop.get_params`.

    Up to 10 tries of area ~ U(scale) * H * W and log-aspect ~ U(log ratio); the first that fits
    is placed uniformly. Otherwise a central crop with the aspect clamped into `ratio`.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    u = rng.random((10, 4))
    for t in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[t, 0])
        aspect_ratio = math.exp(log_lo + (log_hi - log_lo) * u[t, 1])
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(u[t, 2] * (height - h + 1))
            left = int(u[t, 3] * (width - w + 1))
            return top, left, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(img: Image.Image, top: int, left: int, h: int, w: int, size: int) -> np.ndarray:
    """torchvision `F.resized_crop(img, top, left, h, w, [size, size], BICUBIC)` on a PIL image:
    crop, then Pillow's bicubic resize (not `resize(box=...)`, whose filter reads past the box)."""
    return np.asarray(img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC))


# ----------------------------------------------------------------------------------------------
# Colour operations on (H, W, 3) uint8 arrays


def _blend_lut(base: np.ndarray | float, factor: float) -> np.ndarray:
    """Pillow's `ImagingBlend(degenerate, image, alpha)` for v = 0..255, as float32 C code does.

    `out = in1 + alpha * (in2 - in1)`, in float32, truncated toward zero, clipped to [0, 255].
    """
    v = np.arange(256, dtype=np.float32)
    base32 = np.float32(base)
    out = base32 + np.float32(factor) * (v - base32)
    return np.clip(out, 0.0, 255.0).astype(np.uint8)


def to_grayscale(a: np.ndarray) -> np.ndarray:
    """(H, W) uint8 luma, Pillow's convert("L") (ITU-R 601-2, fixed point)."""
    return np.asarray(Image.fromarray(a, "RGB").convert("L"))


def adjust_brightness(a: np.ndarray, factor: float) -> np.ndarray:
    """`ImageEnhance.Brightness(img).enhance(factor)`: blend with black."""
    return cv2.LUT(a, _blend_lut(0.0, factor))


def adjust_contrast(a: np.ndarray, factor: float) -> np.ndarray:
    """`ImageEnhance.Contrast`: blend with the rounded mean luma."""
    g = to_grayscale(a)
    mean = int(int(g.sum(dtype=np.int64)) / g.size + 0.5)  # ImageStat: exact sum / count
    return cv2.LUT(a, _blend_lut(mean, factor))


def adjust_saturation(a: np.ndarray, factor: float) -> np.ndarray:
    """`ImageEnhance.Color`: blend with the grayscale image."""
    img = Image.fromarray(a, "RGB")
    gray = img.convert("L").convert("RGB")
    return np.asarray(Image.blend(gray, img, factor))


def adjust_hue(a: np.ndarray, hue_factor: float) -> np.ndarray:
    """Rotate hue by `hue_factor` of a turn (torchvision's 8-bit shift, OpenCV HSV)."""
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor must be in [-0.5, 0.5], got {hue_factor}")
    hsv = cv2.cvtColor(a, cv2.COLOR_RGB2HSV_FULL)
    # torchvision: np_h += np.int32(hue_factor * 255).astype(np.uint8), wrapping
    shift = int(np.int32(hue_factor * 255).astype(np.uint8))
    hsv[:, :, 0] += np.uint8(shift)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def _torchvision_gaussian_kernel(kernel_size: int, sigma: float) -> np.ndarray:
    # torchvision _get_gaussian_kernel1d in float32
    half = (kernel_size - 1) * 0.5
    x = np.linspace(-half, half, kernel_size, dtype=np.float32)
    pdf = np.exp(np.float32(-0.5) * (x / np.float32(sigma)) ** 2)
    return (pdf / pdf.sum(dtype=np.float32)).astype(np.float32)


def gaussian_blur(a: np.ndarray, sigma: float, kernel_size: int = 9) -> np.ndarray:
    """torchvision `GaussianBlur(kernel_size, sigma)` on uint8: reflect padding, rounded."""
    k = _torchvision_gaussian_kernel(kernel_size, sigma)
    out = cv2.sepFilter2D(a, cv2.CV_32F, k, k, borderType=cv2.BORDER_REFLECT_101)
    np.rint(out, out=out)
    return np.clip(out, 0, 255).astype(np.uint8)


def pil_gaussian_blur(a: np.ndarray, radius: float) -> np.ndarray:
    """DINO v1 blur: `img.filter(ImageFilter.GaussianBlur(radius))`."""
    return np.asarray(Image.fromarray(a, "RGB").filter(ImageFilter.GaussianBlur(radius=radius)))


_SOLARIZE_CACHE: dict[int, np.ndarray] = {}


def solarize(a: np.ndarray, threshold: int = 128) -> np.ndarray:
    """`ImageOps.solarize`: invert every value >= threshold."""
    lut = _SOLARIZE_CACHE.get(threshold)
    if lut is None:
        v = np.arange(256)
        lut = np.where(v < threshold, v, 255 - v).astype(np.uint8)
        _SOLARIZE_CACHE[threshold] = lut
    return cv2.LUT(a, lut)


def normalize_lut(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(256, 1, 3) float32 table of `(v / 255 - mean) / std`, evaluated like ToTensor+Normalize."""
    v = np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0)
    table = (v - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(table.astype(np.float32).reshape(256, 1, 3))


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


# ----------------------------------------------------------------------------------------------
# The multi-crop transform


class MultiCropAugmentation:
    """`DataAugmentationDINO`: image -> 2 global + n local crops, each (S, S, 3) uint8.

    Crops stay uint8 until `normalize_into` writes them, normalised, into a batch buffer: that
    saves a float copy per crop and lets the pipeline ship uint8 when normalising on device.
    """

    def __init__(self, config: AugmentConfig | None = None) -> None:
        self.config = config or AugmentConfig()
        # Set to a list to record, per crop produced, the random decisions and parameters
        # (box, flip, jitter order and factors, grayscale, blur sigma, solarise): what the tests
        # replay and count to check the probabilities on the crops themselves.
        self.trace: list[dict[str, Any]] | None = None
        self._norm_lut = normalize_lut(self.config.mean, self.config.std)
        b, c, s, h = self.config.color_jitter
        self._jitter_ranges = [(max(0.0, 1 - x), 1 + x) for x in (b, c, s)] + [(-h, h)]

    def crop(
        self,
        img: Image.Image,
        rng: np.random.Generator,
        size: int,
        scale: Sequence[float],
        blur_p: float,
        solarize_p: float,
    ) -> np.ndarray:
        """One crop, (size, size, 3) uint8, with its own random parameters."""
        c = self.config
        top, left, h, w = random_resized_crop_params(rng, img.height, img.width, scale, c.ratio)
        a = resized_crop(img, top, left, h, w, size)
        u = rng.random(6)
        t: dict[str, Any] = {"size": size, "box": (top, left, h, w), "jitter": None}
        if u[0] < c.flip_p:
            a = cv2.flip(a, 1)
        if u[1] < c.color_jitter_p:
            a = self._color_jitter(a, rng, t)
        if u[2] < c.grayscale_p:
            g = to_grayscale(a)
            a = cv2.merge((g, g, g))
        sigma = None
        if u[3] < blur_p:
            sigma = float(c.blur_sigma[0] + (c.blur_sigma[1] - c.blur_sigma[0]) * u[4])
            if c.blur_impl == "torchvision":
                a = gaussian_blur(a, sigma, c.blur_kernel_size)
            else:
                a = pil_gaussian_blur(a, sigma)
        if u[5] < solarize_p:
            a = solarize(a, c.solarize_threshold)
        if self.trace is not None:
            t.update(flip=bool(u[0] < c.flip_p), grayscale=bool(u[2] < c.grayscale_p))
            t.update(blur_sigma=sigma, solarize=bool(u[5] < solarize_p))
            self.trace.append(t)
        return a

    def _color_jitter(
        self, a: np.ndarray, rng: np.random.Generator, trace: dict[str, Any]
    ) -> np.ndarray:
        u = rng.random(4)
        # torchvision ColorJitter: factors ~ U(max(0, 1 - x), 1 + x), hue ~ U(-h, h), applied in
        # a random order
        factors = [lo + (hi - lo) * u[i] for i, (lo, hi) in enumerate(self._jitter_ranges)]
        order = []
        for op in rng.permutation(4):
            lo, hi = self._jitter_ranges[op]
            if lo == hi:
                continue  # a zero jitter strength is skipped, as torchvision does
            a = _JITTER_OPS[op](a, factors[op])
            order.append(int(op))
        trace["jitter"] = {"order": order, "factors": factors}
        return a

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """{"global_crops": (2, S, S, 3) uint8, "local_crops": (n, s, s, 3) uint8}."""
        c = self.config
        g = np.empty((2, c.global_crops_size, c.global_crops_size, 3), np.uint8)
        for k in range(2):
            g[k] = self.crop(
                img, rng, c.global_crops_size, c.global_crops_scale, c.blur_p[k], c.solarize_p[k]
            )
        loc = np.empty((c.local_crops_number, c.local_crops_size, c.local_crops_size, 3), np.uint8)
        for k in range(c.local_crops_number):
            loc[k] = self.crop(img, rng, c.local_crops_size, c.local_crops_scale, c.blur_p[2], 0.0)
        return {"global_crops": g, "local_crops": loc}

    def normalize_into(self, crop: np.ndarray, out: np.ndarray) -> None:
        """Write `crop` (H, W, 3) uint8 into `out`: normalised float32, or copied if uint8."""
        if out.dtype == np.uint8:
            out[...] = crop
        else:
            cv2.LUT(crop, self._norm_lut, dst=out)
