"""Dense datasets in folders: `images/` + `annotations/` with matching file stems (ADE20K's
layout), optionally split into subfolders (`images/training`, `annotations/training`, ...).

    root/images[/SPLIT]/NAME.jpg         RGB images (.jpg .jpeg .png .webp)
    root/annotations[/SPLIT]/NAME.png    segmentation: uint8 label map, 255 = ignore
                                         depth: 16-bit PNG (x depth_scale, default 1/1000: mm) or
                                         NAME.npy float metres (x npy_scale, default 1); 0 = invalid
    root/classes.txt                     optional, one class name a line (segmentation)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["DenseFolderSource", "decode_label_map", "decode_depth", "split_dirs"]

_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp")
# ADE20K names its splits "training" and "validation"; accept the usual short names for them.
SPLIT_ALIASES = {
    "train": ("training",),
    "val": ("validation",),
    "validation": ("val",),
    "training": ("train",),
    "test": ("testing",),
}


def split_dirs(root: Path, split: str | None) -> tuple[Path, Path]:
    """(images dir, annotations dir) of `split` under `root`: `images/SPLIT` (or its ADE20K
    alias, train -> training, val -> validation) when it exists, else the flat `images/`."""
    img_root, ann_root = root / "images", root / "annotations"
    if not root.is_dir():
        raise ValueError(f"dense dataset folder {str(root)!r} does not exist or is not a folder")
    if not img_root.is_dir() or not ann_root.is_dir():
        raise ValueError(
            f"{str(root)!r}: expected the subfolders images/ and annotations/ "
            "(ADE20K layout), found " + ", ".join(sorted(os.listdir(root))[:8])
        )
    if split:
        for name in (split, *SPLIT_ALIASES.get(split, ())):
            if (img_root / name).is_dir():
                return img_root / name, ann_root / name
    subdirs = sorted(p.name for p in img_root.iterdir() if p.is_dir())
    if subdirs and split:
        raise ValueError(f"{str(img_root)!r} has no split {split!r} (found: {', '.join(subdirs)})")
    if subdirs and not any(_is_image(p.name) for p in img_root.iterdir()):
        raise ValueError(f"{str(img_root)!r} holds the splits {', '.join(subdirs)}: name one")
    return img_root, ann_root


def _is_image(name: str) -> bool:
    return name.lower().endswith(_IMAGE_EXT) and not name.startswith(".")


def decode_label_map(data, name: str) -> np.ndarray:
    """A single-channel PNG (mode L or P: the palette indices) -> uint8 (H, W)."""
    import io

    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        img.load()
    except Exception as e:  # noqa: BLE001 - Pillow raises several types for bad files
        raise ValueError(f"cannot decode label map {name}: {type(e).__name__}: {e}") from None
    if img.mode not in ("L", "P"):
        raise ValueError(
            f"label map {name} has image mode {img.mode!r}: expected a single-channel "
            "8-bit PNG (mode L or P) of class indices"
        )
    return np.asarray(img, dtype=np.uint8)


def decode_depth(path: Path, depth_scale: float, npy_scale: float) -> np.ndarray:
    """A 16-bit PNG (x depth_scale) or a .npy array (x npy_scale) -> float32 metres (H, W)."""
    from PIL import Image

    name = str(path)
    if path.suffix.lower() == ".npy":
        try:
            a = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot read depth map {name}: {type(e).__name__}: {e}") from None
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim != 2:
            raise ValueError(f"depth map {name} has shape {a.shape}: expected (H, W)")
        return (a.astype(np.float64) * npy_scale).astype(np.float32)
    try:
        img = Image.open(path)
        img.load()
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot decode depth map {name}: {type(e).__name__}: {e}") from None
    if img.mode not in ("I;16", "I;16B", "I", "L"):
        raise ValueError(
            f"depth map {name} has image mode {img.mode!r}: expected a single-channel 16-bit PNG"
        )
    return (np.asarray(img).astype(np.float64) * depth_scale).astype(np.float32)


class DenseFolderSource:
    """Images and their label maps (task "seg") or depth maps (task "depth") from a folder
    (see the module docstring). `__getitem__(i)` -> (uint8 (H, W, 3), target).

    Segmentation: `reduce_zero_label` maps 0 -> 255 and every other value v -> v - 1, as
    mmsegmentation's ADE20K config does (ADE20K's 0 is "other"); with `num_classes` (or
    `classes.txt`) a value outside 0..K-1 and not 255 is an error naming the file.
    Depth: `depth_range` (min, max) is recorded for the heads; values are not clipped.
    Missing annotations fail here, at construction, naming the first image without one.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = None,
        *,
        task: str = "seg",
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        reduce_zero_label: bool = False,
        depth_scale: float = 1e-3,
        npy_scale: float = 1.0,
        depth_range: tuple[float, float] | None = None,
    ) -> None:
        if task not in ("seg", "depth"):
            raise ValueError(f"task must be 'seg' or 'depth', got {task!r}")
        self.root = Path(root).expanduser()
        self.task, self.split = task, split
        self.image_dir, self.ann_dir = split_dirs(self.root, split)
        names = sorted(n for n in os.listdir(self.image_dir) if _is_image(n))
        if not names:
            raise ValueError(f"no images ({', '.join(_IMAGE_EXT)}) in {str(self.image_dir)!r}")
        exts = (".png",) if task == "seg" else (".png", ".npy")
        available = {}
        for n in os.listdir(self.ann_dir):
            stem, ext = os.path.splitext(n)
            if ext.lower() in exts and stem not in available:
                available[stem] = n
        self.images, self.annotations = [], []
        for n in names:
            stem = os.path.splitext(n)[0]
            if stem not in available:
                raise ValueError(
                    f"image {str(self.image_dir / n)!r} has no annotation "
                    f"{stem}{'|'.join(exts)} in {str(self.ann_dir)!r}"
                )
            self.images.append(n)
            self.annotations.append(available[stem])
        self.reduce_zero_label = reduce_zero_label
        self.depth_scale, self.npy_scale = depth_scale, npy_scale
        self.depth_range = depth_range
        if task == "seg":
            names_file = self.root / "classes.txt"
            if class_names is None and names_file.is_file():
                class_names = [s.strip() for s in names_file.read_text().splitlines() if s.strip()]
            if num_classes is None and class_names is not None:
                num_classes = len(class_names)
            if class_names is not None and len(class_names) != num_classes:
                raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
            if num_classes is not None and not 1 <= num_classes <= 255:
                raise ValueError(f"num_classes must be 1..255 (255 = ignore), got {num_classes}")
        self.num_classes, self.class_names = num_classes, class_names

    def __len__(self) -> int:
        return len(self.images)

    def name(self, i: int) -> str:
        return self.images[i]

    def image(self, i: int) -> np.ndarray:
        from dinojax.eval.transforms import load_image

        return np.asarray(load_image(str(self.image_dir / self.images[i])), dtype=np.uint8)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        i = int(i)
        img = self.image(i)
        ann = self.ann_dir / self.annotations[i]
        if self.task == "seg":
            with open(ann, "rb") as f:
                target = decode_label_map(f.read(), str(ann))
            target = check_labels(target, str(ann), self.num_classes, self.reduce_zero_label)
        else:
            target = decode_depth(ann, self.depth_scale, self.npy_scale)
        check_sizes(img, target, str(self.image_dir / self.images[i]), str(ann))
        return img, target

    def __repr__(self) -> str:
        return (
            f"DenseFolderSource({str(self.root)!r}, split={self.split!r}, task={self.task!r}, "
            f"{len(self)} images)"
        )


def check_labels(label: np.ndarray, name: str, num_classes: int | None, reduce_zero_label: bool):
    """mmseg's `reduce_zero_label` (0 -> 255, v -> v - 1), then values must be < K or 255."""
    if reduce_zero_label:
        label = label.astype(np.int16) - 1
        label = np.where(label < 0, 255, label).astype(np.uint8)
        label[label == 254] = 255  # mmseg LoadAnnotations: the old 255 stays ignore
    if num_classes is not None:
        bad = (label >= num_classes) & (label != 255)
        if bad.any():
            raise ValueError(
                f"label map {name} holds class {int(label[bad].max())} but the "
                f"dataset has {num_classes} classes (0..{num_classes - 1}, "
                "255 = ignore)"
            )
    return label


def check_sizes(img: np.ndarray, target: np.ndarray, img_name: str, ann_name: str) -> None:
    if img.shape[:2] != target.shape:
        raise ValueError(
            f"annotation {ann_name} is {target.shape[0]}x{target.shape[1]} but "
            f"image {img_name} is {img.shape[0]}x{img.shape[1]}"
        )
