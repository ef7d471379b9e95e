"""Random-access record sources for the input pipeline: TFDS array_record, image folders, digits.

Every source is a sequence of records `{"image": <encoded bytes | uint8 array>, "label": int}`
(label -1 when the data is unlabelled) with `__len__` and `__getitem__`. Images are not decoded
here: the pipeline decodes inside its per-record function, where a corrupt file is skipped and
counted instead of crashing the run. Sources open their files lazily and pickle without open
handles, so grain can ship them to worker processes (which are spawned, not forked).

`make_source("tfds:imagenet2012:train", data_dir=...)`, `make_source("folder:/data/train")`,
`make_source("digits")` build one from a string, as the configs and the CLI use them.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "DigitsSource",
    "ImageFolderSource",
    "RecordSource",
    "TfdsSource",
    "make_source",
    "parse_tfds_spec",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class RecordSource(Protocol):
    """What the pipeline needs from a source."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


class ImageFolderSource:
    """`root/<class>/<image>` (ImageNet's train layout, labels = sorted class index) or a flat
    folder of images (labels -1). JPEG, PNG and WebP, matched case-insensitively.

    Raises ValueError if `root` is missing, is not a folder, or holds no images: a typo in a data
    path should fail before the first training step, not after the model has compiled.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise ValueError(f"image folder {str(self.root)!r} does not exist")
        if not self.root.is_dir():
            raise ValueError(f"image folder {str(self.root)!r} is not a directory")
        entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
        files: list[str] = []
        labels: list[int] = []
        self.classes: list[str] = []
        if class_dirs:
            for label, d in enumerate(class_dirs):
                names = sorted(n for n in os.listdir(d.path) if _is_image_file(n))
                self.classes.append(d.name)
                files.extend(os.path.join(d.name, n) for n in names)
                labels.extend([label] * len(names))
        else:
            files = [e.name for e in entries if e.is_file() and _is_image_file(e.name)]
            labels = [-1] * len(files)
        if not files:
            layout = "root/<class>/<image> or root/<image>"
            raise ValueError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {str(self.root)!r}; "
                f"expected the layout {layout}"
            )
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.files)

    def key(self, index: int) -> str:
        """A name for the record in logs: its path relative to the root."""
        return self.files[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        with open(self.root / self.files[index], "rb") as f:
            data = f.read()
        return {"image": data, "label": int(self.labels[index]), "key": self.files[index]}

    def __repr__(self) -> str:
        n_cls = len(self.classes)
        return f"ImageFolderSource({str(self.root)!r}, {len(self)} images, {n_cls} classes)"


class TfdsSource:
    """A prepared TFDS dataset in array_record format, read without TensorFlow.

    `tfds.data_source` gives random access. `Image` features are read as their encoded bytes
    (`SkipDecoding`) and decoded by the pipeline with Pillow; `Tensor` features arrive as uint8
    arrays. The label feature is optional (records get -1 without it).
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | os.PathLike | None = None,
        image_key: str = "image",
        label_key: str | None = "label",
    ) -> None:
        self.name, self.split = name, split
        self.data_dir = None if data_dir is None else str(data_dir)
        self.image_key, self.label_key = image_key, label_key
        self._source = None
        src = self._open()  # fail now, with a clear message, if it cannot be read
        features = src.dataset_info.features
        if image_key not in features:
            raise ValueError(
                f"TFDS dataset {name!r} has no feature {image_key!r} (features: {list(features)})"
            )
        if label_key is not None and label_key not in features:
            self.label_key = None
        self._len = len(src)
        if self._len == 0:
            raise ValueError(f"TFDS dataset {name!r} split {split!r} is empty")

    def _open(self):
        if self._source is None:
            import tensorflow_datasets as tfds

            try:
                builder = tfds.builder(self.name, data_dir=self.data_dir)
            except Exception as e:  # noqa: BLE001 - re-raised with the context users need
                first_line = (str(e).strip().splitlines() or [""])[0][:300]
                raise ValueError(
                    f"cannot open TFDS dataset {self.name!r} in data_dir={self.data_dir!r} "
                    f"(is it prepared there?): {type(e).__name__}: {first_line}"
                ) from None
            if not builder.is_prepared():
                raise ValueError(
                    f"TFDS dataset {self.name!r} is not prepared in data_dir={self.data_dir!r}; "
                    "build it once with `tfds build --file_format=array_record`"
                )
            feature = (
                builder.info.features[self.image_key]
                if self.image_key in builder.info.features
                else None
            )
            decoders = None
            if isinstance(feature, tfds.features.Image):
                decoders = {self.image_key: tfds.decode.SkipDecoding()}
            try:
                n_split = builder.info.splits[self.split].num_examples
            except Exception as e:  # noqa: BLE001 - unknown split or malformed slice
                first_line = (str(e).strip().splitlines() or [""])[0][:300]
                raise ValueError(
                    f"TFDS dataset {self.name!r} has no split {self.split!r}: {first_line}"
                ) from None
            if n_split == 0:
                # tfds itself would fail with "Paths sequence can not be of 0 length"
                raise ValueError(f"TFDS dataset {self.name!r} split {self.split!r} is empty")
            try:
                self._source = builder.as_data_source(split=self.split, decoders=decoders)
            except Exception as e:  # noqa: BLE001
                raise ValueError(
                    f"cannot read TFDS dataset {self.name!r} split {self.split!r} as a data source "
                    f"(it must be prepared with file_format=array_record): {e}"
                ) from e
        return self._source

    def __len__(self) -> int:
        return self._len

    def key(self, index: int) -> str:
        return f"{self.name}/{self.split}[{index}]"

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self._open()[index]
        label = -1 if self.label_key is None else int(rec[self.label_key])
        return {"image": rec[self.image_key], "label": label, "key": self.key(index)}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_source"] = None  # reopened in the worker process
        return state

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} records)"


