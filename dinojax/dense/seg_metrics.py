"""Semantic segmentation metrics with mmseg 0.27 semantics (`mmseg/core/evaluation/metrics.py`
`intersect_and_union`, `total_intersect_and_union`, `total_area_to_metrics`).

Per class, over the whole dataset: intersection = pixels predicted c where the label is c, union
= predicted c + labelled c - intersection (pixels labelled `ignore_index` are left out). IoU =
intersection / union, Acc = intersection / labelled; a class neither labelled nor predicted
anywhere has 0 / 0 = nan and is skipped by the means (np.nanmean, like mmseg's). aAcc = all
intersections / all labelled pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["SegMetrics", "intersect_and_union"]


def intersect_and_union(pred, label, num_classes: int, ignore_index: int = 255):
    """(area_intersect, area_union, area_pred, area_label), each (K,) int64, for one image."""
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in shape")
    keep = label != ignore_index
    p, t = pred[keep].astype(np.int64), label[keep].astype(np.int64)
    bad = t[(t < 0) | (t >= num_classes)]
    if bad.size:
        raise ValueError(f"label value {int(bad[0])} outside [0, {num_classes}) and not the "
                         f"ignore index {ignore_index}")  # fmt: skip
    inter = np.bincount(p[p == t], minlength=num_classes)[:num_classes]
    area_pred = np.bincount(p[(p >= 0) & (p < num_classes)], minlength=num_classes)[:num_classes]
    area_label = np.bincount(t, minlength=num_classes)
    return inter, area_pred + area_label - inter, area_pred, area_label


class SegMetrics:
    """Running totals over a dataset; `update(pred, label)` per image (or batch), `compute()`."""

    def __init__(self, num_classes: int, ignore_index: int = 255,
                 class_names: Sequence[str] | None = None):  # fmt: skip
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self.class_names = list(class_names) if class_names else None
        z = lambda: np.zeros(self.num_classes, np.int64)  # noqa: E731
        self.inter, self.union, self.pred, self.label = z(), z(), z(), z()

    def update(self, pred, label) -> None:
        i, u, p, t = intersect_and_union(pred, label, self.num_classes, self.ignore_index)
        self.inter += i
        self.union += u
        self.pred += p
        self.label += t

    def compute(self) -> dict:
        """{"mIoU", "aAcc", "mAcc"} in % and per-class "IoU" / "Acc" lists (% or nan)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = self.inter / self.union
            acc = self.inter / self.label
        total = self.label.sum()
        nanmean = lambda a: float(np.nanmean(a)) * 100 if np.isfinite(a).any() else float("nan")  # noqa: E731
        out = {
            "mIoU": nanmean(iou),
            "mAcc": nanmean(acc),
            "aAcc": float(self.inter.sum() / total) * 100 if total else float("nan"),
            "IoU": [float(v) * 100 for v in iou],
            "Acc": [float(v) * 100 for v in acc],
        }
        if self.class_names:
            out["classes"] = self.class_names
        return out
