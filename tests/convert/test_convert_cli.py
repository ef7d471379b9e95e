"""`python convert_weights.py` on bad input: exit code != 0, one `error:` line naming the problem,
no traceback, and nothing written (no DST, no temp files next to it)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import small_config

from dinojax.convert.backbone import expected_official_shapes, to_hf
from dinojax.convert.checkpoint import save_model
from dinojax.models.vit import create_model

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("convert_weights", REPO / "convert_weights.py")
convert_weights = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_weights)


def _official_sd(cfg=None, seed=0) -> dict[str, torch.Tensor]:
    cfg = cfg or small_config(depth=2)
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in expected_official_shapes(cfg).items()}


def _run(capsys, *argv) -> str:
    """main() in-process; returns the single stderr line."""
    code = convert_weights.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code != 0, out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _nothing_written(directory: Path, before: set[str]) -> None:
    assert set(os.listdir(directory)) == before, sorted(set(os.listdir(directory)) - before)


@pytest.fixture
def src(tmp_path):
    torch.save(_official_sd(), tmp_path / "model.pth")
    return tmp_path / "model.pth"


def test_good_file_converts(tmp_path, src, capsys):
    assert convert_weights.main([str(src), str(tmp_path / "ok")]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "ok" / "dinojax.json").is_file()


def test_missing_unexpected_and_wrong_shape_keys_are_all_named(tmp_path, capsys):
    sd = _official_sd()
    del sd["blocks.1.mlp.fc2.bias"]
    del sd["norm.weight"]
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(384, 100)
    sd["blocks.1.ls1.gamma"] = torch.zeros(7)
    sd["head.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bad.pth")
    before = set(os.listdir(tmp_path))
    line = _run(capsys, tmp_path / "bad.pth", tmp_path / "out")
    for want in ("blocks.1.mlp.fc2.bias: expected (128,)", "norm.weight: expected (128,)",
                 "head.weight: got (3,)",
                 "blocks.0.attn.qkv.weight: got (384, 100), expected (384, 128)",
                 "blocks.1.ls1.gamma: got (7,), expected (128,)"):  # fmt: skip
        assert want in line, (want, line)
    assert "missing keys" in line and "unexpected keys" in line and "wrong shapes" in line
    _nothing_written(tmp_path, before)


def test_wrong_arch_is_a_strict_error(tmp_path, src, capsys):
    line = _run(capsys, src, tmp_path / "out", "--arch", "dinov2_vits14")
    assert "missing keys" in line and "blocks.11.attn.qkv.weight" in line
    assert "expected (384,)" in line  # e.g. norm.weight got (128,)
    assert not (tmp_path / "out").exists()


def test_unknown_arch_name(tmp_path, src, capsys):
    line = _run(capsys, src, tmp_path / "out", "--arch", "dinov2_vitz14")
    assert "unknown architecture 'dinov2_vitz14'" in line


def test_ambiguous_architecture_needs_arch(tmp_path, capsys):
    # Width 96: the head count is not visible in the weights (every official model has head
    # dim 64, and 96 is not a multiple of it).
    sd = _official_sd(small_config(embed_dim=96, num_heads=3, depth=1))
    torch.save(sd, tmp_path / "w96.pth")
    line = _run(capsys, tmp_path / "w96.pth", tmp_path / "out")
    assert "cannot infer the head count" in line and "--arch" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name,content",
    [
        ("random.pth", np.random.default_rng(0).bytes(4096)),
        ("notes.pth", b"this is a text file, not a checkpoint\n" * 20),
        ("random.safetensors", np.random.default_rng(1).bytes(4096)),
        ("empty.pth", b""),
    ],
)
def test_not_a_checkpoint(tmp_path, capsys, name, content):
    (tmp_path / name).write_bytes(content)
    before = set(os.listdir(tmp_path))
    line = _run(capsys, tmp_path / name, tmp_path / "out")
    assert name in line and ("not a readable" in line or "is empty" in line), line
    _nothing_written(tmp_path, before)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(tmp_path, capsys, suffix):
    from safetensors.torch import save_file

    full = tmp_path / f"full{suffix}"
    sd = _official_sd()
    torch.save(sd, full) if suffix == ".pth" else save_file(sd, str(full))
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    before = set(os.listdir(tmp_path))
    line = _run(capsys, cut, tmp_path / "out")
    assert f"cut{suffix} is not a readable" in line, line
    _nothing_written(tmp_path, before)


def test_a_tensor_instead_of_a_state_dict(tmp_path, capsys):
    torch.save(torch.zeros(3), tmp_path / "t.pth")
    assert "holds a Tensor, not a state dict" in _run(capsys, tmp_path / "t.pth", tmp_path / "o")


def test_unknown_extension_in_and_out(tmp_path, src, capsys):
    (tmp_path / "weights.npz").write_bytes(b"PK\x03\x04")
    line = _run(capsys, tmp_path / "weights.npz", tmp_path / "out")
    assert "unknown checkpoint format '.npz'" in line
    save_model(tmp_path / "ckpt", create_model(small_config(depth=1)))
    before = set(os.listdir(tmp_path))
    line = _run(capsys, tmp_path / "ckpt", tmp_path / "out.npz")
    assert "unknown output format '.npz'" in line
    # A file-like DST for an official SRC: converting writes a directory, not a .pth.
    line = _run(capsys, src, tmp_path / "out.pth")
    assert "is a directory" in line
    _nothing_written(tmp_path, before)


def test_nonexistent_src(tmp_path, capsys):
    line = _run(capsys, tmp_path / "nope.pth", tmp_path / "out")
    assert "nope.pth: no such file" in line
    assert not (tmp_path / "out").exists()


def test_dst_exists(tmp_path, src, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    line = _run(capsys, src, tmp_path / "full")
    assert "exists" in line and "--overwrite" in line
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    save_model(tmp_path / "ckpt", create_model(small_config(depth=1)))
    (tmp_path / "taken.pth").write_bytes(b"old")
    line = _run(capsys, tmp_path / "ckpt", tmp_path / "taken.pth")
    assert "taken.pth exists" in line and (tmp_path / "taken.pth").read_bytes() == b"old"


def test_teacher_checkpoint_with_stray_keys(tmp_path, capsys):
    sd = _official_sd()
    teacher = {f"backbone.{k}": v for k, v in sd.items()}
    teacher["dino_loss.center"] = torch.zeros(1, 8)
    torch.save({"teacher": teacher}, tmp_path / "teacher_checkpoint.pth")
    line = _run(capsys, tmp_path / "teacher_checkpoint.pth", tmp_path / "out")
    assert "unexpected keys" in line and "dino_loss.center" in line
    torch.save({"model": teacher}, tmp_path / "other.pth")
    line = _run(capsys, tmp_path / "other.pth", tmp_path / "out")
    assert "no 'teacher' state dict" in line and "model" in line


class _Payload:
    """Unpickling this would run `_touch(marker)`: weights_only must refuse it first."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (self.marker,))


