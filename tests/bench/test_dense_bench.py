"""bench/dense.py on tiny images for one timed call: both sides run on the same weights, agree,
and the JSON line is self-consistent. Never asserts a timing."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Measured max abs differences of the outputs, dinojax vs the torch reference in bench/dense.py
# (random ViT-S/14, float32): segmentation logits 4.8e-7 (max |logit| 0.7), depth 2.9e-6 m
# (depths up to 5.5 m). Tolerances about 2x.
TOL = {"seg_linear": 1e-6, "depth_linear": 6e-6}


def _bench():
    spec = importlib.util.spec_from_file_location("dense_bench", REPO / "bench" / "dense.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dense_bench_smoke(tmp_path, capsys):
    out = tmp_path / "dense.jsonl"
    argv = [
        "--heads",
        "seg_linear",
        "depth_linear",
        "--size",
        "28x42",
        "--batch",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--num-classes",
        "5",
        "--out",
        str(out),
    ]
    records = _bench().main(argv)
    lines = [json.loads(s) for s in out.read_text().splitlines()]
    assert [r["head"] for r in lines] == ["seg_linear", "depth_linear"]
    printed = capsys.readouterr().out.splitlines()
    assert len([s for s in printed if " img/s" in s]) == 2
    for r, rec in zip(lines, records, strict=True):
        assert r["ratio_img_per_s"] == rec["ratio_img_per_s"]
        for side in ("official", "dinojax"):
            s = r[side]
            assert len(s["call_s"]) == 1 and s["call_s_median"] == statistics.median(s["call_s"])
            assert math.isclose(s["img_per_s"], 2 / s["call_s_median"])
        assert math.isclose(
            r["ratio_img_per_s"], r["dinojax"]["img_per_s"] / r["official"]["img_per_s"]
        )
        want = [2, 28, 42, 5] if r["head"] == "seg_linear" else [2, 28, 42]
        assert r["output_shape"] == want and r["size"] == [28, 42]
        assert r["max_abs"] > 0.05
        assert r["max_abs_diff"] < TOL[r["head"]], (r["head"], r["max_abs_diff"])
