"""Patch-PCA and attention pictures: PCA logic, attention rows, PNG files, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageDraw

from dinojax.eval import pictures
from dinojax.eval.transforms import normalize

# NNX modules are pytrees: one compiled call instead of op-by-op execution.
_last_attention = jax.jit(lambda model, x: model.get_last_self_attention(x))


def _scene(path, w=90, h=60):
    """A smooth background with two flat objects (objects = 'foreground')."""
    y = np.mgrid[0:h, 0:w][0]
    bg = np.stack([120 + 40 * y / h, 170 + 30 * y / h, np.full((h, w), 220.0)], -1)
    img = Image.fromarray(bg.astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse((15, 12, 45, 42), fill=(200, 40, 30))
    d.rectangle((55, 20, 75, 50), fill=(40, 160, 60))
    img.save(path)
    return path


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_patch_pca_separates_foreground(sign):
    rng = np.random.default_rng(0)
    d = 16
    # Like real features: objects share a strong "foreground" direction u and differ by smaller
    # object-specific offsets; the background is one tight cluster.
    a, u, v1, v2 = rng.normal(size=(4, d))
    grid = np.tile(3 * a, (6, 7, 1)) + 0.01 * rng.normal(size=(6, 7, d))
    grid[2:4, 2:4] = 3 * a + 4 * u + v1 + 0.1 * rng.normal(size=(2, 2, d))
    grid[2:5, 5] = 3 * a + 4 * u + v2 + 0.1 * rng.normal(size=(3, d))
    pic = pictures.patch_pca([sign * grid], threshold=0.5)[0]
    fg = np.zeros((6, 7), bool)
    fg[2:4, 2:4] = True
    fg[2:5, 5] = True
    assert pic.shape == (6, 7, 3) and pic.min() >= 0 and pic.max() <= 1
    assert np.all(pic[~fg] == 0)  # background removed
    assert pic[fg].std() > 0.1
    np.testing.assert_array_equal(pictures.foreground_masks([sign * grid])[0], fg)
    # Without background removal every patch gets a colour.
    full = pictures.patch_pca([grid], remove_background=False)[0]
    assert np.count_nonzero(full.max(axis=-1)) > 40
    # Two images share one PCA: colours are comparable, shapes preserved.
    two = pictures.patch_pca([grid, grid[:4, :5]])
    assert [p.shape for p in two] == [(6, 7, 3), (4, 5, 3)]


def test_attention_maps_are_the_cls_row(tiny_model, tmp_path):
    path = _scene(tmp_path / "s.png")
    maps = pictures.attention_maps(tiny_model, path, size=56)  # 60x90 -> 56x84 (4x6 patches)
    img = pictures.prepare_image(path, 14, 56)
    assert img.size == (84, 56) and maps.shape == (2, 4, 6)
    full = _last_attention(tiny_model, jnp.asarray(normalize(img)[None]))
    np.testing.assert_allclose(maps.reshape(2, -1), np.asarray(full)[0, :, 0, 1:], atol=1e-6)
    assert np.all(maps.reshape(2, -1).sum(-1) < 1.0)  # the CLS->CLS share is left out


def test_attention_mass_masks_match_dino_recipe():
    """vs the torch steps of DINO's visualize_attention.py (sort, normalise, cumsum > 1 - t,
    unsort with argsort)."""
    import torch

    maps = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32) ** 3
    for t in (0.3, 0.6, 1.0):
        att = torch.from_numpy(maps.reshape(3, -1))
        val, idx = torch.sort(att)
        val /= torch.sum(val, dim=1, keepdim=True)
        th = torch.cumsum(val, dim=1) > (1 - t)
        idx2 = torch.argsort(idx)
        ref = torch.stack([th[h][idx2[h]] for h in range(3)]).numpy().reshape(3, 4, 5)
        got = pictures.attention_mass_masks(maps, t)
        np.testing.assert_array_equal(got, ref)
        kept = (maps * got).reshape(3, -1).sum(1) / maps.reshape(3, -1).sum(1)
        assert np.all(kept >= t - 1e-6)
    with pytest.raises(ValueError, match="mass"):
        pictures.attention_mass_masks(maps, 0.0)


def test_attention_excludes_registers(tmp_path, random_model):
    reg = random_model("dinov2_vits14_reg", depth=1, embed_dim=32, num_heads=2, img_size=28)
    maps = pictures.attention_maps(reg, _scene(tmp_path / "s.png"), size=28)  # 2x3 patches
    assert maps.shape == (2, 2, 3)
    x = jnp.asarray(normalize(pictures.prepare_image(tmp_path / "s.png", 14, 28))[None])
    full = np.asarray(_last_attention(reg, x))[0, :, 0]
    np.testing.assert_allclose(maps.reshape(2, -1), full[:, 5:], atol=1e-6)  # 1 CLS + 4 regs


def test_pictures_written(tiny_model, tmp_path):
    a = _scene(tmp_path / "a.png")
    b = _scene(tmp_path / "b.jpg", w=70, h=100)
    out = tmp_path / "out"
    paths = pictures.pca_pictures(tiny_model, [a, b], out, size=56)
    paths += pictures.attention_pictures(tiny_model, [a, b], out, size=56, cols=3)
    masked = pictures.attention_pictures(tiny_model, [a], tmp_path / "m", size=56, mass=0.6)
    assert Image.open(masked[0]).size == (4 * 84, 56)  # 4 panels in one row (cols=4)
    assert [p.name for p in paths] == [
        "a_pca.png",
        "b_pca.png",
        "a_attention.png",
        "b_attention.png",
    ]
    sizes = {p.name: Image.open(p).size for p in paths}
    # a: 60x90 -> 56x84; b: 100x70 -> 84x56 (width, height below)
    assert sizes["a_pca.png"] == (2 * 84, 56) and sizes["b_pca.png"] == (2 * 56, 84)
    # attention: panels = image + mean + 2 heads = 4 -> 3 columns, 2 rows
    assert sizes["a_attention.png"] == (3 * 84, 2 * 56)
    for p in paths:
        arr = np.asarray(Image.open(p).convert("RGB"), np.float64)
        assert arr.std() > 5  # not constant
        w = arr.shape[1] // 2
        if p.name.endswith("_pca.png"):
            assert arr[:, w:].std() > 5  # the PCA half itself is not constant
    # Every attention panel (mean and each head) carries its own non-constant heat map: undo the
    # overlay (panel = 0.4 image + 0.6 heat) and check the heat itself varies, panel by panel.
    for p, (h, w), alpha in ((paths[2], (56, 84), 0.6), (paths[3], (84, 56), 0.6)):
        _check_heat_panels(np.asarray(Image.open(p).convert("RGB"), np.float64), h, w, 3, 3, alpha)
    _check_heat_panels(np.asarray(Image.open(masked[0]).convert("RGB"), np.float64), 56, 84, 4, 3,
                       0.6)  # fmt: skip


def _check_heat_panels(canvas, h, w, cols, n_maps, alpha):
    panels = [canvas[(i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w]
              for i in range(1 + n_maps)]  # fmt: skip
    base = panels[0]
    assert base.std() > 5
    for i, panel in enumerate(panels[1:], 1):
        heat = (panel - (1 - alpha) * base) / alpha
        assert heat.std() > 10, f"panel {i} shows a constant map"
        assert np.abs(panel - base).mean() > 5, f"panel {i} is the bare image"


def test_cli_and_bad_input(tmp_path, capsys, tiny_checkpoint):
    common = ["--checkpoint", tiny_checkpoint]
    out = tmp_path / "o"
    assert pictures.main([*common, "--data", "digits:test", "--count", "2", "--out", str(out),
                          "--size", "28"]) == 0  # fmt: skip
    assert len(list(out.glob("*_pca.png"))) == 2 and len(list(out.glob("*_attention.png"))) == 2
    capsys.readouterr()
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for args, msg in (
        (["--images", str(tmp_path / "broken.png")], "cannot decode image"),
        (["--images", str(tmp_path / "missing.jpg")], "cannot read image"),
        ([], "give either --images"),
    ):
        rc = pictures.main([*common, *args, "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err
