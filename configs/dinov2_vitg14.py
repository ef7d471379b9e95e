"""DINOv2 `train/vitg14.yaml`: ViT-g/14 (1536 wide, 40 blocks, SwiGLU), Sinkhorn-Knopp, separate
iBOT head, 131072 prototypes, batch 12 x 96 GPUs, 500 epochs x 1250 iterations (official-dino.md
§4.1). On accelerators use bf16 compute and rematerialisation, FSDP over every chip:

    python train.py --config configs/dinov2_vitg14.py --workdir gs://bucket/dinov2_vitg14 \
        --config.mesh.shape='(1,-1)' --config.model.overrides.dtype=bfloat16 \
        --config.model.overrides.remat_policy=full
    python train.py --config configs/dinov2_vitg14.py:smoke --workdir /tmp/vitg14_smoke

Arguments: `smoke`.
"""

from __future__ import annotations

import ml_collections

from configs.common import base_config, parse_arg, smoke
from configs.dinov2_vitl14 import vitl14_recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg)
    c = vitl14_recipe(base_config())
    c.model.arch = "dinov2_vitg14"
    c.batch_size = 1152  # 12 per GPU x 96 GPUs
    c.mesh.shape = (1, -1)  # 1.1 B backbone parameters: shard everything over every device
    return smoke(c) if args.smoke else c
