"""Every accepted source format, each file built from the official code / state dict with random
weights: hub `.pth` (v2, v2 with registers, v1), DINOv2 `teacher_checkpoint.pth` (chunked blocks,
dino_head + ibot_head), DINO v1 full training checkpoint, Hugging Face safetensors.

Each test checks the conversion bit for bit (the converted tree mapped back to official keys equals
the source tensors) and, for the layouts the parity suite does not cover, the outputs of the loaded
JAX model and heads against the official PyTorch modules (float32, highest precision, 1e-4).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import (
    hf_register_vit,
    official_dino_head,
    official_state_dict,
    official_vit,
    randomize_,
)

import dinojax
from dinojax.convert.backbone import detect_config, expected_official_shapes, from_hf, to_official
from dinojax.convert.checkpoint import convert, restore_tree
from dinojax.convert.heads import dino_head_to_torch
from dinojax.models.config import ARCHITECTURES, get_config

ATOL = 1e-4
HEAD = dict(out_dim=96, hidden_dim=64, bottleneck_dim=32)
IBOT_HEAD = dict(out_dim=80, hidden_dim=48, bottleneck_dim=24)


def _np(sd: dict) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in sd.items()}


def _assert_tree_is(path, want_backbone: dict[str, np.ndarray], want_heads=None, name=None):
    """The converted checkpoint holds exactly these official tensors (bit for bit)."""
    tree, meta = restore_tree(path)
    if name is not None:
        assert meta["arch"]["name"] == name
    got = to_official(tree["backbone"])
    assert set(got) == set(want_backbone)
    for k, v in want_backbone.items():
        assert got[k].dtype == np.float32 and np.array_equal(got[k], v), k
    for head_name, want in (want_heads or {}).items():
        got_h = dino_head_to_torch(tree["heads"][head_name])
        assert set(got_h) == set(want), head_name
        for k, v in want.items():
            assert np.array_equal(got_h[k], v), (head_name, k)
    assert set(tree["heads"]) == set(want_heads or {})
    return tree, meta


@jax.jit
def _features(model, x):
    ff = model.forward_features(x)
    return ff["x_norm_clstoken"], ff["x_norm_patchtokens"], ff["x_prenorm"]


def _images(b=2, h=224, w=224, seed=0):
    return np.random.default_rng(seed).standard_normal((b, 3, h, w), dtype=np.float32)


def _assert_close(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = float(np.abs(a - b).max())
    assert err <= ATOL, f"{what}: max abs diff {err}"


def _check_official_outputs(model, ref, x_nchw, heads=None, ref_heads=None):
    with torch.no_grad():
        ff = ref.forward_features(torch.from_numpy(x_nchw))
    with jax.default_matmul_precision("highest"):
        cls, patch, pre = _features(model, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)))
        _assert_close(cls, ff["x_norm_clstoken"].numpy(), "cls")
        _assert_close(patch, ff["x_norm_patchtokens"].numpy(), "patch tokens")
        _assert_close(pre, ff["x_prenorm"].numpy(), "prenorm")
        for name, head in (heads or {}).items():
            # dino head on CLS tokens, ibot head on patch tokens: as in training.
            t_in = ff["x_norm_clstoken"] if name != "ibot_head" else ff["x_norm_patchtokens"]
            with torch.no_grad():
                want = ref_heads[name](t_in).numpy()
            got = jax.jit(lambda m, v: m(v))(head, jnp.asarray(t_in.numpy()))
            _assert_close(got, want, name)


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_official_architecture_is_detected_from_its_tensors(name):
    cfg = get_config(name)
    fake = {k: np.broadcast_to(np.float32(0), s) for k, s in expected_official_shapes(cfg).items()}
    assert detect_config(fake) == cfg
    assert detect_config(fake, arch=name) == cfg
    if name.startswith("dinov2_vits14"):  # the hub checkpoint's tensor count
        assert len(fake) == 175 + ("reg" in name)
    if name == "dino_vits16":
        assert len(fake) == 150


# ---------------------------------------------------------------------------------------------
# Hub backbones
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg", "dino_vits16"])
def test_hub_pth(tmp_path, name):
    cfg = get_config(name)
    ref = official_vit(cfg.replace(num_register_tokens=0, interpolate_offset=0.1), seed=3)
    sd = _np(official_state_dict(ref, cfg))
    if cfg.num_register_tokens:
        # The hub reg key set is the v2 one plus register_tokens (1, 4, D); the PyPI code
        # predates registers, so the tensor is added here (outputs: see the parity suite).
        sd["register_tokens"] = np.random.default_rng(0).standard_normal((1, 4, 384), np.float32)
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "hub.pth")
    assert convert(tmp_path / "hub.pth", tmp_path / "auto") == cfg
    _assert_tree_is(tmp_path / "auto", sd, name=name)
    # --arch gives the same result; the official alias spelling of the hub files works too.
    arch = name.replace("_reg", "_reg4")
    assert convert(tmp_path / "hub.pth", tmp_path / "forced", arch=arch) == cfg
    a, b = restore_tree(tmp_path / "auto")[0], restore_tree(tmp_path / "forced")[0]
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
    if not cfg.num_register_tokens:  # same flow as the parity suite, at a non-square size
        model = dinojax.load(tmp_path / "auto")
        _check_official_outputs(model, ref, _images(1, 112, 224, seed=1))


# ---------------------------------------------------------------------------------------------
# DINOv2 teacher_checkpoint.pth
# ---------------------------------------------------------------------------------------------


def test_dinov2_teacher_checkpoint_with_chunked_blocks_and_two_heads(tmp_path):
    cfg = get_config("dinov2_vits14")
    ref = official_vit(cfg, seed=5, block_chunks=4)
    chunked = _np(ref.state_dict())
    assert "blocks.1.3.attn.qkv.weight" in chunked and "blocks.3.11.ls2.gamma" in chunked
    heads = {
        "dino_head": official_dino_head(seed=1, in_dim=384, **HEAD),
        "ibot_head": official_dino_head(seed=2, in_dim=384, **IBOT_HEAD),
    }
    teacher = {f"backbone.{k}": torch.from_numpy(v) for k, v in chunked.items()}
    for name, head in heads.items():
        teacher.update({f"{name}.{k}": v for k, v in head.state_dict().items()})
    torch.save({"teacher": teacher}, tmp_path / "teacher_checkpoint.pth")

    assert convert(tmp_path / "teacher_checkpoint.pth", tmp_path / "ckpt") == cfg
    flat = {k: v.detach().numpy() for k, v in official_state_dict(ref, cfg).items()}
    flat = {".".join([k.split(".")[0], *k.split(".")[2:]]) if k.startswith("blocks.") else k: v
            for k, v in flat.items()}  # fmt: skip
    want_heads = {n: _np(h.state_dict()) for n, h in heads.items()}
    _, meta = _assert_tree_is(tmp_path / "ckpt", flat, want_heads, name="dinov2_vits14")
    assert meta["source"]["format"] == "teacher"
    assert meta["heads"]["ibot_head"]["out_dim"] == 80

    model, jheads = dinojax.load(tmp_path / "ckpt", heads=True)
    assert set(jheads) == {"dino_head", "ibot_head"}
    _check_official_outputs(model, ref, _images(2, 224, 224, seed=2), jheads, heads)


# ---------------------------------------------------------------------------------------------
# DINO v1 full training checkpoint
# ---------------------------------------------------------------------------------------------


def _v1_training_checkpoint(path, cfg):
    student = official_vit(cfg, seed=7)
    teacher = official_vit(cfg, seed=8)
    s_head = official_dino_head(seed=3, in_dim=384, **HEAD)
    t_head = official_dino_head(seed=4, in_dim=384, **HEAD)
    opt = torch.optim.AdamW(list(student.parameters())[:3], lr=1e-3)
    sum(p.sum() for p in list(student.parameters())[:3]).backward()
    opt.step()  # real optimizer state: exp_avg tensors, ints, floats, lists
    obj = {
        "student": {
            **{f"module.backbone.{k}": v for k, v in official_state_dict(student, cfg).items()},
            **{f"module.head.{k}": v for k, v in s_head.state_dict().items()},
        },
        "teacher": {
            **{f"backbone.{k}": v for k, v in official_state_dict(teacher, cfg).items()},
            **{f"head.{k}": v for k, v in t_head.state_dict().items()},
        },
        "optimizer": opt.state_dict(),
        "epoch": 101,
        "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=96, lr=5e-4),
        "dino_loss": {"center": torch.randn(1, 96, generator=torch.Generator().manual_seed(0))},
        "fp16_scaler": None,
    }
    torch.save(obj, path)
    return obj, (student, s_head), (teacher, t_head)


def test_dino_v1_training_checkpoint_teacher_and_student(tmp_path):
    cfg = get_config("dino_vits16")
    src = tmp_path / "checkpoint.pth"
    obj, (student, s_head), (teacher, t_head) = _v1_training_checkpoint(src, cfg)

    assert convert(src, tmp_path / "teacher") == cfg
    tree, meta = _assert_tree_is(
        tmp_path / "teacher", _np(official_state_dict(teacher, cfg)),
        {"dino_head": _np(t_head.state_dict())}, name="dino_vits16",
    )  # fmt: skip
    assert meta["source"]["format"] == "dino_v1"
    assert np.array_equal(tree["extras"]["dino_center"], obj["dino_loss"]["center"].numpy())

    assert convert(src, tmp_path / "student", which="student") == cfg
    _assert_tree_is(
        tmp_path / "student", _np(official_state_dict(student, cfg)),
        {"dino_head": _np(s_head.state_dict())},
    )  # fmt: skip

    model, heads = dinojax.load(tmp_path / "teacher", heads=True)
    _check_official_outputs(model, teacher, _images(2, 224, 224, seed=3), heads,
                            {"dino_head": t_head})  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Hugging Face safetensors
# ---------------------------------------------------------------------------------------------

# transformers 5 parameter names -> the names of the Hugging Face hub files (transformers 4).
_HF_OLD_NAMES = {
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
}


def _hf_model(reg: bool, seed: int):
    cfg = get_config("dinov2_vits14_reg" if reg else "dinov2_vits14")
    if reg:
        return cfg, hf_register_vit(cfg, seed=seed)
    from transformers import Dinov2Config, Dinov2Model

    # image_size 224: a 16x16 pos-embed grid, still detected as dinov2_vits14 (the grid is not
    # part of the architecture name), and cheap to run at the grid size.
    m = Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                 image_size=224, patch_size=14, layerscale_value=1.0))  # fmt: skip
    m.set_attn_implementation("eager")
    randomize_(m, seed)
    return cfg, m.eval()


@pytest.mark.parametrize("reg", [False, True], ids=["Dinov2Model", "Dinov2WithRegistersModel"])
def test_hf_safetensors(tmp_path, reg):
    from safetensors.torch import load_file

    cfg, hf = _hf_model(reg, seed=9)
    hf.save_pretrained(tmp_path / "hf")
    src = tmp_path / "hf" / "model.safetensors"
    if not reg:
        cfg = cfg.replace(img_size=224)
    assert convert(src, tmp_path / "ckpt") == cfg
    hf_sd = {k: v.numpy() for k, v in load_file(str(src)).items()}
    _assert_tree_is(tmp_path / "ckpt", from_hf(hf_sd), name=cfg.name)

    # The hub files' older names (transformers 4) convert to the same tree.
    old = {}
    for k, v in hf_sd.items():
        for new, name in _HF_OLD_NAMES.items():
            k = k.replace(new, name)
        old[k] = v
    assert jax.tree.all(jax.tree.map(np.array_equal, from_hf(old), from_hf(hf_sd)))

    # Plain Dinov2Model interpolates with the size path, so it equals the official model only at
    # the pos-embed grid size (224 here); the register model matches at any size (docs/parity.md
    # "Position embeddings").
    size = (224, 280) if reg else (224, 224)
    x = _images(1, *size, seed=4)
    with torch.no_grad():
        want = hf(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    model = dinojax.load(tmp_path / "ckpt")
    with jax.default_matmul_precision("highest"):
        cls, patch, _ = _features(model, jnp.asarray(x.transpose(0, 2, 3, 1)))
    r = cfg.num_register_tokens
    _assert_close(cls, want[:, 0], "cls")
    _assert_close(patch, want[:, 1 + r :], "patch tokens")
