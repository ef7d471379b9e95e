"""Monocular depth metrics, as the DINOv2 depth evaluation computes them (the Monocular Depth
Estimation Toolbox that `dinov2/eval/depth` builds on: `depth/core/evaluation/metrics.py`
`calculate`, `depth/datasets/nyu.py` `eval_mask` with the Eigen crop).

Per image, over the valid pixels only (min_depth < gt < max_depth, and inside the Eigen crop when
asked): delta_i = fraction with max(gt / pred, pred / gt) < 1.25 ** i, abs_rel = mean |gt - pred| /
gt, sq_rel, rmse = sqrt(mean (gt - pred) ** 2), rmse_log, log10 = mean |log10 gt - log10 pred|,
silog. A dataset's figure is the mean of the per-image figures (images without a valid pixel are
skipped and counted).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "METRICS",
    "DepthMetrics",
    "NYU_EIGEN_CROP",
    "depth_metrics",
    "image_metrics",
    "valid_mask",
]

# Rows 45:471, columns 41:601 of the 480 x 640 NYU-v2 frames (Eigen et al. 2014).
NYU_EIGEN_CROP = (45, 471, 41, 601)
METRICS = ("delta1", "delta2", "delta3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")


def valid_mask(
    gt: np.ndarray, *, min_depth: float = 1e-3, max_depth: float = 10.0, eigen_crop: bool = False
) -> np.ndarray:
    """Pixels that count: min_depth < gt < max_depth (0 = no measurement), inside the NYU Eigen
    crop if `eigen_crop` (which needs 480 x 640 maps)."""
    gt = np.asarray(gt)
    mask = (gt > min_depth) & (gt < max_depth)
    if eigen_crop:
        if gt.shape[-2:] != (480, 640):
            raise ValueError(
                f"the NYU Eigen crop needs 480x640 depth maps, got {gt.shape[-2]}x{gt.shape[-1]}"
            )
        crop = np.zeros(gt.shape[-2:], bool)
        t, b, left, r = NYU_EIGEN_CROP
        crop[t:b, left:r] = True
        mask &= crop
    return mask


def image_metrics(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> dict[str, float] | None:
    """The metrics of one image over `mask` (None when no pixel is valid)."""
    p = np.asarray(pred, np.float64)[mask]
    g = np.asarray(gt, np.float64)[mask]
    if g.size == 0:
        return None
    if np.any(p <= 0):
        raise ValueError(f"predicted depth must be positive on valid pixels, min {p.min()}")
    thresh = np.maximum(g / p, p / g)
    err_log = np.log(p) - np.log(g)
    return {
        "delta1": float(np.mean(thresh < 1.25)),
        "delta2": float(np.mean(thresh < 1.25**2)),
        "delta3": float(np.mean(thresh < 1.25**3)),
        "abs_rel": float(np.mean(np.abs(g - p) / g)),
        "sq_rel": float(np.mean((g - p) ** 2 / g)),
        "rmse": float(np.sqrt(np.mean((g - p) ** 2))),
        "rmse_log": float(np.sqrt(np.mean(err_log**2))),
        "log10": float(np.mean(np.abs(np.log10(g) - np.log10(p)))),
        "silog": float(np.sqrt(max(np.mean(err_log**2) - np.mean(err_log) ** 2, 0.0)) * 100),
    }


class DepthMetrics:
    """Accumulates per-image metrics over batches; `result()` gives their means."""

    def __init__(
        self, *, min_depth: float = 1e-3, max_depth: float = 10.0, eigen_crop: bool = False
    ):
        self.min_depth, self.max_depth, self.eigen_crop = min_depth, max_depth, eigen_crop
        self.sums = dict.fromkeys(METRICS, 0.0)
        self.count = 0
        self.skipped = 0

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
        if gt.ndim == 2:
            pred, gt = pred[None], gt[None]
        for p, g in zip(pred, gt):
            m = valid_mask(
                g, min_depth=self.min_depth, max_depth=self.max_depth, eigen_crop=self.eigen_crop
            )
            r = image_metrics(p, g, m)
            if r is None:
                self.skipped += 1
                continue
            for k, v in r.items():
                self.sums[k] += v
            self.count += 1

    def result(self) -> dict[str, float]:
        if not self.count:
            raise ValueError("no image with a valid ground-truth pixel to evaluate")
        out = {k: v / self.count for k, v in self.sums.items()}
        out.update(images=self.count, skipped=self.skipped)
        return out


def depth_metrics(
    pred, gt, *, min_depth: float = 1e-3, max_depth: float = 10.0, eigen_crop: bool = False
) -> dict[str, float]:
    """Mean per-image metrics of (B, H, W) (or (H, W)) predictions against ground truth."""
    acc = DepthMetrics(min_depth=min_depth, max_depth=max_depth, eigen_crop=eigen_crop)
    acc.update(pred, gt)
    return acc.result()
