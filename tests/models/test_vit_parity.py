"""Parity of every architecture with the PyTorch reference (official-dino.md §1, §7).

Random weights -> official-format state dict file -> convert_weights -> JAX, float32 under
highest matmul precision: max |JAX - torch| <= 1e-4 on every output (CLS, registers, patch
tokens, prenorm, intermediate layers, attention maps) at 224x224, 518x518 and two non-square
sizes. ViT-L and ViT-g keep their full width with 2 blocks (CI time); the others are full depth.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import hf_register_vit, official_state_dict, official_vit, torch_outputs

import dinojax
from dinojax.convert.checkpoint import convert
from dinojax.models.config import get_config

ATOL = 1e-4
SIZES = [(224, 224), (518, 518), (224, 308), (420, 294)]
ARCHS = [
    "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14",
    "dinov2_vits14_reg", "dinov2_vitb14_reg", "dinov2_vitl14_reg", "dinov2_vitg14_reg",
    "dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8",
]  # fmt: skip
RESULTS_FILE = os.environ.get("DINOJAX_PARITY_JSONL")  # README table source, if set


def _cfg(name):
    cfg = get_config(name)
    if cfg.embed_dim >= 1024:
        cfg = cfg.replace(depth=2)
    return cfg


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """arch -> (torch reference, JAX model loaded through the converter)."""
    cache = {}

    def get(name):
        if name not in cache:
            cfg = _cfg(name)
            d = tmp_path_factory.mktemp(name)
            if cfg.num_register_tokens:
                ref = hf_register_vit(cfg, seed=1)
                from safetensors.torch import save_file

                src = d / "model.safetensors"
                save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(src))
            else:
                ref = official_vit(cfg, seed=1)
                src = d / "model.pth"
                torch.save(official_state_dict(ref, cfg), src)
            arch = name if cfg.depth == get_config(name).depth else None
            convert(src, d / "ckpt", arch=arch)
            model = dinojax.load(d / "ckpt")
            assert model.cfg.num_register_tokens == cfg.num_register_tokens
            assert model.cfg.family == cfg.family and model.cfg.depth == cfg.depth
            cache.clear()  # keep one reference model in memory at a time
            cache[name] = (ref, model)
        return cache[name]

    return get


@jax.jit
def _jax_outputs(model, x, masks):
    depth = model.cfg.depth
    ff = model.forward_features(x, masks)
    ff.pop("masks")
    return {
        **ff,
        "inter_a": model.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True),
        "inter_b": model.get_intermediate_layers(x, n=[0, depth - 1], norm=False),
        "attn": model.get_last_self_attention(x),
    }


def _max_diffs(j, t):
    diffs = {}
    for k in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "attn"):
        assert j[k].shape == t[k].shape, (k, j[k].shape, t[k].shape)
        diffs[k] = float(np.abs(np.asarray(j[k]) - t[k]).max()) if t[k].size else 0.0
    inter = [(a, b) for (pa, ca), (pb, cb) in zip(j["inter_a"], t["inter_a"]) for a, b in
             ((pa, pb), (ca, cb))] + list(zip(j["inter_b"], t["inter_b"]))  # fmt: skip
    for a, b in inter:
        assert a.shape == b.shape, (a.shape, b.shape)
    diffs["intermediate"] = max(float(np.abs(np.asarray(a) - b).max()) for a, b in inter)
    return diffs


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", ARCHS)
def test_parity(converted, name, size):
    ref, model = converted(name)
    cfg = model.cfg
    h, w = size
    b = 2 if h * w <= 224 * 308 else 1
    rng = np.random.default_rng(hash((name, size)) % 2**32)
    x = rng.standard_normal((b, 3, h, w), dtype=np.float32)
    masks = None
    if cfg.has_mask_token and size == (224, 224):
        n = (h // cfg.patch_size) * (w // cfg.patch_size)
        masks = rng.random((b, n)) < 0.4
    t = torch_outputs(ref, cfg, x, masks)
    with jax.default_matmul_precision("highest"):
        j = _jax_outputs(model, jnp.asarray(x.transpose(0, 2, 3, 1)),
                         None if masks is None else jnp.asarray(masks))  # fmt: skip
    diffs = _max_diffs(j, t)
    if RESULTS_FILE:
        with open(RESULTS_FILE, "a") as f:
            f.write(json.dumps({"arch": name, "size": f"{h}x{w}", "depth": cfg.depth, **diffs}) + "\n")
    bad = {k: v for k, v in diffs.items() if not v <= ATOL}
    assert not bad, f"{name} at {h}x{w}: max abs differences above {ATOL}: {bad}"
