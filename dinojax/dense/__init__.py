"""Dense prediction from frozen DINOv2 features: semantic segmentation and monocular depth.

    seg = dinojax.dense.load_segmenter("ckpt/vits14", "ckpt/vits14_ade20k_linear")
    scores = seg.predict(images_nhwc, mode="slide")  # (B, H, W, K) float32
    depth = dinojax.dense.load_depther("ckpt/vits14", "dinov2_vits14_nyu_dpt_head.pth")
    metres = depth.predict(images_nhwc)  # (B, H, W)

Heads are the released official ones (converted by `convert_weights.py`, or given as the official
`.pth`, converted in memory) or heads trained with `python -m dinojax.eval.segment` /
`python -m dinojax.eval.depth`.
"""

from __future__ import annotations


def load_segmenter(backbone, head, **kwargs):
    """Backbone checkpoint (directory, hub name or `.pth`) + segmentation head -> `Segmenter`."""
    from dinojax.dense.segment import load_segmenter as _load

    return _load(backbone, head, **kwargs)


def load_depther(backbone, head, **kwargs):
    """Backbone checkpoint (directory, hub name or `.pth`) + depth head -> `Depther`."""
    from dinojax.dense.depth import load_depther as _load

    return _load(backbone, head, **kwargs)


__all__ = ["load_depther", "load_segmenter"]
