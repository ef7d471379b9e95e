"""Linear depth heads trained in JAX on frozen features (tiny synthetic data), SigLoss against the
official formula, depth metrics on hand-made examples."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import small_config

from dinojax.dense.depth_metrics import NYU_EIGEN_CROP, depth_metrics, valid_mask
from dinojax.dense.train_depth import DepthTrainConfig, sig_loss, train_depth_head
from dinojax.models import create_model


class Ramps:
    """Scenes whose depth is the brightness: depth = 1 + 4 * v (v in [0, 1]), a vertical or
    horizontal ramp per sample, some pixels unmeasured (0)."""

    def __init__(self, n, size=(42, 56), seed=0):
        self.n, self.size, self.seed = n, size, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        h, w = self.size
        rng = np.random.default_rng(self.seed * 1000 + i)
        v = np.linspace(0, 1, h if i % 2 else w, dtype=np.float32)
        v = np.broadcast_to(v[:, None] if i % 2 else v[None, :], (h, w))
        v = v[::-1] if rng.random() < 0.5 else v
        img = np.repeat((v * 255).astype(np.uint8)[..., None], 3, axis=2)
        depth = (1 + 4 * v).astype(np.float32)
        depth = np.where(rng.random((h, w)) < 0.1, 0.0, depth).astype(np.float32)
        return img, depth


def _torch_sigloss(pred, gt, warm):
    """facebookresearch/dinov2 `dinov2/eval/depth/models/losses/sigloss.py` `SigLoss.sigloss`
    (valid_mask=True, max_depth=None, eps=0.001)."""
    pred, gt = torch.from_numpy(pred), torch.from_numpy(gt)
    valid = gt > 0
    g = torch.log(pred[valid] + 0.001) - torch.log(gt[valid] + 0.001)
    if warm:
        return torch.sqrt(0.15 * torch.pow(torch.mean(g), 2)).item()
    return torch.sqrt(torch.var(g) + 0.15 * torch.pow(torch.mean(g), 2)).item()


@pytest.mark.parametrize("warm", [False, True])
def test_sigloss_matches_official(warm):
    rng = np.random.default_rng(0)
    pred = rng.uniform(0.1, 10, (2, 9, 11)).astype(np.float32)
    gt = np.where(rng.random((2, 9, 11)) < 0.3, 0, rng.uniform(0.1, 10, (2, 9, 11)))
    gt = gt.astype(np.float32)
    got = float(sig_loss(jnp.asarray(pred), jnp.asarray(gt), warm_up=warm))
    assert abs(got - _torch_sigloss(pred, gt, warm)) < 1e-6


def test_metrics_on_hand_made_examples():
    gt = np.array([[1.0, 2.0], [4.0, 0.0]], np.float32)  # one unmeasured pixel
    pred = np.array([[1.0, 2.5], [2.0, 7.0]], np.float32)
    m = depth_metrics(pred, gt, max_depth=10.0)
    # valid: (1, 1), (2, 2.5), (4, 2): ratios 1, 1.25, 2
    assert m["delta1"] == pytest.approx(1 / 3)  # 1.25 is not < 1.25
    assert m["delta2"] == pytest.approx(2 / 3)
    assert m["delta3"] == pytest.approx(2 / 3)  # 2 > 1.953125
    assert m["abs_rel"] == pytest.approx((0 + 0.25 + 0.5) / 3)
    assert m["rmse"] == pytest.approx(np.sqrt((0 + 0.25 + 4) / 3))
    assert m["log10"] == pytest.approx((0 + np.log10(1.25) + np.log10(2)) / 3)
    assert m["images"] == 1
    # per-image mean: a perfect second image halves abs_rel
    m2 = depth_metrics(np.stack([pred, gt + (gt == 0)]), np.stack([gt, gt]))
    assert m2["abs_rel"] == pytest.approx(m["abs_rel"] / 2)
    # max_depth cap: gt 4 excluded
    assert depth_metrics(pred, gt, max_depth=3.0)["delta1"] == pytest.approx(1 / 2)


def test_eigen_crop_and_bad_input():
    gt = np.ones((480, 640), np.float32)
    mask = valid_mask(gt, eigen_crop=True)
    t, b, left, r = NYU_EIGEN_CROP
    assert mask.sum() == (b - t) * (r - left) and mask[t, left] and not mask[t - 1, left]
    with pytest.raises(ValueError, match="Eigen crop needs 480x640"):
        valid_mask(np.ones((10, 10)), eigen_crop=True)
    with pytest.raises(ValueError, match="no image with a valid"):
        depth_metrics(np.ones((4, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="shape"):
        depth_metrics(np.ones((4, 4)), np.ones((4, 5)))


def _mesh():
    import jax
    from jax.sharding import Mesh

    return Mesh(np.array(jax.devices()[:2]), ("data",))


def test_training_decreases_the_loss_and_writes_a_loadable_head(tmp_path):
    from dinojax.convert.dense import export_head
    from dinojax.dense import load_depther

    model = create_model(small_config(), seed=0)
    cfg = DepthTrainConfig(
        layers=4,
        image_size=(42, 56),
        min_depth=0.001,
        max_depth=10.0,
        iters=40,
        batch_size=8,
        lr=3e-3,
        warmup_iters=5,
        warm_up_iters=0,
        log_every=5,
    )
    res = train_depth_head(
        model,
        Ramps(16),
        config=cfg,
        val_source=Ramps(8, seed=1),
        out_dir=tmp_path / "run",
        progress=False,
        mesh=_mesh(),
    )
    losses = [r["loss"] for r in res.history]
    assert res.head_cfg["type"] == "linear4" and res.head_cfg["out_index"] == [0, 1, 2, 3]
    assert np.mean(losses[-3:]) < 0.7 * losses[0], losses
    assert res.metrics["images"] == 8 and res.metrics["abs_rel"] < 1.0
    lines = [json.loads(s) for s in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert lines[0]["iter"] == 0 and "val" in lines[-1]
    # the saved head loads with load_depther and gives what the trained params give
    depther = load_depther(model, tmp_path / "run" / "head")
    img = np.stack([Ramps(2, seed=3)[i][0] for i in range(2)])
    pred = depther.predict(img)
    assert pred.shape == (2, 42, 56) and pred.min() >= 0.001 and pred.max() <= 10.0
    # and exports to the released layout, which converts back to the same weights
    export_head(tmp_path / "run" / "head", tmp_path / "head.pth")
    sd = torch.load(tmp_path / "head.pth", weights_only=True)["state_dict"]
    assert sorted(sd) == ["decode_head.conv_depth.bias", "decode_head.conv_depth.weight"]
    w = res.params["conv_depth"]["kernel"]
    np.testing.assert_array_equal(
        sd["decode_head.conv_depth.weight"].numpy()[:, :, 0, 0], w[0, 0].T
    )


def test_bad_sources():
    model = create_model(small_config(), seed=0)
    cfg = DepthTrainConfig(image_size=(28, 28), iters=1, batch_size=8)

    class Bad(Ramps):
        def __getitem__(self, i):
            img, d = super().__getitem__(i)
            return img.astype(np.float32), d

    with pytest.raises(ValueError, match="record 0: image must be uint8"):
        train_depth_head(model, Bad(2), config=cfg, progress=False)
    with pytest.raises(ValueError, match="NYU crop needs 480x640"):
        train_depth_head(
            model, Ramps(2), config=DepthTrainConfig(nyu_crop=True, iters=1), progress=False
        )
    with pytest.raises(ValueError, match="empty"):
        train_depth_head(model, Ramps(0), config=cfg, progress=False)
    with pytest.raises(ValueError, match="layers must be 1 or 4"):
        DepthTrainConfig(layers=2)
