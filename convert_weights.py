"""Convert official DINO / DINOv2 / DINOv3 checkpoints to dinojax and back.

    python convert_weights.py dinov2_vitb14_reg4_pretrain.pth ckpt/      # PyTorch -> dinojax
    python convert_weights.py dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth ckpt/   # DINOv3
    python convert_weights.py dinov3-vitb16/model.safetensors ckpt/      # HF DINOv3ViTModel
    python convert_weights.py teacher_checkpoint.pth ckpt/ --arch dinov2_vitl14
    python convert_weights.py ckpt/ exported.pth [--format teacher]      # dinojax -> PyTorch
    python convert_weights.py ckpt/ model.safetensors --format hf        # -> Hugging Face names
    python convert_weights.py dinov2_vits14_ade20k_ms_head.pth heads/ade20k_ms --arch dinov2_vits14
    python convert_weights.py heads/ade20k_ms head.pth                   # dense head -> official

The direction follows from the formats: a dinojax checkpoint directory as SRC exports it to an
official `.pth` / `.safetensors` state dict; any other SRC is read as an official checkpoint
(hub backbone, DINOv2 teacher_checkpoint.pth, DINO v1 training checkpoint, DINOv3 ViT or
ConvNeXt, Hugging Face safetensors with its config.json checked when it sits next to the file,
a released segmentation / depth head) and written as a dinojax checkpoint directory. On any
error nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("src", help="official checkpoint file, or a dinojax checkpoint directory")
    ap.add_argument("dst", help="dinojax checkpoint directory, or an output .pth/.safetensors")
    ap.add_argument("--arch", help="official architecture name when detection is ambiguous")
    ap.add_argument("--which", default="teacher", choices=["teacher", "student"],
                    help="which network of a training checkpoint to convert")  # fmt: skip
    ap.add_argument("--format", default="hub", choices=["hub", "teacher", "hf"],
                    help="export layout: hub backbone, teacher_checkpoint with heads, or the "
                         "Hugging Face Dinov2 names")  # fmt: skip
    ap.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    args = ap.parse_args(argv)

    from dinojax.convert import dense
    from dinojax.convert.backbone import ConversionError
    from dinojax.convert.checkpoint import META, convert, export

    try:
        if dense.is_head_dir(args.src):
            meta = dense.export_head(args.src, args.dst, overwrite=args.overwrite)
            print(f"wrote {args.dst} ({meta['task']} head {meta['head'].get('type', '')})")
        elif dense.file_is_head(args.src):
            meta = dense.convert_head(args.src, args.dst, arch=args.arch,
                                      overwrite=args.overwrite)  # fmt: skip
            print(f"wrote {args.dst}: {meta['task']} head {meta['head'].get('type', '')}"
                  + (f" for {args.arch}" if args.arch else ""))  # fmt: skip
        elif (Path(args.src) / META).is_file():
            export(args.src, args.dst, fmt=args.format, overwrite=args.overwrite)
            print(f"wrote {args.dst} ({args.format} format)")
        else:
            cfg = convert(args.src, args.dst, arch=args.arch, which=args.which,
                          overwrite=args.overwrite)  # fmt: skip
            print(f"wrote {args.dst}: {_describe(cfg)}")
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable DST, disk full, ...: still one line, nothing left behind
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a converter bug: still one line, and say it is one
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"error: internal error ({type(e).__name__}: {first}); please report it with the "
              "input that caused it", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _describe(cfg) -> str:
    if not hasattr(cfg, "num_register_tokens") or "convnext" in getattr(cfg, "family", ""):
        return f"{cfg.name} (ConvNeXt, depths {tuple(cfg.depths)}, dims {tuple(cfg.dims)})"
    extra = "storage tokens" if getattr(cfg, "family", "") == "dinov3" else "registers"
    return (f"{cfg.name} ({cfg.depth} blocks, dim {cfg.embed_dim}, patch {cfg.patch_size}, "
            f"{cfg.num_register_tokens} {extra})")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
