"""The eval tools on a DINOv3 ViT: features, kNN, linear probes, PCA and attention pictures, the
DINOv3 transform presets. The tools only use the backbone interface (`model(x)`,
`forward_features`, `get_intermediate_layers`, `get_last_self_attention`, `cfg.patch_size`,
`cfg.num_register_tokens`), which `DinoV3VisionTransformer` shares with the DINOv2 model."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

from dinojax.eval import features, knn, linear, pictures
from dinojax.eval.transforms import SATELLITE_MEAN, SATELLITE_STD, dinov3_eval_transform
from dinojax.models.config import get_config
from dinojax.models.vit3 import DinoV3VisionTransformer, abstract_params


@pytest.fixture(scope="module")
def tiny_v3():
    """A 2-block random DINOv3 ViT (patch 16, width 64, 4 storage tokens)."""
    cfg = get_config("dinov3_vits16", depth=2, embed_dim=64, num_heads=2, layerscale_init=1.0)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda a: (0.3 * rng.standard_normal(a.shape)).astype(np.float32), abstract_params(cfg)
    )
    return features.model_from_params(cfg, params)


def test_model_from_params_builds_the_v3_model(tiny_v3):
    assert isinstance(tiny_v3, DinoV3VisionTransformer) and tiny_v3.cfg.num_register_tokens == 4


def test_tokens_and_linear_inputs(tiny_v3):
    x = np.random.default_rng(1).standard_normal((2, 64, 80, 3)).astype(np.float32)
    fn = features.Tokens(cls=True, patch=True, layers=2, layer_patches=True)
    out = jax.jit(lambda x: fn(tiny_v3, x))(x)
    assert out["cls"].shape == (2, 64) and out["patch"].shape == (2, 4, 5, 64)
    assert out["layers_cls"].shape == (2, 2, 64) and out["layers_patch"].shape == (2, 2, 4, 5, 64)
    np.testing.assert_allclose(out["layers_cls"][:, -1], out["cls"], atol=1e-5)
    lin = jax.jit(lambda x: features.LinearInputs(2)(tiny_v3, x))(x)
    assert lin["cls"].shape == (2, 2, 64) and lin["avgpool"].shape == (2, 64)


def test_knn_on_digits(tiny_v3):
    res = knn.knn_eval(
        tiny_v3, "digits:train", "digits:test", batch_size=64, image_size=64,
        max_train=400, max_test=96, progress=False,
    )  # fmt: skip
    assert res["top1"][10] > 25.0  # chance: 10%


@pytest.mark.slow
def test_linear_on_digits(tiny_v3):
    lin = linear.linear_eval(
        tiny_v3, "digits:train", "digits:test", batch_size=64, image_size=64, max_train=256,
        max_test=96, progress=False, n_blocks=(1, 2), learning_rates=(1.0, 10.0), epochs=10,
        train_batch_size=64,
    )  # fmt: skip
    assert lin["top1"] > 15.0  # measured 20.8% (chance 10%) on this random 2-block model


def test_pictures(tiny_v3, tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)).save(path)
    maps = pictures.attention_maps(tiny_v3, path, size=64)  # 70x100 -> 64x96: 4x6 patches
    assert maps.shape == (2, 4, 6) and (maps >= 0).all() and maps.sum() < 2.0  # CLS -> patches
    out = pictures.attention_pictures(tiny_v3, [path], tmp_path / "att", size=64)
    out += pictures.pca_pictures(tiny_v3, [path], tmp_path / "pca", size=64)
    for p in out:
        assert Image.open(p).size[0] > 0


def test_dinov3_transform_presets(torchvision):
    """Square 256 x 256 antialiased bilinear resize + statistics (facebookresearch/dinov3
    README `make_transform`), within one uint8 level of torchvision's kernel."""
    import torch
    from torchvision.transforms import v2

    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (300, 417, 3), np.uint8))
    for satellite, (mean, std) in ((False, ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
                                   (True, (SATELLITE_MEAN, SATELLITE_STD))):  # fmt: skip
        ours = dinov3_eval_transform(satellite=satellite)(img)
        ref = v2.Compose([
            v2.ToImage(), v2.Resize((256, 256), antialias=True),
            v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=mean, std=std),
        ])(img).permute(1, 2, 0).numpy()  # fmt: skip
        assert ours.shape == (256, 256, 3)
        assert np.abs(ours - ref).max() <= 1.01 / 255 / min(std)
    assert SATELLITE_MEAN == (0.430, 0.411, 0.296) and SATELLITE_STD == (0.213, 0.156, 0.143)


@pytest.fixture(scope="module")
def tiny_convnext():
    """A random DINOv3 ConvNeXt with one block per stage (stride 32, width 64)."""
    import dinojax

    return dinojax.create_model("dinov3_convnext_tiny", depths=(1, 1, 1, 1), dims=(16, 32, 48, 64))


def test_convnext_tokens_knn_and_pca(tiny_convnext, tmp_path):
    """ConvNeXt features through the same tools: pooled "CLS" + stride-32 token grid, kNN on
    the digits, PCA pictures; attention pictures are a clear error (no self-attention)."""
    x = np.random.default_rng(1).standard_normal((2, 96, 128, 3)).astype(np.float32)
    out = jax.jit(lambda x: features.Tokens(cls=True, patch=True)(tiny_convnext, x))(x)
    assert out["cls"].shape == (2, 64) and out["patch"].shape == (2, 3, 4, 64)
    res = knn.knn_eval(
        tiny_convnext, "digits:train", "digits:test", batch_size=64, image_size=64,
        max_train=400, max_test=96, progress=False,
    )  # fmt: skip
    assert res["top1"][10] > 40.0  # measured 76% (chance 10%) on this random model
    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (70, 100, 3), np.uint8)).save(path)
    (pca,) = pictures.pca_pictures(tiny_convnext, [path], tmp_path / "pca", size=96)
    assert Image.open(pca).size[0] > 0
    with pytest.raises(ValueError, match="attention pictures need a ViT"):
        pictures.attention_pictures(tiny_convnext, [path], tmp_path / "att", size=96)
