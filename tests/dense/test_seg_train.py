"""Segmentation metrics (mmseg semantics, hand-made cases), the training protocol's pieces, and a
tiny end-to-end training run whose head round-trips through the official layout."""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dinojax.convert import dense
from dinojax.dense import segment, train_seg
from dinojax.dense.seg_augment import SegTrainTransform, random_crop_bbox
from dinojax.dense.seg_metrics import SegMetrics, intersect_and_union

# ------------------------------------------------------------------------------ metrics


def test_metrics_exact_on_a_hand_made_example():
    label = np.array([[0, 0, 1, 255], [2, 2, 1, 1]], np.uint8)
    pred = np.array([[0, 1, 1, 3], [2, 0, 1, 3]], np.int32)
    inter, union, area_pred, area_label = intersect_and_union(pred, label, 5)
    # class 0: label {(0,0),(0,1)}, pred {(0,0),(1,1)} -> I 1, U 3; class 1: label 3 pixels, pred
    # {(0,1),(0,2),(1,2)} -> I 2, U 4; class 2: label 2, pred 1 -> I 1, U 2; class 3: predicted
    # once on a labelled pixel -> I 0, U 1 (the prediction on the ignored pixel does not count);
    # class 4: absent everywhere -> 0 / 0
    assert inter.tolist() == [1, 2, 1, 0, 0] and union.tolist() == [3, 4, 2, 1, 0]
    assert area_pred.tolist() == [2, 3, 1, 1, 0] and area_label.tolist() == [2, 3, 2, 0, 0]
    m = SegMetrics(5)
    m.update(pred, label)
    r = m.compute()
    iou = [100 / 3, 50.0, 50.0, 0.0]
    np.testing.assert_allclose(r["IoU"][:4], iou)
    assert np.isnan(r["IoU"][4]) and np.isnan(r["Acc"][3]) and np.isnan(r["Acc"][4])
    assert r["mIoU"] == pytest.approx(np.mean(iou))
    assert r["aAcc"] == pytest.approx(100 * 4 / 7)  # 4 right of the 7 labelled pixels
    assert r["mAcc"] == pytest.approx(100 * np.mean([1 / 2, 2 / 3, 1 / 2]))


def test_metrics_accumulate_over_images_not_per_image():
    m = SegMetrics(2)
    m.update(np.zeros((1, 4)), np.array([[0, 0, 0, 1]]))
    m.update(np.ones((1, 2)), np.array([[1, 1]]))
    # dataset totals: class 0 I 3 U 4, class 1 I 2 U 3 (a per-image mean would differ)
    assert m.compute()["IoU"] == pytest.approx([75.0, 200 / 3])


def test_metrics_reject_labels_beyond_k():
    with pytest.raises(ValueError, match="label value 7 outside"):
        intersect_and_union(np.zeros((2, 2)), np.full((2, 2), 7), 5)


# ------------------------------------------------------------------------------ protocol


def test_poly_warmup_schedule_matches_mmcv():
    cfg = train_seg.SegTrainConfig(iters=100, warmup_iters=10, lr=1e-3)
    lr = lambda s: float(train_seg.poly_warmup_lr(s, cfg))  # noqa: E731
    # mmcv PolyLrUpdaterHook: regular = base (1 - it / max); warm-up: regular (1 - k),
    # k = (1 - it / warmup)(1 - ratio)
    assert lr(0) == pytest.approx(1e-3 * 1e-6)
    assert lr(5) == pytest.approx(1e-3 * 0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert lr(10) == pytest.approx(1e-3 * 0.9) and lr(99) == pytest.approx(1e-5)


def test_loss_ignores_255_and_averages_over_all_pixels():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 2, 3)), jnp.float32)
    labels = jnp.asarray([[[0, 255], [2, 1]]])
    t = torch.from_numpy(np.array(logits)).permute(0, 3, 1, 2)
    lab = torch.from_numpy(np.array(labels)).long()
    per_pixel = torch.nn.functional.cross_entropy(t, lab, ignore_index=255, reduction="none")
    got = train_seg.seg_loss(logits, labels)
    assert float(got) == pytest.approx(float(per_pixel.mean()), rel=1e-6)  # avg over 4 pixels
    got = train_seg.seg_loss(logits, labels, avg_non_ignore=True)
    assert float(got) == pytest.approx(float(per_pixel.sum() / 3), rel=1e-6)


