"""Record sources: image folders, TFDS array_record (Tensor and Image features), digits."""

from __future__ import annotations

import io
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import tfds_builders
from PIL import Image

from dinojax.data.augment import decode_image
from dinojax.data.pipeline import DataConfig, DinoDataPipeline
from dinojax.data.sources import (
    DigitsSource,
    ImageFolderSource,
    TfdsSource,
    make_source,
    parse_tfds_spec,
)


def _save(path: Path, fmt: str, size=(20, 16), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 128 if mode == "L" else (10, 200, 30)).save(path, fmt)


def test_image_folder_labelled(tmp_path):
    _save(tmp_path / "b_cls" / "x.JPG", "JPEG")
    _save(tmp_path / "b_cls" / "y.png", "PNG")
    _save(tmp_path / "a_cls" / "z.webp", "WEBP")
    _save(tmp_path / "a_cls" / "w.jpeg", "JPEG", mode="L")
    (tmp_path / "a_cls" / "notes.txt").write_text("not an image")
    _save(tmp_path / "a_cls" / ".hidden.jpg", "JPEG")
    (tmp_path / "empty_cls").mkdir()
    src = ImageFolderSource(tmp_path)
    assert src.classes == ["a_cls", "b_cls", "empty_cls"]
    assert len(src) == 4
    assert src.labels.tolist() == [0, 0, 1, 1]
    for i in range(len(src)):
        rec = src[i]
        assert decode_image(rec["image"]).mode == "RGB"
        assert rec["label"] == src.labels[i]
    assert make_source(f"folder:{tmp_path}").files == src.files
    assert make_source(str(tmp_path)).files == src.files


def test_image_folder_flat_and_errors(tmp_path):
    for i in range(3):
        _save(tmp_path / "flat" / f"{i}.png", "PNG")
    flat = ImageFolderSource(tmp_path / "flat")
    assert len(flat) == 3 and all(flat[i]["label"] == -1 for i in range(3))
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderSource(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a directory"):
        ImageFolderSource(tmp_path / "flat" / "0.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderSource(tmp_path / "empty")
    # the pipeline refuses before any training step
    with pytest.raises(ValueError, match="does not exist"):
        DinoDataPipeline(f"folder:{tmp_path / 'missing'}", process_index=0, process_count=1)
    with pytest.raises(ValueError, match="no images"):
        DinoDataPipeline(str(tmp_path / "empty"), process_index=0, process_count=1)


def test_make_source_errors():
    for bad in ("", "folder:", "tfds:", "nonsense_spec"):
        with pytest.raises(ValueError):
            make_source(bad)
    with pytest.raises(ValueError, match="empty"):
        make_source([])


def test_digits():
    full, train, test = DigitsSource(), DigitsSource("train"), DigitsSource("test")
    assert len(full) == 1797 and len(train) + len(test) == 1797
    assert set(np.unique(full.labels)) == set(range(10))
    rec = train[0]
    assert rec["image"].shape == (64, 64) and rec["image"].dtype == np.uint8
    assert decode_image(rec["image"]).size == (64, 64)
    assert make_source("digits:test").labels.tolist() == test.labels.tolist()
    with pytest.raises(ValueError, match="split"):
        DigitsSource("val")


def test_tfds_tensor_feature(tfds_dir):
    src = make_source("tfds:dinojax_tiny_tensor:train", data_dir=tfds_dir)
    assert isinstance(src, TfdsSource) and len(src) == tfds_builders.DinojaxTinyTensor.N
    expected = {a.tobytes(): a.shape for a in tfds_builders.tiny_tensor_images(len(src))}
    for i in range(len(src)):
        rec = src[i]
        assert isinstance(rec["image"], np.ndarray) and rec["image"].dtype == np.uint8
        assert expected[rec["image"].tobytes()] == rec["image"].shape
        assert rec["label"] in (0, 1, 2)
    # sources travel to grain workers pickled, without open handles
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone[3]["image"], src[3]["image"])


def test_tfds_image_feature_bytes(tfds_dir):
    src = TfdsSource("dinojax_tiny_image", data_dir=tfds_dir)
    n = tfds_builders.DinojaxTinyImage.N_GOOD + len(tfds_builders.DinojaxTinyImage.BAD)
    assert len(src) == n
    kinds, bad = set(), 0
    for i in range(n):
        data = src[i]["image"]
        assert isinstance(data, bytes)  # encoded as TFDS stored it, decoded by us
        try:
            assert decode_image(data).size == (40, 32)
            kinds.add(Image.open(io.BytesIO(data)).format)
        except OSError:
            bad += 1
    assert kinds == {"JPEG", "PNG"} and bad == len(tfds_builders.DinojaxTinyImage.BAD)


def test_tfds_errors(tfds_dir, tmp_path):
    with pytest.raises(ValueError, match="cannot open TFDS dataset"):
        TfdsSource("dinojax_no_such_dataset", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no feature"):
        TfdsSource("dinojax_tiny_tensor", data_dir=tfds_dir, image_key="pixels")


def test_tfds_source_in_fresh_interpreter(tfds_dir, children):
    """grain spawns workers: there the builder class is not registered; reading must still work."""
    src = TfdsSource("dinojax_tiny_image", data_dir=tfds_dir)
    code = (
        "import pickle, sys; src = pickle.loads(sys.stdin.buffer.read()); "
        "print(len(src), len(src[0]['image']))"
    )
    out = children.run([sys.executable, "-c", code], input=pickle.dumps(src), timeout=300)
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    assert out.stdout.decode().split() == [str(len(src)), str(len(src[0]["image"]))]


def _small_pipeline(source: str, data_dir: str):
    """Host batches of 4 images (2 x 28 px + 2 x 14 px crops) from one process."""
    augment = DataConfig().augment.__class__(
        global_crops_size=28, local_crops_size=14, local_crops_number=2
    )
    cfg = DataConfig(source=source, data_dir=data_dir, batch_size=4, augment=augment)
    return DinoDataPipeline(config=cfg, process_index=0, process_count=1).host_iterator()


def test_pipeline_over_tfds_skips_truncated(tfds_dir):
    it = _small_pipeline("tfds:dinojax_tiny_image:train", tfds_dir)
    batches = [next(it) for _ in range(2)]  # one full epoch of 8 records
    assert sum(b["n_bad"] for b in batches) == 1
    assert all(b["global_crops"].shape == (8, 28, 28, 3) for b in batches)
    assert set(np.concatenate([b["labels"] for b in batches]).tolist()) <= {0, 1}


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("imagenet2012", ("imagenet2012", "train")),
        ("imagenet2012:train[:1%]", ("imagenet2012", "train[:1%]")),
        ("imagenet2012:validation[10:20]", ("imagenet2012", "validation[10:20]")),
        ("imagenet2012:5.0.0", ("imagenet2012:5.0.0", "train")),
        ("imagenet2012:5.0.0:train[:1%]", ("imagenet2012:5.0.0", "train[:1%]")),
        ("imagenet2012/subset:5.0.0:validation", ("imagenet2012/subset:5.0.0", "validation")),
        ("imagenet2012/subset:train[:50%]+test", ("imagenet2012/subset", "train[:50%]+test")),
        ("mnist:3.*.*:test", ("mnist:3.*.*", "test")),
    ],
)
def test_parse_tfds_spec(spec, expected):
    assert parse_tfds_spec(spec) == expected


