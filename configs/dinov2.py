"""DINOv2 default recipe: `ssl_default_config.yaml` = `train/vitl16_short.yaml` (ViT-L/16,
ImageNet-1k, 100 epochs x 1250 iterations, batch 2048; facebookresearch/dinov2 `dinov2/configs/`,
README).

    python train.py --config configs/dinov2.py --workdir /ckpt/dinov2_vitl16 \
        --config.data.data_dir=/data/tfds
    python train.py --config configs/dinov2.py:smoke --workdir /tmp/dinov2_smoke     # CPU-sized

Arguments: `smoke` (CPU-sized, same code path).
"""

from __future__ import annotations

import ml_collections

from configs.common import base_config, parse_arg, smoke


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg)
    c = base_config()  # the official defaults are this recipe
    c.data.eval_source = "tfds:imagenet2012:validation"
    c.data.eval_train_source = "tfds:imagenet2012:train"
    return smoke(c) if args.smoke else c
