"""Remat policies with the splash kernel: the policies that save the attention output
(`qkv_attn`, `qkv_attn_mlp`) keep what the kernel's backward reads (its output and logsumexp,
named "attn_out" through `residual_checkpoint_name`), so the backward runs the dq / dkv kernels
without rerunning the forward kernel; `full` still recomputes it. Counted in the jaxpr of
`jax.grad` after dead-code elimination (a recomputation whose results the backward does not read
is dropped there, as XLA drops it), on the CPU in Pallas' interpret mode.
"""

from __future__ import annotations

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jex_core
from jax.interpreters import partial_eval as pe
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from reference import small_config

from dinojax.models.config import get_config
from dinojax.models.vit import DinoVisionTransformer, run_blocks
from dinojax.models.vit3 import DinoV3VisionTransformer
from dinojax.sharding import make_mesh

RULES = (("batch", ("data", "fsdp")),)
# Forward kernels in one scanned block's gradient: the forward pass, plus the recomputation in
# the backward under the policies that do not keep the kernel's residuals. `dots` saves matmul
# outputs without batch dimensions only; the attention (kernel, or the `xla` path's batched
# einsums) is recomputed there, as before.
FORWARD_KERNELS = {"none": 1, "full": 2, "dots": 2, "qkv_attn": 1, "qkv_attn_mlp": 1}
# Measured, float32, HIGHEST, the small ViT below, every policy alike: splash (interpret) vs
# xla, output 1.19e-6 (as tests/models/test_splash.py's whole-model case), parameter gradients
# 2.1e-5 at a largest gradient of 42.8 (LayerScale gammas, summed over batch and tokens): 4.9e-7
# of it; the same with no remat, and splash under each policy equals splash without remat bit
# for bit. Tolerances about twice the measurement.
TOL_OUT = 2.5e-6
TOL_GRAD_REL = 1e-6


