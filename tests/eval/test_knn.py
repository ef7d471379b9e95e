"""k-NN classifier vs the official `dinov2.eval.knn.KnnModule`, sharding, knn_eval and the CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dinojax.eval import knn
from dinojax.eval.features import default_mesh

KS = (10, 20, 100, 200)


def _features(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _official_scores(official_knn, train, labels, test, num_classes, ks=KS, T=0.07):
    module = official_knn.KnnModule(
        torch.from_numpy(train), torch.from_numpy(labels).long(), list(ks), T,
        torch.device("cpu"), num_classes=num_classes,
    )  # fmt: skip
    with torch.no_grad():
        out = module(torch.from_numpy(test))
    return {k: v.numpy() for k, v in out.items()}


@pytest.mark.parametrize("chunk", [10_000, 97], ids=["one-chunk", "chunked"])
def test_matches_official_knn_module(official_knn, torch_process_group, chunk):
    n_train, n_test, d, c = 700, 64, 48, 9
    train, test = _features(n_train, d, 0), _features(n_test, d, 1)
    labels = np.random.default_rng(2).integers(0, c, n_train).astype(np.int64)
    ref = _official_scores(official_knn, train, labels, test, c)
    mesh = default_mesh()
    test_sharded = jax.device_put(test, NamedSharding(mesh, P("data")))
    with jax.default_matmul_precision("highest"):
        ours = knn.knn_classify(train, labels, test_sharded, c, KS, 0.07, train_chunk=chunk)
    assert sorted(ours) == sorted(ref)
    for k in KS:
        got = np.asarray(ours[k])
        assert ours[k].sharding.is_equivalent_to(test_sharded.sharding, 2)
        np.testing.assert_allclose(got, ref[k], rtol=0, atol=2e-6)
        # Same predictions: top-1 class and the top-5 set of classes.
        np.testing.assert_array_equal(got.argmax(1), ref[k].argmax(1))
        top5 = lambda s: np.sort(np.argsort(-s, axis=1, kind="stable")[:, :5], axis=1)  # noqa: E731
        np.testing.assert_array_equal(top5(got), top5(ref[k]))
    # Accuracies equal the ones computed from the official scores.
    test_labels = np.random.default_rng(3).integers(0, c, n_test)
    acc = knn.knn_accuracy(ours, test_labels)
    for k in KS:
        ref_top1 = 100.0 * np.mean(ref[k].argmax(1) == test_labels)
        assert acc["top1"][k] == pytest.approx(ref_top1, abs=1e-9)


def test_jittable_and_ks_subsets():
    train, test = _features(300, 16, 4), _features(24, 16, 5)
    labels = np.random.default_rng(6).integers(0, 5, 300)
    fn = jax.jit(lambda a, b, c: knn.knn_classify(a, b, c, 5, (3, 7), 0.1, train_chunk=64))
    out = fn(train, labels, test)
    direct = knn.knn_classify(train, labels, test, 5, (7, 3), 0.1, train_chunk=1000)
    for k in (3, 7):
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(direct[k]), atol=1e-6)
        # Scores are probability mass over at most k neighbours: rows sum to <= 1.
        assert np.all(np.asarray(out[k]).sum(1) <= 1 + 1e-5)
    # k=1 is the nearest neighbour's label with weight 1.
    one = knn.knn_classify(train, labels, test, 5, (1,), 0.07)
    nearest = np.argmax(test @ train.T, axis=1)
    np.testing.assert_array_equal(np.asarray(one[1]).argmax(1), labels[nearest])


def test_bad_inputs():
    train, test = _features(50, 8, 0), _features(4, 8, 1)
    labels = np.zeros(50, np.int32)
    with pytest.raises(ValueError, match="k=200 needs at least 200"):
        knn.knn_classify(train, labels, test, 3)
    with pytest.raises(ValueError, match="same D"):
        knn.knn_classify(train, labels, test[:, :4], 3, (5,))
    with pytest.raises(ValueError, match="train_labels"):
        knn.knn_classify(train, labels[:10], test, 3, (5,))


def test_knn_eval_digits(tiny_model):
    res = knn.knn_eval(
        tiny_model, "digits:train", "digits:test", batch_size=64, image_size=56,
        max_train=400, max_test=96, progress=False,
    )  # fmt: skip
    assert set(res) == {"top1", "top5"} and sorted(res["top1"]) == list(KS)
    for k in KS:
        assert 0.0 <= res["top1"][k] <= res["top5"][k] <= 100.0
    # Random features of a random ViT still beat chance (10%) by far on digits.
    assert res["top1"][10] > 25.0


def test_knn_eval_empty_and_unlabelled(tiny_model, tmp_path):
    from PIL import Image

    with pytest.raises(ValueError, match="test set"):
        knn.knn_eval(tiny_model, "digits:train", f"folder:{tmp_path}", batch_size=8)
    for i in range(3):
        Image.new("RGB", (30, 20), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    with pytest.raises(ValueError, match="labelled"):
        knn.knn_eval(
            tiny_model, f"folder:{tmp_path}", "digits:test", batch_size=8, image_size=56,
            ks=(1,), max_test=8, progress=False,
        )  # fmt: skip


def test_cli(tmp_path, capsys):
    out = tmp_path / "res.json"
    args = [
        "--arch", "dinov2_vits14", "--random", "--override", "depth=1", "--override",
        "embed_dim=32", "--override", "num_heads=1", "--override", "img_size=28",
        "--train", "digits:train", "--test", "digits:test", "--image-size", "28",
        "--batch-size", "64", "--max-train", "256", "--max-test", "64", "--ks", "5", "20",
        "--output", str(out), "--no-progress",
    ]  # fmt: skip
    assert knn.main(args) == 0
    printed = capsys.readouterr().out
    assert "k=5" in printed and "k=20" in printed
    res = json.loads(out.read_text())["knn"]
    assert set(res["top1"]) == {"5", "20"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "/nonexistent/ckpt"], "does not exist"),
        (["--random"], "--random needs --arch"),
        (["--arch", "vit_nope", "--random"], "unknown architecture"),
        (["--arch", "dinov2_vits14", "--random", "--override", "depth"], "KEY=VALUE"),
        (["--arch", "dinov2_vits14", "--random", "--override", "depth=two"], "expected int"),
        (["--arch", "dinov2_vits14", "--random", "--override", "size=3"], "unknown ViTConfig"),
    ],
)
def test_cli_errors(args, message, capsys):
    rc = knn.main([*args, "--train", "digits:train", "--test", "digits:test", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1


def test_cli_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    torch.save({"foo": torch.zeros(3)}, tmp_path / "other.pth")
    torch.save({"teacher": {"dino_head.mlp.0.weight": torch.zeros(3, 3)}}, tmp_path / "head.pth")
    cases = [
        (tmp_path / "empty_dir", "not a dinojax checkpoint"),
        (tmp_path / "junk.pth", "not a readable PyTorch checkpoint"),
        (tmp_path / "other.pth", "not a DINO/DINOv2 backbone"),
        (tmp_path / "head.pth", "no 'backbone.' keys"),
    ]
    for ckpt, message in cases:
        rc = knn.main(
            ["--checkpoint", str(ckpt), "--train", "digits:train", "--test", "digits:test"]
        )
        err = capsys.readouterr().err
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_sharded_scores_equal_unsharded():
    train, test = _features(260, 12, 7), _features(40, 12, 8)
    labels = np.random.default_rng(9).integers(0, 4, 260)
    mesh = default_mesh()
    sharded = knn.knn_classify(
        jax.device_put(train, NamedSharding(mesh, P())), labels,
        jax.device_put(test, NamedSharding(mesh, P("data"))), 4, (10, 50), train_chunk=50,
    )  # fmt: skip
    single = knn.knn_classify(jnp.asarray(train), labels, jnp.asarray(test), 4, (10, 50))
    for k in (10, 50):
        np.testing.assert_allclose(np.asarray(sharded[k]), np.asarray(single[k]), atol=1e-6)