@functools.lru_cache(maxsize=2)
def _upsampled_digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.stack(
        [np.asarray(Image.fromarray(a).resize((size, size), Image.BICUBIC)) for a in small]
    )
    images.setflags(write=False)
    return images, digits.target.astype(np.int32)


class DigitsSource:
    """The 1,797 8x8 handwritten digits of scikit-learn, upsampled: a labelled dataset that
    needs no download, for first runs, smoke training and tests (kNN accuracy means something).

    `split`: "all", "train" (4 of every 5 images) or "test" (the fifth). Images are (size, size)
    uint8, bicubic-upsampled from the 17 grey levels of the original.
    """

    def __init__(self, split: str = "all", size: int = 64) -> None:
        if split not in ("all", "train", "test"):
            raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
        images, labels = _upsampled_digits(size)
        idx = np.arange(len(labels))
        if split == "train":
            idx = idx[idx % 5 != 0]
        elif split == "test":
            idx = idx[idx % 5 == 0]
        self.images, self.labels = images[idx], labels[idx]
        self.split, self.size = split, size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": int(self.labels[index]), "key": str(index)}

    def __repr__(self) -> str:
        return f"DigitsSource(split={self.split!r}, {len(self)} images of {self.size}px)"


# NAME[/CONFIG][:VERSION][:SPLIT]. The name and config hold no ':' or '['; a version is digits
# with up to two '.'-parts (each may be tfds's '*' wildcard); the split is everything after, so
# slices with colons ('train[:1%]', 'train[10:20]+test') stay whole.
_TFDS_SPEC = re.compile(
    r"(?P<name>[^:\[\]]+?(?::(?:\*|\d+(?:\.(?:\d+|\*)){0,2}))?)(?::(?P<split>[^:].*))?"
)


def parse_tfds_spec(spec: str) -> tuple[str, str]:
    """`NAME[/CONFIG][:VERSION][:SPLIT]` -> (name as `tfds.builder` takes it, split).

    The split defaults to "train" and may be any TFDS split expression, colons included:
    `imagenet2012:train[:1%]` -> ("imagenet2012", "train[:1%]"),
    `imagenet2012/subset:5.0.0:validation[10:20]` -> ("imagenet2012/subset:5.0.0", ...).
    """
    m = _TFDS_SPEC.fullmatch(spec)
    if m is None:
        raise ValueError(
            f"cannot parse TFDS dataset {spec!r}: expected NAME[/CONFIG][:VERSION][:SPLIT], "
            "e.g. 'imagenet2012:train[:1%]' or 'imagenet2012/subset:5.0.0:train'"
        )
    return m["name"], m["split"] or "train"


def make_source(spec: str | RecordSource, data_dir: str | None = None) -> RecordSource:
    """A source from a string.

    - `digits`, `digits:train`, `digits:test` - the embedded default;
    - `folder:/path/to/train` (or any existing directory path) - an image folder;
    - `tfds:NAME[:SPLIT]` - a prepared TFDS dataset, read from `data_dir` (default: TFDS's own
      default); see `parse_tfds_spec` (`tfds:imagenet2012/subset:5.0.0:train[:1%]`).

    Anything that is not a string is returned unchanged (an already built source).
    """
    if not isinstance(spec, str):
        if not hasattr(spec, "__getitem__") or not hasattr(spec, "__len__"):
            raise ValueError(f"a data source needs __len__ and __getitem__, got {type(spec)}")
        if len(spec) == 0:
            raise ValueError("the data source is empty")
        return spec
    if not spec:
        raise ValueError("empty data source specification")
    kind, _, rest = spec.partition(":")
    if kind == "digits":
        return DigitsSource(split=rest or "all")
    if kind == "folder":
        if not rest:
            raise ValueError("folder source needs a path: 'folder:/path/to/images'")
        return ImageFolderSource(rest)
    if kind == "tfds":
        if not rest:
            raise ValueError("tfds source needs a name: 'tfds:NAME[:SPLIT]'")
        name, split = parse_tfds_spec(rest)
        return TfdsSource(name, split=split, data_dir=data_dir)
    if os.path.sep in spec or Path(spec).exists():
        return ImageFolderSource(spec)
    raise ValueError(
        f"unknown data source {spec!r}: use 'digits', 'folder:/path' or 'tfds:NAME[:SPLIT]'"
    )
