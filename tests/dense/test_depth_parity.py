"""Depth heads end to end against torch, float32, random weights, sizes that need CenterPadding:

- every head (linear, linear4, DPT) against the reference written from the official semantics
  (`tests/dense/depth_reference.py`: facebookresearch/dinov2 `dinov2/hub/depth/decode_heads.py`
  `BNHead`, `DPTHead`, `ReassembleBlocks`, `FeatureFusionBlock`, `PreActResidualConvUnit`,
  `HeadDepth`; `encoder_decoder.py` `DepthEncoderDecoder.encode_decode`) on the official PyPI
  dinov2 ViT-S/14 backbone (`vit_small` with the hub arguments);
- the DPT head against Hugging Face `DPTForDepthEstimation` with a `Dinov2Config` backbone, an
  independent implementation, weights mapped official -> HF as transformers'
  `convert_dinov2_depth_to_hf.py` does. HF's head ends at `relu` (no `+ min_depth`, no clamp) and
  returns the map at the head's resolution: the test adds min_depth, clamps and resizes to the
  input exactly as `encode_decode` does, on the HF output.

The released heads go through the real loading path: a `{"state_dict": ...}` `.pth` named like the
released files, read by `load_depther`.
"""

from __future__ import annotations

import depth_reference as R
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import Mesh
from reference import official_hub_vit

from dinojax.convert.backbone import from_official
from dinojax.dense.depth import load_depther, torch_linspace
from dinojax.eval.features import model_from_params
from dinojax.models.config import get_config

SIZES = [(480, 640), (350, 500)]
OUT4 = [2, 5, 8, 11]  # dinov2/hub/depthers.py, vit_small
# Measured max abs differences (metres, heads decoding over 0.001-10 m), float32 "highest":
# see the README table; tolerances are ~2x the largest measurement.
# measured: linear 2.4e-6 (350x500), linear4 2.9e-6 (480x640), DPT 7.4e-6 (480x640) and 6.9e-6
# (350x500), DPT vs transformers 7.4e-6 (480x640); small DPT (70x84) see its test.
ATOL = {"linear": 5e-6, "linear4": 6e-6, "dpt": 1.5e-5, "hf": 1.5e-5}


@pytest.fixture(scope="module")
def backbones():
    torch.manual_seed(0)
    ref = official_hub_vit("dinov2_vits14", seed=0)
    cfg = get_config("dinov2_vits14")
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    model = model_from_params(cfg, jax.tree.map(jax.numpy.asarray, from_official(sd, cfg)))
    return ref, model


_FEATS: dict = {}


def _torch_features(ref, x, out_index):
    """The hub backbone forward, computed once per input and block set (shared by the heads)."""
    key = (x.shape, float(x.flat[0]), tuple(out_index))
    if key not in _FEATS:
        with torch.no_grad():
            xt = R.center_padding(torch.from_numpy(x.transpose(0, 3, 1, 2)))
            _FEATS[key] = ref.get_intermediate_layers(
                xt, n=out_index, reshape=True, return_class_token=True, norm=False
            )
    return _FEATS[key]


@torch.no_grad()
def _reference_depth(ref, head, x, out_index):
    """`encode_decode` (tests/dense/depth_reference.py) on cached backbone features."""
    out = torch.clamp(head(_torch_features(ref, x, out_index)), head.min_depth, head.max_depth)
    return F.interpolate(out, size=x.shape[1:3], mode="bilinear", align_corners=False)[:, 0].numpy()


def _mesh():
    return Mesh(np.array(jax.devices()[:2]), ("data",))


def _images(size, seed):
    return np.random.default_rng(seed).standard_normal((2, *size, 3)).astype(np.float32)


def _head(kind: str, seed: int):
    head = (
        R.DPTHead(384, 0.001, 10.0)
        if kind == "dpt"
        else R.BNHead(384, 4 if kind == "linear4" else 1, 0.001, 10.0)
    )
    R.randomize_head_(head, seed)
    return head.eval()


def _save(tmp_path, head, name):
    path = tmp_path / name
    torch.save({"state_dict": R.official_state_dict(head)}, path)
    return path


def _jax_depth(model, path, x, **kw):
    with jax.default_matmul_precision("highest"):
        return load_depther(model, path, mesh=_mesh(), **kw).predict(x)


# The full-size cases take minutes on a loaded CI core: slow suite. The default suite keeps one
# full-size linear case and every head at 61 x 90 (padded to 70 x 98 on both axes).
CASES = [
    pytest.param("linear", (350, 500), marks=pytest.mark.slow),
    ("linear", (61, 90)),
    ("dpt", (61, 90)),
    pytest.param("linear4", (480, 640), marks=pytest.mark.slow),
    pytest.param("dpt", (480, 640), marks=pytest.mark.slow),
    pytest.param("dpt", (350, 500), marks=pytest.mark.slow),
    ("linear4", (61, 90)),
]


