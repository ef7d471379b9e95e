"""bench/estimate_tpu.py (the README's ViT-g/14 TPU estimate) runs, uses the recipe's batch, and its
FLOPs are the training step's accounting, checked here against a hand count for ViT-g/14."""

from __future__ import annotations

import json
import runpy
import sys

import pytest
from train_configs import ROOT

from dinojax.data.masking import mask_upper_bound


def _hand_flops_per_image(batch: int, remat: bool) -> float:
    """2 FLOPs per multiply-add, backward = 2 x forward. ViT-g/14: D 1536, 40 blocks, SwiGLU
    hidden 4096 (facebookresearch/dinov2 `dinov2/models/vision_transformer.py` `vit_giant2`);
    heads 1536 -> 2048 -> 2048 -> bottleneck -> 131072 (DINO bottleneck 384, separate iBOT head
    256: `dinov2/configs/train/vitg14.yaml` over `ssl_default_config.yaml`); iBOT head on the
    step's static masked-token buffer."""
    d, depth, hidden, p, k, hh = 1536, 40, 4096, 14, 131072, 2048

    def backbone(px: int) -> float:
        n = (px // p) ** 2 + 1
        blocks = depth * (n * (8 * d * d + 6 * d * hidden) + 4 * n * n * d)
        return blocks + 2 * (n - 1) * 3 * p * p * d  # + patch embedding

    def head(bottleneck: int) -> float:
        return 2 * (d * hh + hh * hh + hh * bottleneck) + 2 * bottleneck * k

    masked = mask_upper_bound(2 * batch, 256, 0.5, (0.1, 0.5)) / batch
    g, loc = backbone(224), backbone(98)
    student = 2 * g + 8 * loc + 10 * head(384) + masked * head(256)
    teacher = 2 * g + 2 * head(384) + masked * head(256)
    return (4 if remat else 3) * student + teacher


def test_estimate_runs_with_the_recipe_batch_and_the_step_flops(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["estimate_tpu.py"])
    runpy.run_path(str(ROOT / "bench" / "estimate_tpu.py"), run_name="__main__")
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 8 and {r["batch"] for r in rows} == {3072}  # configs/dinov2_vitg14.py
    for r in rows:
        want = 3072 * _hand_flops_per_image(3072, r["remat"]) / 1e12
        assert r["step_tflop"] == pytest.approx(want, rel=1e-12), r
    by = {(r["chips"], r["remat"]): r for r in rows}
    assert by[(256, False)]["per_chip_batch"] == 12  # 12 per GPU x 256 GPUs, one chip per GPU
    assert by[(64, False)]["fits"] is False and by[(64, True)]["fits"] is True
