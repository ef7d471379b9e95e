"""DINOv2 `train/vitl14.yaml`: ViT-L/14 with SwiGLU, Sinkhorn-Knopp centering, a separate iBOT
head, 131072 prototypes, 500 epochs x 1250 iterations at batch 3072 (facebookresearch/dinov2
`dinov2/configs/train/vitl14.yaml`).

    python train.py --config configs/dinov2_vitl14.py --workdir /ckpt/dinov2_vitl14 \
        --config.data.source=tfds:imagenet22k:train --config.data.data_dir=/data/tfds
    python train.py --config configs/dinov2_vitl14.py:smoke --workdir /tmp/vitl14_smoke

Arguments: `smoke`.
"""

from __future__ import annotations

import ml_collections

from configs.common import base_config, parse_arg, smoke


def vitl14_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The changes `vitl14.yaml` / `vitg14.yaml` make to `ssl_default_config.yaml`."""
    c.batch_size = 3072  # 32 per GPU x 96 GPUs
    c.model.overrides.patch_size = 14
    c.model.overrides.ffn_layer = "swiglu"  # swiglufused
    c.model.overrides.drop_path_rate = 0.4
    c.heads.out_dim = 131072
    c.heads.bottleneck_dim = 384
    c.heads.separate_ibot_head = True
    c.heads.ibot_out_dim = 131072
    c.heads.ibot_bottleneck_dim = 256
    c.loss.centering = "sinkhorn_knopp"
    c.optim.epochs = 500
    c.optim.base_lr = 2e-4
    c.optim.warmup_epochs = 80
    c.optim.weight_decay_end = 0.2
    c.optim.layerwise_decay = 1.0
    c.optim.momentum_teacher = 0.994
    c.data.source = "tfds:imagenet22k:train"  # ImageNet22k in the official run
    c.data.local_crops_size = 98
    c.data.eval_source = "tfds:imagenet2012:validation"
    c.data.eval_train_source = "tfds:imagenet2012:train"
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg)
    c = vitl14_recipe(base_config())
    c.model.arch = "dinov2_vitl14"
    return smoke(c) if args.smoke else c