@pytest.mark.parametrize("kind,size", CASES)
def test_head_matches_official_semantics(backbones, tmp_path, kind, size):
    ref, model = backbones
    head = _head(kind, seed=len(kind) + size[0])
    path = _save(tmp_path, head, f"dinov2_vits14_nyu_{kind}_head.pth")
    x = _images(size, seed=size[1])
    out_index = [11] if kind == "linear" else OUT4
    want = _reference_depth(ref, head, x, out_index)
    got = _jax_depth(model, path, x)
    assert got.shape == want.shape == (2, *size)
    err = np.abs(got - want).max()
    print(f"{kind} {size}: max abs {err:.2e} m, depth range {want.min():.3f}-{want.max():.3f}")
    assert err < ATOL[kind]
    assert want.std() > 0.05  # the heads' outputs vary: a constant map would not test much


def _hf_dpt(ref_backbone, head):
    """`DPTForDepthEstimation` with the config and key mapping of transformers'
    `convert_dinov2_depth_to_hf.py` (`get_dpt_config`, `create_rename_keys_dpt`,
    `create_rename_keys_backbone`, `read_in_q_k_v`), small model."""
    from transformers import Dinov2Config, DPTConfig, DPTForDepthEstimation

    bcfg = Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        image_size=518,
        patch_size=14,
        layerscale_value=1.0,
        out_indices=[3, 6, 9, 12],
        apply_layernorm=False,
        reshape_hidden_states=False,
    )
    cfg = DPTConfig(
        backbone_config=bcfg,
        neck_hidden_sizes=[48, 96, 192, 384],
        use_bias_in_fusion_residual=False,
        add_projection=True,
    )
    model = DPTForDepthEstimation(cfg).eval()
    sd = {}
    for k, v in R.official_state_dict(head).items():
        k = k[len("decode_head.") :]
        for a, b in [
            ("reassemble_blocks.projects.{i}.conv", "neck.reassemble_stage.layers.{i}.projection"),
            (
                "reassemble_blocks.readout_projects.{i}.0",
                "neck.reassemble_stage.readout_projects.{i}.0",
            ),
            ("reassemble_blocks.resize_layers.{i}", "neck.reassemble_stage.layers.{i}.resize"),
            ("fusion_blocks.{i}.project.conv", "neck.fusion_stage.layers.{i}.projection"),
            (
                "fusion_blocks.{i}.res_conv_unit1.conv1.conv",
                "neck.fusion_stage.layers.{i}.residual_layer1.convolution1",
            ),
            (
                "fusion_blocks.{i}.res_conv_unit1.conv2.conv",
                "neck.fusion_stage.layers.{i}.residual_layer1.convolution2",
            ),
            (
                "fusion_blocks.{i}.res_conv_unit2.conv1.conv",
                "neck.fusion_stage.layers.{i}.residual_layer2.convolution1",
            ),
            (
                "fusion_blocks.{i}.res_conv_unit2.conv2.conv",
                "neck.fusion_stage.layers.{i}.residual_layer2.convolution2",
            ),
            ("convs.{i}.conv", "neck.convs.{i}"),
            ("project.conv", "head.projection"),
            ("conv_depth.head.{i}", "head.head.{i}"),
        ]:
            for i in range(5):
                src = a.format(i=i) + "."
                if k.startswith(src):
                    k = b.format(i=i) + "." + k[len(src) :]
                    break
            else:
                continue
            break
        sd[k] = v
    d = 384
    for k, v in ref_backbone.state_dict().items():
        m = k.replace("blocks.", "backbone.encoder.layer.").replace(
            "ls1.gamma", "layer_scale1.lambda1"
        )
        # transformers 5 names the script's attention.output.dense / attention.attention.{query,
        # key,value} attention.o_proj / attention.{q,k,v}_proj.
        m = m.replace("ls2.gamma", "layer_scale2.lambda1").replace("attn.proj", "attention.o_proj")
        m = {
            "cls_token": "backbone.embeddings.cls_token",
            "mask_token": "backbone.embeddings.mask_token",
            "pos_embed": "backbone.embeddings.position_embeddings",
            "patch_embed.proj.weight": "backbone.embeddings.patch_embeddings.projection.weight",
            "patch_embed.proj.bias": "backbone.embeddings.patch_embeddings.projection.bias",
            "norm.weight": "backbone.layernorm.weight",
            "norm.bias": "backbone.layernorm.bias",
        }.get(k, m)
        if "attn.qkv" in k:
            for j, name in enumerate("qkv"):  # `read_in_q_k_v`: rows [q; k; v]
                sd[m.replace("attn.qkv", f"attention.{name}_proj")] = v[j * d : (j + 1) * d]
            continue
        sd[m] = v
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # transformers' script asserts exactly these two missing keys (fusion block 0 has no first
    # residual unit in the official head; HF builds and never uses it).
    assert sorted(missing) == [
        "neck.fusion_stage.layers.0.residual_layer1.convolution1.weight",
        "neck.fusion_stage.layers.0.residual_layer1.convolution2.weight",
    ]
    assert not unexpected, unexpected
    return model


