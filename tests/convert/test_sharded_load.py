"""`dinojax.load(path, mesh=...)` restores straight into parameters sharded over the mesh.

On the 8 simulated CPU devices (tests/conftest.py): large parameters are split 8 ways (each
device's `addressable_shards` hold 1/8), the parameters equal the single-device load bit for bit
and the features match; and the full-size ViT-7B restore target, computed abstractly
(`jax.eval_shape` level: nothing allocated), puts ~1/n of the model on each of n = 8 and 64
devices; slow: one full-width ViT-7B block really restored over the 8 devices.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

import dinojax
from dinojax.convert.checkpoint import bytes_per_device, restore_target, restore_tree, save_model
from dinojax.models.config import ViTConfig
from dinojax.models.heads import DINOHead
from dinojax.models.vit import DinoVisionTransformer
from dinojax.sharding import FSDP_RULES, make_mesh

LARGE = 2**14  # elements; every such parameter of the small model below has an embed axis


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = ViTConfig(
        family="dinov2", patch_size=14, img_size=56, embed_dim=128, depth=2, num_heads=2,
        ffn_layer="swiglu", mlp_ratio=4.0, layerscale_init=1.0, num_register_tokens=4,
    )  # fmt: skip
    model = _random(lambda: DinoVisionTransformer(cfg, rngs=nnx.Rngs(0)), seed=0)
    head = _random(
        lambda: DINOHead(128, 512, nlayers=3, hidden_dim=256, bottleneck_dim=64, rngs=nnx.Rngs(1)),
        seed=1,
    )
    path = tmp_path_factory.mktemp("sharded") / "ckpt"
    save_model(path, model, heads={"dino_head": head})
    return path


def _random(make, seed: int):
    """The module with random parameters, without running its (eager, slow on CPU) init."""
    module = nnx.eval_shape(make)
    rng = np.random.default_rng(seed)
    abstract = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    nnx.update(
        module, jax.tree.map(lambda a: rng.normal(0, 0.1, a.shape).astype(a.dtype), abstract)
    )
    return module


def _leaves(module) -> dict[str, jax.Array]:
    state = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(state)}


def test_load_shards_every_large_parameter_over_the_mesh(ckpt):
    assert jax.device_count() == 8
    model, heads = dinojax.load(ckpt, heads=True)  # default mesh: all devices, ("data", "fsdp")
    head = _leaves(heads["dino_head"])
    # The training rules leave the head's hidden -> bottleneck layer ("mlp", "bottleneck")
    # replicated; its first layer and prototypes are split like the backbone.
    leaves = {**_leaves(model), **{f"head{k}": v for k, v in head.items() if "[2]" not in k}}
    large = {k: x for k, x in leaves.items() if x.size >= LARGE}
    assert len(large) >= 8 and "head['last_layer']['weight_v']" in large
    for k, x in large.items():
        shards = x.addressable_shards
        assert len(shards) == 8, k
        assert {s.device for s in shards} == set(jax.devices()), k
        # each device holds 1/8 of the array, split along one axis
        assert all(s.data.size * 8 == x.size for s in shards), (k, shards[0].data.shape)
    # e.g. the stacked qkv kernel (layers, embed, 3 * embed): embed split over fsdp
    qkv = model.blocks.attn.qkv.kernel[...]
    assert qkv.addressable_shards[0].data.shape == (2, 128 // 8, 3 * 128)


def test_sharded_load_equals_single_device_load(ckpt):
    one = make_mesh((1, 1), devices=jax.devices()[:1])
    a = dinojax.load(ckpt, mesh=one)
    b = dinojax.load(ckpt, mesh=make_mesh((2, 4)), rules=FSDP_RULES)
    pa, pb = _leaves(a), _leaves(b)
    ref, _ = restore_tree(ckpt)  # numpy, for tools
    ref = {k: v for k, v in _flat(ref["backbone"]).items()}
    assert pa.keys() == pb.keys() == ref.keys()
    for k in pa:
        assert len(pa[k].sharding.device_set) == 1
        np.testing.assert_array_equal(np.asarray(pa[k]), np.asarray(pb[k]), err_msg=k)
        np.testing.assert_array_equal(np.asarray(pa[k]), ref[k], err_msg=k)
    x = jax.random.normal(jax.random.key(0), (8, 56, 56, 3))
    with jax.default_matmul_precision("highest"):
        fa = jax.jit(lambda m, x: m.forward_features(x))(a, x)
        fb = jax.jit(lambda m, x: m.forward_features(x))(b, x)
    # Same parameters; the sharded matmuls sum in another order. Measured max abs diffs: CLS
    # 7.5e-8 (values up to 0.6), patch tokens 5.4e-7 (0.9), pre-norm 9.1e-6 (11); atol 2x that.
    for k, atol in (("x_norm_clstoken", 1.5e-7), ("x_norm_patchtokens", 1.1e-6),
                    ("x_prenorm", 1.8e-5)):  # fmt: skip
        np.testing.assert_allclose(np.asarray(fa[k]), np.asarray(fb[k]), atol=atol, rtol=0)


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _vit7b():
    # DINOv3 ViT-7B/16: width 4096, 40 blocks, 32 heads, SwiGLU hidden 8192, no qkv bias, 4
    # storage tokens, the untied local CLS norm.
    from dinojax.models.config import get_config

    return get_config("dinov3_vit7b16")


@pytest.mark.parametrize("n", [8, 64])
def test_vit7b_restore_target_puts_1_over_n_of_the_model_on_each_device(n):
    cfg = _vit7b()
    assert cfg.ffn_hidden_dim == 8192
    meta = {"arch": cfg.to_dict(), "model": "dinov3_vit", "heads": {}, "extras": []}
    if n == jax.device_count():
        mesh = make_mesh((1, -1))
    else:  # more devices than this machine has: shardings of an abstract mesh
        mesh = AbstractMesh((1, n), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    target = restore_target("unused", meta, mesh=mesh)
    leaves = jax.tree.leaves(target)
    total = sum(a.size * np.dtype(a.dtype).itemsize for a in leaves)
    assert 6.5e9 * 4 < total < 7.0e9 * 4  # ~6.7 B float32 parameters
    # no large leaf left replicated
    for a in leaves:
        if a.size >= 2**20:
            assert np.prod(a.sharding.shard_shape(a.shape)) * n == a.size, a
    per_device = bytes_per_device(target)
    assert len(per_device) == n
    # the replicated remainder (norms, LayerScale, SwiGLU biases, tokens) is a few MB of 27 GB
    assert max(per_device.values()) <= total / n * 1.02
    assert min(per_device.values()) >= total / n


def test_fsdp_rules_are_the_training_rules():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from configs.common import base_config

    assert tuple(tuple(r) for r in base_config().mesh.rules) == FSDP_RULES


def test_load_checks_against_the_recorded_architecture(ckpt, tmp_path):
    # a checkpoint whose recorded architecture does not match what is stored: one clear error
    import json
    import shutil

    from dinojax.convert.backbone import ConversionError
    from dinojax.convert.checkpoint import META

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    meta = json.loads((bad / META).read_text())
    meta["arch"]["embed_dim"] = 256
    meta["arch"]["num_heads"] = 4
    (bad / META).write_text(json.dumps(meta))
    with pytest.raises(ConversionError, match="cannot restore the checkpoint"):
        dinojax.load(bad)


@pytest.mark.slow
def test_vit7b_width_block_loads_sharded(tmp_path):
    # One full-width ViT-7B block (width 4096, SwiGLU 8192; 0.69 GB in float32) restored over the
    # 8 devices: every large parameter 1/8 per device, values equal to the numpy restore.
    cfg = _vit7b().replace(depth=1)
    from dinojax.models.vit3 import DinoV3VisionTransformer

    model = _random(lambda: DinoV3VisionTransformer(cfg, rngs=nnx.Rngs(0)), seed=0)
    save_model(tmp_path / "ckpt", model)
    del model
    loaded = dinojax.load(tmp_path / "ckpt")
    ref = _flat(restore_tree(tmp_path / "ckpt")[0]["backbone"])
    for k, x in _leaves(loaded).items():
        if x.size >= 2**20:
            assert all(s.data.size * 8 == x.size for s in x.addressable_shards), k
        np.testing.assert_array_equal(np.asarray(x), ref[k], err_msg=k)
