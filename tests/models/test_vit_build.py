"""Backbone construction and training-time semantics: official parameter counts (no allocation),
config overrides, remat policies (same outputs and gradients) and drop path (facebookresearch/dinov2
`dinov2/models/vision_transformer.py` and `dinov2/layers/block.py`; facebookresearch/dino
`vision_transformer.py`)."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import small_config

import dinojax
from dinojax.models.config import ARCHITECTURES, REMAT_POLICIES, get_config
from dinojax.models.vit import (
    _attention,
    _drop_add_residual,
    _ffn,
    _padded_fused_attention,
    abstract_params,
    block_forward,
    dot_product_attention,
    drop_path_rates,
    layer_norm,
)

# The parameter counts of the official modules: `test_config_official.py` recounts them on the
# official constructors (v2), the v1 values of facebookresearch/dino and the HF register configs;
# reg = + 4 * D (the register tokens).
OFFICIAL_PARAMS = {
    "dinov2_vits14": 22_056_576,
    "dinov2_vitb14": 86_580_480,
    "dinov2_vitl14": 304_368_640,
    "dinov2_vitg14": 1_136_480_768,
    "dino_vits16": 21_665_664,
    "dino_vits8": 21_670_272,
    "dino_vitb16": 85_798_656,
    "dino_vitb8": 85_807_872,
}
for _s, _d in (("s", 384), ("b", 768), ("l", 1024), ("g", 1536)):
    OFFICIAL_PARAMS[f"dinov2_vit{_s}14_reg"] = OFFICIAL_PARAMS[f"dinov2_vit{_s}14"] + 4 * _d


def _count(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_official_architectures_have_the_official_parameter_counts(name):
    assert set(OFFICIAL_PARAMS) == set(ARCHITECTURES)
    params = abstract_params(get_config(name))
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(params))
    assert _count(params) == OFFICIAL_PARAMS[name]
    cfg = get_config(name)
    assert params["pos_embed"].shape == (
        1,
        (cfg.img_size // cfg.patch_size) ** 2 + 1,
        cfg.embed_dim,
    )
    assert ("mask_token" in params) == name.startswith("dinov2")
    assert ("ls1" in params["blocks"]) == name.startswith("dinov2")


def test_overrides():
    cfg = get_config("dinov2_vitb14_reg4", img_size=224, drop_path_rate=0.4, layerscale_init=1e-5)
    assert cfg.name == "dinov2_vitb14_reg" and cfg.num_register_tokens == 4
    p = abstract_params(cfg)
    assert p["pos_embed"].shape == (1, 257, 768) and p["register_tokens"].shape == (1, 4, 768)
    assert drop_path_rates(cfg) == [0.4] * 12
    assert drop_path_rates(cfg.replace(drop_path_uniform=False))[-1] == pytest.approx(0.4)
    assert "register_tokens" not in abstract_params(get_config("dinov2_vits14"))
    p8 = abstract_params(get_config("dinov2_vits14", num_register_tokens=8))
    assert p8["register_tokens"].shape == (1, 8, 384)
    assert "ls1" not in abstract_params(get_config("dinov2_vits14", layerscale_init=None))["blocks"]

    model = dinojax.create_model(small_config(depth=2), layerscale_init=1e-5, dtype="bfloat16")
    gammas = model.params()["blocks"]["ls1"]["gamma"]
    assert gammas.dtype == jnp.float32 and np.all(np.asarray(gammas) == np.float32(1e-5))
    out = jax.jit(lambda m, v: m.forward_features(v))(model, jnp.ones((1, 28, 42, 3)))
    assert out["x_norm_clstoken"].dtype == jnp.bfloat16  # compute dtype; params stay float32
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(model.params()))

    for bad, match in ((dict(ffn_layer="moe"), "ffn_layer"), (dict(remat_policy="x"), "remat"),
                       (dict(drop_path_rate=1.0), "drop_path_rate"), (dict(imgsize=1), "unknown"),
                       (dict(num_register_tokens=4, family="dino", layerscale_init=None),
                        "registers")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            get_config("dinov2_vits14", **bad)
    with pytest.raises(ValueError, match="unknown architecture"):
        dinojax.create_model("dinov2_vitx14")


@pytest.mark.parametrize("name", ["dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8"])
def test_dino_v1_uses_the_stochastic_depth_decay_rule(name):
    """DINO v1 (facebookresearch/dino `vision_transformer.py` `VisionTransformer`):
    `dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]`;
    DINOv2 hub configs keep one rate everywhere (the recipes' drop_path_uniform: true)."""
    import torch

    cfg = get_config(name, drop_path_rate=0.1)
    want = [x.item() for x in torch.linspace(0, 0.1, cfg.depth)]
    # torch's values are float32 (ulp 7.5e-9 at 0.1), ours float64: measured max |diff| 5.1e-9.
    np.testing.assert_allclose(drop_path_rates(cfg), want, rtol=0, atol=1e-8)
    assert drop_path_rates(get_config("dinov2_vits14", drop_path_rate=0.1)) == [0.1] * 12


def test_dino_v1_linspace_rates_reach_the_blocks():
    """Training a 2-block v1 model at rate 0.5: block 0 gets rate 0 (never dropped), block 1 gets
    0.5 (per-sample): every sample's output is block 1 applied to the deterministic block-0
    output with each residual branch either kept (x2) or dropped."""
    cfg = small_config(depth=2, family="dino", layerscale_init=None, drop_path_uniform=False,
                       drop_path_rate=0.5)  # fmt: skip
    model = dinojax.create_model(cfg, seed=1)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 28, 28, 3), np.float32))
    p = model.params()
    blk = [jax.tree.map(lambda a, i=i: a[i], p["blocks"]) for i in range(2)]
    eps = cfg.layernorm_eps

    @jax.jit
    def outcomes(x):
        y0 = block_forward(blk[0], model.prepare_tokens(p, x), cfg)  # rate 0: never dropped
        q = blk[1]

        def attn(y):
            return _attention(q["attn"], layer_norm(q["norm1"], y, eps), cfg, y.dtype)

        def ffn(y):
            return _ffn(q["mlp"], layer_norm(q["norm2"], y, eps), cfg, y.dtype)

        res = []
        for ka in (0.0, 2.0):
            y = y0 + ka * attn(y0)
            res += [y, y + 2.0 * ffn(y)]
        return jnp.stack(res)  # (4, B, N, D)

    with jax.default_matmul_precision("highest"):
        cands = np.asarray(outcomes(x))
        train = jax.jit(lambda m, v, k: m.forward_features(v, key=k)["x_prenorm"])
        seen = set()
        for seed in range(4):
            out = np.asarray(train(model, x, jax.random.key(seed)))
            err = np.abs(cands - out[None]).max(axis=(2, 3))  # (4 outcomes, B)
            assert np.all(err.min(axis=0) <= 1e-5), err
            seen.update(int(c) for c in err.argmin(axis=0))
    assert len(seen) > 1  # block 1 really drops (and keeps) branches