def test_parse_tfds_spec_errors():
    for bad in ("mnist:", ":train", "a::b", "mnist[x]"):
        with pytest.raises(ValueError, match="cannot parse TFDS dataset"):
            parse_tfds_spec(bad)


def test_tfds_split_slices_versions_and_empty_splits(tfds_dir):
    n = tfds_builders.DinojaxTinyTensor.N
    full = make_source("tfds:dinojax_tiny_tensor", data_dir=tfds_dir)
    half = make_source("tfds:dinojax_tiny_tensor:train[:50%]", data_dir=tfds_dir)
    assert (half.name, half.split, len(half)) == ("dinojax_tiny_tensor", "train[:50%]", n // 2)
    sliced = make_source("tfds:dinojax_tiny_tensor:1.0.0:train[2:5]", data_dir=tfds_dir)
    assert (sliced.name, len(sliced)) == ("dinojax_tiny_tensor:1.0.0", 3)
    for i in range(3):
        np.testing.assert_array_equal(sliced[i]["image"], full[2 + i]["image"])
    assert len(make_source("tfds:dinojax_tiny_tensor:1.0.0", data_dir=tfds_dir)) == n
    with pytest.raises(ValueError, match=r"split 'train\[5:5\]' is empty"):
        make_source("tfds:dinojax_tiny_tensor:train[5:5]", data_dir=tfds_dir)
    with pytest.raises(ValueError, match="has no split 'validation'"):
        make_source("tfds:dinojax_tiny_tensor:validation", data_dir=tfds_dir)


def test_pipeline_skips_records_tfds_cannot_decode(tmp_path):
    """Records broken below the image codec - not a tf.Example at all, or a feature missing -
    are skipped and counted like truncated JPEGs."""
    d = str(tmp_path)
    tfds_builders.build(tfds_builders.DinojaxTinyCorrupt, d)
    tfds_builders.corrupt_records(d, "dinojax_tiny_corrupt", {4: "proto", 7: "feature"})
    src = TfdsSource("dinojax_tiny_corrupt", data_dir=d)
    # What TFDS raises for each (measured): protobuf's DecodeError for the non-Example bytes, a
    # TypeError from its feature decoder for the missing image. The pipeline must skip both.
    from google.protobuf.message import DecodeError

    with pytest.raises(DecodeError):
        src[4]
    with pytest.raises(TypeError):
        src[7]
    it = _small_pipeline("tfds:dinojax_tiny_corrupt", d)
    batches = [next(it) for _ in range(3)]  # one epoch of 12 records
    bad_keys = {k for b in batches for k, _ in b["bad"]}
    assert bad_keys == {"dinojax_tiny_corrupt/train[4]", "dinojax_tiny_corrupt/train[7]"}
    assert sum(b["n_bad"] for b in batches) >= 2
    read = set(np.concatenate([b["record_index"] for b in batches]).tolist())
    assert not read & {4, 7}
    assert all(b["global_crops"].shape == (8, 28, 28, 3) for b in batches)
