"""Fixtures for the eval tests: the official `dinov2.eval` code, a gloo group, tiny models."""

from __future__ import annotations

import logging
import sys
import types
import warnings

import pytest

logging.getLogger("dinov2").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="xFormers not available")

# `dinov2/eval/knn.py` and `linear.py` import, at module level, dinov2.data (the training data
# stack), dinov2.eval.metrics / utils (torchmetrics), dinov2.eval.setup (omegaconf) and fvcore,
# which the test extra does not install. `KnnModule` and `create_linear_input` use none of them,
# so those imports are satisfied with inert placeholder modules while the official file is
# imported; the classes and functions under test then run unmodified.
_PLACEHOLDERS = (
    "dinov2.data",
    "dinov2.data.transforms",
    "dinov2.eval.metrics",
    "dinov2.eval.setup",
    "dinov2.eval.utils",
    "fvcore",
    "fvcore.common",
    "fvcore.common.checkpoint",
)


class _Inert(type):
    """A class whose every attribute is another inert class (e.g. `AccuracyAveraging.X`)."""

    def __getattr__(cls, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Inert(attr, (), {})


def _placeholder(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)

    def missing(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Inert(attr, (), {})

    mod.__getattr__ = missing  # PEP 562: any imported name resolves to an inert class
    mod.__path__ = []
    return mod


def import_official_eval(name: str) -> types.ModuleType:
    """`dinov2.eval.<name>` from the installed official package, its unusable imports stubbed."""
    # Only the placeholder entries are undone afterwards (real modules imported on the way, such
    # as dinov2.distributed, stay); the official module itself is not left importable with stubs.
    full = f"dinov2.eval.{name}"
    saved = {n: sys.modules.get(n) for n in (*_PLACEHOLDERS, full)}
    try:
        sys.modules.pop(full, None)
        sys.modules.update({n: _placeholder(n) for n in _PLACEHOLDERS})
        module = __import__(full, fromlist=["_"])
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    return module


@pytest.fixture(scope="session")
def official_knn():
    return import_official_eval("knn")


@pytest.fixture(scope="session")
def official_linear():
    return import_official_eval("linear")


def _random_model(name: str, seed: int = 0, **overrides):
    """A random-weight backbone built from numpy values (eager `create_model` initialisation
    takes seconds per model on a busy CPU; this takes milliseconds). Norm scales and LayerScale
    around 1, everything else N(0, 0.1^2)."""
    import jax
    import numpy as np

    from dinojax.eval.features import model_from_params
    from dinojax.models import get_config
    from dinojax.models.vit import abstract_params

    cfg = get_config(name, **overrides)
    rng = np.random.default_rng(seed)

    def value(path, a):
        names = "/".join(str(getattr(k, "key", k)) for k in path)
        base = 1.0 if names.endswith(("scale", "gamma")) else 0.0
        return (base + 0.1 * rng.normal(size=a.shape)).astype(a.dtype)

    return model_from_params(cfg, jax.tree_util.tree_map_with_path(value, abstract_params(cfg)))


@pytest.fixture(scope="session")
def random_model():
    return _random_model


@pytest.fixture(scope="session")
def tiny_model():
    """A 2-block random DINOv2 ViT (patch 14, width 64) with a 4x4 pos-embed grid."""
    return _random_model("dinov2_vits14", seed=1, depth=2, embed_dim=64, num_heads=2, img_size=56)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A dinojax checkpoint directory of a 1-block width-32 model (for the command lines)."""
    from dinojax.convert.checkpoint import save_model

    model = _random_model("dinov2_vits14", seed=2, depth=1, embed_dim=32, num_heads=1, img_size=28)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model(path, model)
    return str(path)
