"""Dense datasets (segmentation and depth) for training and evaluating the dense heads.

A dense source has `__len__`, `__getitem__(i) -> (image uint8 (H, W, 3), target)` and
`name(i)`; the target is a label map uint8 (H, W) with 255 = ignore (segmentation, with
`num_classes` / `class_names` where known) or depth float32 (H, W) in metres with 0 = invalid
(depth, with `depth_range` where known). `dense_source(spec, split)` builds one from a string:

    digits[:N[:SIZE]]         N (default 300) digit scenes, 11 classes, SIZE = 224 | HxW
    depthscenes[:N[:SIZE]]    N (default 300) rendered scenes, depth 0.5-10 m
    folder:PATH | PATH        images/[SPLIT/] + annotations/[SPLIT/] (ADE20K layout)
    tfds:NAME[:SPLIT]         built by `python -m dinojax.dense.data.tfds_dense`, in data_dir

Any spec but tfds may end in `?key=value&...` options (`parse_options`), e.g.
`folder:/data/ade?num_classes=150&reduce_zero_label=true`, `depthscenes:200?depth_range=1-20`.
"""

from __future__ import annotations

import os
from pathlib import Path

from dinojax.dense.data.folder import DenseFolderSource
from dinojax.dense.data.synthetic import DepthScenes, DigitScenes, depth_scenes, digit_scenes

__all__ = [
    "DenseFolderSource",
    "DenseTfdsSource",
    "DepthScenes",
    "DigitScenes",
    "build_dense_tfds",
    "dense_source",
    "parse_options",
    "depth_scenes",
    "digit_scenes",
    "source_task",
]

# The embedded datasets draw each split from its own seed stream, so train and val never share
# a scene.
_SPLIT_SEED = {"train": 0, "training": 0, "val": 1, "validation": 1, "test": 2}
_DEFAULT_N = 300


def __getattr__(name):  # TFDS is imported only when used
    if name in ("DenseTfdsSource", "build_dense_tfds"):
        from dinojax.dense.data import tfds_dense

        return getattr(tfds_dense, name)
    raise AttributeError(name)


def _size(text: str, spec: str):
    try:
        if "x" in text:
            h, w = text.split("x")
            return int(h), int(w)
        return int(text)
    except ValueError:
        raise ValueError(f"dense dataset {spec!r}: size {text!r} is not an int or HxW") from None


def source_task(src) -> str:
    """ "seg" or "depth": what a dense source's targets are."""
    task = getattr(src, "task", None)
    if task in ("seg", "depth"):
        return task
    if isinstance(src, DepthScenes) or getattr(src, "depth_range", None) is not None:
        return "depth"
    return "seg"


def _folder_task(root: Path, split: str | None) -> str:
    """Guess a folder's task from its first annotation: .npy or a 16-bit PNG -> depth."""
    from PIL import Image

    from dinojax.dense.data.folder import split_dirs

    _, ann = split_dirs(root, split)
    for n in sorted(os.listdir(ann)):
        if n.lower().endswith(".npy"):
            return "depth"
        if n.lower().endswith(".png"):
            with Image.open(ann / n) as im:
                return "depth" if im.mode.startswith("I") else "seg"
    raise ValueError(f"no annotations (.png / .npy) in {str(ann)!r}")


def dense_source(
    spec,
    split: str = "train",
    *,
    task: str | None = None,
    data_dir: str | None = None,
    seed: int = 0,
    **options,
):
    """A dense source from `spec` (see the module docstring) for `split` ("train", "val", ...).

    `task` ("seg" | "depth"), when given, is checked against the source's. `options` go to
    the source: `digit_scenes` / `depth_scenes` keywords (size, colour_cue, depth_range, ...)
    or `DenseFolderSource`'s (num_classes, reduce_zero_label, depth_scale, npy_scale,
    depth_range). A source object is returned as it is."""
    if task not in (None, "seg", "depth"):
        raise ValueError(f"task must be 'seg' or 'depth', got {task!r}")
    if not isinstance(spec, (str, os.PathLike)):
        if not hasattr(spec, "__getitem__") or not hasattr(spec, "__len__"):
            raise ValueError(f"a dense source needs __len__ and __getitem__, got {type(spec)}")
        src = spec
    else:
        src = _from_string(str(spec), split, task, data_dir, seed, options)
    if len(src) == 0:
        raise ValueError(f"dense dataset {spec!r} split {split!r} is empty")
    found = source_task(src)
    if task is not None and found != task:
        what = {"seg": "segmentation", "depth": "depth"}
        raise ValueError(
            f"dense dataset {spec!r} holds {what[found]} targets, expected {what[task]}"
        )
    return src


