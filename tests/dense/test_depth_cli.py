"""`python -m dinojax.eval.depth`: help, predict pictures, train and evaluate (tiny backbone),
one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import depth_reference as R
import numpy as np
import pytest
import torch
from PIL import Image
from test_depth_train import Ramps

from dinojax.eval import depth as cli_depth

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--arch", "dinov2_vits14", "--random", "--override", "depth=4"]


def test_help():
    r = subprocess.run(
        [sys.executable, "-m", "dinojax.eval.depth", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "predict" in r.stdout and "evaluate" in r.stdout
    for cmd in ("predict", "train", "evaluate"):
        with pytest.raises(SystemExit) as e:
            cli_depth.main([cmd, "--help"])
        assert e.value.code == 0


def test_predict_writes_a_depth_picture(tmp_path, capsys):
    head = R.BNHead(384, 1, 0.001, 10.0)
    R.randomize_head_(head, 0)
    path = tmp_path / "dinov2_vits14_nyu_linear_head.pth"
    torch.save({"state_dict": R.official_state_dict(head)}, path)
    img = np.random.default_rng(0).integers(0, 255, (45, 60, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    rc = cli_depth.main(
        [
            "predict",
            *TINY[:3],
            "--head",
            str(path),
            "--images",
            str(tmp_path / "a.png"),
            "--out",
            str(tmp_path / "out"),
            "--save-npy",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    pic = Image.open(tmp_path / "out" / "a_depth.png")
    assert pic.height == 45 and pic.width > 120
    d = np.load(tmp_path / "out" / "a_depth.npy")
    assert d.shape == (45, 60) and 0.001 <= d.min() and d.max() <= 10.0
    # bad input: one error line, exit code 2
    rc = cli_depth.main(
        [
            "predict",
            *TINY[:3],
            "--head",
            str(tmp_path / "missing.pth"),
            "--images",
            str(tmp_path / "a.png"),
            "--out",
            str(tmp_path / "o2"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "missing.pth" in err and err.count("\n") == 1


def test_train_then_evaluate(tmp_path, monkeypatch, capsys):
    sources = {"train": Ramps(8), "val": Ramps(4, seed=1)}
    monkeypatch.setattr(cli_depth, "_dense_source", lambda spec, split, data_dir: sources[split])
    out = tmp_path / "run"
    rc = cli_depth.main(
        [
            "train",
            *TINY,
            "--data",
            "ramps",
            "--val",
            "ramps",
            "--max-depth",
            "10",
            "--image-size",
            "28x42",
            "--iters",
            "3",
            "--batch-size",
            "8",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert (out / "head" / "dinojax.json").is_file() and (out / "log.jsonl").is_file()
    rc = cli_depth.main(
        [
            "evaluate",
            *TINY,
            "--head",
            str(out / "head"),
            "--data",
            "ramps",
            "--output",
            str(tmp_path / "m.json"),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["images"] == 4 and set(m) >= {"rmse", "abs_rel", "log10", "delta1", "delta3"}
