"""DINOv3 ConvNeXt construction and semantics (facebookresearch/dinov3 `dinov3/models/convnext.py`
`ConvNeXt`): official parameter counts (no allocation), configs, the public API on a small model
(`get_intermediate_layers` stage selection and norms, `model(x)`, input checks), scanned = looped
stages, bfloat16 compute, remat policies (same outputs and gradients), the per-sample linspace
drop path, and logical sharding on an 8-device mesh.

The models here get their weights from random official state dicts through the converter (no
per-parameter random init to compile)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dinojax.convert.convnext import convnext_from_official, expected_convnext_shapes
from dinojax.models.convnext import (
    CONVNEXT_ARCHITECTURES,
    CONVNEXT_REMAT_POLICIES,
    ConvNeXtConfig,
    DinoConvNeXt,
    _drop_path,
    abstract_convnext_params,
    block_forward,
    create_convnext,
    get_convnext_config,
    run_stage,
)
from dinojax.sharding import logical_to_mesh_sharding, make_mesh

# Counted on transformers' `DINOv3ConvNextModel` built on the meta device with the upstream
# sizes (tests/convert/test_convnext_convert.py recounts them on those models): tiny 27.8M,
# small 49.5M, base 87.6M, large 196.2M (the DINOv3 model card's 29M / 50M / 89M / 198M).
OFFICIAL_PARAMS = {
    "dinov3_convnext_tiny": 27_820_128,
    "dinov3_convnext_small": 49_454_688,
    "dinov3_convnext_base": 87_566_464,
    "dinov3_convnext_large": 196_230_336,
}
# facebookresearch/dinov3 `dinov3/models/convnext.py` `convnext_sizes`
UPSTREAM = {
    "dinov3_convnext_tiny": ([3, 3, 9, 3], [96, 192, 384, 768]),
    "dinov3_convnext_small": ([3, 3, 27, 3], [96, 192, 384, 768]),
    "dinov3_convnext_base": ([3, 3, 27, 3], [128, 256, 512, 1024]),
    "dinov3_convnext_large": ([3, 3, 27, 3], [192, 384, 768, 1536]),
}
SMALL = ConvNeXtConfig(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32))


def _count(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _model(cfg: ConvNeXtConfig = SMALL, seed: int = 0, **overrides) -> DinoConvNeXt:
    rng = np.random.default_rng(seed)
    sd = {}
    for k, s in expected_convnext_shapes(cfg).items():
        r = rng.standard_normal(s).astype(np.float32)
        if k.endswith("gamma"):
            r = 0.1 + 0.4 * np.abs(r)
        elif len(s) == 1 and k.endswith("weight"):  # LayerNorm weights
            r = 1.0 + 0.2 * r
        elif k.endswith("bias"):
            r = 0.05 * r
        else:
            r = r / np.sqrt(np.prod(s[1:]))
        sd[k] = r
    model = nnx.eval_shape(lambda: DinoConvNeXt(cfg.replace(**overrides), rngs=nnx.Rngs(0)))
    nnx.update(model, jax.tree.map(jnp.asarray, convnext_from_official(sd, cfg)))
    return model


def _x(b=2, h=96, w=64, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((b, h, w, 3), np.float32))


@pytest.mark.parametrize("name", sorted(CONVNEXT_ARCHITECTURES))
def test_official_architectures_have_the_official_parameter_counts(name):
    cfg = get_convnext_config(name)
    assert (list(cfg.depths), list(cfg.dims)) == UPSTREAM[name]
    assert (cfg.layer_scale_init, cfg.layernorm_eps, cfg.drop_path_rate) == (1e-6, 1e-6, 0.0)
    params = abstract_convnext_params(cfg)
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(params))
    assert _count(params) == OFFICIAL_PARAMS[name]
    assert cfg.embed_dim == cfg.dims[-1] and cfg.patch_size == 32 and cfg.depth == 4


def test_config_overrides_and_errors():
    cfg = get_convnext_config("dinov3_convnext_base", drop_path_rate=0.4, dtype="bfloat16")
    assert cfg.name == "dinov3_convnext_base" and cfg.dims[-1] == 1024
    rates = cfg.drop_path_rates()
    # `ConvNeXt.__init__`: dp_rates = np.linspace(0, drop_path_rate, sum(depths)), in order
    np.testing.assert_array_equal(rates, np.linspace(0, 0.4, 36))
    assert ConvNeXtConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["family"] == "dinov3_convnext"
    for bad, match in ((dict(depths=(3, 3, 9)), "4 stages"), (dict(dims=(8, 0, 8, 8)), "positive"),
                       (dict(patch_size=16), "output stride"),
                       (dict(drop_path_rate=1.0), "drop_path_rate"),
                       (dict(layer_scale_init=0.0), "layer_scale_init"),
                       (dict(remat_policy="qkv"), "remat_policy"),
                       (dict(depth=3), "unknown")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            get_convnext_config("dinov3_convnext_tiny", **bad)
    with pytest.raises(ValueError, match="unknown ConvNeXt architecture 'dinov3_convnext_huge'"):
        get_convnext_config("dinov3_convnext_huge")


def test_create_convnext_initialises_like_the_official_module():
    """`ConvNeXt.init_weights` / `_init_weights`: trunc_normal(std 0.02) Conv2d and Linear
    weights, zero biases, LayerNorms 1 / 0, gamma = layer_scale_init_value."""
    cfg = SMALL.replace(dims=(16, 32, 48, 64))
    model = create_convnext(cfg, seed=1)
    p = model.params()
    st = p["stages"][2]
    np.testing.assert_array_equal(np.asarray(st["gamma"]), np.full((2, 48), 1e-6, np.float32))
    for ln in (st["norm"], p["norm"], p["downsample_layers"][0][1], p["downsample_layers"][3][0]):
        assert np.all(np.asarray(ln["scale"]) == 1) and np.all(np.asarray(ln["bias"]) == 0)
    for conv in (st["dwconv"], st["pwconv1"], p["downsample_layers"][1][1]):
        assert np.all(np.asarray(conv["bias"]) == 0)
    w = np.asarray(st["pwconv1"]["kernel"])
    assert abs(w.std() - 0.02) < 0.002 and np.abs(w).max() < 0.1
    a, b = create_convnext(cfg, seed=0), create_convnext(cfg, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a.params()),
                                                    jax.tree.leaves(b.params())))  # fmt: skip


def test_public_api_semantics():
    """`get_intermediate_layers` (official semantics: the last n stages or the listed ones, the
    stage's global average pool as its class token, only stage 3 through the final norm) against
    `forward_features` and the stage outputs themselves."""
    model = _model()
    x = _x()

    @jax.jit
    def run(model, x):
        return (
            model.forward_features(x, masks=jnp.ones((2, 6), bool)),
            model.get_intermediate_layers(x, 4, reshape=True, return_class_token=True, norm=False),
            model.get_intermediate_layers(x, [1, 3], return_class_token=True),
            model.get_intermediate_layers(x, 2, reshape=True),
        )

    with jax.default_matmul_precision("highest"):
        ff, raw, normed, last2 = jax.tree.map(np.asarray, run(model, x))
    assert [p.shape for p, _ in raw] == [(2, 24, 16, 8), (2, 12, 8, 16), (2, 6, 4, 24),
                                         (2, 3, 2, 32)]  # fmt: skip
    for p, c in raw:
        np.testing.assert_allclose(c, p.mean(axis=(1, 2)), rtol=0, atol=1e-6)
    assert ff["x_storage_tokens"].shape == (2, 0, 32) and ff["masks"].shape == (2, 6)
    np.testing.assert_array_equal(ff["x_prenorm"], raw[3][0].reshape(2, 6, 32))
    # n = [1, 3]: stage 1 raw, stage 3 normalised exactly like forward_features
    (p1, c1), (p3, c3) = normed
    np.testing.assert_array_equal(p1, raw[1][0].reshape(2, 96, 16))
    np.testing.assert_array_equal(c1, raw[1][1])
    np.testing.assert_allclose(p3, ff["x_norm_patchtokens"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(c3, ff["x_norm_clstoken"], rtol=0, atol=1e-6)
    assert not np.allclose(p3, raw[3][0].reshape(2, 6, 32), atol=1e-2)
    # int n = the last n stages, reshaped to (B, h, w, C)
    np.testing.assert_array_equal(last2[0], raw[2][0])
    np.testing.assert_allclose(last2[1], ff["x_norm_patchtokens"].reshape(2, 3, 2, 32), atol=1e-6)

    for bad, match in ((5, "out of range"), ([4], "out of range"), ([], "out of range"),
                       ([1, 1], "duplicates")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            model.get_intermediate_layers(x, bad)
    with pytest.raises(ValueError, match="NHWC"):
        model.forward_features(jnp.zeros((1, 3, 64, 64)))
    with pytest.raises(ValueError, match="smaller than the output stride"):
        model(jnp.zeros((1, 31, 64, 3)))


def test_scanned_and_looped_stages_agree():
    model = _model()
    x = _x(h=70, w=100)  # floors: 17x25 -> 8x12 -> 4x6 -> 2x3 tokens
    fwd = jax.jit(lambda m, x: m.forward_features(x))
    with jax.default_matmul_precision("highest"):
        ref = fwd(model, x)
        loop = fwd(_model(scan_layers=False), x)
    assert ref["x_norm_patchtokens"].shape == (2, 6, 32)
    for k in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
        np.testing.assert_allclose(np.asarray(loop[k]), np.asarray(ref[k]), rtol=0, atol=2e-6)


def test_remat_policies_give_identical_outputs_and_gradients():
    """Remat only decides what the backward pass recomputes: a stage in training mode (drop
    path on) gives the same loss and parameter gradients under every policy (float32 rounding
    of a different fusion; measured <= 1e-7 relative). The policies act in `run_stage`, where
    every stage goes through."""
    rates = [0.2, 0.3]
    x = _x(b=4, h=6, w=4).repeat(8, axis=-1)  # a stage-2 input: (4, 6, 4, 24)
    key = jax.random.key(3)
    params = _model().params()["stages"][2]

    def run(policy):
        cfg = SMALL.replace(remat_policy=policy)

        def loss(p):
            return jnp.sum(run_stage(p, x, cfg, rates, key=key) ** 2)

        return jax.jit(jax.value_and_grad(loss))(params)

    def rel(a, b):
        return float(jnp.abs(a - b).max() / jnp.abs(b).max())

    with jax.default_matmul_precision("highest"):
        base_loss, base_grad = run("none")
        for policy in CONVNEXT_REMAT_POLICIES[1:]:
            loss, grad = run(policy)
            assert rel(loss, base_loss) <= 2e-6, policy
            assert max(jax.tree.leaves(jax.tree.map(rel, grad, base_grad))) <= 2e-6, policy


def test_drop_path_is_per_sample_with_the_stage_rates():
    """`dinov3/models/convnext.py` `drop_path`: each sample's branch is dropped with probability
    `rate` or kept and divided by 1 - rate. A scanned stage takes its slice of the linspace rates
    as traced values: stage 2 of SMALL at drop_path_rate 0.8 has blocks at 0.4 and 0.6, and each
    sample's output is one of the four drop / keep combinations."""
    cfg = SMALL.replace(drop_path_rate=0.8)
    assert cfg.drop_path_rates()[2:4] == pytest.approx([0.4, 0.6])
    model = _model(drop_path_rate=0.8)
    p = model.params()["stages"][2]
    x = _x(b=8, h=6, w=4).repeat(8, axis=-1)  # a stage-2 input: (8, 6, 4, 24)
    blocks = [jax.tree.map(lambda a, i=i: a[i], p) for i in range(2)]

    @jax.jit
    def outcomes(x):
        res = []
        for k0 in (0.0, 1 / 0.6):
            y = x + k0 * (block_forward(blocks[0], x, cfg) - x)
            for k1 in (0.0, 1 / 0.4):
                res.append(y + k1 * (block_forward(blocks[1], y, cfg) - y))
        return jnp.stack(res)

    train = jax.jit(lambda p, x, k: run_stage(p, x, cfg, [0.4, 0.6], key=k))
    with jax.default_matmul_precision("highest"):
        cands = np.asarray(outcomes(x))
        seen = set()
        for seed in range(3):
            out = np.asarray(train(p, x, jax.random.key(seed)))
            err = np.abs(cands - out[None]).max(axis=(2, 3, 4))  # (4 outcomes, B)
            assert np.all(err.min(axis=0) <= 1e-5), err.min(axis=0)
            seen.update(int(i) for i in err.argmin(axis=0))
        assert len(seen) > 2
    # the law: P(drop) = rate, kept samples scaled by 1 / (1 - rate), one draw per sample
    y = np.asarray(jax.jit(_drop_path)(jnp.ones((4000, 2, 2, 3)), jnp.float32(0.4),
                                       jax.random.key(0)))  # fmt: skip
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.6], rtol=1e-6)
    assert np.all(y == y[:, :1, :1, :1])
    assert abs(float((y[:, 0, 0, 0] == 0).mean()) - 0.4) < 0.03
    # eval (no key) ignores the rate
    a = jax.jit(lambda m, x: m(x))(model, _x())
    b = jax.jit(lambda m, x: m(x))(_model(), _x())
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_logical_sharding_on_a_mesh():
    """Every parameter carries logical names; with the FSDP rules the wide weights shard over
    `fsdp`, and `model(x)` with sharded parameters and a sharded batch equals the single-device
    `forward_features(x)["x_norm_clstoken"]`."""
    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", None), ("norm", None),
             ("layers", None))  # fmt: skip
    mesh = make_mesh((2, 4))
    abstract = nnx.eval_shape(lambda: DinoConvNeXt(get_convnext_config("dinov3_convnext_tiny"),
                                                   rngs=nnx.Rngs(0)))  # fmt: skip
    sh = logical_to_mesh_sharding(abstract, mesh, rules)
    st = sh["stages"][3]
    assert st["pwconv1"]["kernel"].spec == P(None, "fsdp")  # (layers, embed, mlp)
    assert st["pwconv2"]["kernel"].spec == P(None, None, "fsdp")  # (layers, mlp, embed)
    assert st["dwconv"]["kernel"].spec == P(None, None, None, None, "fsdp")
    assert sh["downsample_layers"][2][1]["kernel"].spec == P(None, None, None, "fsdp")
    assert sh["norm"]["scale"].spec == P()

    model = _model()
    x = _x(b=8)
    with jax.default_matmul_precision("highest"):
        ref = np.asarray(jax.jit(lambda m, x: m.forward_features(x)["x_norm_clstoken"])(model, x))
        shardings = logical_to_mesh_sharding(model, mesh, rules)
        nnx.update(model, jax.device_put(model.params(), shardings))
        assert model.params()["stages"][2]["pwconv1"]["kernel"].sharding.spec == P(None, "fsdp")
        xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, P(("data", "fsdp"))))
        out = jax.jit(lambda m, x: m(x))(model, xs)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=2e-6)
