"""Peak resident memory of `convert_weights.py` on a ViT-g-width checkpoint, and on the DINOv3
families (a ViT-H+-width ViT as official `.pth` and Hugging Face safetensors, a ConvNeXt-B).

The converter streams (dinojax/convert/io.py, checkpoint.py): one tensor is read, converted and
placed at a time, so its resident high-water mark, less the interpreter and imports, stays within
1.5x the checkpoint file. Measured on a reduced-depth ViT-g (width 1536, 24 heads, SwiGLU 4096,
the `dinov2_vitg14` block) in every source format, and on the way back (export), in a subprocess
which reports its own `VmHWM` (/proc/self/status). The interpreter + imports baseline is the
same command on a tiny checkpoint.

    python tests/convert/test_convert_memory.py DEPTH [DIR]   # print the figures (README table)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 1.5  # peak above the baseline / checkpoint file size


def _cfg(depth: int, width: int = 1536):
    from dinojax.models.config import ViTConfig

    # dinov2_vitg14's block at reduced depth (`width` < 1536 only for the tiny baseline).
    return ViTConfig(
        family="dinov2", patch_size=14, img_size=518, embed_dim=width, depth=depth,
        num_heads=width // 64, ffn_layer="swiglu", mlp_ratio=4.0, layerscale_init=1.0,
    )  # fmt: skip


def official_state(depth: int, width: int = 1536, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights in the official hub layout."""
    from dinojax.convert.backbone import expected_official_shapes

    rng = np.random.default_rng(seed)
    return {
        k: rng.standard_normal(shape, dtype=np.float32) * 0.02
        for k, shape in expected_official_shapes(_cfg(depth, width)).items()
    }


def write_sources(dst: Path, depth: int, width: int = 1536) -> dict[str, Path]:
    """The same random backbone as a hub `.pth`, a `teacher_checkpoint.pth` (+ a DINO head), a
    DINO v1-style training checkpoint and Hugging Face safetensors."""
    import torch
    from safetensors.numpy import save_file

    from dinojax.convert.backbone import to_hf

    dst.mkdir(parents=True, exist_ok=True)
    sd = official_state(depth, width)
    suffixes = {"hub": ".pth", "teacher": ".pth", "dino_v1": ".pth", "hf": ".safetensors"}
    paths = {k: dst / f"{k}{s}" for k, s in suffixes.items()}
    tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
    torch.save(tensors, paths["hub"])
    head = {  # a small DINOHead (3 layers, bottleneck 256, 4096 prototypes)
        "mlp.0.weight": torch.zeros(512, width), "mlp.0.bias": torch.zeros(512),
        "mlp.2.weight": torch.zeros(512, 512), "mlp.2.bias": torch.zeros(512),
        "mlp.4.weight": torch.zeros(256, 512), "mlp.4.bias": torch.zeros(256),
        "last_layer.weight_g": torch.ones(4096, 1), "last_layer.weight_v": torch.zeros(4096, 256),
    }  # fmt: skip
    teacher = {f"backbone.{k}": v for k, v in tensors.items()}
    teacher.update({f"dino_head.{k}": v for k, v in head.items()})
    torch.save({"teacher": teacher}, paths["teacher"])
    del teacher
    # DINO v1 `main_dino.py` checkpoint: student and teacher (DDP "module." prefix), loss centre.
    net = {f"module.backbone.{k}": v for k, v in tensors.items()}
    net.update({f"module.head.{k}": v for k, v in head.items()})
    v1 = {"student": net, "teacher": net, "dino_loss": {"center": torch.zeros(1, 4096)},
          "epoch": 100, "args": argparse.Namespace(arch="vit_giant")}  # fmt: skip
    torch.save(v1, paths["dino_v1"])
    del net, v1
    save_file(to_hf(sd), str(paths["hf"]))
    return paths


_CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
from convert_weights import main
rc = main(sys.argv[2:])
# The high-water mark of this process's own address space (reset at exec: unlike the
# children's ru_maxrss, it does not include the parent's resident set at the fork).
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0].split()[1]
print("VmHWM_KB", hwm)
sys.exit(rc)
"""


def peak_rss(args: list[str]) -> int:
    """Resident high-water mark (bytes) of `python convert_weights.py ARGS`; raises on failure."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(ROOT), *args], env=env, capture_output=True, text=True
    )
    if proc.returncode:
        raise AssertionError(f"convert_weights.py {args} failed: {proc.stderr[-2000:]}")
    return int(proc.stdout.split("VmHWM_KB")[-1].split()[0]) * 1024


