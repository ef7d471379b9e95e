"""Dense datasets as TFDS array_record files, built from an ADE20K-style folder and read back
without TensorFlow through `dinojax.data.sources.TfdsSource`.

    python -m dinojax.dense.data.tfds_dense ROOT --data-dir DIR [--name ade20k_dense]
        [--task seg|depth] [--reduce-zero-label] [--num-classes K] [--depth-scale 0.001]

writes DIR/NAME/1.0.0/NAME-SPLIT.array_record-* for every split folder of ROOT/images
(ADE20K's training/validation become train/validation; a flat folder is "train"), then
`dense_source("tfds:NAME:validation", data_dir=DIR)` reads it.

Features: `image` = the image file's own bytes (`tfds.features.Image`, stored as they are, decoded
by Pillow on reading, as the folder source does, so the pixels are the same); `label` = the label
map (`Tensor` uint8 (H, W), reduce_zero_label already applied, checked < K) or `depth` (`Tensor`
float32 (H, W), metres); `name` = the image file name. The metadata (task, num_classes,
class_names, depth_range) lands in the dataset's metadata.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["DenseTfdsSource", "build_dense_tfds", "main"]

_SPLIT_NAMES = {"training": "train", "validation": "validation", "testing": "test"}


def _splits(root: Path) -> dict[str, str | None]:
    """TFDS split name -> folder split (None: the flat layout)."""
    img_root = root / "images"
    if not img_root.is_dir():
        raise ValueError(f"{str(root)!r}: expected the subfolders images/ and annotations/")
    subdirs = sorted(p.name for p in img_root.iterdir() if p.is_dir() and not p.name[0] == ".")
    if not subdirs:
        return {"train": None}
    out = {}
    for d in subdirs:
        split = _SPLIT_NAMES.get(d, d)
        if not split.replace("_", "").isalnum():
            raise ValueError(
                f"split folder {d!r} is not a valid TFDS split name (letters, digits, _)"
            )
        out[split] = d
    return out


def _builder_class(name: str):
    import tensorflow_datasets as tfds

    class DenseFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """An ADE20K-style folder (images/ + annotations/) as a dense dataset."""

        VERSION = tfds.core.Version("1.0.0")
        # Nothing is downloaded, so no checksums file next to the code is looked for (TFDS's
        # lookup of it, for a builder inside a package, needs `importlib_resources`).
        code_path = None

        def __init__(self, *, root=None, task="seg", options=None, **kwargs):
            self._root, self._task, self._options = root, task, dict(options or {})
            super().__init__(**kwargs)

        def _info(self):
            target = (
                {"label": tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding="zlib")}
                if self._task == "seg"
                else {
                    "depth": tfds.features.Tensor(
                        shape=(None, None), dtype=np.float32, encoding="zlib"
                    )
                }
            )
            meta = tfds.core.MetadataDict(task=self._task)
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"Dense ({self._task}) dataset from the folder {self._root}",
                features=tfds.features.FeaturesDict(
                    {"image": tfds.features.Image(), "name": tfds.features.Text(), **target}
                ),
                metadata=meta,
                disable_shuffling=True,  # records in the folder's (sorted) order
            )

        def _split_generators(self, dl_manager):
            from dinojax.dense.data.folder import DenseFolderSource

            gens = {}
            for split, folder in _splits(Path(self._root)).items():
                src = DenseFolderSource(self._root, folder, task=self._task, **self._options)
                gens[split] = self._generate_examples(src)
            # the metadata of the last split's source (all splits share the options)
            self.info.metadata.update(
                num_classes=src.num_classes,
                class_names=src.class_names,
                depth_range=src.depth_range,
            )
            return gens

        def _generate_examples(self, src):
            key = "label" if self._task == "seg" else "depth"
            for i in range(len(src)):
                _, target = src[i]  # decodes and checks (labels < K, sizes)
                with open(src.image_dir / src.images[i], "rb") as f:
                    data = f.read()
                yield src.images[i], {"image": data, key: target, "name": src.images[i]}

    DenseFolder.name = name
    return DenseFolder


def build_dense_tfds(
    root: str | os.PathLike,
    data_dir: str | os.PathLike,
    name: str = "dense_folder",
    *,
    task: str = "seg",
    **options,
) -> str:
    """Build the TFDS dataset `name` (array_record) in `data_dir` from the folder `root`; the
    `options` are `DenseFolderSource`'s (num_classes, class_names, reduce_zero_label,
    depth_scale, npy_scale, depth_range). Returns the dataset's directory. Nothing is left in
    `data_dir` when a file is bad (TFDS writes to a temporary directory first)."""
    if not name.replace("_", "").isalnum() or not name[0].isalpha() or name != name.lower():
        raise ValueError(f"TFDS dataset name must be lower_snake_case, got {name!r}")
    cls = _builder_class(name)
    root = str(Path(root).expanduser().resolve())
    builder = cls(
        root=root, task=task, options=options, data_dir=str(data_dir), file_format="array_record"
    )
    out = Path(data_dir) / name
    existed = out.exists()
    try:
        with tempfile.TemporaryDirectory() as tmp:  # TFDS's (unused) downloads folder
            builder.download_and_prepare(download_dir=tmp)
    except BaseException:
        if not existed:  # only TFDS's incomplete.* folder is there: leave nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    return str(builder.data_path)


class DenseTfdsSource:
    """A dense dataset built by `build_dense_tfds`, read through `TfdsSource` (random access,
    no TensorFlow): `__getitem__(i)` -> (uint8 (H, W, 3), label map uint8 | depth float32)."""

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None) -> None:
        from dinojax.data.sources import TfdsSource
        from dinojax.dense.data.folder import SPLIT_ALIASES

        # "val" finds "validation" (the name ADE20K's folder gets here) and back
        for i, s in enumerate((split, *SPLIT_ALIASES.get(split, ()))):
            try:
                self._tfds = TfdsSource(name, split=s, data_dir=data_dir, label_key=None)
                break
            except ValueError as e:
                if "has no split" not in str(e) or i == len(SPLIT_ALIASES.get(split, ())):
                    raise
        src = self._tfds._open()
        features = src.dataset_info.features
        keys = [k for k in ("label", "depth") if k in features]
        if len(keys) != 1:
            raise ValueError(
                f"TFDS dataset {name!r} is not a dense dataset: expected a 'label' "
                f"or a 'depth' feature, found {list(features)}"
            )
        self.target_key = keys[0]
        self.task = "seg" if self.target_key == "label" else "depth"
        meta = dict(src.dataset_info.metadata or {})
        self.num_classes = meta.get("num_classes")
        self.class_names = meta.get("class_names")
        dr = meta.get("depth_range")
        self.depth_range = None if dr is None else tuple(dr)
        self.has_names = "name" in features

    def __len__(self) -> int:
        return len(self._tfds)

    def _record(self, i: int):
        return self._tfds._open()[int(i)]

    def name(self, i: int) -> str:
        if self.has_names:
            n = self._record(i)["name"]
            return n.decode() if isinstance(n, bytes) else str(n)
        return self._tfds.key(i)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        from dinojax.eval.transforms import load_image

        rec = self._record(i)
        try:
            img = np.asarray(load_image(rec["image"]), dtype=np.uint8)
        except ValueError as e:
            raise ValueError(f"{self._tfds.key(i)}: {e}") from None
        target = np.asarray(rec[self.target_key])
        return img, target.astype(np.uint8 if self.task == "seg" else np.float32)

    def __repr__(self) -> str:
        return f"DenseTfdsSource({self._tfds.name!r}, split={self._tfds.split!r}, {len(self)})"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dinojax.dense.data.tfds_dense",
        description="Build a TFDS (array_record) dense dataset from an ADE20K-style folder "
        "(ROOT/images[/SPLIT]/X.jpg + ROOT/annotations[/SPLIT]/X.png).",
    )
    p.add_argument("root", help="the folder holding images/ and annotations/")
    p.add_argument("--data-dir", required=True, help="TFDS data_dir to write into")
    p.add_argument("--name", default="dense_folder", help="dataset name (lower_snake_case)")
    p.add_argument("--task", choices=("seg", "depth"), default="seg")
    p.add_argument("--num-classes", type=int, help="segmentation: K (labels must be < K or 255)")
    p.add_argument(
        "--reduce-zero-label",
        action="store_true",
        help="segmentation: 0 -> 255 (ignore), v -> v - 1 (ADE20K)",
    )
    p.add_argument(
        "--depth-scale",
        type=float,
        default=1e-3,
        help="depth: metres per unit of a 16-bit PNG (default 0.001: mm)",
    )
    p.add_argument("--npy-scale", type=float, default=1.0, help="depth: metres per .npy unit")
    p.add_argument("--depth-range", type=float, nargs=2, metavar=("MIN", "MAX"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.task == "seg":
        opts = dict(num_classes=args.num_classes, reduce_zero_label=args.reduce_zero_label)
    else:
        opts = dict(
            depth_scale=args.depth_scale,
            npy_scale=args.npy_scale,
            depth_range=tuple(args.depth_range) if args.depth_range else None,
        )
    try:
        path = build_dense_tfds(args.root, args.data_dir, args.name, task=args.task, **opts)
    except ValueError as e:
        print(f"error: {e}")
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
