"""Feature extraction to `.npy` files: CLS, patch tokens and intermediate layers, any resolution.

    python -m dinojax.eval.extract --checkpoint CKPT --data folder:/images --out feats/ \
        --patch --layers 4 --size 448 644

writes into `--out`:

    cls.npy            (N, D)           final-norm CLS (`model(x)`)
    patch.npy          (N, h, w, D)     final-norm patch tokens (registers excluded)
    layers_cls.npy     (N, L, D)        CLS of the requested blocks, final norm applied
    layers_patch.npy   (N, L, h, w, D)  their patch tokens (with --layer-patches)
    labels.npy         (N,)             dataset labels (-1 when unlabelled)
    keys.txt           one record name per line (file path for folders)
    meta.json          architecture, transform, block indices, shapes, source

Arrays are written batch by batch into memory-mapped `.npy` files (bounded host memory), in a
temporary folder renamed into place at the end, so an interrupted run leaves nothing half-written.
Images go through the official eval transform (`--image-size`, default 224 crop) or are resized to
exactly `--size H [W]` (multiples of the patch size).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinojax.eval.features import Tokens, iter_features, resolve_source
from dinojax.eval.transforms import EvalTransform, ResizeTransform

__all__ = ["extract_to_dir", "main", "make_transform"]


def make_transform(
    model, image_size: int = 224, resize_size: int | None = None, size: Sequence[int] | None = None
):
    """Official eval transform, or an exact resize to `size` = (S,) or (H, W)."""
    p = model.cfg.patch_size
    if size:
        if len(size) not in (1, 2):
            raise ValueError(f"--size takes H or H W, got {list(size)}")
        h, w = (size[0], size[0]) if len(size) == 1 else size
        if model.cfg.family == "dinov2" and (h % p or w % p):
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        return ResizeTransform(h, w)
    if model.cfg.family == "dinov2" and image_size % p:
        raise ValueError(f"crop size {image_size} is not a multiple of the patch size {p}")
    if resize_size is None:
        return EvalTransform.for_crop(image_size)
    return EvalTransform(resize_size=resize_size, crop_size=image_size)


def _layer_indices(depth: int, layers: int | Sequence[int] | None) -> tuple[int, ...] | None:
    if layers is None:
        return None
    idx = tuple(range(depth - layers, depth)) if isinstance(layers, int) else tuple(layers)
    if not idx or any(i < 0 or i >= depth for i in idx):
        raise ValueError(f"block indices {list(idx)} out of range for a {depth}-block model")
    return idx


def extract_to_dir(
    model,
    source,
    out_dir: str | os.PathLike,
    *,
    cls: bool = True,
    patch: bool = False,
    layers: int | Sequence[int] | None = None,
    layer_patches: bool = False,
    transform=None,
    batch_size: int = 64,
    indices: Sequence[int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    data_dir: str | None = None,
    mesh=None,
) -> dict[str, Any]:
    """Extract and write the arrays listed in the module docstring; returns the metadata."""
    import jax

    # With several processes every one computes (collectives) and gets all rows; process 0 writes.
    writer = jax.process_index() == 0
    out_dir = Path(out_dir)
    nonempty = out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))
    # Every process checks (a shared folder: nothing is written before all processes started,
    # since writing needs every process's collectives), so all stop together.
    if nonempty and not overwrite:
        raise ValueError(f"{out_dir} exists and is not empty (use --overwrite)")
    if not (cls or patch or layers is not None):
        raise ValueError("nothing to extract: ask for cls, patch and/or layers")
    if layer_patches and layers is None:
        raise ValueError("layer patches need layers (--layers)")
    src = resolve_source(source, data_dir)
    idx = _layer_indices(model.cfg.depth, layers)
    fn = Tokens(cls=cls, patch=patch, layers=idx, layer_patches=layer_patches)
    transform = transform or make_transform(model)
    n = len(src) if indices is None else len(indices)
    if not writer:
        for _ in iter_features(
            model, src, fn, transform=transform, batch_size=batch_size, indices=indices,
            mesh=mesh, progress=False,
        ):  # fmt: skip
            pass
        return {"count": n, "writer": False}
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    arrays: dict[str, np.ndarray] = {}
    labels = np.lib.format.open_memmap(tmp / "labels.npy", "w+", np.int64, (n,))
    keys: list[str] = []
    try:
        for batch in iter_features(
            model, src, fn, transform=transform, batch_size=batch_size, indices=indices,
            mesh=mesh, progress=progress, desc="extract",
        ):  # fmt: skip
            rows = slice(batch.start, batch.start + len(batch.labels))
            for name, value in batch.features.items():
                if name not in arrays:
                    arrays[name] = np.lib.format.open_memmap(
                        tmp / f"{name}.npy", "w+", np.float32, (n, *value.shape[1:])
                    )
                arrays[name][rows] = value
            labels[rows] = batch.labels
            keys.extend(batch.keys)
        for a in (*arrays.values(), labels):
            a.flush()
        (tmp / "keys.txt").write_text("".join(k.replace("\n", " ") + "\n" for k in keys))
        meta = {
            "arch": model.cfg.to_dict(),
            "source": repr(src),
            "transform": {"type": type(transform).__name__, **vars(transform)},
            "layers": list(idx) if idx is not None else None,
            "arrays": {k: list(v.shape) for k, v in arrays.items()},
            "count": n,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        del arrays, labels
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return meta


def _parser() -> argparse.ArgumentParser:
    from dinojax.eval import cli

    p = argparse.ArgumentParser(
        prog="python -m dinojax.eval.extract",
        description="Extract CLS / patch / intermediate-layer features of a dataset to .npy files.",
    )
    cli.add_model_args(p)
    p.add_argument("--data", required=True, help="digits[:split], folder:DIR, tfds:NAME[:SPLIT]")
    p.add_argument("--out", required=True, help="output folder (must be new or empty)")
    p.add_argument("--data-dir", default=None, help="TFDS data_dir")
    p.add_argument("--no-cls", action="store_true", help="do not write cls.npy")
    p.add_argument("--patch", action="store_true", help="write patch.npy (N, h, w, D)")
    p.add_argument(
        "--layers", type=int, nargs="+", default=None,
        help="one number n = the last n blocks, or several 0-based block indices",
    )  # fmt: skip
    p.add_argument("--layer-patches", action="store_true", help="also the layers' patch tokens")
    p.add_argument("--image-size", type=int, default=224, help="center crop (eval transform)")
    p.add_argument("--resize-size", type=int, default=None)
    p.add_argument("--size", type=int, nargs="+", default=None, help="exact resize: H [W]")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-items", type=int, default=None, help="only the first N records")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from dinojax.eval import cli

    args = _parser().parse_args(argv)

    def run():
        src = resolve_source(args.data, args.data_dir)  # bad data fails before the model loads
        model = cli.load_model(args)
        transform = make_transform(model, args.image_size, args.resize_size, args.size)
        layers = args.layers
        if layers is not None and len(layers) == 1:
            layers = layers[0]
        indices = None
        if args.max_items is not None:
            if args.max_items <= 0:
                raise ValueError(f"--max-items must be positive, got {args.max_items}")
            indices = range(min(len(src), args.max_items))
        meta = extract_to_dir(
            model, src, args.out, cls=not args.no_cls, patch=args.patch, layers=layers,
            layer_patches=args.layer_patches, transform=transform, batch_size=args.batch_size,
            indices=indices, overwrite=args.overwrite, progress=not args.no_progress,
            data_dir=args.data_dir,
        )  # fmt: skip
        if "arrays" not in meta:  # not the writing process
            return 0
        shapes = ", ".join(f"{k} {tuple(v)}" for k, v in meta["arrays"].items())
        print(f"wrote {args.out}: {meta['count']} images; {shapes}")
        return 0

    return cli.run_main(run)


if __name__ == "__main__":
    raise SystemExit(main())
