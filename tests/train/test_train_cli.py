"""Command-line entry points fail fast with one clear line on bad input (no training started)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(children, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    return children.run([sys.executable, *args], cwd=ROOT, env=env, text=True, timeout=300)


def test_train_requires_workdir_except_for_the_demo(children):
    r = _run(children, "train.py", "--config", "configs/dinov2.py:smoke")
    assert r.returncode != 0
    assert "--workdir is required" in r.stderr


def test_export_of_a_missing_workdir(tmp_path, children):
    args = ("-m", "dinojax.train.export", str(tmp_path / "nothing"), str(tmp_path / "out.pth"))
    r = _run(children, *args)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "holds no training checkpoints" in r.stderr
