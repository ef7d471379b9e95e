"""Dense datasets: the embedded digit / rendered-depth scenes (closed-form depth, label
consistency), ADE20K-style folders, the TFDS array_record builder read back, spec strings."""

from __future__ import annotations

import colorsys
import os

import numpy as np
import pytest
from PIL import Image

from dinojax.dense.data import DenseFolderSource, dense_source, depth_scenes, digit_scenes
from dinojax.dense.data.synthetic import Camera, Plane, Sphere, render_depth

# --- digit scenes -------------------------------------------------------------------------------


def test_digit_scenes_deterministic_and_typed():
    a, b = digit_scenes(3, size=(48, 64), seed=5), digit_scenes(3, size=(48, 64), seed=5)
    c = digit_scenes(3, size=(48, 64), seed=6)
    for i in range(3):
        (ia, la), (ib, lb) = a[i], b[i]
        assert ia.dtype == np.uint8 and ia.shape == (48, 64, 3)
        assert la.dtype == np.uint8 and la.shape == (48, 64)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a[0][0], c[0][0])
    assert a.num_classes == 11 and len(a.class_names) == 11 and a.name(2).endswith("[2]")
    with pytest.raises(IndexError):
        a[3]


def test_digit_scene_labels_follow_the_pasted_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    src = digit_scenes(12, size=96, seed=1)
    seen = set()
    for i in range(len(src)):
        img, label = src[i]
        layout = src.layout(i)
        assert 1 <= len(layout) <= 4
        boxes = np.zeros(label.shape, bool)
        for d in layout:
            assert digits.target[d.index] == d.digit
            boxes[d.top : d.top + d.height, d.left : d.left + d.width] = True
        assert (label[~boxes] == 0).all()  # background outside every digit's box
        assert set(np.unique(label)) <= {0} | {1 + d.digit for d in layout}
        # the last pasted digit is on top: its ink (the 8x8 digit upscaled, as a mask) is its class
        d = layout[-1]
        ink = np.asarray(
            Image.fromarray((digits.images[d.index] / 16).astype(np.float32), "F").resize(
                (d.width, d.height), Image.BILINEAR
            )
        )
        box = label[d.top : d.top + d.height, d.left : d.left + d.width]
        mask = ink > src.THRESHOLD
        assert mask.sum() > 10
        assert (box[mask] == 1 + d.digit).all()
        # colour cue: the pixels of class k have the hue k / 10
        k = 1 + d.digit
        px = img[label == k].astype(np.float64)[:300] / 255
        hues = np.array([colorsys.rgb_to_hsv(*p)[0] for p in px])
        strong = px.max(1) - px.min(1) > 0.3  # saturated: the ink, not its blended edge
        dh = np.abs((hues[strong] - d.digit / 10 + 0.5) % 1.0 - 0.5)
        assert np.median(dh) < 0.05
        seen |= {d.digit for d in layout}
    assert len(seen) >= 6


# --- rendered depth -----------------------------------------------------------------------------


def test_ground_plane_depth_is_closed_form():
    h_cam, pitch, f, size = 1.4, np.radians(20), 80.0, (60, 80)
    cam = Camera(position=(0.3, h_cam, -2.0), yaw=0.7, pitch=pitch, focal=f)
    _, depth = render_depth(cam, [Plane((0.0, 1.0, 0.0), 0.0)], size)
    # a pixel row at y_n = (v + 0.5 - H/2) / f sees the ground at camera z = h / (y_n cos + sin)
    y_n = (np.arange(60) + 0.5 - 30) / f
    denom = y_n * np.cos(pitch) + np.sin(pitch)
    expect = np.where(denom > 0, h_cam / np.where(denom > 0, denom, 1), np.inf)
    np.testing.assert_allclose(depth, np.repeat(expect[:, None], 80, 1), rtol=1e-9)
    assert np.isinf(depth[0]).all() and np.isfinite(depth[-1]).all()