def test_batch_norm_train_matches_torch_running_stats():
    x = np.random.default_rng(1).normal(2, 3, size=(2, 3, 4, 5)).astype(np.float32)
    bn = torch.nn.BatchNorm2d(5).train()
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
        bn.weight.copy_(torch.linspace(0.5, 1.5, 5))
        expect = bn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    params = {"weight": jnp.linspace(0.5, 1.5, 5), "bias": jnp.zeros(5),
              "running_mean": jnp.full(5, 0.5), "running_var": jnp.ones(5)}  # fmt: skip
    y, stats = train_seg.batch_norm_train(params, jnp.asarray(x), 1e-5)
    np.testing.assert_allclose(np.asarray(y), expect, atol=2e-5)
    np.testing.assert_allclose(stats["running_mean"], bn.running_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(stats["running_var"], bn.running_var.numpy(), rtol=1e-5)


def test_random_crop_avoids_single_class_crops():
    label = np.zeros((100, 100), np.uint8)
    label[:, 90:] = 1  # only crops touching the right edge hold two classes
    for seed in range(5):
        y, x = random_crop_bbox(label, 20, np.random.default_rng(seed), 0.75)
        crop = label[y : y + 20, x : x + 20]
        assert len(np.unique(crop)) == 2 or x + 20 <= 90  # 10 redraws may all miss (rare)
    t = SegTrainTransform(crop_size=64, scale=(128, 32), photometric=True)
    img, lab = t(np.full((40, 50, 3), 128, np.uint8), np.ones((40, 50), np.uint8),
                 np.random.default_rng(0))  # fmt: skip
    assert img.shape == (64, 64, 3) and img.dtype == np.float32 and lab.shape == (64, 64)
    assert set(np.unique(lab)) <= {1, 255}  # resized to short side 16-64, padded with 255


# ------------------------------------------------------------------------------ training


class Stripes:
    """Tiny synthetic scenes: vertical bands of 3 colours (classes 0-2) with noise; a 255 band."""

    def __init__(self, n: int, size=(42, 56), seed=0, bad: int | None = None):
        self.n, self.size, self.seed, self.bad = n, size, seed, bad

    def __len__(self):
        return self.n

    def name(self, i):
        return f"stripes/{i:03d}.png"

    def __getitem__(self, i):
        rng = np.random.default_rng(self.seed * 1000 + i)
        h, w = self.size
        cuts = np.sort(rng.choice(np.arange(6, w - 6), 2, replace=False))
        label = np.zeros((h, w), np.uint8)
        label[:, cuts[0] :] = 1
        label[:, cuts[1] :] = 2
        colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], np.float32)
        img = colours[label] + rng.normal(0, 20, (h, w, 3))
        label[:2] = 255
        if i == self.bad:
            label[5, 5] = 9
        return np.clip(img, 0, 255).astype(np.uint8), label