def test_remat_policies_give_identical_outputs_and_gradients():
    """Remat only decides what the backward pass recomputes: outputs, loss and gradients agree
    to float32 rounding (XLA fuses the recomputation differently; measured <= 4e-7 relative).
    Training mode with batch-subset drop path: a traced rate would switch it to per-sample and
    change every value."""
    # Batch 4 at rate 0.2: the batch-subset path (subset of 3).
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 28, 28, 3), np.float32))
    key = jax.random.key(3)

    def run(policy):
        model = dinojax.create_model(small_config(depth=2, drop_path_rate=0.2), seed=2,
                                     remat_policy=policy)  # fmt: skip
        graphdef, state = nnx.split(model, nnx.Param)

        def loss(state):
            ff = nnx.merge(graphdef, state).forward_features(x, key=key)
            value = jnp.sum(ff["x_norm_patchtokens"] ** 2) + jnp.sum(ff["x_norm_clstoken"])
            return value, ff["x_prenorm"]

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(state)

    def rel(a, b):
        return float(jnp.abs(a - b).max() / jnp.abs(b).max())

    with jax.default_matmul_precision("highest"):
        (base_loss, base_out), base_grad = run("none")
        for policy in REMAT_POLICIES[1:]:
            (loss, out), grad = run(policy)
            assert rel(out, base_out) <= 2e-6, policy
            assert rel(loss, base_loss) <= 2e-6, (policy, float(loss), float(base_loss))
            errs = jax.tree.leaves(jax.tree.map(rel, grad, base_grad))
            assert max(errs) <= 2e-6, (policy, max(errs))


