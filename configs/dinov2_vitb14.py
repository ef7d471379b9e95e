"""DINOv2 ViT-B/14 trained from scratch with the default (`vitl16_short`) hyper-parameters.

Not an official recipe: the released ViT-B/14 was distilled from ViT-g/14 (dinov2 `MODEL_CARD.md`).
Only the backbone changes (ViT-B/14, crops 224 / 98), drop-path rate 0.1 as in iBOT's ViT-B.

    python train.py --config configs/dinov2_vitb14.py --workdir /ckpt/dinov2_vitb14
    python train.py --config configs/dinov2_vitb14.py:smoke --workdir /tmp/vitb14_smoke

Arguments: `smoke`.
"""

from __future__ import annotations

import ml_collections

from configs.common import parse_arg, smoke
from configs.dinov2_vits14 import small_or_base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg)
    c = small_or_base("dinov2_vitb14", 0.1)
    return smoke(c) if args.smoke else c