_OPTION_KEYS = {
    "num_classes", "reduce_zero_label", "depth_scale", "npy_scale", "depth_range",  # folders
    "colour_cue", "digits_per_image", "scale", "fov", "cache",  # embedded scenes
}  # fmt: skip


def _option_value(text: str):
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    parts = text.split("-") if "-" in text.lstrip("-") and "e-" not in low else [text]
    try:
        vals = [float(p) if any(c in p for c in ".e") else int(p) for p in parts]
    except ValueError:
        raise ValueError(
            f"option value {text!r} is not a number, a range A-B or true/false"
        ) from None
    return vals[0] if len(vals) == 1 else tuple(vals)


def parse_options(spec: str) -> tuple[str, dict]:
    """`SPEC?key=value&key=value` -> (SPEC, options): numbers, `A-B` ranges (tuples) and
    true / false, e.g. `folder:/data/ade?num_classes=150&reduce_zero_label=true`,
    `folder:/data/nyu?depth_range=0.001-10`, `digits:300?colour_cue=false`."""
    base, sep, query = spec.partition("?")
    if not sep:
        return spec, {}
    options = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or key not in _OPTION_KEYS:
            raise ValueError(f"dense dataset {spec!r}: option {item!r} is not key=value with a "
                             f"key of {', '.join(sorted(_OPTION_KEYS))}")  # fmt: skip
        try:
            options[key] = _option_value(value)
        except ValueError as e:
            raise ValueError(f"dense dataset {spec!r}: {key}: {e}") from None
    return base, options


def _from_string(spec, split, task, data_dir, seed, options):
    if not spec:
        raise ValueError("empty dense dataset specification")
    spec, given = parse_options(spec)
    options = {**given, **options}
    kind, _, rest = spec.partition(":")
    if kind in ("digits", "depthscenes"):
        parts = rest.split(":") if rest else []
        if len(parts) > 2:
            raise ValueError(f"dense dataset {spec!r}: expected {kind}[:N[:SIZE]]")
        try:
            n = int(parts[0]) if parts and parts[0] else _DEFAULT_N
        except ValueError:
            raise ValueError(f"dense dataset {spec!r}: N {parts[0]!r} is not an int") from None
        if len(parts) == 2:
            options = {"size": _size(parts[1], spec), **options}
        if split not in _SPLIT_SEED:
            raise ValueError(
                f"dense dataset {spec!r} has the splits train, val, test; got {split!r}"
            )
        s = seed + 1_000_003 * _SPLIT_SEED[split]
        make = digit_scenes if kind == "digits" else depth_scenes
        return make(n, seed=s, **options)
    if kind == "tfds":
        from dinojax.data.sources import parse_tfds_spec
        from dinojax.dense.data.tfds_dense import DenseTfdsSource

        if not rest:
            raise ValueError("tfds dense dataset needs a name: 'tfds:NAME[:SPLIT]'")
        if options:
            raise ValueError(
                f"tfds dense datasets take no options (fixed when built), got {sorted(options)}"
            )
        name, tsplit = parse_tfds_spec(rest)
        if name == rest:
            tsplit = split  # no split in the spec: the one asked for
        return DenseTfdsSource(name, split=tsplit, data_dir=data_dir)
    if kind == "folder" or os.path.sep in spec or Path(spec).exists():
        path = Path(rest if kind == "folder" else spec).expanduser()
        if kind == "folder" and not rest:
            raise ValueError("folder dense dataset needs a path: 'folder:/path/to/root'")
        if task is None:
            from dinojax.dense.data.folder import split_dirs

            split_dirs(path, split)  # the layout errors first
            task = _folder_task(path, split)
        return DenseFolderSource(path, split, task=task, **options)
    raise ValueError(
        f"unknown dense dataset {spec!r}: use digits[:N[:SIZE]], "
        "depthscenes[:N[:SIZE]], folder:PATH or tfds:NAME[:SPLIT]"
    )
