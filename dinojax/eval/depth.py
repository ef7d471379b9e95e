"""Monocular depth from the command line: released or trained heads on frozen DINOv2 features.

    # depth pictures (image | colour map | scale bar in metres) for any images
    python -m dinojax.eval.depth predict --checkpoint dinov2_vits14 \
        --head dinov2_vits14_nyu_dpt_head.pth --images a.jpg b.png --out depth/
    # train a linear4 head on frozen features (head directory + log.jsonl in --out)
    python -m dinojax.eval.depth train --checkpoint dinov2_vits14 --data depthscenes:300 \
        --val depthscenes:100 --iters 1000 --out heads/scenes_linear4
    # metrics (RMSE, AbsRel, log10, delta1/2/3, ...) of a head on a dataset
    python -m dinojax.eval.depth evaluate --checkpoint dinov2_vits14 --head heads/x/head \
        --data folder:/data/nyu --split val --eigen-crop --output metrics.json

Datasets are dense sources (`dinojax.dense.data.dense_source`: embedded rendered scenes, folders,
TFDS). Heads are head directories or the released `.pth` files (converted in memory); see
`dinojax.dense.depth` for the depth range of the released linear heads (`--linear-range hub`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["depth_picture", "main"]


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** np.floor(np.log10(raw)) if raw > 0 else 1.0
    step = min((s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw), default=raw)
    first = np.ceil(lo / step) * step
    return [float(v) for v in np.arange(first, hi + 1e-9 * step, step)]


def depth_picture(
    image: np.ndarray, depth: np.ndarray, *, vmin: float | None = None, vmax: float | None = None
) -> Image.Image:
    """uint8 (H, W, 3) image + (H, W) metres -> [image | colour map | scale bar] (near = bright)."""
    from dinojax.eval.pictures import colorize

    lo = float(np.min(depth)) if vmin is None else vmin
    hi = float(np.max(depth)) if vmax is None else vmax
    hi = hi if hi > lo else lo + 1e-3
    h, w = depth.shape
    colour = colorize(1.0 - (depth - lo) / (hi - lo))
    bar_w, label_w, pad = max(12, w // 40), 70, 6
    canvas = Image.new("RGB", (2 * w + pad + bar_w + label_w, h), (255, 255, 255))
    canvas.paste(Image.fromarray(np.asarray(image, np.uint8)), (0, 0))
    canvas.paste(Image.fromarray(colour), (w, 0))
    top, bottom = 8, h - 8
    ramp = np.linspace(hi, lo, max(bottom - top, 2))  # far at the top
    bar = colorize(1.0 - (ramp - lo) / (hi - lo))[:, None, :].repeat(bar_w, 1)
    canvas.paste(Image.fromarray(bar), (2 * w + pad, top))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    x0 = 2 * w + pad + bar_w
    for v in _ticks(lo, hi):
        y = top + (hi - v) / (hi - lo) * (bottom - top - 1)
        draw.line([(x0, y), (x0 + 4, y)], fill=(0, 0, 0))
        draw.text((x0 + 6, y - 6), f"{v:g} m", fill=(0, 0, 0), font=font)
    return canvas


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def _dense_source(spec: str, split: str, data_dir: str | None):
    try:
        from dinojax.dense.data import dense_source
    except ImportError:
        raise ValueError(
            "dense datasets need dinojax.dense.data (not in this installation)"
        ) from None
    return dense_source(spec, split, task="depth", data_dir=data_dir)


def _size(text: str) -> tuple[int, int]:
    try:
        h, _, w = text.partition("x")
        return (int(h), int(w or h))
    except ValueError:
        raise ValueError(f"--image-size expects H or HxW, got {text!r}") from None


def _depther(args, model):
    from dinojax.dense import load_depther

    return load_depther(
        model,
        args.head,
        dataset=args.dataset,
        min_depth=args.min_depth,
        max_depth=args.max_depth,
        linear_range=args.linear_range,
        dtype=args.dtype,
    )


def _predict(args) -> int:
    from dinojax.eval import cli
    from dinojax.eval.transforms import load_image

    imgs = [np.asarray(load_image(p)) for p in args.images]  # bad files fail before the model
    depther = _depther(args, cli.load_model(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path, img in zip(args.images, imgs):
        d = depther.predict(img)[0]
        stem = Path(path).stem
        pic = depth_picture(img, d, vmin=args.vmin, vmax=args.vmax)
        pic.save(out / f"{stem}_depth.png")
        if args.save_npy:
            np.save(out / f"{stem}_depth.npy", d)
        print(f"wrote {out / f'{stem}_depth.png'} ({d.min():.3f}-{d.max():.3f} m)")
    return 0


def _range(args, src) -> tuple[float, float]:
    from dinojax.convert.dense_depth import DATASET_RANGES

    lo, hi = DATASET_RANGES.get(args.dataset, getattr(src, "depth_range", None) or (None, None))
    lo = args.min_depth if args.min_depth is not None else (lo if lo is not None else 1e-3)
    hi = args.max_depth if args.max_depth is not None else hi
    if hi is None:
        raise ValueError("the depth range is unknown: pass --dataset nyu|kitti or --max-depth")
    return float(lo), float(hi)


def _train(args) -> int:
    from dinojax.dense.train_depth import DepthTrainConfig, train_depth_head
    from dinojax.eval import cli

    src = _dense_source(args.data, args.split, args.data_dir)
    val = _dense_source(args.val, args.val_split, args.data_dir) if args.val else None
    lo, hi = _range(args, src)
    cfg = DepthTrainConfig(
        layers=args.layers,
        image_size=_size(args.image_size),
        min_depth=lo,
        max_depth=hi,
        iters=args.iters,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        nyu_crop=args.nyu_crop,
        flip=not args.no_flip,
        seed=args.seed,
        dataset=args.dataset,
        log_every=args.log_every,
    )
    res = train_depth_head(
        cli.load_model(args),
        src,
        config=cfg,
        val_source=val,
        out_dir=args.out,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(
        f"wrote {Path(args.out) / 'head'} ({res.head_cfg['type']}, blocks "
        f"{res.head_cfg['out_index']}, final loss {res.history[-1]['loss']:.4f})"
    )
    if res.metrics:
        print(json.dumps(res.metrics, sort_keys=True))
    return 0


def _evaluate(args) -> int:
    from tqdm.auto import tqdm

    from dinojax.dense.depth_metrics import DepthMetrics
    from dinojax.eval import cli

    src = _dense_source(args.data, args.split, args.data_dir)
    depther = _depther(args, cli.load_model(args))
    n = len(src) if args.max_images is None else min(args.max_images, len(src))
    acc = DepthMetrics(
        min_depth=depther.min_depth, max_depth=depther.max_depth, eigen_crop=args.eigen_crop
    )
    for i in tqdm(range(n), desc="evaluate", disable=args.no_progress):
        img, gt = src[i]
        acc.update(depther.predict(img)[0], np.asarray(gt, np.float32))
    res = acc.result()
    res.update(
        head=str(args.head),
        data=args.data,
        split=args.split,
        range=[depther.min_depth, depther.max_depth],
        eigen_crop=args.eigen_crop,
    )
    print(json.dumps(res, sort_keys=True))
    if args.output:
        cli.write_json(args.output, res)
    return 0


def _parser() -> argparse.ArgumentParser:
    from dinojax.eval import cli

    p = argparse.ArgumentParser(
        prog="python -m dinojax.eval.depth",
        description="Monocular depth with DINOv2 features: pictures, "
        "training linear heads, metrics.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def head_args(q):
        q.add_argument("--head", required=True, help="head directory or released *_head.pth")
        q.add_argument(
            "--linear-range",
            choices=["dataset", "hub"],
            default="dataset",
            help="linear heads: decode over the dataset's range (default) or the hub's 0.001-80 m",
        )
        q.add_argument(
            "--dtype",
            choices=["float32", "bfloat16"],
            default="float32",
            help="backbone compute dtype",
        )

    def range_args(q):
        q.add_argument(
            "--dataset",
            choices=["nyu", "kitti"],
            default=None,
            help="depth range of the dataset (NYU 0.001-10 m, KITTI 0.001-80 m)",
        )
        q.add_argument("--min-depth", type=float, default=None)
        q.add_argument("--max-depth", type=float, default=None)

    q = sub.add_parser("predict", help="depth pictures (PNG) for image files")
    cli.add_model_args(q)
    head_args(q)
    range_args(q)
    q.add_argument("--images", nargs="+", required=True, help="image files")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--vmin", type=float, default=None, help="colour scale minimum (m)")
    q.add_argument("--vmax", type=float, default=None, help="colour scale maximum (m)")
    q.add_argument("--save-npy", action="store_true", help="also save the maps (metres) as .npy")

    q = sub.add_parser("train", help="train a linear depth head on frozen features")
    cli.add_model_args(q)
    range_args(q)
    q.add_argument("--data", required=True, help="dense depth dataset (e.g. depthscenes:300)")
    q.add_argument("--split", default="train")
    q.add_argument("--val", default=None, help="validation dataset (metrics at the end)")
    q.add_argument("--val-split", default="val")
    q.add_argument("--data-dir", default=None, help="TFDS data_dir")
    q.add_argument(
        "--layers",
        type=int,
        choices=[1, 4],
        default=4,
        help="1: linear (last block), 4: linear4 (the released blocks)",
    )
    q.add_argument("--image-size", default="224x294", help="H or HxW every sample is resized to")
    q.add_argument("--iters", type=int, default=1000)
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--lr", type=float, default=1e-3)
    q.add_argument("--weight-decay", type=float, default=1e-4)
    q.add_argument("--nyu-crop", action="store_true", help="crop 480x640 samples to 45:472, 43:608")
    q.add_argument("--no-flip", action="store_true", help="no horizontal flips")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--log-every", type=int, default=10)
    q.add_argument("--out", required=True, help="output folder (head/ and log.jsonl)")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--no-progress", action="store_true")

    q = sub.add_parser("evaluate", help="depth metrics of a head on a dataset")
    cli.add_model_args(q)
    head_args(q)
    range_args(q)
    q.add_argument("--data", required=True, help="dense depth dataset")
    q.add_argument("--split", default="val")
    q.add_argument("--data-dir", default=None, help="TFDS data_dir")
    q.add_argument("--eigen-crop", action="store_true", help="NYU Eigen crop (480x640 maps)")
    q.add_argument("--max-images", type=int, default=None)
    q.add_argument("--output", default=None, help="write the metrics as JSON here")
    q.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from dinojax.eval import cli

    args = _parser().parse_args(argv)
    run = {"predict": _predict, "train": _train, "evaluate": _evaluate}[args.command]
    return cli.run_main(lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
