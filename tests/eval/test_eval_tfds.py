"""The eval tools over a real TFDS array_record dataset (built by the test, no TensorFlow), with
the progress bar on: extraction keeps every record and label, kNN finds each image itself, and a
corrupt record stops with one line naming it."""

from __future__ import annotations

import numpy as np
import tfds_builders  # tests/data, put on sys.path by tests/conftest.py

from dinojax.data.sources import TfdsSource
from dinojax.eval import extract, knn

MODEL = ["--arch", "dinov2_vits14", "--random", "--override", "depth=1", "--override",
         "embed_dim=32", "--override", "num_heads=1", "--override", "img_size=28"]  # fmt: skip


def test_extract_tfds_with_progress(tfds_dir, tmp_path, capsys):
    out = tmp_path / "f"
    src = "tfds:dinojax_tiny_tensor:train"
    rc = extract.main([*MODEL, "--data", src, "--data-dir", tfds_dir, "--out", str(out),
                       "--size", "28", "--batch-size", "5", "--patch"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    n = tfds_builders.DinojaxTinyTensor.N
    # The progress bar (tqdm, on stderr) reached every record.
    assert f"{n}/{n}" in captured.err and "img" in captured.err, captured.err
    records = TfdsSource("dinojax_tiny_tensor", data_dir=tfds_dir)
    labels = np.array([records[i]["label"] for i in range(len(records))])
    np.testing.assert_array_equal(np.load(out / "labels.npy"), labels)
    assert sorted(set(labels.tolist())) == [0, 1, 2]
    cls, patch = np.load(out / "cls.npy"), np.load(out / "patch.npy")
    assert cls.shape == (n, 32) and patch.shape == (n, 2, 2, 32)
    assert np.isfinite(cls).all() and np.unique(cls.round(5), axis=0).shape[0] == n


def test_knn_tfds_finds_itself(tfds_dir, tmp_path, capsys):
    # Train set = test set: with k = 1 every image's nearest neighbour is itself (cosine 1), so
    # top-1 is exactly 100% whatever the random weights; k = 12 votes over every image instead.
    src = "tfds:dinojax_tiny_tensor:train"
    out = tmp_path / "knn.json"
    rc = knn.main([*MODEL, "--train", src, "--test", src, "--data-dir", tfds_dir, "--image-size",
                   "28", "--batch-size", "8", "--ks", "1", "12", "--output", str(out),
                   "--no-progress"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    import json

    res = json.loads(out.read_text())["knn"]
    assert res["top1"]["1"] == 100.0
    assert res["top5"]["12"] == 100.0  # only 3 classes: every class is in the top 5


def test_corrupt_tfds_record_is_one_line_error(tfds_dir, tmp_path, capsys):
    # dinojax_tiny_image holds a truncated JPEG (key 3): evaluation must not silently drop a
    # record, so it stops naming it, and writes nothing.
    out = tmp_path / "bad"
    rc = extract.main([*MODEL, "--data", "tfds:dinojax_tiny_image:train", "--data-dir", tfds_dir,
                       "--out", str(out), "--size", "28", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert "record" in err
    assert not out.exists()
