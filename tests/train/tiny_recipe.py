"""`train.py --config tests/train/tiny_recipe.py:RECIPE`: a recipe at test size (train_configs).

The argument names the recipe (e.g. dino_vits16); the run is 8 steps on a (2, 2) mesh.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_configs import tiny_config  # noqa: E402


def get_config(arg: str | None = None):
    c = tiny_config(arg or "dinov2")
    c.mesh.shape = (2, 2)
    c.train.async_checkpoints = True
    return c