def test_remat_policies_decide_what_the_scan_saves(capsys):
    """The policy really reaches `jax.checkpoint` inside the block scan: the residuals the scan
    saves for the backward pass (per layer, stacked over depth) are exactly what the policy
    names. Without remat the scan saves ~30 arrays (LayerNorm statistics, attention
    probabilities, GELU inputs, ...)."""
    depth, b, n, d, hidden = 2, 2, 5, 128, 512
    x = jnp.ones((b, 28, 28, 3))  # 4 patches + CLS = 5 tokens

    def scan_residuals(policy):
        model = dinojax.create_model(small_config(depth=depth), remat_policy=policy)
        graphdef, state = nnx.split(model, nnx.Param)

        def loss(state):
            return jnp.sum(nnx.merge(graphdef, state).forward_features(x)["x_prenorm"] ** 2)

        capsys.readouterr()
        jax.ad_checkpoint.print_saved_residuals(loss, state)
        lines = capsys.readouterr().out.splitlines()
        shapes = [re.match(r"^f32\[([\d,]*)\] output of scan", line) for line in lines]
        dims = [[int(v) for v in m.group(1).split(",")] for m in shapes if m]
        # (depth, b, n, width): "attn_out" is named on the (b, n, heads, head_dim) attention
        # output, before the reshape to (b, n, D)
        return sorted((*s[:3], math.prod(s[3:])) for s in dims)

    def per_layer(*widths):
        return sorted((depth, b, n, w) for w in widths)

    carry = d  # the block input of every layer: always saved by the scan
    assert len(scan_residuals("none")) > 20
    assert scan_residuals("full") == per_layer(carry)
    # checkpoint_name tags: "qkv" (3D), "attn_out" (D), "mlp_hidden" (hidden)
    assert scan_residuals("qkv_attn") == per_layer(carry, 3 * d, d)
    assert scan_residuals("qkv_attn_mlp") == per_layer(carry, 3 * d, d, hidden)
    # dots without batch dims: qkv, proj, fc1, fc2 (the attention einsums have batch dims)
    assert scan_residuals("dots") == per_layer(carry, 3 * d, d, hidden, d)


def test_drop_path_batch_subset_above_0_1():
    # rate 0.5, B = 8: the residual is computed for max(int(8 * 0.5), 1) = 4 random samples and
    # added scaled by 8 / 4; the other samples are untouched.
    x = jnp.zeros((8, 3, 4))
    seen = set()
    for seed in range(6):
        y = _drop_add_residual(x, lambda t: t + 1.0, 0.5, jax.random.key(seed), True)
        rows = np.asarray(y).reshape(8, -1)
        hit = np.flatnonzero(rows[:, 0])
        assert len(hit) == 4 and np.all(rows[hit] == 2.0) and np.all(np.delete(rows, hit, 0) == 0)
        seen.add(tuple(hit))
    assert len(seen) > 1  # the subset is random
    y = _drop_add_residual(x[:1], lambda t: t + 1.0, 0.9, jax.random.key(0), True)
    assert np.all(np.asarray(y) == 1.0)  # at least one sample, scale 1/1


def test_drop_path_per_sample_below_0_1():
    x = jnp.zeros((4000, 1, 2))
    y = np.asarray(_drop_add_residual(x, lambda t: t + 1.0, 0.05, jax.random.key(1), False))
    vals = np.unique(y)
    np.testing.assert_allclose(vals, [0.0, 1 / 0.95], rtol=1e-6)
    assert np.all(y[:, 0, 0] == y[:, 0, 1])  # one draw per sample
    assert abs(float((y[:, 0, 0] == 0).mean()) - 0.05) < 0.015


@pytest.mark.parametrize("family,rate,subset", [("dinov2", 0.3, True), ("dinov2", 0.1, False),
                                                ("dino", 0.3, False)])  # fmt: skip
def test_block_dispatches_the_official_drop_path(family, rate, subset):
    over = {"family": "dino", "layerscale_init": None} if family == "dino" else {}
    model = dinojax.create_model(small_config(depth=1, **over), seed=0)
    p = jax.tree.map(lambda a: a[0], model.params()["blocks"])
    cfg = model.cfg
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 5, 128), np.float32))
    key = jax.random.key(11)
    got = jax.jit(lambda p, x, k: block_forward(p, x, cfg, rate=rate, key=k))(p, x, key)
    zero = jax.jit(lambda p, x: block_forward(p, x, cfg))(p, x)  # eval

    def branch(fn, sub, norm, ls):
        def f(y):
            r = fn(p[sub], layer_norm(p[norm], y, cfg.layernorm_eps), cfg, y.dtype)
            return r * p[ls]["gamma"] if ls in p else r

        return f

    # v2: batch-subset above 0.1, per-sample otherwise (facebookresearch/dinov2
    # `dinov2/layers/block.py` `Block.forward`); v1: always per-sample (facebookresearch/dino
    # `vision_transformer.py` `drop_path`).
    @jax.jit
    def manual(x, key):
        k1, k2 = jax.random.split(key)
        y = _drop_add_residual(x, branch(_attention, "attn", "norm1", "ls1"), rate, k1, subset)
        return _drop_add_residual(y, branch(_ffn, "mlp", "norm2", "ls2"), rate, k2, subset)

    want = manual(x, key)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not np.array_equal(np.asarray(got), np.asarray(zero))


