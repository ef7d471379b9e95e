"""Export the teacher (or student) of any training checkpoint to the converter's formats.

    python -m dinojax.train.export WORKDIR DST [--step N] [--which teacher] [--format FMT]

DST a directory: a dinojax checkpoint directory (`dinojax.load(DST)`, `convert_weights.py`).
DST a `.pth` / `.safetensors` file: the official layout, FMT "hub" (backbone state dict the
official hub models load strictly), "teacher" (DINOv2 teacher_checkpoint.pth with the heads)
or "hf" (Hugging Face Dinov2Model names). The checkpoint is read as host numpy arrays, so any
machine can export what any mesh wrote.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import ml_collections

from dinojax.train.checkpoint import Checkpointer, CheckpointError

__all__ = ["export_checkpoint", "main"]


def _head_meta(params: dict[str, Any], in_dim: int) -> dict[str, Any]:
    mlp = params["mlp"]
    layers = [mlp[k] for k in sorted(mlp, key=int)]
    kernels = [layer["kernel"] for layer in layers]
    return {
        "in_dim": int(in_dim),
        "out_dim": int(params["last_layer"]["weight_g"].shape[0]),
        "nlayers": len(layers),
        "hidden_dim": int(kernels[0].shape[1]) if len(layers) > 1 else None,
        "bottleneck_dim": int(kernels[-1].shape[1]),
        "mlp_bias": "bias" in layers[0],
    }


def export_checkpoint(
    workdir: str | Path,
    dst: str | Path,
    *,
    step: int | None = None,
    which: str = "teacher",
    fmt: str = "hub",
    overwrite: bool = False,
) -> Path:
    """Write the `which` network of checkpoint `step` (default: latest) in `workdir` to `dst`
    (see the module docstring). Returns `dst`."""
    from dinojax.convert import checkpoint as conv
    from dinojax.convert.io import FILE_SUFFIXES
    from dinojax.ssl.step import vit_config

    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    workdir, dst = Path(workdir), Path(dst)
    ckpt_dir = workdir / "checkpoints" if (workdir / "checkpoints").is_dir() else workdir
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{workdir} holds no training checkpoints")
    ckpt = Checkpointer(ckpt_dir, save_every=1, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {ckpt_dir}")
        config = ml_collections.ConfigDict(ckpt.read_config(step))
        nets = ckpt.restore_numpy(step, (which,))
    finally:
        ckpt.close()
    cfg = vit_config(config).replace(drop_path_rate=0.0)
    heads = {k: v for k, v in nets.items() if k != "backbone"}
    meta = {
        "format": "dinojax",
        "version": conv.FORMAT_VERSION,
        "layout": "stacked",
        "arch": cfg.to_dict(),
        "heads": {k: _head_meta(v, cfg.embed_dim) for k, v in heads.items()},
        "extras": [],
        "source": {
            "path": str(ckpt_dir),
            "format": "dinojax-train",
            "which": which,
            "step": int(step),
        },  # fmt: skip
    }
    tree = {"backbone": nets["backbone"], "heads": heads, "extras": {}}
    if dst.suffix in FILE_SUFFIXES:
        with tempfile.TemporaryDirectory() as tmp:
            conv.save(Path(tmp) / "ckpt", tree, meta)
            conv.export(Path(tmp) / "ckpt", dst, fmt=fmt, overwrite=overwrite)
    else:
        conv.save(dst, tree, meta, overwrite=overwrite)
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("workdir", help="training workdir (or its checkpoints/ directory)")
    ap.add_argument("dst", help="dinojax checkpoint directory, or a .pth / .safetensors file")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--which", default="teacher", choices=["teacher", "student"])
    ap.add_argument("--format", default="hub", choices=["hub", "teacher", "hf"],
                    help="layout of a .pth / .safetensors DST")  # fmt: skip
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    from dinojax.convert.backbone import ConversionError

    try:
        out = export_checkpoint(
            args.workdir, args.dst, step=args.step, which=args.which, fmt=args.format,
            overwrite=args.overwrite,
        )  # fmt: skip
    except (CheckpointError, ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