@pytest.mark.slow
def test_dpt_matches_transformers(backbones, tmp_path):
    """HF's `Dinov2Backbone` resizes the position embeddings with the size path (no 0.1 offset),
    unlike the official non-register hub backbone (scale factor with the offset), so its tokens
    differ at these sizes: HF's DPT neck and head (`DPTForDepthEstimation.forward` after the
    backbone: `self.neck(feature_maps, h // 14, w // 14)`, `self.head(...)`) run on the official
    backbone's tokens, [CLS, patches] per block as `Dinov2Backbone` returns them with
    `apply_layernorm=False, reshape_hidden_states=False`. The backbone mapping is still checked
    (strict load) and compared where no resize happens (518 x 518)."""
    ref, model = backbones
    head = _head("dpt", seed=7)
    hf = _hf_dpt(ref, head)
    size = (480, 640)
    x = _images(size, seed=size[1])
    with torch.no_grad():
        feats = _torch_features(ref, x, OUT4)
        tokens = [torch.cat([c[:, None], p.flatten(2).transpose(1, 2)], 1) for p, c in feats]
        hp, wp = feats[0][0].shape[2:]
        pred = hf.head(hf.neck(tokens, hp, wp))  # (B, h', w'), relu output
        # the mapped HF backbone, where it interpolates nothing, gives the official tokens
        x518 = torch.from_numpy(_images((518, 518), seed=3).transpose(0, 3, 1, 2))[:1]
        hf_maps = hf.backbone(x518).feature_maps
        off = ref.get_intermediate_layers(x518, n=OUT4, return_class_token=True, norm=False)
        bb_err = max((m[:, 1:] - p).abs().max().item() for m, (p, _) in zip(hf_maps, off))
    # HF omits `+ min_depth`, the clamp and the resize of `encode_decode`: apply them here.
    want = torch.clamp(pred[:, None] + 0.001, 0.001, 10.0)
    want = F.interpolate(want, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()
    got = _jax_depth(model, _save(tmp_path, head, "dinov2_vits14_nyu_dpt_head.pth"), x)
    err = np.abs(got - want).max()
    print(f"dpt vs transformers {size}: max abs {err:.2e} m; HF backbone at 518: {bb_err:.2e}")
    assert bb_err < 1e-5  # measured 4.3e-6
    assert err < ATOL["hf"]


def test_linspace_is_torch_exact():
    for lo, hi, n in [(0.001, 10.0, 256), (0.001, 80.0, 256), (0.5, 3.0, 7)]:
        np.testing.assert_array_equal(torch_linspace(lo, hi, n), torch.linspace(lo, hi, n).numpy())


def test_hub_linear_range_option(backbones, tmp_path):
    """`linear_range="hub"` decodes a NYU linear head over 0.001-80 m like the hub's
    `_make_dinov2_linear_depth_head`; the default uses the dataset's 0.001-10 m."""
    ref, model = backbones
    head = _head("linear", seed=5)
    path = _save(tmp_path, head, "dinov2_vits14_nyu_linear_head.pth")
    x = _images((61, 90), seed=2)
    hub = R.BNHead(384, 1, 0.001, 80.0)
    hub.load_state_dict(head.state_dict())
    want = R.encode_decode(ref, hub, torch.from_numpy(x.transpose(0, 3, 1, 2)), [11])
    got = _jax_depth(model, path, x, linear_range="hub")
    err = np.abs(got - want[:, 0].numpy()).max()
    print(f"linear, hub range 0.001-80 m: max abs {err:.2e} m")
    assert err < 4e-5  # measured 1.9e-5 (8x the range of the NYU case)
    default = _jax_depth(model, path, x)
    assert default.max() <= 10.0 and got.max() > default.max()


def test_bfloat16_backbone_is_close(backbones, tmp_path):
    """dtype="bfloat16" runs the backbone in bf16 (the head in float32): measured mean relative
    difference to float32 0.94% (DPT, 61x90), max 0.029 m; bounds ~2x."""
    ref, model = backbones
    head = _head("dpt", seed=3)
    path = _save(tmp_path, head, "dinov2_vits14_nyu_dpt_head.pth")
    x = _images((61, 90), seed=5)
    a = _jax_depth(model, path, x)
    b = _jax_depth(model, path, x, dtype="bfloat16")
    rel = np.mean(np.abs(a - b) / a)
    assert 0 < rel < 0.02 and np.abs(a - b).max() < 0.06
