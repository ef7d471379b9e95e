"""A real kill: `train.py` SIGKILLed mid-run (an async save may be half written), restarted with
the same command, continues with bit-identical losses to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cpu_flags import CPU_COLLECTIVE_FLAGS

ROOT = Path(__file__).resolve().parents[2]


def _cmd(workdir: Path) -> list[str]:
    return [
        sys.executable,
        "train.py",
        "--config",
        "tests/train/tiny_recipe.py:dinov2",
        "--workdir",
        str(workdir),
        "--config.optim.epochs=4",
    ]  # fmt: skip  (16 steps)


def _env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4", TF_CPP_MIN_LOG_LEVEL="3")
    env["XLA_FLAGS"] = CPU_COLLECTIVE_FLAGS  # not the caller's own flags
    return env


def _losses(workdir: Path) -> dict[int, float]:
    out = {}  # a step logged twice (before the kill and after the restart): the last one counts
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            out[r["step"]] = r["loss"]
    return out


@pytest.mark.slow
@pytest.mark.timeout(1200)  # measured 217 s on 2 cores shared at load average 8-15
def test_sigkill_then_restart_is_exact(tmp_path, children):
    ref = children.run(_cmd(tmp_path / "ref"), cwd=ROOT, env=_env(), text=True, timeout=900)
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "killed"
    p = children.popen(_cmd(run), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 900
    while not (run / "checkpoints" / "8").is_dir() and p.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    steps_before = sorted(_losses(run))
    assert steps_before[-1] < 16

    again = children.run(_cmd(run), cwd=ROOT, env=_env(), text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from checkpoint" in again.stdout + again.stderr
    a, b = _losses(tmp_path / "ref"), _losses(run)
    assert sorted(a) == sorted(b) == list(range(1, 17))
    assert a == b  # bit-identical (the JSON floats round-trip exactly)