def _touch(path: str) -> None:
    Path(path).write_text("code ran")


def test_pickled_code_is_refused_without_running(tmp_path, capsys):
    marker = tmp_path / "pwned"
    sd = {k: v for k, v in _official_sd().items()}
    torch.save({**sd, "payload": _Payload(str(marker))}, tmp_path / "evil.pth")
    assert not marker.exists()
    line = _run(capsys, tmp_path / "evil.pth", tmp_path / "out")
    assert "evil.pth is not a readable PyTorch checkpoint" in line and "Unpickl" in line, line
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_real_process_exit_code_and_no_traceback(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"\x80\x02junk")
    proc = subprocess.run(
        [sys.executable, str(REPO / "convert_weights.py"), str(tmp_path / "junk.pth"),
         str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "junk.pth is not a readable" in lines[-1]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def _hf_sd() -> dict[str, torch.Tensor]:
    sd = {k: v.numpy() for k, v in _official_sd().items()}
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in to_hf(sd).items()}


def _without(sd, *prefixes):
    return {k: v for k, v in sd.items() if not k.startswith(prefixes)}


def _v1_with_registers():
    sd = _without(_official_sd(), "mask_token", "blocks.0.ls", "blocks.1.ls")
    return {**sd, "register_tokens": torch.zeros(1, 4, 128)}


def _v1_with_layerscale():
    return _without(_official_sd(), "mask_token")


def _renumbered_block():
    return {k.replace("blocks.1.", "blocks.2."): v for k, v in _official_sd().items()}


def _rectangular_pos_embed():
    return {**_official_sd(), "pos_embed": torch.zeros(1, 1 + 4 * 5, 128)}


# Malformed state dicts: each must give one `error:` line naming the problem (never a traceback
# from deep inside detection) and leave nothing behind.
MALFORMED = {
    "v1_with_registers": (_v1_with_registers, ".pth",
                          ["register_tokens", "no mask_token"]),
    "v1_with_layerscale": (_v1_with_layerscale, ".pth",
                           ["LayerScale (ls1.gamma)", "no mask_token"]),
    "stray_blocks_key": (lambda: {**_official_sd(), "blocks.extra": torch.zeros(3)}, ".pth",
                         ["unexpected keys [blocks.extra: got (3,)]"]),
    "no_blocks": (lambda: _without(_official_sd(), "blocks."), ".pth",
                  ["no transformer blocks", "'blocks.{i}.*'"]),
    "non_contiguous_blocks": (_renumbered_block, ".pth", ["not contiguous: [0, 2]"]),
    "rectangular_pos_embed": (_rectangular_pos_embed, ".pth",
                              ["pos_embed has 20 patch positions, not a square grid"]),
    "bad_cls_rank": (lambda: {**_official_sd(), "cls_token": torch.zeros(128)}, ".pth",
                     ["cls_token: got shape (128,), expected (1, 1, embed_dim)"]),
    "no_fc1": (lambda: _without(_official_sd(), "blocks.0.mlp.fc1."), ".pth",
               ["missing keys", "blocks.0.mlp.fc1.weight: expected (512, 128)"]),
    "non_tensor_value": (lambda: {**_official_sd(), "epoch": 3}, ".pth",
                         ["non-tensor values [epoch: int]"]),
    "integer_tensor": (lambda: {**_official_sd(), "norm.bias": torch.zeros(128, dtype=torch.long)},
                       ".pth", ["floating-point", "norm.bias: dtype int64"]),
    "hf_unknown_key": (lambda: {**_hf_sd(), "encoder.layer.0.attention.rope.weight":
                                torch.zeros(2)}, ".safetensors",
                       ["unknown Hugging Face DINOv2 keys",
                        "encoder.layer.0.attention.rope.weight"]),
    "hf_not_a_layer_key": (lambda: {**_hf_sd(), "pooler.dense.weight": torch.zeros(2)},
                           ".safetensors", ["unknown Hugging Face", "pooler.dense.weight"]),
    "hf_missing_k_proj": (lambda: _without(_hf_sd(), "encoder.layer.1.attention.k_proj.weight"),
                          ".safetensors",
                          ["incomplete attn.qkv projections in HF layer 1 (weight)"]),
    "hf_mismatched_v_proj": (lambda: {**_hf_sd(), "encoder.layer.0.attention.v_proj.bias":
                                      torch.zeros(64)}, ".safetensors",
                             ["attn.qkv projections in HF layer 0 (bias) have different shapes"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_state_dicts(tmp_path, capsys, case):
    from safetensors.torch import save_file

    make, suffix, wants = MALFORMED[case]
    src = tmp_path / f"{case}{suffix}"
    sd = make()
    torch.save(sd, src) if suffix == ".pth" else save_file(sd, str(src))
    before = set(os.listdir(tmp_path))
    line = _run(capsys, src, tmp_path / "out")
    assert "internal error" not in line, line
    for want in wants:
        assert want in line, (want, line)
    _nothing_written(tmp_path, before)


def test_unexpected_exception_is_one_line(tmp_path, src, capsys, monkeypatch):
    """The CLI's last resort: a converter bug still gives one `error:` line, marked as a bug,
    and the atomic write leaves nothing behind."""
    import dinojax.convert.checkpoint as ckpt

    def boom(sd, cfg):
        raise RuntimeError("simulated bug\nsecond line")

    monkeypatch.setattr(ckpt, "from_official", boom)
    before = set(os.listdir(tmp_path))
    code = convert_weights.main([str(src), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("error: internal error (RuntimeError: simulated bug)"), err
    _nothing_written(tmp_path, before)


@pytest.mark.parametrize(
    "meta,want",
    [
        ("{not json", "is not valid JSON"),
        ('{"format": "other"}', "does not describe a dinojax checkpoint"),
        ('{"format": "dinojax", "version": 1}', "no architecture ('arch') recorded"),
        ('{"format": "dinojax", "version": 1, "arch": {"family": "v3"}}', "invalid architecture"),
    ],
)
def test_corrupt_dinojax_json(tmp_path, capsys, meta, want):
    save_model(tmp_path / "ckpt", create_model(small_config(depth=1)))
    (tmp_path / "ckpt" / "dinojax.json").write_text(meta)
    before = set(os.listdir(tmp_path))
    line = _run(capsys, tmp_path / "ckpt", tmp_path / "out.pth")
    assert want in line and "internal error" not in line, line
    _nothing_written(tmp_path, before)
