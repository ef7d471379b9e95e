"""Released depth heads <-> head directories: exact round trips, detection, strict one-line errors,
head / backbone mismatches."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import depth_reference as R
import numpy as np
import pytest
import torch

from dinojax.convert import dense
from dinojax.convert.backbone import ConversionError
from dinojax.convert.dense_depth import from_official, to_official

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("convert_weights", ROOT / "convert_weights.py")
convert_weights = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_weights)


def _convert(capsys, *argv) -> tuple[int, str]:
    code = convert_weights.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _sd(kind: str, d: int = 384, seed: int = 0) -> dict:
    head = (
        R.DPTHead(d, 0.001, 10.0)
        if kind == "dpt"
        else R.BNHead(d, 4 if kind == "linear4" else 1, 0.001, 10.0)
    )
    R.randomize_head_(head, seed)
    return {k: v.numpy() for k, v in R.official_state_dict(head).items()}


@pytest.mark.parametrize("kind", ["linear", "linear4", "dpt"])
def test_round_trip_is_exact(kind):
    sd = _sd(kind)
    params, cfg = from_official(sd, None, f"dinov2_vits14_kitti_{kind}_head.pth")
    assert cfg["type"] == kind and cfg["embed_dim"] == 384
    assert cfg["out_index"] == ([11] if kind == "linear" else [2, 5, 8, 11])
    assert (cfg["dataset"], cfg["min_depth"], cfg["max_depth"]) == ("kitti", 0.001, 80.0)
    back = to_official(params, cfg)
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_convert_weights_cli_round_trip(tmp_path, capsys):
    """convert_weights.py: released .pth -> head directory -> released .pth, bit-exact."""
    sd = _sd("dpt", seed=1)
    src = tmp_path / "dinov2_vits14_nyu_dpt_head.pth"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, src)
    code, err = _convert(capsys, src, tmp_path / "head")
    assert code == 0, err
    meta = dense.read_head_meta(tmp_path / "head")
    assert meta["task"] == "depth" and meta["head"]["type"] == "dpt"
    assert meta["head"]["max_depth"] == 10.0
    code, err = _convert(capsys, tmp_path / "head", tmp_path / "back.pth")
    assert code == 0, err
    back = torch.load(tmp_path / "back.pth", weights_only=True)["state_dict"]
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k].numpy(), sd[k], err_msg=k)


def test_linear_or_linear4_from_arch_or_name():
    """3072 input channels: a ViT-g linear head or a ViT-S linear4 head."""
    sd = {
        "decode_head.conv_depth.weight": np.zeros((256, 3072, 1, 1), np.float32),
        "decode_head.conv_depth.bias": np.zeros(256, np.float32),
    }
    with pytest.raises(
        ConversionError,
        match="linear head of width 1536 or a linear4 head of width 384: pass --arch",
    ):
        from_official(sd, None, "head.pth")
    assert from_official(sd, None, "dinov2_vits14_nyu_linear4_head.pth")[1]["embed_dim"] == 384
    _, cfg = from_official(sd, "dinov2_vitg14", None)
    assert (cfg["type"], cfg["out_index"]) == ("linear", [39])
    _, cfg = from_official(sd, "dinov2_vits14", None)
    assert (cfg["type"], cfg["out_index"], cfg["max_depth"]) == ("linear4", [2, 5, 8, 11], None)


BAD = {
    "missing": (
        lambda sd: sd.pop("decode_head.fusion_blocks.2.res_conv_unit1.conv2.conv.weight"),
        "missing ['decode_head.fusion_blocks.2.res_conv_unit1.conv2.conv.weight']",
    ),
    "unexpected": (
        lambda sd: sd.update({"decode_head.bn.weight": np.zeros(3, np.float32)}),
        "unexpected ['decode_head.bn.weight']",
    ),
    "misshaped": (
        lambda sd: sd.update({"decode_head.project.conv.bias": np.zeros(5, np.float32)}),
        "mis-shaped decode_head.project.conv.bias (5,) (expected (256,))",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_fail_in_one_line_and_write_nothing(tmp_path, capsys, case):
    sd = _sd("dpt")
    BAD[case][0](sd)
    src = tmp_path / "dinov2_vits14_nyu_dpt_head.pth"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, src)
    code, err = _convert(capsys, src, tmp_path / "out")
    assert code == 2
    assert err.count("\n") == 1 and BAD[case][1] in err, err
    assert not (tmp_path / "out").exists()


def test_head_backbone_mismatch_names_both(tmp_path):
    from dinojax.dense import load_depther
    from dinojax.models import create_model

    path = tmp_path / "dinov2_vitb14_nyu_linear_head.pth"
    torch.save(
        {"state_dict": {k: torch.from_numpy(v) for k, v in _sd("linear", 768).items()}}, path
    )
    small = create_model("dinov2_vits14", depth=12)
    with pytest.raises(
        ConversionError,
        match=r"dinov2_vitb14_nyu_linear_head.pth.*does not match "
        r"backbone dinov2_vits14 \(width 384",
    ):
        load_depther(small, path)
    path = tmp_path / "dinov2_vits14_nyu_dpt_head.pth"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in _sd("dpt").items()}}, path)
    reg = create_model("dinov2_vits14_reg", depth=1)  # fails before any block runs
    with pytest.raises(
        ConversionError,
        match=r"dinov2_vits14_nyu_dpt_head.pth \(dpt\) was "
        r"released for non-register backbones, not dinov2_vits14_reg",
    ):
        load_depther(reg, path)
    # a head whose file name does not say the dataset needs the range
    unnamed = tmp_path / "depth.pth"
    unnamed.write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="depth range of .*depth.pth is unknown"):
        load_depther(small, unnamed)
    assert load_depther(small, unnamed, dataset="kitti").max_depth == 80.0
    with pytest.raises(ConversionError, match="no such head"):
        load_depther(small, tmp_path / "nope.pth")