def _pallas_kernels(jaxpr, found: list[str]) -> list[str]:
    """Names of the Pallas kernels in a jaxpr, nested jaxprs (scan, remat, shard_map, jit)
    included; one entry per call site (a scanned body counts once)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(str(eqn.params["name"]))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jex_core.ClosedJaxpr):
                    _pallas_kernels(sub.jaxpr, found)
                elif isinstance(sub, jex_core.Jaxpr):
                    _pallas_kernels(sub, found)
    return found


def _grad_kernels(model, x) -> list[str]:
    """Kernels live in the jaxpr of the parameter gradient of sum(model(x))."""
    graph, params = nnx.split(model, nnx.Param)

    def loss(params, x):
        return jnp.sum(nnx.merge(graph, params)(x))

    closed = jax.make_jaxpr(jax.grad(loss))(params, x)
    live, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    return _pallas_kernels(live, [])


def _check_counts(kernels: list[str], policy: str) -> None:
    forward = [k for k in kernels if "_fwd" in k]
    assert len(forward) == FORWARD_KERNELS[policy], (policy, kernels)
    assert sum("_dq" in k for k in kernels) == sum("_dkv" in k for k in kernels) == 1, kernels


@pytest.mark.parametrize("policy", list(FORWARD_KERNELS))
def test_policy_keeps_splash_residuals(policy):
    cfg = small_config(depth=2, num_register_tokens=4, attention="splash", remat_policy=policy)
    model = nnx.eval_shape(lambda: DinoVisionTransformer(cfg, rngs=nnx.Rngs(0)))
    _check_counts(_grad_kernels(model, jax.ShapeDtypeStruct((2, 42, 42, 3), jnp.float32)), policy)


@pytest.mark.parametrize("policy", ["full", "qkv_attn"])
def test_policy_keeps_splash_residuals_under_shard_map(policy):
    """As the training step runs it: a mesh in context, the kernel inside `jax.shard_map` over
    the batch axes (8 CPU devices, data 2 x fsdp 4)."""
    cfg = small_config(depth=2, attention="splash", remat_policy=policy)
    model = nnx.eval_shape(lambda: DinoVisionTransformer(cfg, rngs=nnx.Rngs(0)))
    mesh = make_mesh((2, 4), ("data", "fsdp"))
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    x = jax.ShapeDtypeStruct((8, 42, 42, 3), jnp.float32, sharding=batch)
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        kernels = _grad_kernels(model, x)
    _check_counts(kernels, policy)


@pytest.mark.parametrize("policy", ["full", "qkv_attn_mlp"])
def test_policy_keeps_splash_residuals_dinov3(policy):
    """The DINOv3 ViT (RoPE on q and k before the kernel) names the same residuals."""
    cfg = get_config("dinov3_vits16", embed_dim=128, num_heads=2, depth=2)
    cfg = cfg.replace(attention="splash", remat_policy=policy)
    model = nnx.eval_shape(lambda: DinoV3VisionTransformer(cfg, rngs=nnx.Rngs(0)))
    _check_counts(_grad_kernels(model, jax.ShapeDtypeStruct((2, 32, 48, 3), jnp.float32)), policy)


def _filled_vit(attention: str, policy: str) -> DinoVisionTransformer:
    """Small ViT (2 blocks, 2 heads of 64, 4 registers; 42 px: 9 patches + 5 tokens) with
    N(0, 0.1) weights (LayerNorm scales 1 + N(0, 0.1)): attention logits of order 1. The same
    numbers for every (attention, policy)."""
    cfg = small_config(depth=2, num_register_tokens=4, attention=attention, remat_policy=policy)
    model = nnx.eval_shape(lambda: DinoVisionTransformer(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)

    def fill(path, a):
        w = 0.1 * rng.standard_normal(a.shape).astype(np.float32)
        return jnp.asarray(w + 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else w)

    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    nnx.update(model, jax.tree_util.tree_map_with_path(fill, state))
    return model


def test_saved_residuals_give_the_xla_values():
    """Forward and parameter gradients through the kept kernel residuals (`qkv_attn`) equal the
    `xla` path's under the same policy. (`qkv_attn_mlp` keeps the same attention residuals; each
    interpret-mode gradient compiles for seconds, so one policy is run.)"""
    x = jax.random.normal(jax.random.key(3), (2, 42, 42, 3))
    ct = jax.random.normal(jax.random.key(4), (2, 128))

    def run(attention):
        graph, params = nnx.split(_filled_vit(attention, "qkv_attn"), nnx.Param)

        def loss(params):
            out = nnx.merge(graph, params)(x)
            return jnp.sum(out * ct), out

        grads, out = jax.jit(jax.grad(loss, has_aux=True))(params)
        return out, jax.tree.leaves(grads)

    with jax.default_matmul_precision("highest"):
        (out_s, grad_s), (out_x, grad_x) = run("splash"), run("xla")
    out_diff = float(jnp.max(jnp.abs(out_s - out_x)))
    grad_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(grad_s, grad_x))
    scale = max(float(jnp.max(jnp.abs(g))) for g in grad_x)
    assert out_diff < TOL_OUT and grad_diff < TOL_GRAD_REL * scale, (out_diff, grad_diff, scale)


def test_tpu_program_runs_the_forward_kernel_once():
    """The TPU compiler's program (deviceless, v5p-8; libtpu, the `test` extra) for the gradient
    of two scanned bf16 blocks under `qkv_attn`: three splash kernels, forward, dq and dkv, none
    recomputed. Measured: 3 here; 4 under `full`, and 4 under `qkv_attn` before the kernel named
    its residuals."""
    if importlib.util.find_spec("libtpu") is None:
        msg = "libtpu is not installed: the TPU compiler cannot run (pip install the `test` extra)"
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true: {msg}", pytrace=False)
        pytest.skip(msg)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(
        platform="tpu", topology_name="v5:2x2x1", chip_config_name="megacore",
        chips_per_host_bounds=(2, 2, 1), num_slices=1,
    )  # fmt: skip
    mesh = make_mesh((1, -1), ("data", "fsdp"), list(topo.devices))
    cfg = small_config(depth=2, attention="auto", dtype="bfloat16", remat_policy="qkv_attn")
    abstract = nnx.eval_shape(lambda: DinoVisionTransformer(cfg, rngs=nnx.Rngs(0)))
    blocks = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))["blocks"]

    def loss(p, x):
        return jnp.sum(run_blocks(p, x, cfg, 0, cfg.depth).astype(jnp.float32))

    x = jax.ShapeDtypeStruct((8, 257, 128), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp")))
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        hlo = jax.jit(jax.grad(loss)).lower(blocks, x).compile().as_text()
    assert hlo.count('custom_call_target="tpu_custom_call"') == 3
