"""bench/train_step.py runs end to end on the CPU (the GPU/TPU benchmark's code path) and writes a
self-consistent JSON line. Nothing here is timed: the numbers are only checked against each other
and against the step's FLOP accounting."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
from cpu_flags import CPU_COLLECTIVE_FLAGS
from train_configs import ROOT, tiny_config

from dinojax.ssl import step as ssl_step


def test_train_step_benchmark_runs_and_reports_consistent_figures(tmp_path, children):
    out = tmp_path / "train_step.jsonl"
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2", TF_CPP_MIN_LOG_LEVEL="3")
    env["XLA_FLAGS"] = CPU_COLLECTIVE_FLAGS  # not the caller's own flags
    cmd = [sys.executable, "bench/train_step.py", "--config", "tests/train/tiny_recipe.py:dinov2",
           "--config.mesh.shape=(1,-1)", "--steps", "2", "--warmup", "0", "--peak_flops", "1e12",
           "--out", str(out), "--label", "ci"]  # fmt: skip
    res = children.run(cmd, cwd=ROOT, env=env, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "img/s" in res.stdout and "MFU" in res.stdout, res.stdout
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert rec["label"] == "ci" and rec["devices"] == 2 and rec["mesh"] == {"data": 1, "fsdp": 2}
    assert rec["batch_size"] == 16 and rec["platform"] == "cpu"
    c = tiny_config()
    c.mesh.shape = (1, -1)
    # The analytic FLOPs are the step's own accounting for this recipe and batch.
    assert rec["flops_per_step"] == pytest.approx(ssl_step.flops_per_step(c), rel=1e-12)
    t = rec["step_s_median"]
    assert t > 0 and rec["compile_s"] > 0
    assert rec["img_per_s"] == pytest.approx(16 / t, rel=1e-9)
    assert rec["img_per_s_per_device"] == pytest.approx(rec["img_per_s"] / 2, rel=1e-9)
    tflops = rec["flops_per_step"] / t / 2 / 1e12
    assert rec["tflops_per_device"] == pytest.approx(tflops, rel=1e-9)
    assert rec["mfu"] == pytest.approx(tflops * 1e12 / 1e12, rel=1e-9)  # --peak_flops 1e12
    assert math.isfinite(rec["loss"])