def test_eval_mode_is_identity_for_drop_path():
    cfg = small_config(depth=2)
    a = dinojax.create_model(cfg.replace(drop_path_rate=0.4), seed=5)
    b = dinojax.create_model(cfg, seed=5)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 28, 28, 3), np.float32))
    fwd = jax.jit(lambda m, v, k: m.forward_features(v, key=k))
    fa, fb = fwd(a, x, None), fwd(b, x, None)  # no key: eval
    for k in ("x_norm_clstoken", "x_prenorm"):
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]))
    train = fwd(a, x, jax.random.key(0))
    assert not np.array_equal(np.asarray(train["x_prenorm"]), np.asarray(fa["x_prenorm"]))


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("bfloat16", 4e-3)])
@pytest.mark.parametrize("n", [257, 1 + 4 + 256])
def test_padded_fused_attention_equals_plain_attention(n, dtype, tol):
    """The cuDNN path pads the token axis to a multiple of 8 and passes the true lengths
    (cuDNN's fused attention rejects odd token counts such as 257 in training). Run that same
    padding + lengths logic through `jax.nn.dot_product_attention(implementation="xla")` (no GPU
    here): it must equal plain
    attention. Measured max abs diff: <= 1.2e-7 in float32, <= 1e-3 in bfloat16. The keys are
    shifted so real logits average -2: ignoring the lengths (padded zero keys get logit 0) moves
    the output by >= 0.078, far above the tolerances."""
    rng = np.random.default_rng(n)
    q, k, v = (jnp.asarray(rng.standard_normal((2, n, 6, 64)) + off, dtype)
               for off in (0.5, -0.5, 0.0))  # fmt: skip
    scale = 64**-0.5
    with jax.default_matmul_precision("highest"):
        fused = jax.jit(lambda q, k, v: _padded_fused_attention(q, k, v, scale, "xla"))(q, k, v)
        plain = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, scale=scale))(q, k, v)
        n_pad = -(-n // 8) * 8
        pad = ((0, 0), (0, n_pad - n), (0, 0), (0, 0))
        unmasked = jax.nn.dot_product_attention(
            *(jnp.pad(t, pad) for t in (q, k, v)), scale=scale, implementation="xla"
        )[:, :n]

    def err(a, b):
        return float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max())

    assert fused.shape == plain.shape == (2, n, 6, 64) and fused.dtype == jnp.dtype(dtype)
    assert err(fused, plain) <= tol, err(fused, plain)
    if n_pad != n:  # the lengths really mask the padding
        assert err(unmasked, plain) >= 0.05, err(unmasked, plain)


def test_batch_subset_drop_path_draws_in_each_group():
    """`groups` > 1: each per-device batch gets its own subset of int(b_g (1 - rate)) rows, drawn
    with its own key and scaled by b_g / keep, exactly as one-group drop path on that batch."""
    x = jax.random.normal(jax.random.key(1), (12, 3, 4))
    key, rate, groups = jax.random.key(7), 0.4, 3

    def res(t):
        return 2.0 * t + 1.0

    got = _drop_add_residual(x, res, rate, key, True, groups)
    keys = jax.random.split(key, groups)
    want = jnp.concatenate(
        [_drop_add_residual(x[4 * g : 4 * g + 4], res, rate, keys[g], True) for g in range(groups)]
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # int(4 * 0.6) = 2 rows of each group of 4 get the residual
    changed = np.any(np.asarray(got) != np.asarray(x), axis=(1, 2)).reshape(groups, 4)
    assert (changed.sum(axis=1) == 2).all()
    with pytest.raises(ValueError, match="not divisible"):
        _drop_add_residual(x[:10], res, rate, key, True, groups)
