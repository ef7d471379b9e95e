"""Segmentation heads against the official semantics (`reference_seg`: a torch transcription of
dinov2's `BNHead` / `CenterPadding` and mmseg 0.27's `EncoderDecoder`) on the official PyPI backbone
(`vit_small` with the hub keyword arguments, `reference.official_hub_vit`, depth 4 as a test
choice, random weights), plus the converter and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import official_hub_vit
from reference_seg import RefBNHead, RefSegmentor, head_file, random_head

from dinojax.convert import dense, dense_seg
from dinojax.convert.backbone import ConversionError, from_official
from dinojax.dense import segment
from dinojax.eval.features import model_from_params
from dinojax.models.config import get_config

DEPTH = 4
CFG = get_config("dinov2_vits14", depth=DEPTH)
D = CFG.embed_dim
# Measured max abs differences of the class scores (logits up to ~6): linear whole 480x640 6.2e-6,
# slide 5.7e-6; ms head whole 350x500 3.5e-6, slide 3.9e-6 (6 windows) and 6.4e-6 (12 small
# windows); TTA probabilities 4.8e-7. Tolerances about 2x the largest measurement.
ATOL = 1.5e-5


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def backbones():
    ref = official_hub_vit("dinov2_vits14", seed=5, depth=DEPTH)
    params = from_official({k: v.numpy() for k, v in ref.state_dict().items()}, CFG)
    return ref, model_from_params(CFG, jax.tree.map(jnp.asarray, params))


def one_device_mesh(n: int = 1):
    return jax.make_mesh((n,), ("data",), devices=jax.devices()[:n],
                         axis_types=(jax.sharding.AxisType.Auto,))  # fmt: skip


def images(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ------------------------------------------------------------------------------ parity


slow = pytest.mark.slow
CASES = [  # (head, mode, size, batch, crop, stride): sizes that need padding, whole and slide
    ("linear", "whole", (480, 640), 1, 512, 341),
    pytest.param("linear", "slide", (480, 640), 1, 512, 341, marks=slow),  # 2 windows
    pytest.param("ms", "whole", (350, 500), 2, 512, 341, marks=slow),
    pytest.param("ms", "slide", (350, 500), 2, 256, 171, marks=slow),  # 2 x 3 windows
    ("ms", "slide", (100, 131), 1, 56, 37),  # 3 x 4 overlapping, padded windows: fast
]


@pytest.mark.parametrize("kind,mode,size,batch,crop,stride", CASES)
def test_released_head_matches_official(backbones, tmp_path, kind, mode, size, batch, crop,
                                        stride):  # fmt: skip
    ref_bb, ours = backbones
    k = 150 if kind == "linear" else 21
    head = random_head(kind, k, len(kind) + batch, D)
    layers = dense_seg.layers_for(kind, DEPTH)
    x = images((batch, *size, 3), seed=batch)
    ref = RefSegmentor(ref_bb, head, layers)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    with torch.no_grad():
        expect = (ref.slide_inference(xt, crop, stride) if mode == "slide"
                  else ref.encode_decode(xt)).permute(0, 2, 3, 1).numpy()  # fmt: skip
    seg = segment.load_segmenter(ours, head_file(head, tmp_path / "h.pth"),
                                 mesh=one_device_mesh(batch))  # fmt: skip
    assert seg.head_cfg["layers"] == layers and seg.head_cfg["type"] == kind
    with jax.default_matmul_precision("highest"):
        got = seg.predict(x, mode=mode, crop_size=crop, stride=stride)
    assert got.shape == (batch, *size, k) and got.dtype == np.float32
    err = np.abs(got - expect).max()
    assert err < ATOL, err
    assert (got.argmax(-1) == expect.argmax(-1)).mean() > 0.999


def test_ms_test_time_augmentation_matches_aug_test(backbones, tmp_path):
    """mode="ms": scales x flip views, softmax, mean (mmseg `aug_test`), slide inside each view,
    at a small size (short side 56, two scales) to stay fast."""
    ref_bb, ours = backbones
    head = random_head("ms", 21, 9, D)
    x = images((1, 60, 75, 3), seed=3)
    assert segment.ms_sizes(60, 75, (1.0, 1.32), 56) == [(56, 70), (73, 91)]
    scales, ms_size, crop, stride = (1.32,), 56, 64, 42  # one scale x flip: 2 views, 2 x 2 windows
    sizes = segment.ms_sizes(60, 75, scales, ms_size)  # mmcv rescale_size arithmetic
    ref = RefSegmentor(ref_bb, head, dense_seg.layers_for("ms", DEPTH))
    with torch.no_grad():
        expect = ref.aug_test(torch.from_numpy(x).permute(0, 3, 1, 2), sizes, "slide", crop,
                              stride).permute(0, 2, 3, 1).numpy()  # fmt: skip
    seg = segment.load_segmenter(ours, head_file(head, tmp_path / "h.pth"), mesh=one_device_mesh())
    with jax.default_matmul_precision("highest"):
        got = seg.predict(x, mode="ms", scales=scales, ms_size=ms_size, crop_size=crop,
                          stride=stride)  # fmt: skip
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    assert np.abs(got - expect).max() < 1e-6  # measured 4.8e-7 (probabilities)


def test_probs_is_softmax_of_the_logits_and_sharding_is_transparent(tmp_path):
    """3 images sharded over the 8 test devices (padded to 8) give what one device gives (a
    narrow random backbone: only the layout is under test)."""
    from dinojax.models import create_model

    ours = create_model("dinov2_vits14", depth=2, embed_dim=64, num_heads=1, seed=2)
    g = torch.Generator().manual_seed(1)
    head = RefBNHead(64, 5)
    torch.nn.init.normal_(head.conv_seg.weight, generator=g)
    path = head_file(head, tmp_path / "h.pth")
    x = (np.random.default_rng(0).uniform(0, 255, (3, 30, 44, 3))).astype(np.uint8)
    one = segment.load_segmenter(ours, path, mesh=one_device_mesh())
    many = segment.load_segmenter(ours, path)
    assert many.mesh.size == jax.device_count() == 8
    a = one.predict(x, mode="slide", crop_size=28, stride=14)
    b = many.predict(x, mode="slide", crop_size=28, stride=14, batch_size=2)
    np.testing.assert_allclose(a, b, atol=2e-5)
    p = one.predict(x, mode="slide", crop_size=28, stride=14, probs=True)
    np.testing.assert_allclose(p, np.asarray(jax.nn.softmax(a, -1)), atol=1e-6)
    # uint8 input is normalised with the ImageNet mean / std
    xf = (x.astype(np.float32) - np.float32(segment.IMAGENET_MEAN)) / np.float32(
        segment.IMAGENET_STD
    )
    np.testing.assert_allclose(one.predict(xf, mode="whole"), one.predict(x), atol=1e-6)
    assert one.segment(x).shape == (3, 30, 44)
    # bf16 backbone: same shapes, float32 scores, nearly the same classes
    bf = segment.load_segmenter(ours, path, mesh=one_device_mesh(), dtype="bfloat16")
    assert bf.model.cfg.dtype == "bfloat16"
    c = bf.predict(x, mode="slide", crop_size=28, stride=14)
    assert c.dtype == np.float32 and (c.argmax(-1) == a.argmax(-1)).mean() > 0.9


# ------------------------------------------------------------------------------ converter


@pytest.mark.parametrize("kind,arch,k", [("linear", "dinov2_vitb14", 150),
                                         ("ms", "dinov2_vits14", 21)])  # fmt: skip
def test_converter_round_trip_is_exact(tmp_path, kind, arch, k):
    c = get_config(arch).embed_dim * (1 if kind == "linear" else 4)
    g = torch.Generator().manual_seed(0)
    sd = {
        "decode_head.bn.weight": torch.randn(c, generator=g),
        "decode_head.bn.bias": torch.randn(c, generator=g),
        "decode_head.bn.running_mean": torch.randn(c, generator=g),
        "decode_head.bn.running_var": torch.rand(c, generator=g),
        "decode_head.bn.num_batches_tracked": torch.tensor(40000),
        "decode_head.conv_seg.weight": torch.randn(k, c, 1, 1, generator=g),
        "decode_head.conv_seg.bias": torch.randn(k, generator=g),
    }
    src = tmp_path / f"{arch}_{'ade20k' if k == 150 else 'voc2012'}_{kind}_head.pth"
    torch.save({"meta": {"x": 1}, "state_dict": sd}, src)
    meta = dense.convert_head(src, tmp_path / "dir")  # arch from the released file name
    cfg = meta["head"]
    assert meta["task"] == "segmentation" and cfg["type"] == kind and cfg["num_classes"] == k
    assert cfg["dataset"] == ("ade20k" if k == 150 else "voc2012")
    assert cfg["layers"] == ([11] if kind == "linear" else [8, 9, 10, 11])
    dense.export_head(tmp_path / "dir", tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)["state_dict"]
    assert set(back) == set(sd)
    for key, v in sd.items():
        assert back[key].dtype == v.dtype and torch.equal(back[key], v), key


def _sd(c, k, **change):
    sd = {f"decode_head.bn.{n}": np.ones(c, np.float32)
          for n in ("weight", "bias", "running_mean", "running_var")}  # fmt: skip
    sd["decode_head.bn.num_batches_tracked"] = np.array(7, np.int64)
    sd["decode_head.conv_seg.weight"] = np.zeros((k, c, 1, 1), np.float32)
    sd["decode_head.conv_seg.bias"] = np.zeros(k, np.float32)
    for key, v in change.items():
        key = "decode_head." + key.replace("__", ".")
        if v is None:
            sd.pop(key)
        else:
            sd[key] = v
    return sd


def _torch_sd(c, k):
    return {k_: torch.from_numpy(v) for k_, v in _sd(c, k).items()}


def test_converter_errors_are_one_line_naming_the_problem():
    def err(sd, arch=None):
        with pytest.raises(ConversionError) as e:
            dense_seg.from_official(sd, arch)
        msg = str(e.value)
        assert "\n" not in msg
        return msg

    assert "bn.running_var" in err(_sd(384, 150, bn__running_var=None)) and "missing" in err(
        _sd(384, 150, bn__running_var=None)
    )
    msg = err(_sd(384, 150, bn__extra=np.zeros(3, np.float32)))
    assert "unexpected" in msg and "bn.extra" in msg
    msg = err(_sd(384, 150, bn__bias=np.zeros(380, np.float32)))
    assert "decode_head.bn.bias: got (380,), expected (384,)" in msg
    # width 1536 = ViT-g linear or ViT-S ms: ambiguous without --arch, resolved with it
    assert "--arch" in err(_sd(1536, 21))
    assert dense_seg.from_official(_sd(1536, 21), "dinov2_vits14")[1]["type"] == "ms"
    msg = err(_sd(768, 150), "dinov2_vits14")  # a ViT-B head on a ViT-S backbone
    assert "dinov2_vitb14 linear" in msg and "dinov2_vits14" in msg
    msg = err(_sd(384, 150), "dinov2_vits14_reg")  # released heads: no registers
    assert "dinov2_vits14_reg" in msg and "non-register" in msg


def test_head_backbone_mismatch_at_load_names_both(backbones, tmp_path):
    _, ours = backbones
    path = head_file(random_head("linear", 3, 0, D), tmp_path / "h.pth")
    params, meta = dense.from_official(dense.read_file(path), arch="dinov2_vits14")
    dense.save_head(tmp_path / "dir", params, meta)
    from flax import nnx

    from dinojax.models import create_model

    wide = nnx.eval_shape(lambda: create_model("dinov2_vitb14", depth=2))  # shapes only
    for head in (path, tmp_path / "dir"):
        with pytest.raises(ConversionError, match="dinov2_vitb14") as e:
            segment.load_segmenter(wide, head)
        assert "\n" not in str(e.value)
    # a released file names its backbone: a ViT-g linear head (1536) is not a ViT-S ms head
    torch.save(
        {"state_dict": _torch_sd(1536, 150)}, tmp_path / "dinov2_vitg14_ade20k_linear_head.pth"
    )
    small = nnx.eval_shape(lambda: create_model("dinov2_vits14", depth=12))
    with pytest.raises(
        ConversionError, match="is for dinov2_vitg14, the backbone is dinov2_vits14"
    ):
        segment.load_segmenter(small, tmp_path / "dinov2_vitg14_ade20k_linear_head.pth")
    reg = nnx.eval_shape(lambda: create_model("dinov2_vits14_reg", depth=12))
    with pytest.raises(ConversionError, match="non-register.*dinov2_vits14_reg"):
        segment.load_segmenter(reg, path)
    # the converted directory says ViT-S layer 11; a depth-4 ViT-S has no block 11
    with pytest.raises(ConversionError, match="depth 4"):
        segment.load_segmenter(ours, tmp_path / "dir")
    with pytest.raises(ValueError, match="NHWC"):
        segment.load_segmenter(ours, path, mesh=one_device_mesh()).predict(np.zeros((2, 5, 5)))
