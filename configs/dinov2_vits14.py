"""DINOv2 ViT-S/14 trained from scratch with the default (`vitl16_short`) hyper-parameters.

Not an official recipe: the released ViT-S/14 was distilled from ViT-g/14 (dinov2 `MODEL_CARD.md`).
Only the backbone changes (ViT-S/14, patch-14 crops 224 / 98 like `vitl14.yaml`), and the drop-path
rate is 0.1, the usual value for ViT-S in iBOT / DINO.

    python train.py --config configs/dinov2_vits14.py --workdir /ckpt/dinov2_vits14
    python train.py --config configs/dinov2_vits14.py:smoke --workdir /tmp/vits14_smoke

Arguments: `smoke`.
"""

from __future__ import annotations

import ml_collections

from configs.common import base_config, parse_arg, smoke


def small_or_base(arch: str, drop_path_rate: float) -> ml_collections.ConfigDict:
    c = base_config()
    c.model.arch = arch
    c.model.overrides.patch_size = 14
    c.model.overrides.drop_path_rate = drop_path_rate
    c.data.local_crops_size = 98
    c.data.eval_source = "tfds:imagenet2012:validation"
    c.data.eval_train_source = "tfds:imagenet2012:train"
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg)
    c = small_or_base("dinov2_vits14", 0.1)
    return smoke(c) if args.smoke else c
