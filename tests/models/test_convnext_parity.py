"""Parity of the DINOv3 ConvNeXt backbones with Hugging Face `DINOv3ConvNextModel`.

The reference is transformers' `DINOv3ConvNextModel` (`models/dinov3_convnext/
modeling_dinov3_convnext.py`), built from the upstream sizes written out here (`UPSTREAM_SIZES`,
facebookresearch/dinov3 `dinov3/models/convnext.py` `convnext_sizes`, layer scale 1e-6 and
LayerNorm eps 1e-6 as in `dinov3/hub/backbones.py` `dinov3_convnext_*`), never from dinojax's
config. Every parameter is randomised (LayerNorm weights and biases, layer scales far from their
init), then the weights go HF -> official -> dinojax through `dinojax.convert.convnext`, and the
architecture is detected from the tensors. Float32 under "highest" matmul precision, NHWC inputs
against the reference's NCHW.

Compared (max |JAX - torch| per output, `TOL`): the normalised CLS (HF `pooler_output`), the
normalised patch tokens (HF `last_hidden_state[:, 1:]`), `x_prenorm` (the last stage, flattened),
the raw output of every stage (HF `hidden_states[1:]`) with its global average pool
(`get_intermediate_layers(4, norm=False, reshape=True, return_class_token=True)`), and the
normalised `get_intermediate_layers(2, return_class_token=True)` (stage 2 raw, stage 3 through
the final norm, as the official `norms`). bfloat16 compute (float32 parameters) must keep a
cosine similarity >= 0.999 with the float32 reference for every token.

CI time (2 cores): tiny runs in the default suite at 224 x 224 and 208 x 416 (odd: 13 x 26
tokens at stride 16 and 6 x 13 at stride 32, so the last downsampling drops a row), with the
LayerNorm-eps and bfloat16 checks; tiny at 512 x 768 and small, base and large (full width and
depth) at 224 x 224 and 208 x 416 run under `-m slow`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dinojax.convert.convnext import (
    convnext_from_hf,
    convnext_from_official,
    detect_convnext_config,
)
from dinojax.models.convnext import DinoConvNeXt

# facebookresearch/dinov3 `dinov3/models/convnext.py` `convnext_sizes`.
UPSTREAM_SIZES = {
    "tiny": dict(depths=[3, 3, 9, 3], dims=[96, 192, 384, 768]),
    "small": dict(depths=[3, 3, 27, 3], dims=[96, 192, 384, 768]),
    "base": dict(depths=[3, 3, 27, 3], dims=[128, 256, 512, 1024]),
    "large": dict(depths=[3, 3, 27, 3], dims=[192, 384, 768, 1536]),
}

# Max |JAX - torch| per output. In the comments: the largest over 18 cases (tiny at the three
# default sizes, small / base / large at 224 x 224 and 208 x 416, seeds 0 and 1;
# bench/results/parity_convnext.jsonl: torch 2.14.1, jax 0.10.2, transformers 5.24, CPU,
# 2026-12-01); each tolerance is about twice that. Then the smallest change a LayerNorm eps of
# 1e-5 instead of 1e-6 makes to that output over the same cases (`test_tolerances_catch_a_
# layernorm_eps_mistake` checks the four outputs it moves by more than 1.5x the tolerance).
TOL = {
    "x_norm_clstoken": 5.5e-6,  # measured 2.7e-6; eps mistake >= 7.5e-5 (13x)
    "x_norm_patchtokens": 2.8e-5,  # measured 1.4e-5; eps mistake >= 3.0e-5 (1.06x)
    "x_prenorm": 2.5e-5,  # measured 1.2e-5; eps mistake >= 2.7e-5 (1.1x)
    "stages": 2.5e-5,  # raw stage outputs (|x| <= 8): measured 1.2e-5; eps >= 4.6e-5 (1.8x)
    "stage_cls": 2e-6,  # their average pools: measured 9.8e-7; eps mistake >= 7.2e-6 (3.6x)
    "intermediate": 2.8e-5,  # normed n=2 outputs: measured 1.4e-5; eps >= 7.5e-5 (2.7x)
}
# bfloat16 compute: smallest per-token cosine measured 0.99988 (large), 0.99992 (tiny).
BF16_COSINE = 0.999
DEFAULT_SIZES = [(224, 224), (208, 416)]
SLOW_SIZES = [(224, 224), (208, 416)]


def hf_reference(size: str, seed: int = 0):
    """`DINOv3ConvNextModel` of an upstream size with random weights (eval mode)."""
    from transformers import DINOv3ConvNextConfig, DINOv3ConvNextModel

    s = UPSTREAM_SIZES[size]
    cfg = DINOv3ConvNextConfig(hidden_sizes=s["dims"], depths=s["depths"], layer_norm_eps=1e-6,
                               layer_scale_init_value=1e-6, hidden_act="gelu")  # fmt: skip
    torch.manual_seed(seed)
    model = DINOv3ConvNextModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):  # layer scale: far from its 1e-6 init
                p.copy_(0.1 + 0.4 * torch.rand(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * r)
            elif p.ndim == 1:  # every 1-D weight is a LayerNorm's
                p.copy_(1.0 + 0.2 * r)
            else:
                p.copy_(r / np.sqrt(np.prod(p.shape[1:])))
    return model


def build(size: str, seed: int = 0):
    """(HF reference, dinojax model) with the same weights, through the converter."""
    ref = hf_reference(size, seed)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    official = convnext_from_hf(sd)
    cfg = detect_convnext_config(official)
    assert cfg.name == f"dinov3_convnext_{size}"
    model = nnx.eval_shape(lambda: DinoConvNeXt(cfg, rngs=nnx.Rngs(0)))
    nnx.update(model, jax.tree.map(jnp.asarray, convnext_from_official(official, cfg)))
    return ref, model


def with_cfg(model: DinoConvNeXt, **overrides) -> DinoConvNeXt:
    """The same weights under another config (a numerics change or a deliberate mistake)."""
    other = nnx.eval_shape(lambda: DinoConvNeXt(model.cfg.replace(**overrides), rngs=nnx.Rngs(0)))
    nnx.update(other, model.params())
    return other


def images(size: tuple[int, int], seed: int = 0, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, *size), dtype=np.float32)


def torch_outputs(ref, x: np.ndarray) -> dict:
    with torch.no_grad():
        o = ref(torch.from_numpy(x), output_hidden_states=True)
    stages = [h for h in o.hidden_states[1:]]  # [0] is the input image
    last = stages[-1]
    return {
        "x_norm_clstoken": o.pooler_output.numpy(),
        "x_norm_patchtokens": o.last_hidden_state[:, 1:].numpy(),
        "x_prenorm": last.flatten(2).transpose(1, 2).numpy(),
        "stages": [h.permute(0, 2, 3, 1).numpy() for h in stages],
        # the official "class token" of an intermediate stage: `x.mean([-2, -1])`
        "stage_cls": [h.mean([-2, -1]).numpy() for h in stages],
        "intermediate": [
            (stages[2].flatten(2).transpose(1, 2).numpy(), stages[2].mean([-2, -1]).numpy()),
            (o.last_hidden_state[:, 1:].numpy(), o.pooler_output.numpy()),
        ],
    }


@jax.jit
def _outputs(model, x):
    ff = model.forward_features(x)
    raw = model.get_intermediate_layers(x, 4, reshape=True, return_class_token=True, norm=False)
    return {
        "x_norm_clstoken": ff["x_norm_clstoken"],
        "x_norm_patchtokens": ff["x_norm_patchtokens"],
        "x_prenorm": ff["x_prenorm"],
        "x_storage_tokens": ff["x_storage_tokens"],
        "stages": [p for p, _ in raw],
        "stage_cls": [c for _, c in raw],
        "intermediate": model.get_intermediate_layers(x, 2, return_class_token=True),
    }


def jax_outputs(model, x, precision: str = "highest") -> dict:
    with jax.default_matmul_precision(precision):
        return jax.tree.map(np.asarray, _outputs(model, x))


def _pairs(j, t, key):
    return list(zip(jax.tree.leaves(j[key]), jax.tree.leaves(t[key])))


def max_diffs(j: dict, t: dict) -> dict[str, float]:
    out = {}
    for key in TOL:
        pairs = _pairs(j, t, key)
        for a, b in pairs:
            assert a.shape == b.shape, (key, a.shape, b.shape)
        out[key] = max(float(np.abs(a.astype(np.float32) - b).max()) for a, b in pairs)
    return out


def min_cosines(j: dict, t: dict) -> dict[str, float]:
    """Smallest per-token cosine similarity of each output (tokens along the last axis)."""
    out = {}
    for key in TOL:
        cos = []
        for a, b in _pairs(j, t, key):
            a = a.astype(np.float64).reshape(-1, a.shape[-1])
            b = b.astype(np.float64).reshape(-1, b.shape[-1])
            cos.append(np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1))
        out[key] = float(np.min(np.concatenate(cos)))
    return out


def _nhwc(x: np.ndarray) -> jax.Array:
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def _check(model, ref, size, seed):
    x = images(size, seed)
    t = torch_outputs(ref, x)
    j = jax_outputs(model, _nhwc(x))
    assert j["x_storage_tokens"].shape == (2, 0, model.cfg.embed_dim)
    h, w = size[0] // 32, size[1] // 32
    assert j["x_norm_patchtokens"].shape == (2, h * w, model.cfg.embed_dim)
    diffs = max_diffs(j, t)
    bad = {k: v for k, v in diffs.items() if v > TOL[k]}
    assert not bad, f"over tolerance: {bad} (all: {diffs})"


@pytest.fixture(scope="module")
def tiny():
    return build("tiny", seed=0)


@pytest.mark.parametrize(
    "size",
    [*DEFAULT_SIZES, pytest.param((512, 768), marks=pytest.mark.slow)],
    ids=lambda s: f"{s[0]}x{s[1]}",
)
def test_tiny_matches_transformers(tiny, size):
    ref, model = tiny
    _check(model, ref, size, seed=size[1])


def test_tolerances_catch_a_layernorm_eps_mistake(tiny):
    """The same weights with LayerNorm eps 1e-5 (the ViTs' value) instead of 1e-6 fail the
    tolerances: the test can see a one-constant mistake."""
    ref, model = tiny
    x = images((224, 224), seed=7)
    diffs = max_diffs(jax_outputs(with_cfg(model, layernorm_eps=1e-5), _nhwc(x)),
                      torch_outputs(ref, x))  # fmt: skip
    for key in ("x_norm_clstoken", "stages", "stage_cls", "intermediate"):
        assert diffs[key] > 1.5 * TOL[key], (key, diffs[key])


def test_bfloat16_compute_keeps_the_cosine(tiny):
    ref, model = tiny
    x = images((224, 224), seed=8)
    j = jax_outputs(with_cfg(model, dtype="bfloat16"), _nhwc(x), precision="default")
    assert j["x_norm_clstoken"].dtype == jnp.bfloat16
    cos = min_cosines(j, torch_outputs(ref, x))
    assert min(cos.values()) >= BF16_COSINE, cos


@pytest.mark.slow
@pytest.mark.parametrize("size", SLOW_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("arch", ["small", "base", "large"])
def test_full_size_models_match_transformers(arch, size):
    """Full width and depth (27 blocks in stage 2), float32; bfloat16 at 224 x 224."""
    ref, model = build(arch, seed=1)
    _check(model, ref, size, seed=size[1])
    if size == (224, 224):
        x = images(size, seed=8)
        j = jax_outputs(with_cfg(model, dtype="bfloat16"), _nhwc(x), precision="default")
        cos = min_cosines(j, torch_outputs(ref, x))
        assert min(cos.values()) >= BF16_COSINE, cos
