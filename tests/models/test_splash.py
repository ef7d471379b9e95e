"""The Pallas splash attention kernel (`attention="splash"`, TPU) against the `xla` einsum path,
run on the CPU in Pallas' interpret mode, and what `attention="auto"` picks per device.

The token counts are the recipes' own: 257 (224 px / 14, CLS), 261 (+ 4 registers), 1370 (518 px)
and 50 (98 px local crops); none is a multiple of the kernel's 128-token block, so every case
exercises the padding and its mask.
"""

from __future__ import annotations

import importlib.util
import os
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P
from reference import small_config

from dinojax.models import attention as attn
from dinojax.models.vit import DinoVisionTransformer, dot_product_attention
from dinojax.sharding import make_mesh

SCALE = 64**-0.5
RULES = (("batch", ("data", "fsdp")),)
# Measured max abs diff splash (interpret) vs xla, float32, HIGHEST, inputs ~ N(0, 1): forward
# 4.9e-7 (257), 4.2e-7 (261), 4.5e-7 (1370), 4.8e-7 (50), 8.3e-7 sharded; gradients 8.3e-7,
# 5.4e-7, 6.6e-7, 4.8e-7, 7.7e-7 sharded; the small ViT's output 1.24e-6 (magnitude 3.8).
# Tolerances are about twice the largest.
TOL_FWD = TOL_GRAD = 2e-6
TOL_MODEL = 2.5e-6


def _qkvc(b: int, n: int, h: int = 2, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 4)
    return tuple(jax.random.normal(k, (b, n, h, 64), jnp.float32) for k in ks)


def _fwd_and_grad(impl: str, q, k, v, ct):
    def loss(q, k, v):
        o = dot_product_attention(q, k, v, scale=SCALE, implementation=impl)
        return jnp.sum(o * ct), o

    (_, o), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return o, g


def _max_diffs(a, b) -> tuple[float, float]:
    (oa, ga), (ob, gb) = a, b
    fwd = float(jnp.max(jnp.abs(oa - ob)))
    grad = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(ga, gb))
    return fwd, grad


@pytest.mark.parametrize("n", [257, 261, 1370, 50])
def test_splash_forward_and_gradient_equal_xla(n):
    q, k, v, ct = _qkvc(2, n)
    with jax.default_matmul_precision("highest"):
        fn = jax.jit(partial(dot_product_attention, scale=SCALE, implementation="splash"))
        assert "pallas_call" in str(jax.make_jaxpr(fn)(q, k, v))  # the kernel, not a fallback
        fwd, grad = _max_diffs(
            _fwd_and_grad("splash", q, k, v, ct), _fwd_and_grad("xla", q, k, v, ct)
        )
    assert fwd < TOL_FWD and grad < TOL_GRAD, (n, fwd, grad)


@pytest.mark.parametrize(("b", "spec"), [(8, P(("data", "fsdp"))), (6, P("data"))])
def test_splash_sharded_with_shard_map_equals_xla(b, spec):
    """On the 8 CPU devices (mesh data 2 x fsdp 4, batch rule over both), each device runs the
    kernel on its own examples; a batch of 6 does not split 8 ways and runs over `data` only."""
    mesh = make_mesh((2, 4), ("data", "fsdp"))
    q, k, v, ct = _qkvc(b, 261, seed=1)
    with jax.default_matmul_precision("highest"), jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        q, k, v, ct = (jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v, ct))
        fn = lambda q, k, v: dot_product_attention(q, k, v, scale=SCALE, implementation="splash")  # noqa: E731
        jaxpr = str(jax.make_jaxpr(fn)(q, k, v))
        assert "shard_map" in jaxpr and "pallas_call" in jaxpr
        splash = _fwd_and_grad("splash", q, k, v, ct)
        fwd, grad = _max_diffs(splash, _fwd_and_grad("xla", q, k, v, ct))
    assert fwd < TOL_FWD and grad < TOL_GRAD, (fwd, grad)
    assert splash[1][0].sharding.spec == spec  # gradients stay batch-sharded


