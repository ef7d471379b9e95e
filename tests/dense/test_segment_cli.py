"""`python -m dinojax.eval.segment`: --help, predict pictures, train + evaluate wiring, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_seg_train import SMALL, Stripes

from dinojax.dense.seg_pictures import ADE20K_CLASSES, palette
from dinojax.eval import segment as cli


def test_help_lists_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "dinojax.eval.segment", "--help"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert all(c in out for c in ("predict", "train", "evaluate"))


def test_palettes():
    voc = palette(21, "voc2012")
    assert voc[0].tolist() == [0, 0, 0] and voc[1].tolist() == [128, 0, 0]
    assert voc[15].tolist() == [192, 128, 128]  # person, the PASCAL colour map
    ade = palette(150, "ade20k")
    assert len({tuple(c) for c in ade}) == 150 and ADE20K_CLASSES[12] == "person"


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    from dinojax.convert.checkpoint import save_model
    from dinojax.models import create_model

    path = tmp_path_factory.mktemp("bb") / "tiny"
    save_model(path, create_model("dinov2_vits14", depth=2, embed_dim=64, num_heads=1, seed=0))
    return str(path)


def test_predict_writes_overlay_pictures(backbone_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"decode_head.bn.weight": torch.ones(64), "decode_head.bn.bias": torch.zeros(64),
          "decode_head.bn.running_mean": torch.zeros(64), "decode_head.bn.running_var":
          torch.ones(64), "decode_head.bn.num_batches_tracked": torch.tensor(0),
          "decode_head.conv_seg.weight": torch.randn(21, 64, 1, 1, generator=g),
          "decode_head.conv_seg.bias": torch.zeros(21)}  # fmt: skip
    torch.save({"state_dict": sd}, tmp_path / "head.pth")
    Image.fromarray(Stripes(1)[0][0]).save(tmp_path / "a.png")
    rc = cli.main(["predict", "--checkpoint", backbone_dir, "--head", str(tmp_path / "head.pth"),
                   "--images", str(tmp_path / "a.png"), "--out", str(tmp_path / "out"),
                   "--mode", "slide", "--no-resize", "--crop-size", "28", "--stride", "14",
                   "--save-labels"])  # fmt: skip
    assert rc == 0
    pic = Image.open(tmp_path / "out" / "a_seg.png")
    assert pic.size[0] > 2 * 56 and pic.size[1] >= 42  # image | overlay | legend
    labels = np.asarray(Image.open(tmp_path / "out" / "a_labels.png"))
    assert labels.shape == (42, 56) and labels.max() < 21


def test_train_then_evaluate(backbone_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        cli,
        "resolve_source",
        lambda spec, split, data_dir=None: Stripes(8, seed=int(split == "val")),
    )
    small = {k: v for k, v in SMALL.items() if not k.startswith("eval_") and k != "warmup_iters"}
    argv = ["train", "--checkpoint", backbone_dir, "--train", "stripes", "--val", "stripes",
            "--num-classes", "3", "--out", str(tmp_path / "run"), "--iters", "12",
            "--warmup-iters", "3", "--no-eval-resize", "--eval-crop-size", "42",
            "--eval-stride", "28", "--no-progress"]  # fmt: skip
    for k, v in small.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag, *map(str, v)] if isinstance(v, tuple) else [flag, str(v)]
    assert cli.main(argv) == 0
    assert "mIoU" in capsys.readouterr().out
    assert (tmp_path / "run" / "head" / "dinojax.json").is_file()
    rc = cli.main(["evaluate", "--checkpoint", backbone_dir, "--head", str(tmp_path / "run/head"),
                   "--data", "stripes", "--no-resize", "--crop-size", "42", "--stride", "28",
                   "--output", str(tmp_path / "ev.json"), "--no-progress"])  # fmt: skip
    assert rc == 0
    res = json.loads((tmp_path / "ev.json").read_text())["segmentation"]
    assert 0 <= res["mIoU"] <= 100 and len(res["IoU"]) == 3


def test_bad_input_is_one_error_line(backbone_dir, tmp_path, capsys):
    argv = ["predict", "--checkpoint", backbone_dir, "--head", str(tmp_path / "no.pth"),
            "--images", str(tmp_path / "none.png"), "--out", str(tmp_path / "o")]  # fmt: skip
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: no such image") and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_convert_weights_cli_round_trip(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("convert_weights", root / "convert_weights.py")
    cw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cw)
    g = torch.Generator().manual_seed(3)
    c, k = 4 * 384, 150  # ambiguous width (ViT-g linear or ViT-S ms): --arch decides
    sd = {"decode_head.bn.weight": torch.randn(c, generator=g), "decode_head.bn.bias":
          torch.randn(c, generator=g), "decode_head.bn.running_mean": torch.randn(c, generator=g),
          "decode_head.bn.running_var": torch.rand(c, generator=g),
          "decode_head.bn.num_batches_tracked": torch.tensor(80000),
          "decode_head.conv_seg.weight": torch.randn(k, c, 1, 1, generator=g),
          "decode_head.conv_seg.bias": torch.randn(k, generator=g)}  # fmt: skip
    torch.save({"state_dict": sd}, tmp_path / "head.pth")
    assert cw.main([str(tmp_path / "head.pth"), str(tmp_path / "d")]) != 0
    err = capsys.readouterr().err
    assert "--arch" in err and not (tmp_path / "d").exists()
    src, dst = str(tmp_path / "head.pth"), str(tmp_path / "d")
    assert cw.main([src, dst, "--arch", "dinov2_vits14"]) == 0
    meta = json.loads((tmp_path / "d" / "dinojax.json").read_text())
    assert meta["head"]["type"] == "ms" and meta["head"]["layers"] == [8, 9, 10, 11]
    assert cw.main([str(tmp_path / "d"), str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(back[n], v) for n, v in sd.items()) and set(back) == set(sd)
