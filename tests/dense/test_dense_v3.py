"""The dense heads on a DINOv3 backbone (patch 16, storage tokens, RoPE): a linear segmentation
head and a linear4 depth head train on frozen DINOv3 features, save as head directories and
predict at the input resolution through `load_segmenter` / `load_depther`."""

import numpy as np

import dinojax
from dinojax.dense import load_depther, load_segmenter
from dinojax.dense.data import dense_source
from dinojax.dense.train_depth import DepthTrainConfig, train_depth_head
from dinojax.dense.train_seg import train_seg_head


def _tiny_v3():
    return dinojax.create_model("dinov3_vits16", depth=4, embed_dim=64, num_heads=1, seed=0)


def test_segmentation_head_on_a_dinov3_backbone(tmp_path):
    model = _tiny_v3()
    src = dense_source("digits:8:48", "train")
    res = train_seg_head(model, src, 11, output_dir=tmp_path / "seg", iters=2, batch_size=8,
                         crop_size=48, scale=(96, 48), warmup_iters=1, eval_resize=None,
                         progress=False)  # fmt: skip
    assert res["head_cfg"]["backbone"] == "dinov3_vits16" and res["head_cfg"]["layers"] == [3]
    seg = load_segmenter(model, tmp_path / "seg" / "head")
    images = np.stack([src[i][0] for i in range(2)])[:, :40, :45]  # not a multiple of 16
    scores = seg.predict(images, mode="whole")
    assert scores.shape == (2, 40, 45, 11) and scores.dtype == np.float32
    assert np.isfinite(scores).all()


def test_depth_head_on_a_dinov3_backbone(tmp_path):
    model = _tiny_v3()
    src = dense_source("depthscenes:8:48", "train")
    cfg = DepthTrainConfig(iters=2, batch_size=8, image_size=(48, 48), warmup_iters=1,
                           warm_up_iters=1)  # fmt: skip
    res = train_depth_head(model, src, config=cfg, out_dir=str(tmp_path / "depth"),
                           progress=False)  # fmt: skip
    assert res.head_cfg["type"] == "linear4" and res.head_cfg["num_register_tokens"] == 4
    assert res.head_cfg["out_index"] == [0, 1, 2, 3]
    depther = load_depther(model, tmp_path / "depth" / "head")
    images = np.stack([src[i][0] for i in range(2)])[:, :40, :45]
    metres = depther.predict(images)
    assert metres.shape == (2, 40, 45)
    assert (metres >= cfg.min_depth).all() and (metres <= cfg.max_depth).all()


def test_linear4_depth_head_needs_four_blocks():
    import pytest

    from dinojax.dense.train_depth import out_index_for

    model = dinojax.create_model("dinov3_vits16", depth=2, embed_dim=64, num_heads=1, seed=0)
    with pytest.raises(ValueError, match="at least 4 blocks, this one has 2"):
        out_index_for(model, 4)
    assert out_index_for(model, 1) == [1]