def _small_vit(attention: str) -> DinoVisionTransformer:
    """Small ViT (2 blocks, 2 heads of 64, 4 registers; 42 px images: 9 patches + 5 tokens)
    with N(0, 0.1) weights (LayerNorm scales 1 + N(0, 0.1)): attention logits of order 1, not
    the near-uniform attention of the 0.02 init. Filled from numpy: no eager init to wait for."""
    from flax import nnx

    cfg = small_config(depth=2, num_register_tokens=4, attention=attention)
    model = nnx.eval_shape(lambda: DinoVisionTransformer(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)

    def fill(path, a):
        w = 0.1 * rng.standard_normal(a.shape).astype(np.float32)
        return jnp.asarray(w + 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else w)

    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    nnx.update(model, jax.tree_util.tree_map_with_path(fill, state))
    return model


def _forward(attention: str):
    model = _small_vit(attention)
    return lambda x: model(x)


def test_whole_model_with_splash_equals_xla():
    x = jax.random.normal(jax.random.key(2), (2, 42, 42, 3))
    with jax.default_matmul_precision("highest"):
        out = {a: jax.jit(_forward(a))(x) for a in ("splash", "xla")}
    diff = float(jnp.max(jnp.abs(out["splash"] - out["xla"])))
    assert diff < TOL_MODEL, diff


def test_auto_on_cpu_is_xla_bit_for_bit():
    """On CPU devices `auto` traces the very program `xla` does (same jaxpr, so same bits), with
    and without a mesh of CPU devices."""
    assert attn.resolve("auto") == "xla"
    with jax.set_mesh(make_mesh((2, 4), ("data", "fsdp"))):
        assert attn.device_platform() == "cpu" and attn.resolve("auto", jnp.bfloat16) == "xla"
    x = jax.ShapeDtypeStruct((2, 42, 42, 3), jnp.float32)
    auto, xla = (str(jax.make_jaxpr(_forward(a))(x)) for a in ("auto", "xla"))
    assert auto == xla


@pytest.mark.parametrize(
    ("platform", "dtype", "expected"),
    [
        ("tpu", jnp.float32, "splash"),
        ("tpu", jnp.bfloat16, "splash"),
        ("gpu", jnp.bfloat16, "cudnn"),
        ("gpu", jnp.float32, "xla"),  # cuDNN's fused attention takes 16-bit inputs only
        ("cpu", jnp.bfloat16, "xla"),
    ],
)
def test_auto_reads_the_mesh_devices(platform, dtype, expected):
    """Decided by the devices of the mesh in use, not the host: a TPU mesh on this CPU host (as
    a deviceless compile has) picks the TPU kernel."""
    device = AbstractDevice(device_kind=f"{platform} test", num_cores=None, platform=platform)
    mesh = AbstractMesh((4,), ("fsdp",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        assert attn.resolve("auto", dtype) == expected
    for explicit in ("xla", "cudnn", "splash"):
        assert attn.resolve(explicit, dtype) == explicit


def test_auto_on_several_tpus_without_a_mesh_is_xla(monkeypatch):
    """A plain jit over several TPUs (no `jax.set_mesh`) cannot run the kernel: XLA refuses to
    partition a Mosaic call. `auto` keeps the einsum path there, and takes splash under a mesh."""
    monkeypatch.setattr(attn, "device_platform", lambda: "tpu")
    assert jax.device_count() == 8 and attn.resolve("auto") == "xla"
    with jax.set_mesh(make_mesh((2, 4), ("data", "fsdp"))):
        assert attn.resolve("auto") == "splash"


def test_unknown_attention_is_one_line():
    with pytest.raises(ValueError, match=r"attention must be one of .*'splash', 'auto'.*'flash'"):
        small_config(attention="flash")


def test_splash_compiles_for_a_tpu_slice():
    """One block's gradient with `auto` attention compiled deviceless by the TPU compiler for a
    v5p-8 (4 chips; libtpu, the `test` extra): the three splash kernels (forward, dq, dkv) are
    in the program, one per chip's local batch."""
    if importlib.util.find_spec("libtpu") is None:
        msg = "libtpu is not installed: the TPU compiler cannot run (pip install the `test` extra)"
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true: {msg}", pytrace=False)
        pytest.skip(msg)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from flax import nnx
    from jax.experimental import topologies

    from dinojax.models.vit import block_forward

    topo = topologies.get_topology_desc(
        platform="tpu", topology_name="v5:2x2x1", chip_config_name="megacore",
        chips_per_host_bounds=(2, 2, 1), num_slices=1,
    )  # fmt: skip
    mesh = make_mesh((1, -1), ("data", "fsdp"), list(topo.devices))
    cfg = small_config(depth=1, attention="auto", dtype="bfloat16")
    abstract = nnx.eval_shape(lambda: DinoVisionTransformer(cfg, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    block = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), params["blocks"])

    def loss(p, x):
        return jnp.sum(block_forward(p, x, cfg).astype(jnp.float32))

    x = jax.ShapeDtypeStruct((8, 257, 128), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp")))
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        hlo = jax.jit(jax.grad(loss)).lower(block, x).compile().as_text()
    assert hlo.count('custom_call_target="tpu_custom_call"') == 3