def test_walls_and_sphere_depth_are_closed_form():
    f, size = 50.0, (41, 41)
    cam = Camera(position=(0.0, 1.0, 0.0), yaw=0.0, pitch=0.0, focal=f)
    # a fronto-parallel wall has the same camera z everywhere
    _, depth = render_depth(cam, [Plane((0.0, 0.0, 1.0), 6.5)], size)
    np.testing.assert_allclose(depth, 6.5, rtol=1e-12)
    # a wall turned by phi about the vertical through (0, ., D): z = D cos / (x_n sin + cos)
    phi, dist = np.radians(35), 4.0
    n = (np.sin(phi), 0.0, np.cos(phi))
    _, depth = render_depth(cam, [Plane(n, dist * np.cos(phi))], size)
    x_n = (np.arange(41) + 0.5 - 20.5) / f
    expect = dist * np.cos(phi) / (x_n * np.sin(phi) + np.cos(phi))
    np.testing.assert_allclose(depth, np.tile(expect, (41, 1)), rtol=1e-9)
    # a sphere straight ahead: the centre pixel (odd size: its ray is the optical axis) sees
    # its near pole at z = distance - radius, in front of the far wall
    objs = [Plane((0.0, 0.0, 1.0), 9.0), Sphere((0.0, 1.0, 5.0), 1.25)]
    _, depth = render_depth(cam, objs, size)
    assert depth[20, 20] == pytest.approx(3.75, rel=1e-12)
    assert depth[0, 0] == pytest.approx(9.0, rel=1e-12)  # the wall around it


def test_depth_scenes_dataset():
    src = depth_scenes(4, size=(40, 56), seed=3)
    assert src.depth_range == (0.5, 10.0)
    for i in range(4):
        img, depth = src[i]
        assert img.dtype == np.uint8 and img.shape == (40, 56, 3)
        assert depth.dtype == np.float32 and depth.shape == (40, 56)
        valid = depth > 0
        assert valid.mean() > 0.9 and depth[valid].min() >= 0.5 and depth.max() <= 10.0
        cam, objs = src.scene(i)
        _, exact = render_depth(cam, objs, (40, 56))
        np.testing.assert_allclose(depth[valid], exact[valid], rtol=1e-6)
        np.testing.assert_array_equal(src[i][0], img)  # deterministic
    assert not np.array_equal(src[0][1], depth_scenes(4, size=(40, 56), seed=4)[0][1])


# --- folders ------------------------------------------------------------------------------------


def _write_seg_folder(root, splits=("training", "validation"), n=3, k=6, fmt="jpg"):
    rng = np.random.default_rng(0)
    for split in splits:
        sub = [split] if split else []
        os.makedirs(os.path.join(root, "images", *sub), exist_ok=True)
        os.makedirs(os.path.join(root, "annotations", *sub), exist_ok=True)
        for i in range(n):
            h, w = 20 + 3 * i, 30 + i
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            lab = rng.integers(0, k, (h, w), dtype=np.uint8)
            lab[0, :4] = 255
            Image.fromarray(img).save(os.path.join(root, "images", *sub, f"x{i}.{fmt}"))
            Image.fromarray(lab).save(os.path.join(root, "annotations", *sub, f"x{i}.png"))
    return root


def test_folder_source_reads_ade20k_layout(tmp_path):
    root = _write_seg_folder(str(tmp_path))
    src = DenseFolderSource(root, "val", num_classes=6)
    assert len(src) == 3 and src.name(1) == "x1.jpg" and src.num_classes == 6
    img, lab = src[1]
    assert img.shape == (23, 31, 3) and img.dtype == np.uint8
    raw = np.asarray(Image.open(tmp_path / "annotations/validation/x1.png"))
    np.testing.assert_array_equal(lab, raw)
    np.testing.assert_array_equal(
        img, np.asarray(Image.open(tmp_path / "images/validation/x1.jpg"))
    )
    # mmseg's reduce_zero_label: 0 -> 255, v -> v - 1, 255 stays 255
    red = DenseFolderSource(root, "val", num_classes=5, reduce_zero_label=True)[1][1]
    expect = np.where(raw == 0, 255, np.where(raw == 255, 255, raw.astype(np.int16) - 1))
    np.testing.assert_array_equal(red, expect.astype(np.uint8))
    assert dense_source(root, "val").task == "seg"  # detected from the 8-bit annotations


