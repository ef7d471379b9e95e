"""Every hub `ViTConfig` agrees with the official module it names.

The facts are read from modules built by the official code alone (`reference.official_hub_vit`:
the PyPI `dinov2` constructors with the torch-hub keyword arguments, the facebookresearch/dino v1
values, the published Hugging Face register configs), never from `dinojax.models.config`: heads,
head dim, width, depth, the eps of every LayerNorm (`module.eps`), the FFN kind and hidden width
(fc1 / w12 shapes), LayerScale presence and init, the qkv / proj / FFN biases, patch size,
pos-embed grid, register count, mask token, and the pos-embed interpolation (offset and
antialias, measured on the official method's output). `test_a_wrong_field_is_caught` shows each
check fails for a one-field mistake (LayerNorm eps 1e-5 among them).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from reference import (
    DINO_V1,
    DINO_V1_COMMON,
    HF_REGISTER_CONFIGS,
    HUB_INTERPOLATION,
    _hub_size,
    official_hub_kwargs,
    official_hub_vit,
)
from test_vit_build import OFFICIAL_PARAMS

from dinojax.models.config import ARCHITECTURES, ViTConfig

NAMES = sorted(ARCHITECTURES)
BUILD_DEPTH = 2  # enough to read per-block facts; the official depth is read separately


def _unique(values) -> float:
    values = {float(v) for v in values}
    assert len(values) == 1, values
    return values.pop()


def _interpolation(resample) -> dict:
    """Offset and antialias of the pos-embed interpolation, from the official method's output on
    a random grid: which `F.interpolate` call it equals (scale factor (h0 + offset) / M, or the
    target size), at a size where the paths differ by > 1e-2."""
    m, d, (h0, w0) = 6, 8, (9, 7)
    grid = torch.randn(1, d, m, m, generator=torch.Generator().manual_seed(0))
    got = resample(grid, h0, w0)
    found = []
    for offset in (0.0, 0.1):
        for aa in (False, True):
            kw = (
                dict(scale_factor=((h0 + offset) / m, (w0 + offset) / m))
                if offset
                else dict(size=(h0, w0))
            )
            want = torch.nn.functional.interpolate(grid, mode="bicubic", antialias=aa, **kw)
            if want.shape == got.shape and torch.equal(want, got):
                found.append(dict(interpolate_offset=offset, interpolate_antialias=aa))
    assert len(found) == 1, found
    return found[0]


def _v2_resample(model):
    def resample(grid, h0, w0):
        d = grid.shape[1]
        p = model.patch_size
        with torch.no_grad():
            model.pos_embed = torch.nn.Parameter(
                torch.cat([torch.zeros(1, 1, d), grid.flatten(2).transpose(1, 2)], dim=1)
            )
            # The PyPI code names the image sides (w, h) but is called with (H, W): rows first.
            out = model.interpolate_pos_encoding(torch.zeros(1, 1 + h0 * w0, d), h0 * p, w0 * p)
        return out[:, 1:].reshape(1, h0, w0, d).permute(0, 3, 1, 2)

    return resample


def _hf_resample(model):
    emb = model.embeddings

    def resample(grid, h0, w0):
        d = grid.shape[1]
        p = emb.patch_embeddings.patch_size[0]
        with torch.no_grad():
            emb.position_embeddings = torch.nn.Parameter(
                torch.cat([torch.zeros(1, 1, d), grid.flatten(2).transpose(1, 2)], dim=1)
            )
            out = emb.interpolate_pos_encoding(torch.zeros(1, 1 + h0 * w0, d), h0 * p, w0 * p)
        return out[:, 1:].reshape(1, h0, w0, d).permute(0, 3, 1, 2)

    return resample


def official_facts(name: str) -> dict:
    """The architecture of hub model `name`, read from the official module (not from dinojax)."""
    family, size, reg, patch = _hub_size(name)
    model = official_hub_vit(name, depth=BUILD_DEPTH, randomize=False)
    total = sum(p.numel() for p in model.parameters())
    if reg:
        layers = model.encoder.layer
        per_block = sum(p.numel() for p in layers[0].parameters())
        emb = model.embeddings
        attn = [blk.attention for blk in layers]
        mlp = layers[0].mlp
        swiglu = hasattr(mlp, "gate_proj")
        first, last = (mlp.gate_proj, mlp.down_proj) if swiglu else (mlp.fc1, mlp.fc2)
        facts = dict(
            depth=HF_REGISTER_CONFIGS[size]["num_hidden_layers"],
            embed_dim=emb.patch_embeddings.projection.out_channels,
            num_heads=_unique(a.num_attention_heads for a in attn),
            head_dim=_unique(a.head_dim for a in attn),
            norms=[m.eps for blk in layers for m in (blk.norm1, blk.norm2)] + [model.layernorm.eps],
            ffn_layer="swiglu" if swiglu else "mlp",
            ffn_hidden_dim=first.out_features,
            layerscale=[blk.layer_scale1.lambda1 for blk in layers]
            + [blk.layer_scale2.lambda1 for blk in layers],
            qkv_bias=all(p.bias is not None for a in attn for p in (a.q_proj, a.k_proj, a.v_proj)),
            proj_bias=all(a.o_proj.bias is not None for a in attn),
            ffn_bias=first.bias is not None and last.bias is not None,
            patch_size=emb.patch_embeddings.projection.kernel_size,
            pos_patches=emb.position_embeddings.shape[1] - 1,
            num_register_tokens=emb.register_tokens.shape[1],
            mask_token=hasattr(emb, "mask_token"),
            **_interpolation(_hf_resample(model)),
        )
    else:
        blocks = list(model.blocks)
        per_block = sum(p.numel() for p in blocks[0].parameters())
        attn = [blk.attn for blk in blocks]
        mlp = blocks[0].mlp
        swiglu = hasattr(mlp, "w12")
        first, last = (mlp.w12, mlp.w3) if swiglu else (mlp.fc1, mlp.fc2)
        if family == "dinov2":
            depth = official_hub_kwargs(name)["depth"]
            mask_token = hasattr(model, "mask_token")
            regs = getattr(model, "register_tokens", torch.zeros(1, 0, 1)).shape[1]
        else:  # the v2 class with v1 values: v1 has no mask token and no registers
            depth, mask_token, regs = DINO_V1[size]["depth"], DINO_V1_COMMON["mask_token"], 0
        facts = dict(
            depth=depth,
            embed_dim=model.embed_dim,
            num_heads=_unique(a.num_heads for a in attn),
            head_dim=_unique(a.qkv.in_features // a.num_heads for a in attn),
            norms=[m.eps for blk in blocks for m in (blk.norm1, blk.norm2)] + [model.norm.eps],
            ffn_layer="swiglu" if swiglu else "mlp",
            ffn_hidden_dim=first.out_features // (2 if swiglu else 1),
            layerscale=[getattr(blk.ls1, "gamma", None) for blk in blocks]
            + [getattr(blk.ls2, "gamma", None) for blk in blocks],
            qkv_bias=all(a.qkv.bias is not None for a in attn),
            proj_bias=all(a.proj.bias is not None for a in attn),
            ffn_bias=first.bias is not None and last.bias is not None,
            patch_size=model.patch_embed.proj.kernel_size,
            pos_patches=model.pos_embed.shape[1] - 1,
            num_register_tokens=regs,
            mask_token=mask_token,
            **_interpolation(_v2_resample(model)),
        )
        if family == "dino":
            # The v1 interpolation is the same formula (facebookresearch/dino
            # `vision_transformer.py` `interpolate_pos_encoding`): check the module agrees.
            assert facts["interpolate_offset"] == DINO_V1_COMMON["interpolate_offset"]
            assert facts["interpolate_antialias"] == DINO_V1_COMMON["interpolate_antialias"]
    if family == "dinov2" and not reg:
        assert {k: facts[k] for k in HUB_INTERPOLATION[False]} == HUB_INTERPOLATION[False]
    # The full model's parameter count, from the 2-block build: + (depth - 2) blocks, minus the
    # mask token the v2 class carries and v1 has not.
    no_mask = 0 if facts["mask_token"] else model.mask_token.numel()
    facts["num_params"] = total + (facts["depth"] - BUILD_DEPTH) * per_block - no_mask
    return facts


def mismatches(cfg: ViTConfig, facts: dict) -> list[str]:
    """The fields of `cfg` that disagree with the official facts (empty: they all agree)."""
    if facts["layerscale"][0] is None:
        assert all(g is None for g in facts["layerscale"])
        ls = None
    else:
        ls = _unique(v for g in facts["layerscale"] for v in g.detach().flatten().tolist())
    grid = math.isqrt(facts["pos_patches"])
    got = dict(
        depth=cfg.depth,
        embed_dim=cfg.embed_dim,
        num_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        layernorm_eps=cfg.layernorm_eps,
        ffn_layer=cfg.ffn_layer,
        ffn_hidden_dim=cfg.ffn_hidden_dim,
        layerscale_init=cfg.layerscale_init,
        qkv_bias=cfg.qkv_bias,
        proj_bias=cfg.proj_bias,
        ffn_bias=cfg.ffn_bias,
        patch_size=cfg.patch_size,
        pos_patches=cfg.num_pos_patches,
        img_size=cfg.img_size,
        num_register_tokens=cfg.num_register_tokens,
        mask_token=cfg.has_mask_token,
        interpolate_offset=cfg.interpolate_offset,
        interpolate_antialias=cfg.interpolate_antialias,
    )
    want = dict(
        {k: facts[k] for k in got if k in facts},
        layernorm_eps=_unique(facts["norms"]),
        layerscale_init=ls,
        patch_size=_unique(facts["patch_size"]),
        img_size=grid * _unique(facts["patch_size"]),
    )
    assert grid * grid == facts["pos_patches"]
    return [f"{k}: ours {got[k]!r}, official {want[k]!r}" for k in got if got[k] != want[k]]


@pytest.fixture(scope="module")
def facts():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = official_facts(name)
        return cache[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_config_matches_the_official_module(facts, name):
    cfg = ARCHITECTURES[name]
    f = facts(name)
    assert len(f["norms"]) == 2 * BUILD_DEPTH + 1  # every LayerNorm was read
    assert not mismatches(cfg, f), (name, mismatches(cfg, f))


@pytest.mark.parametrize("name", NAMES)
def test_official_parameter_counts_are_the_official_modules(facts, name):
    """`OFFICIAL_PARAMS` (which test_vit_build checks dinojax against) counted on the official
    modules."""
    assert facts(name)["num_params"] == OFFICIAL_PARAMS[name]


# One plausible mistake per checked field; each must be reported.
MISTAKES = [
    dict(layernorm_eps=1e-5),
    dict(num_heads=12, embed_dim=384),
    dict(depth=11),
    dict(mlp_ratio=3.0),
    dict(ffn_layer="swiglu"),
    dict(layerscale_init=1e-5),
    dict(qkv_bias=False),
    dict(proj_bias=False),
    dict(ffn_bias=False),
    dict(patch_size=16),
    dict(img_size=224),
    dict(num_register_tokens=4),
    dict(interpolate_offset=0.0),
    dict(interpolate_antialias=True),
]


@pytest.mark.parametrize("mistake", MISTAKES, ids=lambda m: ",".join(m))
def test_a_wrong_field_is_caught(facts, mistake):
    cfg = dataclasses.replace(ARCHITECTURES["dinov2_vits14"], **mistake)
    assert mismatches(cfg, facts("dinov2_vits14"))


def test_v1_mistakes_are_caught(facts):
    v1 = ARCHITECTURES["dino_vits16"]
    f = facts("dino_vits16")
    assert mismatches(dataclasses.replace(v1, family="dinov2"), f)  # would add a mask token
    assert mismatches(dataclasses.replace(v1, layernorm_eps=1e-5), f)
    assert mismatches(dataclasses.replace(v1, img_size=518), f)


def test_register_mistakes_are_caught(facts):
    reg = ARCHITECTURES["dinov2_vitg14_reg"]
    f = facts("dinov2_vitg14_reg")
    for mistake in (dict(num_register_tokens=0), dict(ffn_layer="mlp"), dict(layernorm_eps=1e-5),
                    dict(interpolate_antialias=False)):  # fmt: skip
        assert mismatches(dataclasses.replace(reg, **mistake), f), mistake


def test_interpolation_probe_tells_the_paths_apart():
    """`_interpolation` identifies each of the four F.interpolate variants it looks for."""
    for offset in (0.0, 0.1):
        for aa in (False, True):

            def resample(grid, h0, w0, offset=offset, aa=aa):
                m = grid.shape[-1]
                kw = (
                    dict(scale_factor=((h0 + offset) / m, (w0 + offset) / m))
                    if offset
                    else dict(size=(h0, w0))
                )
                return torch.nn.functional.interpolate(grid, mode="bicubic", antialias=aa, **kw)

            assert _interpolation(resample) == dict(
                interpolate_offset=offset, interpolate_antialias=aa
            )
