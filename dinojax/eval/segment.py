"""Semantic segmentation from the command line: predict (pictures), train a linear head, evaluate.

    # released head (official .pth or a converted head directory) on your images -> PNGs
    python -m dinojax.eval.segment predict --checkpoint dinov2_vits14 \
        --head dinov2_vits14_ade20k_linear_head.pth --images a.jpg b.png --out seg/ --mode slide
    # train a linear head on frozen features (official protocol; every value configurable)
    python -m dinojax.eval.segment train --checkpoint ckpt/vits14 --train folder:/data/ade \
        --val folder:/data/ade --num-classes 150 --out runs/ade_linear
    # mIoU / aAcc of a head on a labelled dataset
    python -m dinojax.eval.segment evaluate --checkpoint ckpt/vits14 --head runs/ade_linear/head \
        --data folder:/data/ade --split val --mode slide

Datasets are dense sources (`dinojax.dense.data.dense_source`: the embedded digit scenes, image
folders with images/ + annotations/, TFDS). Pictures: `<name>_seg.png` = [image | class-colour
overlay | legend]; `--save-labels` also writes the class map as `<name>_labels.png` (uint8).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dinojax.dense.train_seg import SegTrainConfig

__all__ = ["main", "resolve_source"]

_DEFAULTS = SegTrainConfig()


def resolve_source(spec: str, split: str, data_dir: str | None = None, **options):
    """A segmentation source from a dataset spec (`dinojax.dense.data.dense_source`)."""
    try:
        from dinojax.dense.data import dense_source
    except ImportError as e:  # pragma: no cover - shipped with dinojax
        raise ValueError(f"dataset {spec!r}: dinojax.dense.data is not available ({e})") from None
    return dense_source(spec, split, task="seg", data_dir=data_dir, **options)


def _add_backbone(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="backbone: dinojax checkpoint dir, hub name (dinov2_vits14) or official "
                   ".pth")  # fmt: skip
    p.add_argument("--arch", default=None, help="architecture of an ambiguous official .pth")
    p.add_argument("--bf16", action="store_true", help="run the backbone in bfloat16")


def _add_inference(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inference")
    g.add_argument("--mode", choices=["whole", "slide", "ms"], default="slide")
    g.add_argument("--crop-size", type=int, default=None, help="slide window (512; ms 640)")
    g.add_argument("--stride", type=int, default=None, help="slide stride (341; ms 426)")
    g.add_argument("--resize", type=int, nargs=2, default=[2048, 512], metavar=("LONG", "SHORT"),
                   help="keep-ratio test resize before whole/slide inference (the configs' "
                   "(2048, 512)); scores come back at the input size")  # fmt: skip
    g.add_argument("--no-resize", action="store_true", help="run at the input size")
    g.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.32, 1.73, 2.28, 3.0],
                   help="ms test-time scales")  # fmt: skip
    g.add_argument("--ms-size", type=int, default=640, help="ms short side at scale 1")
    g.add_argument("--ms-mode", choices=["whole", "slide"], default="slide")
    g.add_argument("--no-flip", action="store_true", help="ms without the flipped views")
    g.add_argument("--batch-size", type=int, default=8)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dinojax.eval.segment",
        description="Semantic segmentation with frozen DINOv2 features and a linear head.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("predict", help="segment images into PNG pictures")
    _add_backbone(pr)
    pr.add_argument("--head", required=True, help="head directory or official *_head.pth")
    pr.add_argument("--images", nargs="+", required=True, help="image files")
    pr.add_argument("--out", required=True, help="output directory")
    pr.add_argument("--save-labels", action="store_true", help="also write the class maps")
    pr.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    _add_inference(pr)

    tr = sub.add_parser("train", help="train a linear head (official protocol)")
    _add_backbone(tr)
    tr.add_argument("--train", required=True, help="training dataset (digits, folder:DIR, tfds:)")
    tr.add_argument("--train-split", default="train")
    tr.add_argument("--val", default=None, help="validation dataset (evaluated with slide)")
    tr.add_argument("--val-split", default="val")
    tr.add_argument("--data-dir", default=None, help="TFDS data_dir")
    tr.add_argument("--num-classes", type=int, default=None,
                    help="K (default: the dataset's num_classes)")  # fmt: skip
    tr.add_argument("--out", required=True, help="run directory (head/, metrics.jsonl)")
    tr.add_argument("--overwrite", action="store_true")
    tr.add_argument("--resume", action="store_true", help="continue from OUT/train_state")
    g = tr.add_argument_group("protocol (defaults: the official linear configs)")
    g.add_argument("--iters", type=int, default=_DEFAULTS.iters)
    g.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size)
    g.add_argument("--lr", type=float, default=_DEFAULTS.lr)
    g.add_argument("--weight-decay", type=float, default=_DEFAULTS.weight_decay)
    g.add_argument("--warmup-iters", type=int, default=_DEFAULTS.warmup_iters)
    g.add_argument("--crop-size", type=int, default=_DEFAULTS.crop_size)
    g.add_argument(
        "--scale",
        type=int,
        nargs=2,
        default=list(_DEFAULTS.scale),
        metavar=("LONG", "SHORT"),
        help="resize scale before the random ratio",
    )
    g.add_argument("--ratio-range", type=float, nargs=2, default=list(_DEFAULTS.ratio_range))
    g.add_argument("--cat-max-ratio", type=float, default=_DEFAULTS.cat_max_ratio)
    g.add_argument("--no-photometric", action="store_true", help="no PhotoMetricDistortion")
    g.add_argument("--layers", type=int, nargs="+", default=None,
                   help="blocks to concatenate (default: the last one)")  # fmt: skip
    g.add_argument(
        "--avg-non-ignore",
        action="store_true",
        help="average the loss over labelled pixels (mmseg default: all pixels)",
    )
    g.add_argument("--eval-every", type=int, default=0)
    g.add_argument("--eval-crop-size", type=int, default=_DEFAULTS.eval_crop_size)
    g.add_argument("--eval-stride", type=int, default=_DEFAULTS.eval_stride)
    g.add_argument("--eval-resize", type=int, nargs=2, default=list(_DEFAULTS.eval_resize))
    g.add_argument("--no-eval-resize", action="store_true")
    g.add_argument("--checkpoint-every", type=int, default=0)
    g.add_argument("--log-every", type=int, default=_DEFAULTS.log_every)
    g.add_argument("--seed", type=int, default=0)
    tr.add_argument("--no-progress", action="store_true")

    ev = sub.add_parser("evaluate", help="mIoU / aAcc of a head on a labelled dataset")
    _add_backbone(ev)
    ev.add_argument("--head", required=True, help="head directory or official *_head.pth")
    ev.add_argument("--data", required=True, help="dataset (digits, folder:DIR, tfds:...)")
    ev.add_argument("--split", default="val")
    ev.add_argument("--data-dir", default=None)
    ev.add_argument("--max-items", type=int, default=None)
    ev.add_argument("--output", default=None, help="write the metrics as JSON here")
    ev.add_argument("--no-progress", action="store_true")
    _add_inference(ev)
    return p


def _segmenter(args):
    from dinojax.dense.segment import load_segmenter

    extra = {"dtype": "bfloat16"} if args.bf16 else {}
    return load_segmenter(args.checkpoint, args.head, arch=args.arch, **extra)


def _predict_kw(args) -> dict:
    return dict(
        mode=args.mode, crop_size=args.crop_size, stride=args.stride,
        resize=None if args.no_resize else tuple(args.resize), scales=tuple(args.scales),
        ms_size=args.ms_size, ms_mode=args.ms_mode, flip=not args.no_flip,
        batch_size=args.batch_size,
    )  # fmt: skip


def _predict(args) -> int:
    from PIL import Image

    from dinojax.dense.seg_pictures import class_names_for, overlay_picture, palette
    from dinojax.eval.transforms import load_image

    paths = [Path(p) for p in args.images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"no such image file(s): {missing}")
    images = [np.asarray(load_image(p).convert("RGB")) for p in paths]
    seg = _segmenter(args)
    hc = seg.head_cfg
    k = seg.num_classes
    colours = palette(k, hc.get("dataset"))
    names = class_names_for(k, hc.get("dataset"), hc.get("class_names"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kw = _predict_kw(args)
    kw["resize"] = None if args.no_resize or args.mode == "ms" else tuple(args.resize)
    for path, img in zip(paths, images):
        classes = seg.segment(img[None], **kw)[0]
        overlay_picture(img, classes, colours, names, alpha=args.alpha).save(
            out / f"{path.stem}_seg.png")  # fmt: skip
        if args.save_labels:
            Image.fromarray(classes.astype(np.uint8)).save(out / f"{path.stem}_labels.png")
        print(f"{path} -> {out / (path.stem + '_seg.png')}")
    return 0


def _train(args) -> int:
    from dinojax.dense.train_seg import train_seg_head

    train = resolve_source(args.train, args.train_split, args.data_dir)
    val = resolve_source(args.val, args.val_split, args.data_dir) if args.val else None
    k = args.num_classes or getattr(train, "num_classes", None)
    if not k:
        raise ValueError(f"give --num-classes: the dataset {args.train!r} does not say")
    extra = {"dtype": "bfloat16"} if args.bf16 else {}
    from dinojax.dense.common import load_backbone

    backbone = load_backbone(args.checkpoint, arch=args.arch, **extra)
    res = train_seg_head(
        backbone, train, int(k), val_source=val, output_dir=args.out,
        class_names=getattr(train, "class_names", None), progress=not args.no_progress,
        overwrite=args.overwrite, resume=args.resume, iters=args.iters,
        batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_iters=args.warmup_iters, crop_size=args.crop_size,
        scale=tuple(args.scale), ratio_range=tuple(args.ratio_range),
        cat_max_ratio=args.cat_max_ratio, photometric=not args.no_photometric,
        layers=tuple(args.layers) if args.layers else None, avg_non_ignore=args.avg_non_ignore,
        eval_every=args.eval_every, eval_crop_size=args.eval_crop_size,
        eval_stride=args.eval_stride,
        eval_resize=None if args.no_eval_resize else tuple(args.eval_resize),
        checkpoint_every=args.checkpoint_every, log_every=args.log_every, seed=args.seed,
    )  # fmt: skip
    print(f"final loss {res['losses'][-1]:.4f}" if res["losses"] else "no loss logged")
    for step, ev in res["eval"].items():
        print(f"step {step}: mIoU {ev['mIoU']:.2f}  aAcc {ev['aAcc']:.2f}")
    print(f"head: {Path(args.out) / 'head'} (load_segmenter / convert_weights.py)")
    return 0


def _evaluate(args) -> int:
    from dinojax.dense.train_seg import evaluate_segmentation
    from dinojax.eval import cli

    data = resolve_source(args.data, args.split, args.data_dir)
    seg = _segmenter(args)
    kw = _predict_kw(args)
    res = evaluate_segmentation(seg, data, max_items=args.max_items,
                                progress=not args.no_progress, **kw)  # fmt: skip
    print(f"mIoU {res['mIoU']:.2f}  aAcc {res['aAcc']:.2f}  mAcc {res['mAcc']:.2f}")
    if args.output:
        cli.write_json(args.output, {"segmentation": res, "args": vars(args)})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from dinojax.eval import cli

    args = _parser().parse_args(argv)
    run = {"predict": _predict, "train": _train, "evaluate": _evaluate}[args.command]
    return cli.run_main(lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