def test_folder_source_errors_name_the_file(tmp_path):
    root = _write_seg_folder(str(tmp_path), k=6)
    with pytest.raises(ValueError, match=r"label map .*x0\.png holds class 5 .* 5 classes"):
        DenseFolderSource(root, "train", num_classes=5)[0]
    with pytest.raises(ValueError, match="no split 'test'.*training, validation"):
        DenseFolderSource(root, "test")
    os.remove(tmp_path / "annotations/training/x2.png")
    with pytest.raises(ValueError, match=r"image .*training/x2\.jpg' has no annotation x2\.png"):
        DenseFolderSource(root, "train")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "annotations/validation/x0.png")
    with pytest.raises(
        ValueError, match=r"annotation .*x0\.png is 5x5 but image .*x0\.jpg is 20x30"
    ):
        DenseFolderSource(root, "val")[0]
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(
        tmp_path / "annotations/validation/x0.png"
    )
    with pytest.raises(ValueError, match=r"label map .*x0\.png has image mode 'RGB'"):
        DenseFolderSource(root, "val")[0]
    with pytest.raises(ValueError, match="expected the subfolders images/ and annotations/"):
        DenseFolderSource(tmp_path / "annotations", None)


def test_depth_folder_png_mm_and_npy(tmp_path):
    for d in ("images", "annotations"):
        os.makedirs(tmp_path / d)
    rng = np.random.default_rng(0)
    mm = rng.integers(0, 10000, (16, 20)).astype(np.uint16)
    metres = rng.uniform(0, 5, (16, 20)).astype(np.float32)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(
            tmp_path / f"images/{name}.png"
        )
    Image.fromarray(mm).save(tmp_path / "annotations/a.png")
    np.save(tmp_path / "annotations/b.npy", metres)
    src = dense_source(str(tmp_path), npy_scale=2.0, depth_range=(0.1, 10.0))
    assert src.task == "depth" and src.depth_range == (0.1, 10.0)
    np.testing.assert_allclose(src[0][1], mm * 1e-3, rtol=1e-6)
    np.testing.assert_allclose(src[1][1], metres * 2.0, rtol=1e-6)
    assert src[0][1].dtype == np.float32


# --- TFDS ---------------------------------------------------------------------------------------


def test_tfds_builder_round_trip_matches_folder(tmp_path):
    from dinojax.dense.data.tfds_dense import main

    root = _write_seg_folder(str(tmp_path / "ade"), k=7)
    data_dir = str(tmp_path / "tfds")
    args = [root, "--data-dir", data_dir, "--name", "tiny_ade", "--reduce-zero-label"]
    assert main([*args, "--num-classes", "6"]) == 0
    for split, tsplit in (("train", "tfds:tiny_ade"), ("val", "tfds:tiny_ade:validation")):
        folder = DenseFolderSource(root, split, num_classes=6, reduce_zero_label=True)
        tf = dense_source(tsplit, split, data_dir=data_dir, task="seg")
        assert len(tf) == len(folder) == 3 and tf.num_classes == 6
        for i in range(3):
            (fi, fl), (ti, tl) = folder[i], tf[i]
            assert tf.name(i) == folder.name(i)
            assert ti.dtype == fi.dtype and tl.dtype == fl.dtype == np.uint8
            np.testing.assert_array_equal(ti, fi)
            np.testing.assert_array_equal(tl, fl)
    # a label >= K fails the build naming the file, and nothing is prepared
    assert main([*args[:3], "--name", "bad_ade", "--num-classes", "5"]) == 1
    assert sorted(os.listdir(tmp_path / "tfds")) == ["tiny_ade"]


def test_tfds_depth_round_trip(tmp_path):
    from dinojax.dense.data import build_dense_tfds

    root = tmp_path / "nyu"
    for d in ("images", "annotations"):
        os.makedirs(root / d)
    rng = np.random.default_rng(2)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (12 + i, 18, 3), dtype=np.uint8)).save(
            root / f"images/{i}.jpg"
        )
        Image.fromarray(rng.integers(1, 9000, (12 + i, 18)).astype(np.uint16)).save(
            root / f"annotations/{i}.png"
        )
    build_dense_tfds(root, tmp_path / "tfds", "tiny_nyu", task="depth", depth_range=(0.001, 10))
    tf = dense_source("tfds:tiny_nyu", data_dir=str(tmp_path / "tfds"), task="depth")
    folder = DenseFolderSource(root, task="depth")
    assert tf.depth_range == (0.001, 10)
    for i in range(2):
        np.testing.assert_array_equal(tf[i][0], folder[i][0])
        np.testing.assert_array_equal(tf[i][1], folder[i][1])
        assert tf[i][1].dtype == np.float32


# --- spec strings -------------------------------------------------------------------------------


