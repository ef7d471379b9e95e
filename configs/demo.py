"""The demo `python train.py` runs: a small DINOv2 (ViT with patch 8, 4 blocks) trained for a few
minutes on the CPU on the embedded handwritten digits, with the teacher's kNN accuracy on the
held-out digits printed before and after training. Same code path as every recipe.

    python train.py                                          # = --config configs/demo.py
    python train.py --config configs/demo.py --workdir /tmp/demo --config.optim.epochs=30
"""

from __future__ import annotations

import ml_collections

from configs.common import base_config, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg)
    c = base_config()
    c.is_demo = True
    c.batch_size = 64
    c.model.arch = "dinov2_vits14"
    c.model.overrides.update(
        dict(patch_size=8, img_size=32, embed_dim=96, depth=4, num_heads=3, drop_path_rate=0.0)
    )
    c.heads.out_dim = c.heads.ibot_out_dim = 1024
    c.heads.hidden_dim = c.heads.ibot_hidden_dim = 256
    c.heads.bottleneck_dim = c.heads.ibot_bottleneck_dim = 64
    # One KoLeo / iBOT-centre group over the whole batch however many devices run the demo, so a
    # laptop (1 device) and the tests (8 simulated devices) train the same model.
    c.loss.n_shards = 1
    c.data.source = "digits:train"
    c.data.eval_source = "digits:test"
    c.data.eval_train_source = "digits:train"
    c.data.global_crops_size = 32
    c.data.local_crops_size = 16
    c.data.local_crops_number = 4
    c.data.num_workers = 0
    c.data.read_threads = 2
    c.optim.epoch_length = 20
    c.optim.epochs = 15  # 300 steps
    c.optim.warmup_epochs = 2
    c.optim.freeze_last_layer_epochs = 1
    c.optim.momentum_teacher = 0.99
    c.loss.warmup_teacher_temp_epochs = 3
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.train.knn_every = 100
    c.train.knn_at_start = True
    c.train.knn_at_end = True
    c.train.knn_batch_size = 256
    c.train.knn_image_size = 32
    c.train.knn_max_train = 2000
    if args.smoke:
        c.optim.epochs = 2
        c.optim.warmup_epochs = 1
        c.loss.warmup_teacher_temp_epochs = 1
        c.train.knn_every = 0
    return c
