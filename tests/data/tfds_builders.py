"""Tiny TFDS datasets in array_record format, built without TensorFlow
(https://www.tensorflow.org/datasets/tfless_tfds).

- `DinojaxTinyTensor`: uint8 images as `tfds.features.Tensor` (no TensorFlow needed to encode them).
- `DinojaxTinyImage`: the standard `tfds.features.Image` feature, as TFDS itself stores ImageNet.
  Encoding numpy arrays into it needs TensorFlow, but TFDS stores already-encoded bytes as they
  are, so the records are the ones TFDS writes (checked: JPEG/PNG bytes in, same bytes out), and
  they can include a truncated JPEG to exercise the bad-record path.
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


def _jpeg(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def tiny_tensor_images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (20 + i % 7, 24 + i % 5, 3), dtype=np.uint8) for i in range(n)]


class DinojaxTinyTensor(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    N = 12

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=(None, None, 3), dtype=np.uint8, encoding="bytes"
                    ),
                    "label": tfds.features.ClassLabel(num_classes=3),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, img in enumerate(tiny_tensor_images(self.N)):
            yield i, {"image": img, "label": i % 3}


class DinojaxTinyImage(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    N_GOOD = 7
    BAD = (3,)  # keys whose JPEG is truncated

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"image": tfds.features.Image(), "label": tfds.features.ClassLabel(num_classes=2)}
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(1)
        for i in range(self.N_GOOD + len(self.BAD)):
            arr = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
            img = Image.fromarray(arr)
            if i % 3 == 1:
                data = _jpeg(img.convert("L"))  # grayscale JPEG
            elif i % 3 == 2:
                data = _jpeg(img, "PNG")
            else:
                data = _jpeg(img)
            if i in self.BAD:
                data = data[: len(data) // 3]
            yield i, {"image": data, "label": i % 2}


def build(builder_cls, data_dir: str) -> None:
    builder_cls(data_dir=data_dir, file_format="array_record").download_and_prepare()


class DinojaxTinyCorrupt(DinojaxTinyTensor):
    """Same records as `DinojaxTinyTensor`; `corrupt_records` then damages some of them."""


def corrupt_records(data_dir: str, name: str, damage: dict[int, str]) -> None:
    """Rewrite a prepared split's array_record shard with records that TFDS cannot decode.

    damage[i] = "proto": record i is not a serialized tf.Example at all (parsing fails);
    "feature": a valid tf.Example whose image feature is missing (feature decoding fails).
    """
    import glob

    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    (path,) = glob.glob(f"{data_dir}/{name}/*/{name}-train.array_record-*")
    reader = ArrayRecordReader(path)
    records = reader.read_all()
    reader.close()
    for i, kind in damage.items():
        if kind == "proto":
            records[i] = b"\x07garbage, not a tf.Example"
        elif kind == "feature":
            assert b"image/value" in records[i]
            records[i] = records[i].replace(b"image/value", b"image/valuX")
        else:
            raise ValueError(kind)
    writer = ArrayRecordWriter(path, "group_size:1")
    for r in records:
        writer.write(r)
    writer.close()
