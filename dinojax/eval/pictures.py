"""Pictures of what the features see, saved as PNG.

- Patch-feature PCA (the DINOv2 paper's figure 1 recipe): the final-norm patch tokens of all the
  given images are pooled; a first PCA's first component separates foreground from background
  (components are min-max scaled to [0, 1] and thresholded; the sign is chosen so that the image
  borders fall mostly in the background); a second PCA on the foreground patches only gives three
  components, each min-max scaled, shown as RGB; background is black. Pooling the images (the
  default) makes colours comparable across them, like the paper's columns.
- Attention maps (DINO's `visualize_attention.py`): the attention of the CLS query to every patch
  (registers excluded) in each head of the last block, `model.get_last_self_attention`, min-max
  scaled per head, coloured and blended over the image; plus the mean over heads.

Images can have any size: each is resized so that its shorter side is `size` and both sides are
multiples of the patch size (or kept at their own size, rounded, with `size=None`).

Outputs (one PNG per image):
  `<name>_pca.png`        (H, 2W): the resized image | the PCA picture (patch grid upsampled)
  `<name>_attention.png`  (rows*H, cols*W): panels [image, mean, head 0, head 1, ...],
                          cols = min(panels, `cols`), rows = ceil(panels / cols)

    python -m dinojax.eval.pictures --checkpoint CKPT --images a.jpg b.png --kind pca attention \
        --out pictures/ --size 448
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from dinojax.eval.features import Tokens, _forward
from dinojax.eval.transforms import fit_to_patch, load_image, normalize

__all__ = [
    "attention_maps",
    "attention_mass_masks",
    "attention_pictures",
    "colorize",
    "foreground_masks",
    "patch_pca",
    "pca_pictures",
    "prepare_image",
]

# Anchors of a perceptual dark-to-bright colormap (close to matplotlib's "inferno").
_CMAP = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
     [250, 193, 39], [252, 255, 164]], np.float64,
)  # fmt: skip


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB through the colormap."""
    v = np.clip(np.asarray(values, np.float64), 0.0, 1.0) * (len(_CMAP) - 1)
    lo = np.floor(v).astype(int)
    hi = np.minimum(lo + 1, len(_CMAP) - 1)
    t = (v - lo)[..., None]
    return np.round(_CMAP[lo] * (1 - t) + _CMAP[hi] * t).astype(np.uint8)


def _minmax(x: np.ndarray, axis=None) -> np.ndarray:
    lo = x.min(axis=axis, keepdims=True)
    span = x.max(axis=axis, keepdims=True) - lo
    return (x - lo) / np.where(span > 0, span, 1.0)


def prepare_image(data: Any, patch_size: int, size: int | None = 448) -> Image.Image:
    """An RGB image resized (bicubic) to multiples of the patch size, shorter side ~`size`."""
    img = load_image(data)
    h, w = fit_to_patch(img.height, img.width, patch_size, size)
    return img if (w, h) == img.size else img.resize((w, h), Image.BICUBIC)


# ---------------------------------------------------------------------------------------------
# PCA
# ---------------------------------------------------------------------------------------------


def _pca(x: np.ndarray, k: int) -> np.ndarray:
    """Scores of the first k principal components of the rows of x (float64 SVD)."""
    x = x.astype(np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:k].T


