"""Attention implementations behind `ViTConfig.attention`, and the choice `auto` makes.

- `xla`: softmax((q * scale) k^T) v as plain einsums, softmax in float32 (the parity path).
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, fused on NVIDIA GPUs (bf16).
- `splash`: the Pallas TPU kernel `jax.experimental.pallas.ops.tpu.splash_attention`. The token
  axis is padded to the kernel's block and the padded keys are masked out; on devices other than
  TPU the kernel runs in Pallas' interpret mode (the CPU tests use it).
- `auto`: splash on TPU, cudnn on GPU for 16-bit inputs, xla otherwise, read from the devices of
  the mesh in use (`jax.set_mesh`), so a deviceless compile for a TPU topology on a CPU host picks
  the TPU kernel. Several TPUs without a mesh in context: xla (the kernel needs the mesh).

docs/parity.md "Attention implementations" gives the measured agreement with `xla`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dinojax.sharding import batch_axes

Array = jax.Array

# The splash kernel's tile along both token axes: a multiple of the TPU lane width (128), which
# its kernels require of every kv block.
SPLASH_BLOCK = 128


def device_platform() -> str:
    """Platform ("tpu", "gpu", "cpu") of the devices the current computation targets: those of
    the mesh set with `jax.set_mesh` (inside `jax.jit` its abstract mesh still names the device
    kind), else the default devices."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    if device is not None:
        return str(device.platform)
    return jax.devices()[0].platform


def resolve(implementation: str, dtype=jnp.float32) -> str:
    """The implementation `auto` stands for here (others are returned unchanged)."""
    if implementation != "auto":
        return implementation
    platform = device_platform()
    if platform == "tpu":
        # XLA cannot partition a Pallas (Mosaic) kernel: it needs the shard_map that a mesh in
        # context gives it (`splash_attention`). A plain jit over several TPUs (no `jax.set_mesh`,
        # e.g. an evaluation's forward) keeps the einsum path.
        mesh = jax.sharding.get_abstract_mesh()
        return "splash" if not mesh.empty or jax.device_count() == 1 else "xla"
    # cuDNN's fused attention takes only 16-bit inputs; float32 stays on the einsum path.
    if platform in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def _splash_kernel(n: int, n_pad: int, heads: int, interpret: bool, name: str | None):
    # Built inside the trace that uses it (its mask tables become constants of that trace); the
    # numpy mask analysis behind it is cached by the splash module itself.
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    # Every query (the padded ones too: their rows are dropped afterwards) attends to the n real
    # keys only, so no row is empty; only the last kv block is partial (a static block mask).
    keep = np.zeros((n_pad, n_pad), np.bool_)
    keep[:, :n] = True
    mask = sa.MultiHeadMask([sa.NumpyMask(keep)] * heads)
    blocks = sa.BlockSizes(
        block_q=SPLASH_BLOCK, block_kv=SPLASH_BLOCK, block_kv_compute=SPLASH_BLOCK,
        block_q_dkv=SPLASH_BLOCK, block_kv_dkv=SPLASH_BLOCK, block_kv_dkv_compute=SPLASH_BLOCK,
        block_q_dq=SPLASH_BLOCK, block_kv_dq=SPLASH_BLOCK,
    )  # fmt: skip
    # `residual_checkpoint_name`: the kernel's forward names the two residuals its backward reads
    # (its output and the per-row logsumexp) so that a `jax.checkpoint` policy saving `name`
    # keeps them, and the backward runs the dq / dkv kernels without rerunning the forward one.
    return sa.make_splash_mha(
        mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret,
        residual_checkpoint_name=name,
    )  # fmt: skip


def _shard_axes(mesh, batch: int) -> tuple[str, ...]:
    # The batch mesh axes (config.mesh.rules' `batch` rule, as the model's activation constraints
    # use), keeping the leading ones whose product divides the batch: a batch that does not split
    # evenly is gathered by shard_map instead of failing.
    axes = batch_axes(mesh, nn.get_logical_axis_rules())
    axes = tuple(a for a in axes if a not in mesh.manual_axes)  # already split by an outer map
    while axes and batch % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
    return axes


def splash_attention(
    q: Array, k: Array, v: Array, *, scale: float, name: str | None = None
) -> Array:
    """Splash attention on (B, N, heads, head_dim) inputs; the result matches the `xla` path.

    `name`: the `checkpoint_name` of what the backward needs from the forward. It names the
    kernel's own residuals (its padded (heads, N_pad, head_dim) output and (heads, N_pad)
    float32 logsumexp), not the returned array: under a remat policy saving `name` those two are
    kept and the result is re-sliced from them, where naming the result would keep it but still
    rerun the forward kernel for the residuals.

    Each device runs the kernel on its own part of the batch (`jax.shard_map` over the batch mesh
    axes, heads whole); the kernel itself takes one example's (heads, N, head_dim) and is
    `vmap`ped over the local batch. Without a mesh in context, a `jax.jit` over arrays sharded
    on several TPUs fails ("Mosaic kernels cannot be automatically partitioned"): call the model
    under `jax.set_mesh`, as the training step does (`auto` falls back to `xla` there)."""
    b, n, h, _ = q.shape
    n_pad = -(-n // SPLASH_BLOCK) * SPLASH_BLOCK
    # The scale is applied to q before the logits, as the `xla` path does (`attention_probs`).
    q = q * jnp.asarray(scale, q.dtype)
    pad = ((0, 0), (0, n_pad - n), (0, 0), (0, 0))
    q, k, v = (jnp.pad(t, pad).transpose(0, 2, 1, 3) for t in (q, k, v))
    interpret = device_platform() != "tpu"

    def local(q, k, v):
        return jax.vmap(_splash_kernel(n, n_pad, h, interpret, name))(q, k, v)

    mesh = jax.sharding.get_abstract_mesh()
    # Mesh axes not yet manual (all of them, unless the model is called inside a shard_map).
    free = () if mesh.empty else tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
    if math.prod(mesh.shape[a] for a in free) > 1:
        axes = _shard_axes(mesh, b)
        spec = P(axes if len(axes) != 1 else axes[0]) if axes else P()
        # check_vma off: the Pallas call has no replication rule of its own.
        local = jax.shard_map(
            local, mesh=mesh, in_specs=spec, out_specs=spec, axis_names=set(free), check_vma=False
        )
    o = local(q, k, v)
    return o.transpose(0, 2, 1, 3)[:, :n]