def test_dense_source_specs():
    s = dense_source("digits:5:32", "train")
    assert len(s) == 5 and s[0][0].shape == (32, 32, 3)
    v = dense_source("digits:5:32", "val")
    assert not np.array_equal(s[0][0], v[0][0])  # splits are different scenes
    d = dense_source("depthscenes:2:24x40", "val", task="depth")
    assert d[0][1].shape == (24, 40) and d.depth_range == (0.5, 10.0)
    assert len(dense_source("depthscenes")) == 300
    for spec, msg in [
        ("digits:x", "N 'x' is not an int"),
        ("digits:3:big", "size 'big' is not an int or HxW"),
        ("nope", "unknown dense dataset 'nope'"),
        ("folder:", "needs a path"),
    ]:
        with pytest.raises(ValueError, match=msg):
            dense_source(spec)
    with pytest.raises(ValueError, match="holds segmentation targets, expected depth"):
        dense_source("digits:3", task="depth")
    with pytest.raises(ValueError, match="splits train, val, test; got 'dev'"):
        dense_source("digits:3", "dev")


def test_scene_cache_returns_fresh_copies_and_pickles_empty():
    import pickle

    src = digit_scenes(3, size=32, seed=0)
    assert src.cache  # small: cached by default
    img, lab = src[1]
    img[:] = 0
    lab[:] = 7
    again = src[1]
    assert again[0].any() and not (again[1] == 7).all()
    clone = pickle.loads(pickle.dumps(src))
    assert clone._items == {}
    np.testing.assert_array_equal(clone[1][0], again[0])
    big = depth_scenes(10_000, size=224)
    assert not big.cache
    np.testing.assert_array_equal(depth_scenes(2, 32, cache=False)[1][1], depth_scenes(2, 32)[1][1])


def test_tfds_source_pickles_for_workers(tmp_path):
    import pickle

    from dinojax.dense.data import build_dense_tfds

    root = _write_seg_folder(str(tmp_path / "ade"), splits=(None,), n=2)
    build_dense_tfds(root, tmp_path / "tfds", "pick_ade", num_classes=6)
    src = dense_source("tfds:pick_ade", data_dir=str(tmp_path / "tfds"))
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone[1][1], src[1][1])
    assert clone.name(1) == "x1.jpg" and len(clone) == 2


def test_spec_options(tmp_path):
    from dinojax.dense.data import parse_options

    assert parse_options(
        "folder:/d?num_classes=150&reduce_zero_label=true&depth_range=0.001-10"
    ) == ("folder:/d", {"num_classes": 150, "reduce_zero_label": True, "depth_range": (0.001, 10)})
    assert parse_options("digits:3?colour_cue=false&scale=0.3-0.4")[1] == {
        "colour_cue": False, "scale": (0.3, 0.4)
    }  # fmt: skip
    root = _write_seg_folder(str(tmp_path), k=6)
    src = dense_source(f"folder:{root}?num_classes=5&reduce_zero_label=true", "val")
    assert src.num_classes == 5 and src.reduce_zero_label
    assert dense_source("depthscenes:2:32?depth_range=1-20").depth_range == (1.0, 20.0)
    assert not dense_source("digits:2:32?colour_cue=off").colour_cue
    with pytest.raises(ValueError, match="option 'bogus=1' is not key=value with a key of"):
        dense_source("digits:2?bogus=1")
    with pytest.raises(ValueError, match="num_classes: option value 'many' is not a number"):
        dense_source(f"{root}?num_classes=many")


def test_the_cli_dataset_strings_resolve_here(tmp_path):
    from dinojax.eval import depth as depth_cli
    from dinojax.eval import segment as seg_cli

    seg = seg_cli.resolve_source("digits:3:28", "val")
    assert seg.num_classes == 11 and seg[0][1].shape == (28, 28)
    root = _write_seg_folder(str(tmp_path), k=6)
    ade = seg_cli.resolve_source(f"folder:{root}?num_classes=5&reduce_zero_label=true", "train")
    assert ade.num_classes == 5 and ade[0][1].max() == 255
    dep = depth_cli._dense_source("depthscenes:2:28", "train", None)
    assert dep.depth_range == (0.5, 10.0)
    with pytest.raises(ValueError, match="holds segmentation targets, expected depth"):
        depth_cli._dense_source("digits:2", "train", None)