def _border(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[0], m[-1], m[:, 0], m[:, -1] = True, True, True, True
    return m.reshape(-1)


def _flatten(features: Sequence[np.ndarray]) -> tuple[list[tuple[int, int]], np.ndarray]:
    if not features:
        raise ValueError("no images")
    shapes = [tuple(f.shape[:2]) for f in features]
    flat = np.concatenate([f.reshape(-1, f.shape[-1]) for f in features])
    if flat.shape[0] < 3:
        raise ValueError(f"PCA needs at least 3 patches, got {flat.shape[0]}")
    return shapes, flat


def _split(values: np.ndarray, shapes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    out, start = [], 0
    for h, w in shapes:
        out.append(values[start : start + h * w].reshape(h, w, *values.shape[1:]))
        start += h * w
    return out


def _foreground(shapes, flat: np.ndarray, threshold: float) -> np.ndarray:
    first = _minmax(_pca(flat, 1)[:, 0])
    border = np.concatenate([_border(h, w) for h, w in shapes])
    inner = ~border
    if inner.any() and first[border].mean() > first[inner].mean():
        first = 1.0 - first  # the sign of a component is arbitrary: borders -> background
    return first > threshold


def foreground_masks(features: Sequence[np.ndarray], threshold: float = 0.5) -> list[np.ndarray]:
    """(h_i, w_i) boolean foreground masks from the first principal component of all patches
    (min-max scaled, oriented so the image borders are mostly background, > `threshold`)."""
    shapes, flat = _flatten(features)
    return _split(_foreground(shapes, flat, threshold), shapes)


def patch_pca(
    features: Sequence[np.ndarray], threshold: float = 0.5, remove_background: bool = True
) -> list[np.ndarray]:
    """Patch grids (h_i, w_i, D) -> RGB pictures (h_i, w_i, 3) in [0, 1], one joint PCA.

    Foreground as in `foreground_masks`; background patches are black. With fewer than 3
    foreground patches, or with `remove_background=False`, every patch is foreground.
    """
    shapes, flat = _flatten(features)
    fg = np.ones(flat.shape[0], bool)
    if remove_background:
        fg = _foreground(shapes, flat, threshold)
        if fg.sum() < 3:
            fg = np.ones_like(fg)
    rgb = np.zeros((flat.shape[0], 3))
    scores = _pca(flat[fg], 3)
    if scores.shape[1] < 3:
        scores = np.pad(scores, ((0, 0), (0, 3 - scores.shape[1])))
    rgb[fg] = _minmax(scores, axis=0)
    return _split(rgb, shapes)


def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour upsampling of a (h, w, ...) patch grid to (height, width, ...)."""
    rows = np.arange(height) * grid.shape[0] // height
    cols = np.arange(width) * grid.shape[1] // width
    return grid[rows][:, cols]


def _run(model, fn, img: Image.Image) -> dict[str, np.ndarray]:
    graphdef, state = nnx.split(model)
    x = jnp.asarray(normalize(img)[None])
    return {k: np.asarray(v) for k, v in _forward(graphdef, fn, state, x).items()}


def _names(images: Sequence[Any], given: Sequence[str] | None) -> list[str]:
    names, seen = [], {}
    for i, data in enumerate(images):
        if given is not None:
            base = given[i]
        elif isinstance(data, (str, os.PathLike)):
            base = Path(data).stem
        else:
            base = f"image{i:03d}"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return names


def pca_pictures(
    model,
    images: Sequence[Any],
    out_dir: str | os.PathLike,
    *,
    size: int | None = 448,
    threshold: float = 0.5,
    remove_background: bool = True,
    joint: bool = True,
    names: Sequence[str] | None = None,
) -> list[Path]:
    """Write `<name>_pca.png` (image | PCA picture) for every image; returns the paths."""
    if not images:
        raise ValueError("no images given")
    p = model.cfg.patch_size
    imgs = [prepare_image(d, p, size) for d in images]
    feats = [_run(model, Tokens(cls=False, patch=True), im)["patch"][0] for im in imgs]
    if joint:
        pics = patch_pca(feats, threshold, remove_background)
    else:
        pics = [patch_pca([f], threshold, remove_background)[0] for f in feats]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, im, pic in zip(_names(images, names), imgs, pics):
        w, h = im.size
        canvas = np.zeros((h, 2 * w, 3), np.uint8)
        canvas[:, :w] = np.asarray(im)
        canvas[:, w:] = np.round(_upsample(pic, h, w) * 255).astype(np.uint8)
        path = out_dir / f"{name}_pca.png"
        Image.fromarray(canvas).save(path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ClsAttention:
    def __call__(self, model, x):
        attn = model.get_last_self_attention(x)
        first_patch = 1 + model.cfg.num_register_tokens
        return {"attn": attn[:, :, 0, first_patch:].astype(jnp.float32)}


def _check_attention(model) -> None:
    if not hasattr(model, "get_last_self_attention"):
        name = getattr(model.cfg, "name", type(model).__name__)
        raise ValueError(f"attention pictures need a ViT (self-attention); {name} is a "
                         f"{type(model).__name__}: use the PCA pictures instead")  # fmt: skip


def attention_maps(model, image: Any, size: int | None = 448) -> np.ndarray:
    """(heads, h, w) CLS-to-patch attention of the last block for one image."""
    _check_attention(model)
    img = prepare_image(image, model.cfg.patch_size, size)
    p = model.cfg.patch_size
    attn = _run(model, _ClsAttention(), img)["attn"][0]
    return attn.reshape(attn.shape[0], img.height // p, img.width // p)


def attention_mass_masks(maps: np.ndarray, mass: float) -> np.ndarray:
    """DINO's `visualize_attention.py --threshold`: per head, the smallest set of patches holding
    `mass` of the attention (sorted ascending, normalised, cumulative sum > 1 - mass)."""
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"attention mass must be in (0, 1], got {mass}")
    flat = maps.reshape(maps.shape[0], -1).astype(np.float64)
    order = np.argsort(flat, axis=1, kind="stable")
    val = np.take_along_axis(flat, order, axis=1)
    val = val / val.sum(axis=1, keepdims=True)
    keep_sorted = np.cumsum(val, axis=1) > (1.0 - mass)
    keep = np.empty_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=1)
    return keep.reshape(maps.shape)


def attention_pictures(
    model,
    images: Sequence[Any],
    out_dir: str | os.PathLike,
    *,
    size: int | None = 448,
    cols: int = 4,
    alpha: float = 0.6,
    mass: float | None = None,
    names: Sequence[str] | None = None,
) -> list[Path]:
    """Write `<name>_attention.png` (panels: image, mean over heads, each head) per image.
    With `mass`, each map shows DINO's thresholded mask (`attention_mass_masks`) instead."""
    if not images:
        raise ValueError("no images given")
    _check_attention(model)
    if cols <= 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"cols must be positive and alpha in [0, 1], got {cols}, {alpha}")
    if mass is not None and not 0.0 < mass <= 1.0:
        raise ValueError(f"attention mass must be in (0, 1], got {mass}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    p = model.cfg.patch_size
    paths = []
    for name, data in zip(_names(images, names), images):
        img = prepare_image(data, p, size)
        attn = _run(model, _ClsAttention(), img)["attn"][0]
        maps = attn.reshape(attn.shape[0], img.height // p, img.width // p)
        base = np.asarray(img, np.float64)
        w, h = img.size
        panels = [np.asarray(img)]
        shown = np.concatenate([maps.mean(axis=0, keepdims=True), maps])
        shown = attention_mass_masks(shown, mass).astype(np.float64) if mass else shown
        for m in shown:
            heat = colorize(_upsample(_minmax(m), h, w)).astype(np.float64)
            panels.append(np.round((1 - alpha) * base + alpha * heat).astype(np.uint8))
        c = min(cols, len(panels))
        rows = math.ceil(len(panels) / c)
        canvas = np.zeros((rows * h, c * w, 3), np.uint8)
        for i, panel in enumerate(panels):
            r, q = divmod(i, c)
            canvas[r * h : (r + 1) * h, q * w : (q + 1) * w] = panel
        path = out_dir / f"{name}_attention.png"
        Image.fromarray(canvas).save(path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from dinojax.eval import cli

    p = argparse.ArgumentParser(
        prog="python -m dinojax.eval.pictures",
        description="Patch-feature PCA and last-block attention pictures (PNG).",
    )
    cli.add_model_args(p)
    p.add_argument("--images", nargs="+", default=None, help="image files")
    p.add_argument("--data", default=None, help="or take images from a dataset source")
    p.add_argument("--count", type=int, default=4, help="how many images from --data")
    p.add_argument("--data-dir", default=None, help="TFDS data_dir")
    p.add_argument("--kind", nargs="+", choices=["pca", "attention"], default=["pca", "attention"])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--size", type=int, default=448,
        help="shorter side in pixels, rounded to the patch size (0: keep each image's size)",
    )  # fmt: skip
    p.add_argument("--threshold", type=float, default=0.5, help="PCA foreground threshold")
    p.add_argument("--keep-background", action="store_true", help="PCA without background removal")
    p.add_argument("--separate", action="store_true", help="one PCA per image instead of joint")
    p.add_argument("--cols", type=int, default=4, help="attention panels per row")
    p.add_argument(
        "--mass", type=float, default=None,
        help="show DINO's masks keeping this share of each head's attention (e.g. 0.6)",
    )  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from dinojax.eval import cli

    args = _parser().parse_args(argv)

    def run():
        if bool(args.images) == bool(args.data):
            raise ValueError("give either --images FILE... or --data SOURCE")
        names = None
        if args.images:
            images = list(args.images)
            # Fail on a bad file before the model is loaded and compiled.
            for path in images:
                load_image(path)
        else:
            from dinojax.eval.features import resolve_source

            src = resolve_source(args.data, args.data_dir)
            if args.count <= 0:
                raise ValueError(f"--count must be positive, got {args.count}")
            recs = [src[i] for i in range(min(args.count, len(src)))]
            images = [r["image"] for r in recs]
            names = [f"{i:03d}_" + Path(str(r.get("key", i))).stem for i, r in enumerate(recs)]
        model = cli.load_model(args)
        size = args.size or None
        written = []
        if "pca" in args.kind:
            written += pca_pictures(
                model, images, args.out, size=size, threshold=args.threshold,
                remove_background=not args.keep_background, joint=not args.separate, names=names,
            )  # fmt: skip
        if "attention" in args.kind:
            written += attention_pictures(
                model, images, args.out, size=size, cols=args.cols, mass=args.mass, names=names
            )
        for path in written:
            print(f"wrote {path}")
        return 0

    return cli.run_main(run)


if __name__ == "__main__":
    raise SystemExit(main())
