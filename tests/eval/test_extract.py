"""Feature extraction to .npy files: contents, shapes, metadata, command line, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from reference import official_state_dict, official_vit

from dinojax.data.sources import DigitsSource
from dinojax.eval import extract, features
from dinojax.eval.transforms import EvalTransform, ResizeTransform


def test_extract_to_dir(tiny_model, tmp_path):
    out = tmp_path / "feats"
    idx = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]  # 11 rows (repeats allowed): one padded batch of 16
    t = ResizeTransform(42, 70)  # non-square, 3x5 patches
    meta = extract.extract_to_dir(
        tiny_model, "digits:test", out, cls=True, patch=True, layers=(0, 1), layer_patches=True,
        transform=t, batch_size=16, indices=idx, progress=False,
    )  # fmt: skip
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(
        ["cls.npy", "patch.npy", "layers_cls.npy", "layers_patch.npy", "labels.npy", "keys.txt",
         "meta.json"]
    )  # fmt: skip
    arrays = {p.stem: np.load(p) for p in out.glob("*.npy")}
    assert arrays["cls"].shape == (11, 64) and arrays["patch"].shape == (11, 3, 5, 64)
    assert arrays["layers_cls"].shape == (11, 2, 64)
    assert arrays["layers_patch"].shape == (11, 2, 3, 5, 64)
    np.testing.assert_array_equal(arrays["labels"], DigitsSource("test").labels[idx])
    assert (out / "keys.txt").read_text().split() == [str(i) for i in idx]
    m = json.loads((out / "meta.json").read_text())
    assert m == json.loads(json.dumps(meta)) and m["layers"] == [0, 1] and m["count"] == 11
    # Same numbers as in-memory extraction; the last layer's norm output is the final output.
    ref, _ = features.extract_features(
        tiny_model, "digits:test", features.Tokens(cls=True, patch=True), transform=t,
        batch_size=8, indices=idx, progress=False,
    )  # fmt: skip
    np.testing.assert_allclose(arrays["cls"], ref["cls"], atol=1e-5)
    np.testing.assert_allclose(arrays["layers_patch"][:, 1], ref["patch"], atol=1e-5)
    np.testing.assert_allclose(arrays["layers_cls"][:, 1], ref["cls"], atol=1e-5)
    with pytest.raises(ValueError, match="not empty"):
        extract.extract_to_dir(tiny_model, "digits:test", out, transform=t, indices=[0])


def test_cli_checkpoint_dir_and_official_pth(tmp_path, capsys, tiny_checkpoint):
    out = tmp_path / "a"
    rc = extract.main(["--checkpoint", tiny_checkpoint, "--data", "digits:test", "--out", str(out),
                       "--size", "28", "42", "--patch", "--layers", "1", "--max-items", "5",
                       "--no-progress"])  # fmt: skip
    assert rc == 0 and "wrote" in capsys.readouterr().out
    assert np.load(out / "patch.npy").shape == (5, 2, 3, 32)
    assert np.load(out / "layers_cls.npy").shape == (5, 1, 32)
    # An official hub-style .pth is converted in memory (strict) and gives the same features.
    from dinojax.models.config import get_config

    cfg = get_config("dinov2_vits14", depth=1, embed_dim=64, num_heads=1, img_size=28)
    ref = official_vit(cfg, seed=5)
    torch.save(official_state_dict(ref, cfg), tmp_path / "m.pth")
    rc = extract.main(["--checkpoint", str(tmp_path / "m.pth"), "--data", "digits:test", "--out",
                       str(tmp_path / "b"), "--image-size", "28", "--max-items", "3",
                       "--no-progress"])  # fmt: skip
    assert rc == 0
    # digits are 64 px: the eval transform at crop 28 resizes to 32 and center-crops 28
    x = np.stack([EvalTransform.for_crop(28)(DigitsSource("test").images[i]) for i in range(3)])
    with torch.no_grad():
        expect = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    got = np.load(tmp_path / "b" / "cls.npy")
    # float32 on both sides, outputs of magnitude ~5: measured max abs diff 1.4e-6
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", "30"], "not a multiple of the patch size 14"),
        (["--layers", "7"], "out of range"),
        (["--layer-patches"], "need layers"),
        (["--no-cls"], "nothing to extract"),
    ],
)
def test_cli_errors(args, message, tmp_path, capsys, tiny_checkpoint):
    rc = extract.main(["--checkpoint", tiny_checkpoint, "--data", "digits:test", "--out",
                       str(tmp_path / "o"), "--no-progress", *args])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()  # nothing written on error
    assert not list(tmp_path.glob(".o.partial*"))
