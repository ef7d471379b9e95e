"""DINOv3 ViT conversion: official <-> dinojax <-> official bit for bit (buffers included),
Hugging Face -> official -> Hugging Face, architecture detection for every hub model, and the
one-line errors (wrong family for --arch, HF config mismatches, bad buffers, ConvNeXt module
missing) with nothing written.

The official state dicts here are built from the key/shape table of each architecture
(`expected_official_shapes`, which is pinned against an independent list of the official keys
below) filled with random values, with the buffers as the official `init_weights` sets them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import dinojax
from dinojax.convert import v3 as v3conv
from dinojax.convert.backbone import ConversionError
from dinojax.convert.checkpoint import convert, export, read_meta
from dinojax.convert.io import read_file, write_file
from dinojax.models.config import get_config
from dinojax.models.config_v3 import V3_ARCHITECTURES

SMALL = get_config("dinov3_vits16", embed_dim=128, num_heads=2, depth=2)


def official_keys(cfg) -> set[str]:
    """The official key list of `dinov3/models/vision_transformer.py` `DinoVisionTransformer`,
    written out independently of the converter."""
    keys = {"cls_token", "mask_token", "rope_embed.periods", "patch_embed.proj.weight",
            "patch_embed.proj.bias", "norm.weight", "norm.bias"}  # fmt: skip
    if cfg.num_storage_tokens:
        keys.add("storage_tokens")
    for name, on in (("cls_norm", cfg.untie_cls_and_patch_norms),
                     ("local_cls_norm", cfg.untie_global_and_local_cls_norm)):  # fmt: skip
        if on:
            keys |= {f"{name}.weight", f"{name}.bias"}
    ffn = ("w1", "w2", "w3") if cfg.ffn_layer.startswith("swiglu") else ("fc1", "fc2")
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        keys |= {b + k for k in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                                 "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
                                 "ls1.gamma", "ls2.gamma")}  # fmt: skip
        if cfg.qkv_bias:
            keys |= {b + "attn.qkv.bias", b + "attn.qkv.bias_mask"}
        for f in ffn:
            keys |= {f"{b}mlp.{f}.weight", f"{b}mlp.{f}.bias"}
    return keys


def random_official(cfg, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sd = {
        k: rng.standard_normal(s).astype(np.float32)
        for k, s in v3conv.expected_official_shapes(cfg).items()
    }
    sd.update(_buffers(cfg))
    return sd


def _buffers(cfg) -> dict[str, np.ndarray]:
    import torch

    # `RopePositionEmbedding._init_weights` and `init_weights_vit`, computed by torch.
    dh = cfg.head_dim
    out = {
        "rope_embed.periods": (
            cfg.rope_base ** (2 * torch.arange(dh // 4, dtype=torch.float32) / (dh // 2))
        ).numpy()
    }
    if cfg.has_bias_mask:
        o = 3 * cfg.embed_dim
        mask = torch.ones(o)
        mask[o // 3 : 2 * o // 3] = 0
        out.update({f"blocks.{i}.attn.qkv.bias_mask": mask.numpy() for i in range(cfg.depth)})
    return out


@pytest.mark.parametrize("name", sorted(V3_ARCHITECTURES))
def test_official_key_table_and_detection(name):
    """Every hub architecture: the converter's key table is the official one, and the
    architecture is detected back from tensor shapes alone (no weights allocated)."""
    cfg = V3_ARCHITECTURES[name]
    shapes = v3conv.expected_official_shapes(cfg)
    assert set(shapes) == official_keys(cfg)
    sd = {k: np.broadcast_to(np.zeros((), np.float32), s) for k, s in shapes.items()}
    sd.update(_buffers(cfg))
    assert v3conv.detect_v3_config(sd) == cfg
    assert v3conv.is_v3_vit(sd) and not v3conv.is_hf_v3(sd)


def test_hub_hyperparameters():
    """facebookresearch/dinov3 `dinov3/hub/backbones.py`, written out."""
    want = {  # width, depth, heads, ffn, hidden, qkv bias
        "dinov3_vits16": (384, 12, 6, "mlp", 1536, True),
        "dinov3_vits16plus": (384, 12, 6, "swiglu", 1536, True),
        "dinov3_vitb16": (768, 12, 12, "mlp", 3072, True),
        "dinov3_vitl16": (1024, 24, 16, "mlp", 4096, True),
        "dinov3_vitl16plus": (1024, 24, 16, "swiglu", 4096, True),
        "dinov3_vith16plus": (1280, 32, 20, "swiglu", 5120, True),
        "dinov3_vit7b16": (4096, 40, 32, "swiglu64", 8192, False),
    }
    for name, (d, depth, heads, ffn, hidden, qkv_bias) in want.items():
        c = get_config(name)
        assert (c.embed_dim, c.depth, c.num_heads, c.ffn_layer, c.ffn_hidden_dim,
                c.qkv_bias) == (d, depth, heads, ffn, hidden, qkv_bias), name  # fmt: skip
        fixed = (c.patch_size, c.num_storage_tokens, c.layernorm_eps, c.rope_base)
        assert fixed == (16, 4, 1e-5, 100.0)
        assert c.mask_k_bias and c.rope_normalize_coords == "separate"
        assert c.untie_global_and_local_cls_norm == (name == "dinov3_vit7b16")
    assert get_config("dinov3_vitl16_sat493m").untie_global_and_local_cls_norm
    abstract = dinojax.models.vit3.abstract_params(get_config("dinov3_vit7b16"))
    n = sum(int(np.prod(a.shape)) for a in __import__("jax").tree.leaves(abstract))
    assert 6.7e9 < n < 6.8e9, n  # "7B": 6,716M parameters


def test_round_trip_is_exact():
    cfg = SMALL.replace(untie_cls_and_patch_norms=True, untie_global_and_local_cls_norm=True)
    sd = random_official(cfg)
    back = v3conv.to_official(v3conv.from_official(sd, cfg), cfg)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == np.float32 and np.array_equal(back[k], sd[k]), k


def test_round_trip_swiglu_without_qkv_bias():
    cfg = SMALL.replace(ffn_layer="swiglu64", mlp_ratio=3.0, qkv_bias=False)
    sd = random_official(cfg, seed=1)
    assert "blocks.0.attn.qkv.bias_mask" not in sd and "blocks.0.mlp.w2.weight" in sd
    back = v3conv.to_official(v3conv.from_official(sd, cfg), cfg)
    assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
    det = v3conv.detect_v3_config(sd)
    assert det.ffn_layer.startswith("swiglu") and det.ffn_hidden_dim == cfg.ffn_hidden_dim
    assert not det.qkv_bias and not det.has_bias_mask and det.depth == 2


def test_hf_round_trip_and_back_to_official():
    pytest.importorskip("transformers")
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    hc = DINOv3ViTConfig(**v3conv.hf_config_kwargs(SMALL.replace(ffn_layer="swiglu")))
    torch.manual_seed(0)
    hf = {k: v.numpy() for k, v in DINOv3ViTModel(hc).state_dict().items()}
    assert v3conv.is_hf_v3(hf)
    off = v3conv.from_hf(hf, hc.to_dict())
    assert set(off) == official_keys(v3conv.detect_v3_config(off))
    np.testing.assert_array_equal(off["rope_embed.periods"], _buffers(SMALL)["rope_embed.periods"])
    assert not off["blocks.0.attn.qkv.bias"][128:256].any()  # zero key bias, masked anyway
    cfg = v3conv.detect_v3_config(off)
    again = v3conv.to_hf(v3conv.to_official(v3conv.from_official(off, cfg), cfg), cfg)
    assert set(again) == set(hf)
    for k in hf:
        assert np.array_equal(again[k], hf[k]), k


def test_hf_config_mismatch_is_one_line(tmp_path):
    pytest.importorskip("transformers")
    import torch
    from safetensors.torch import save_file
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    hc = DINOv3ViTConfig(**v3conv.hf_config_kwargs(SMALL))
    sd = DINOv3ViTModel(hc).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    bad = {**hc.to_dict(), "num_hidden_layers": 3, "layer_norm_eps": 1e-6}
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConversionError) as e:
        convert(tmp_path / "model.safetensors", tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and "num_hidden_layers=3 (the tensors have 2)" in msg
    assert "layer_norm_eps=1e-06 (DINOv3 uses 1e-05)" in msg
    assert not (tmp_path / "out").exists()
    (tmp_path / "config.json").write_text(hc.to_json_string())
    cfg = convert(tmp_path / "model.safetensors", tmp_path / "out")
    assert cfg.depth == 2 and read_meta(tmp_path / "out")["model"] == "dinov3_vit"
    del torch


def test_wrong_family_for_arch_is_one_line(tmp_path):
    v3 = random_official(SMALL)
    write_file(v3, tmp_path / "v3.pth")
    with pytest.raises(ConversionError, match=r"is a DINOv3 ViT, but --arch dinov2_vitb14 "
                                              r"expects a DINO / DINOv2 ViT"):  # fmt: skip
        convert(tmp_path / "v3.pth", tmp_path / "a", arch="dinov2_vitb14")
    from dinojax.convert.backbone import expected_official_shapes as v2_shapes

    v2 = get_config("dinov2_vits14", depth=1, img_size=28)
    write_file({k: np.zeros(s, np.float32) for k, s in v2_shapes(v2).items()}, tmp_path / "v2.pth")
    want = r"DINOv2 ViT \(it has a learned pos_embed\), but --arch dinov3_vits16 expects a DINOv3"
    with pytest.raises(ConversionError, match=want):
        convert(tmp_path / "v2.pth", tmp_path / "b", arch="dinov3_vits16")
    with pytest.raises(ConversionError, match=r"is a DINOv3 ViT, but --arch dinov3_convnext_tiny"):
        convert(tmp_path / "v3.pth", tmp_path / "c", arch="dinov3_convnext_tiny")
    assert not any((tmp_path / n).exists() for n in "abc")


def test_bad_buffers_are_refused():
    sd = random_official(SMALL)
    wrong = {**sd, "rope_embed.periods": sd["rope_embed.periods"] * 2}
    with pytest.raises(ConversionError, match=r"rope_embed.periods .* are not base 100"):
        v3conv.from_official(wrong, SMALL)
    wrong = {**sd, "blocks.1.attn.qkv.bias_mask": np.ones_like(sd["blocks.1.attn.qkv.bias_mask"])}
    with pytest.raises(ConversionError, match=r"bias_mask of blocks \[1\] is not \[1 \| 0 \| 1\]"):
        v3conv.from_official(wrong, SMALL)
    missing = {k: v for k, v in sd.items() if k != "storage_tokens"}
    with pytest.raises(ConversionError, match=r"missing keys \[storage_tokens"):
        v3conv.from_official(missing, SMALL)


def test_convert_load_export_cli(tmp_path):
    """convert_weights.py both ways: official .pth -> dinojax -> .pth (bit for bit) and -> HF."""
    import convert_weights

    sd = random_official(SMALL, seed=3)
    write_file(sd, tmp_path / "v3.pth")
    assert convert_weights.main([str(tmp_path / "v3.pth"), str(tmp_path / "ckpt")]) == 0
    meta = read_meta(tmp_path / "ckpt")
    assert meta["model"] == "dinov3_vit" and meta["arch"]["family"] == "dinov3"
    model = dinojax.load(tmp_path / "ckpt")
    assert type(model).__name__ == "DinoV3VisionTransformer" and model.cfg.depth == 2
    assert convert_weights.main([str(tmp_path / "ckpt"), str(tmp_path / "out.pth")]) == 0
    back = read_file(tmp_path / "out.pth")
    assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
    export(tmp_path / "ckpt", tmp_path / "hf.safetensors", fmt="hf")
    hf = read_file(tmp_path / "hf.safetensors")
    assert "model.layer.1.attention.q_proj.weight" in hf and "rope_embed.periods" not in hf
