"""Eval transform semantics and sharded feature extraction (padding, order, caching, errors)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dinojax.data.sources import DigitsSource
from dinojax.eval import features as F
from dinojax.eval.transforms import (
    EvalTransform,
    ResizeTransform,
    center_crop,
    fit_to_patch,
    normalize,
    resize_shorter_side,
)


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def test_resize_shorter_side_torchvision_sizes():
    # torchvision Resize(256): shorter side 256, longer int(256 * long / short) (truncated).
    assert resize_shorter_side(_image(500, 375), 256).size == (341, 256)
    assert resize_shorter_side(_image(375, 500), 256).size == (256, 341)
    assert resize_shorter_side(_image(64, 64), 256).size == (256, 256)
    img = _image(300, 200)
    np.testing.assert_array_equal(
        np.asarray(resize_shorter_side(img, 100)), np.asarray(img.resize((150, 100), Image.BICUBIC))
    )
    same = _image(256, 300)
    assert resize_shorter_side(same, 256) is same


def test_center_crop_offsets_and_padding():
    img = _image(341, 256)
    a = np.asarray(img)
    # torchvision: top = round((256 - 224) / 2) = 16, left = round((341 - 224) / 2) = 58 (58.5 ->
    # 58, Python's round-half-even like torchvision's int(round(...))).
    np.testing.assert_array_equal(np.asarray(center_crop(img, 224)), a[16:240, 58:282])
    small = center_crop(_image(5, 3), 6)  # padded with zeros: left (6-5)//2 = 0, top (6-3)//2 = 1
    s = np.asarray(small)
    assert small.size == (6, 6) and s[0].max() == 0 and s[4:].max() == 0 and s[1:4, 5].max() == 0


def test_eval_transform_pipeline():
    img = _image(120, 90, 3)
    t = EvalTransform()
    out = t(img)
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    ref = center_crop(resize_shorter_side(img, 256), 224)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expect = (
        (np.asarray(ref, np.float32) / np.float32(255.0)) - mean.astype(np.float32)
    ) / std.astype(np.float32)
    np.testing.assert_array_equal(out, expect.astype(np.float32))
    assert EvalTransform.for_crop(56) == EvalTransform(resize_size=64, crop_size=56)
    r = ResizeTransform(28, 42)(img)
    assert r.shape == (28, 42, 3)
    np.testing.assert_array_equal(r, normalize(img.resize((42, 28), Image.BICUBIC)))
    assert fit_to_patch(90, 120, 14) == (84, 126)
    assert fit_to_patch(90, 120, 14, size=224) == (224, 294)


def test_eval_transform_matches_real_torchvision(tmp_path, torchvision):
    """facebookresearch/dinov2 `dinov2/data/transforms.py` `make_classification_eval_transform`
    (Resize bicubic, CenterCrop, ToTensor, Normalize), run by torchvision itself: bit-exact on
    upscaling, downscaling, extreme aspect ratios and zero padding (crop > image)."""
    from torchvision import transforms as T

    sizes = [(500, 375), (375, 500), (64, 64), (257, 300), (223, 223), (1000, 37)]
    cases = []
    for i, (w, h) in enumerate(sizes):
        _image(w, h, i).save(tmp_path / f"{i}.png")
        cases.append((str(tmp_path / f"{i}.png"), 256, 224))
    cases += [(cases[2][0], 200, 224), (cases[3][0], 64, 56)]  # crop > image: zero padding
    for path, resize, crop in cases:
        official = T.Compose([
            T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(crop),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ])  # fmt: skip
        expected = official(Image.open(path).convert("RGB")).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(EvalTransform(resize, crop)(path), expected, err_msg=path)


def _direct(model, images: np.ndarray) -> np.ndarray:
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(images)))


def test_padding_order_and_subset(tiny_model):
    src = DigitsSource("test")
    t = EvalTransform.for_crop(56)
    idx = np.array([5, 0, 17, 3, 9, 11, 2, 30, 31, 8, 1, 12, 40])  # 13 rows: 2 batches, 3 padded
    with jax.default_matmul_precision("highest"):
        feats, labels = F.extract_features(
            tiny_model, src, F.Cls(), transform=t, batch_size=8, indices=idx, progress=False
        )
    assert feats["cls"].shape == (13, 64)
    np.testing.assert_array_equal(labels, src.labels[idx])
    images = np.stack([t(Image.fromarray(src.images[i]).convert("RGB")) for i in idx])
    np.testing.assert_allclose(feats["cls"], _direct(tiny_model, images), rtol=1e-5, atol=1e-5)
    # Normalised variant: unit rows, same directions.
    with jax.default_matmul_precision("highest"):
        nfeats, _ = F.extract_features(
            tiny_model, src, F.Cls(normalize=True), transform=t, batch_size=16, indices=idx[:5],
            progress=False,
        )  # fmt: skip
    np.testing.assert_allclose(np.linalg.norm(nfeats["cls"], axis=1), 1.0, rtol=1e-6)
    ref = feats["cls"][:5] / np.linalg.norm(feats["cls"][:5], axis=1, keepdims=True)
    np.testing.assert_allclose(nfeats["cls"], ref, rtol=1e-5, atol=1e-6)


def test_tokens_and_layers(tiny_model):
    t = ResizeTransform(42, 56)  # non-square, 3x4 patches
    with jax.default_matmul_precision("highest"):
        out, _ = F.extract_features(
            tiny_model, DigitsSource("test"), F.Tokens(cls=True, patch=True, layers=2,
            layer_patches=True), transform=t, batch_size=8, indices=range(5), progress=False,
        )  # fmt: skip
        x = jnp.asarray(np.stack([t(Image.fromarray(a).convert("RGB"))
                                  for a in DigitsSource("test").images[:5]]))  # fmt: skip
        ff, layers = jax.jit(
            lambda m, x: (
                m.forward_features(x),
                m.get_intermediate_layers(x, 2, reshape=True, return_class_token=True),
            )
        )(tiny_model, x)
    assert out["patch"].shape == (5, 3, 4, 64) and out["layers_patch"].shape == (5, 2, 3, 4, 64)
    np.testing.assert_allclose(out["cls"], ff["x_norm_clstoken"], atol=1e-5)
    np.testing.assert_allclose(out["patch"].reshape(5, 12, 64), ff["x_norm_patchtokens"], atol=1e-5)
    for j, (p, c) in enumerate(layers):
        np.testing.assert_allclose(out["layers_cls"][:, j], c, atol=1e-5)
        np.testing.assert_allclose(out["layers_patch"][:, j], p, atol=1e-5)


def test_compiles_once_per_model_and_function(tiny_model):
    t = EvalTransform.for_crop(28)
    kw = dict(transform=t, batch_size=8, progress=False)
    F.extract_features(tiny_model, DigitsSource("test"), F.Cls(True), indices=range(11), **kw)
    size = F._forward._cache_size()
    # Another call, a new (equal) feature function object, a different dataset: no new compile.
    F.extract_features(tiny_model, DigitsSource("train"), F.Cls(True), indices=range(3, 19), **kw)
    assert F._forward._cache_size() == size


def test_unreadable_image_and_empty_sources(tiny_model, tmp_path):
    good, bad = tmp_path / "imgs" / "a", tmp_path / "imgs" / "b"
    good.mkdir(parents=True)
    bad.mkdir()
    _image(30, 30).save(good / "ok.png")
    (bad / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    t = EvalTransform.for_crop(28)
    with pytest.raises(ValueError, match=r"b/broken\.jpg.*cannot decode"):
        F.extract_features(tiny_model, f"folder:{tmp_path / 'imgs'}", transform=t, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        F.extract_features(tiny_model, f"folder:{tmp_path / 'empty'}", transform=t)

    class Empty:
        def __len__(self):
            return 0

        def __getitem__(self, i):
            raise IndexError(i)

    with pytest.raises(ValueError, match="empty"):
        F.extract_features(tiny_model, Empty(), transform=t)
    with pytest.raises(ValueError, match="no records selected"):
        F.extract_features(tiny_model, "digits:test", transform=t, indices=[])


def test_model_from_params(tiny_model):
    m = F.model_from_params(tiny_model.cfg, tiny_model.params())
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 56, 56, 3)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(m(x)), np.asarray(tiny_model(x)))


def test_params_sharded_on_another_mesh(tiny_model):
    """The trainer's teacher: parameters FSDP-sharded on a (data, fsdp) mesh."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)

    def shard(a):  # last axis over "fsdp" where it divides, else replicated
        split = a.ndim and a.shape[-1] % 4 == 0
        spec = P(*([None] * (a.ndim - 1)), "fsdp") if split else P()
        return jax.device_put(a, NamedSharding(mesh, spec))

    model = F.model_from_params(tiny_model.cfg, jax.tree.map(shard, tiny_model.params()))
    t = EvalTransform.for_crop(56)
    kw = dict(transform=t, batch_size=8, indices=range(10), progress=False)
    with jax.default_matmul_precision("highest"):
        ref, _ = F.extract_features(tiny_model, "digits:test", F.Cls(True), **kw)
        on_mesh, _ = F.extract_features(model, "digits:test", F.Cls(True), mesh=mesh, **kw)
        default, _ = F.extract_features(model, "digits:test", F.Cls(True), **kw)
    np.testing.assert_allclose(on_mesh["cls"], ref["cls"], atol=1e-6)
    np.testing.assert_allclose(default["cls"], ref["cls"], atol=1e-6)
