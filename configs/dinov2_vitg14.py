"""DINOv2 `train/vitg14.yaml`: ViT-g/14 (1536 wide, 40 blocks, SwiGLU), Sinkhorn-Knopp, separate
iBOT head, 131072 prototypes, batch 3072 = 12 per GPU x 256 GPUs, 500 epochs x 1250 iterations
(facebookresearch/dinov2 `dinov2/configs/train/vitg14.yaml`). On accelerators use bf16 compute and
rematerialisation (FSDP over every chip is the default mesh):

    python train.py --config configs/dinov2_vitg14.py --workdir gs://bucket/dinov2_vitg14 \
        --config.model.overrides.dtype=bfloat16 --config.model.overrides.remat_policy=full
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
    # vitg14.yaml: batch_size_per_gpu 12; the paper's ViT-g batch is 3072, i.e. 256 GPUs
    # (confirmed by the authors in facebookresearch/dinov2#311: "256 gpus, and epoch length 1250,
    # for 500 epochs"). bench/estimate_tpu.py uses this recipe's batch.
    c.batch_size = 3072
    return smoke(c) if args.smoke else c