SMALL = dict(
    batch_size=8, crop_size=42, scale=(84, 42), ratio_range=(0.8, 1.25), lr=1e-2, warmup_iters=3,
    eval_crop_size=42, eval_stride=28, eval_resize=None, log_every=1,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_backbone():
    from dinojax.models import create_model

    return create_model("dinov2_vits14", depth=2, embed_dim=64, num_heads=1, seed=0)


def test_training_learns_and_the_head_round_trips(tiny_backbone, tmp_path):
    res = train_seg.train_seg_head(
        tiny_backbone, Stripes(16), 3, val_source=Stripes(4, seed=1), output_dir=tmp_path / "run",
        iters=25, progress=False, class_names=["red", "green", "blue"], **SMALL,
    )  # fmt: skip
    losses = res["losses"]
    assert len(losses) == 25 and np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses
    ev = res["eval"][25]
    assert ev["mIoU"] > 60 and ev["aAcc"] > 80, ev  # chance: ~33 mIoU
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 1 and "lr" in lines[0] and "eval" in lines[-1]
    # the written head loads with load_segmenter and exports to the official layout exactly
    seg = segment.load_segmenter(tiny_backbone, tmp_path / "run" / "head")
    assert seg.class_names == ["red", "green", "blue"] and seg.head_cfg["num_batches_tracked"] == 25
    again = train_seg.evaluate_segmentation(seg, Stripes(4, seed=1), crop_size=42, stride=28,
                                            resize=None, progress=False)  # fmt: skip
    assert again["mIoU"] == pytest.approx(ev["mIoU"])
    dense.export_head(tmp_path / "run" / "head", tmp_path / "head.pth")
    sd = torch.load(tmp_path / "head.pth", weights_only=True)["state_dict"]
    assert sd["decode_head.conv_seg.weight"].shape == (3, 64, 1, 1)
    assert int(sd["decode_head.bn.num_batches_tracked"]) == 25
    np.testing.assert_array_equal(sd["decode_head.bn.running_var"].numpy(),
                                  res["head"]["bn"]["running_var"])  # fmt: skip
    official = segment.load_segmenter(tiny_backbone, tmp_path / "head.pth")
    x = Stripes(2, seed=3)[0][0][None]
    np.testing.assert_array_equal(official.predict(x), seg.predict(x))


def test_bad_labels_name_the_sample(tiny_backbone, tmp_path):
    with pytest.raises(ValueError, match=r"sample 0 \(stripes/000.png\): label values \[9\]"):
        train_seg.train_seg_head(tiny_backbone, Stripes(3, bad=0), 3, iters=1, progress=False,
                                 **SMALL)  # fmt: skip
    with pytest.raises(ValueError, match="not empty"):
        (tmp_path / "x").mkdir()
        (tmp_path / "x" / "f").write_text("")
        train_seg.train_seg_head(tiny_backbone, Stripes(3), 3, output_dir=tmp_path / "x",
                                 iters=1, progress=False, **SMALL)  # fmt: skip
    with pytest.raises(ValueError, match="out of range"):
        train_seg.train_seg_head(tiny_backbone, Stripes(3), 3, layers=(0, 5), iters=1,
                                 progress=False, **SMALL)  # fmt: skip


class Crashing(Stripes):
    """Stripes that fail once `limit` samples have been read (an interrupted run)."""

    def __init__(self, n, limit):
        super().__init__(n)
        self.reads, self.limit = itertools.count(), limit

    def __getitem__(self, i):
        if next(self.reads) >= self.limit:
            raise RuntimeError("interrupted")
        return super().__getitem__(i)


@pytest.mark.slow  # three short runs, three compilations: ~50 s on a loaded 2-core machine
def test_resume_equals_an_uninterrupted_run(tiny_backbone, tmp_path):
    kw = dict(iters=4, checkpoint_every=2, progress=False, **{**SMALL, "log_every": 2})
    full = train_seg.train_seg_head(tiny_backbone, Stripes(8), 3, output_dir=tmp_path / "a", **kw)
    # 1 read for the up-front check + 2 batches of 8: the third batch fails after the step-2
    # checkpoint
    with pytest.raises(RuntimeError, match="interrupted"):
        train_seg.train_seg_head(tiny_backbone, Crashing(8, 17), 3, output_dir=tmp_path / "b",
                                 **kw)  # fmt: skip
    assert json.loads((tmp_path / "b" / "train_state" / "step.json").read_text())["step"] == 2
    with pytest.raises(ValueError, match=r"differs in \['lr'\]"):
        train_seg.train_seg_head(tiny_backbone, Stripes(8), 3, output_dir=tmp_path / "b",
                                 resume=True, **{**kw, "lr": 0.5})  # fmt: skip
    resumed = train_seg.train_seg_head(tiny_backbone, Stripes(8), 3, output_dir=tmp_path / "b",
                                       resume=True, **kw)  # fmt: skip
    for a, b in zip(jax.tree.leaves(full["head"]), jax.tree.leaves(resumed["head"])):
        np.testing.assert_array_equal(a, b)
    assert resumed["head_cfg"]["num_batches_tracked"] == 4
