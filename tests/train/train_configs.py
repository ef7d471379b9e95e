"""Tiny training configs for the trainer tests (8 simulated CPU devices, see tests/conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the recipes live in configs/ at the repository root


def tiny_config(recipe: str = "dinov2", arg: str = "smoke", **train):
    """A recipe at smoke size, smaller still: 8 steps of batch 16, patch 8, crops 32 / 16 px."""
    import importlib

    c = importlib.import_module(f"configs.{recipe}").get_config(arg)
    c.model.overrides.patch_size = 8
    c.model.overrides.img_size = 32
    # LayerScale 1e-5 (the recipes) makes every image's CLS nearly identical at init, and KoLeo's
    # -log(nearest distance) then amplifies float32 reduction-order noise between meshes.
    if c.loss.family != "dino":  # v1 has no LayerScale
        c.model.overrides.layerscale_init = 1.0
    c.data.global_crops_size = 32
    c.data.local_crops_size = 16
    c.data.read_threads = 2
    c.heads.out_dim = c.heads.ibot_out_dim = 128
    c.optim.epochs, c.optim.epoch_length = 2, 4
    c.loss.n_shards = 2  # KoLeo / iBOT-center groups fixed: losses independent of the mesh
    c.mesh.shape = (2, 4)
    c.train.checkpoint_every = 4
    c.train.log_every = 1
    c.train.progress = False
    c.train.async_checkpoints = True
    # Smallest array the start-up check demands sharded on fsdp > 1: the heads' last layer
    # (32 x 128) and every block kernel. The largest replicated array is 2048 (a head kernel
    # whose dims the rules leave unsharded).
    c.train.assert_sharded_min_size = 4096
    c.train.update(train)
    return c