def measure(tmp: Path, depth: int) -> dict[str, dict[str, float]]:
    """{format: {file_gb, peak_gb, baseline_gb, ratio}} for every source format and export."""
    tiny = write_sources(tmp / "tiny", depth=1, width=64)
    big = write_sources(tmp / "big", depth=depth)
    out = {}
    jobs = [(name, [str(src), str(tmp / f"out_{name}")], [str(tiny[name]), str(tmp / f"t_{name}")],
             src.stat().st_size) for name, src in big.items()]  # fmt: skip
    # Export back from the converted hub checkpoint (to .pth and to safetensors).
    for name, suffix in (("export_pth", ".pth"), ("export_hf", ".safetensors")):
        fmt = ["--format", "hf"] if suffix == ".safetensors" else []
        jobs.append((name, [str(tmp / "out_hub"), str(tmp / f"{name}{suffix}"), *fmt],
                     [str(tmp / "t_hub"), str(tmp / f"t_{name}{suffix}"), *fmt],
                     big["hub"].stat().st_size))  # fmt: skip
    for name, args, tiny_args, size in jobs:
        base = peak_rss(tiny_args)
        peak = peak_rss(args)
        out[name] = {"file_gb": size / 1e9, "peak_gb": peak / 1e9, "baseline_gb": base / 1e9,
                     "ratio": (peak - base) / size}  # fmt: skip
    return out


def write_v3_sources(dst: Path, tiny: bool = False) -> dict[str, Path]:
    """DINOv3 families: a ViT-H+/16-width ViT (width 1280, SwiGLU 5120, 4 blocks) as an official
    `.pth` and as Hugging Face safetensors, and a full ConvNeXt-B official `.pth`."""
    import jax
    import torch
    from safetensors.numpy import save_file

    from dinojax.convert import v3 as v3conv
    from dinojax.convert.convnext import convnext_to_official
    from dinojax.models.config import get_config
    from dinojax.models.convnext import ConvNeXtConfig, abstract_convnext_params
    from dinojax.models.vit3 import abstract_params

    dst.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def rand(a):
        return rng.standard_normal(a.shape, dtype=np.float32) * 0.02

    def save_pth(sd, path):
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, path)

    if tiny:
        cfg = get_config("dinov3_vits16", depth=1, embed_dim=64, num_heads=1)
        ccfg = ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))
    else:
        cfg = get_config("dinov3_vith16plus", depth=4)
        ccfg = get_config("dinov3_convnext_base")
    sd = v3conv.to_official(jax.tree.map(rand, abstract_params(cfg)), cfg)
    paths = {"v3_vit": dst / "v3.pth", "v3_hf": dst / "v3.safetensors", "convnext": dst / "cnx.pth"}
    save_pth(sd, paths["v3_vit"])
    save_file(v3conv.to_hf(sd, cfg), str(paths["v3_hf"]))
    del sd
    save_pth(convnext_to_official(jax.tree.map(rand, abstract_convnext_params(ccfg)), ccfg),
             paths["convnext"])  # fmt: skip
    return paths


def measure_v3(tmp: Path) -> dict[str, dict[str, float]]:
    tiny = write_v3_sources(tmp / "tiny", tiny=True)
    big = write_v3_sources(tmp / "big")
    out = {}
    for name, src in big.items():
        base = peak_rss([str(tiny[name]), str(tmp / f"t_{name}")])
        peak = peak_rss([str(src), str(tmp / f"out_{name}")])
        size = src.stat().st_size
        out[name] = {"file_gb": size / 1e9, "peak_gb": peak / 1e9, "baseline_gb": base / 1e9,
                     "ratio": (peak - base) / size}  # fmt: skip
    return out


@pytest.mark.slow
def test_dinov3_conversion_peak_memory_within_1_5x_checkpoint(tmp_path):
    figures = measure_v3(tmp_path)
    print(figures)
    too_big = {k: round(v["ratio"], 2) for k, v in figures.items() if v["ratio"] > LIMIT}
    assert not too_big, f"peak resident memory above {LIMIT}x the checkpoint: {too_big}"


@pytest.mark.slow
def test_conversion_peak_memory_within_1_5x_checkpoint(tmp_path):
    figures = measure(tmp_path, depth=4)
    print(figures)
    too_big = {k: round(v["ratio"], 2) for k, v in figures.items() if v["ratio"] > LIMIT}
    assert not too_big, f"peak resident memory above {LIMIT}x the checkpoint: {too_big}"


if __name__ == "__main__":
    import json
    import tempfile

    depth = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    with tempfile.TemporaryDirectory(dir=sys.argv[2] if len(sys.argv) > 2 else None) as d:
        for name, f in measure(Path(d), depth).items():
            print(json.dumps({"format": name, **{k: round(v, 3) for k, v in f.items()}}))
