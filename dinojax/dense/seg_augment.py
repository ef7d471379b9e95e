"""The training pipeline of the official linear segmentation configs, mmseg 0.27
`mmseg/datasets/pipelines/transforms.py`: `Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0))`,
`RandomCrop(crop_size=512, cat_max_ratio=0.75)`, `RandomFlip(prob=0.5)`,
`PhotoMetricDistortion()`, `Normalize`, `Pad(size=crop, pad_val=0, seg_pad_val=255)`.

Images are uint8 RGB (mmseg reads BGR with cv2; the HSV steps use the matching RGB conversion, so
the result is the same), labels uint8 with 255 = ignore. Resizing uses cv2 like mmcv (`imrescale`:
bilinear for images, nearest for labels). Randomness comes from the numpy Generator passed in.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from dinojax.dense.segment import IMAGENET_MEAN, IMAGENET_STD, rescale_size

__all__ = ["SegTrainTransform", "photometric_distortion", "random_crop_bbox"]


def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    # PhotoMetricDistortion.convert: float32 multiply-add, clip to [0, 255], back to uint8.
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(img: np.ndarray, rng: np.random.Generator, brightness_delta: int = 32,
                           contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5),
                           hue_delta: int = 18) -> np.ndarray:  # fmt: skip
    """mmseg `PhotoMetricDistortion.__call__`: brightness, contrast (before or after, coin
    flip), saturation, hue; each applied with probability 1/2."""
    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = rng.integers(2)
    if mode == 1 and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(*contrast_range))
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        shift = int(rng.integers(-hue_delta, hue_delta))  # np.random.randint: high excluded
        hsv[..., 0] = (hsv[..., 0].astype(int) + shift) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if mode == 0 and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(*contrast_range))
    return img


def random_crop_bbox(label: np.ndarray, crop: int, rng: np.random.Generator,
                     cat_max_ratio: float = 0.75, ignore_index: int = 255):  # fmt: skip
    """mmseg `RandomCrop`: a uniform offset; with cat_max_ratio < 1 re-drawn (up to 10 times)
    until the crop holds more than one class and no class covers cat_max_ratio of it."""
    h, w = label.shape

    def draw():
        y = int(rng.integers(0, max(h - crop, 0) + 1))
        x = int(rng.integers(0, max(w - crop, 0) + 1))
        return y, x

    y, x = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            labels, cnt = np.unique(label[y : y + crop, x : x + crop], return_counts=True)
            cnt = cnt[labels != ignore_index]
            if len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio:
                break
            y, x = draw()
    return y, x


@dataclasses.dataclass(frozen=True)
class SegTrainTransform:
    """(image uint8 (H, W, 3), label uint8 (H, W)) -> (normalised float32 (crop, crop, 3),
    label uint8 (crop, crop)) with the official random augmentation."""

    crop_size: int = 512
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    ignore_index: int = 255

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        lo, hi = self.ratio_range
        ratio = rng.random() * (hi - lo) + lo  # Resize.random_sample_ratio
        scale = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        h, w = rescale_size(*label.shape, scale)
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
        c = self.crop_size
        y, x = random_crop_bbox(label, c, rng, self.cat_max_ratio, self.ignore_index)
        image, label = image[y : y + c, x : x + c], label[y : y + c, x : x + c]
        if rng.random() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        image = np.ascontiguousarray(image)
        if self.photometric:
            image = photometric_distortion(image, rng)
        out = np.zeros((c, c, 3), np.float32)  # Pad: image 0 after Normalize, label 255
        out[: image.shape[0], : image.shape[1]] = (
            image.astype(np.float32) - np.float32(IMAGENET_MEAN)
        ) / np.float32(IMAGENET_STD)
        lab = np.full((c, c), self.ignore_index, np.uint8)
        lab[: label.shape[0], : label.shape[1]] = label
        return out, lab
