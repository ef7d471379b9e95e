"""The DINO / DINOv2 vision transformer, readable top to bottom.

One Flax NNX `DinoVisionTransformer` covers every official backbone: facebookresearch/dinov2
`dinov2/models/vision_transformer.py` `DinoVisionTransformer` and facebookresearch/dino
`vision_transformer.py` `VisionTransformer` (docs/parity.md lists the behaviours kept). Modules
here only *hold* parameters, named like the official state-dict keys (`blocks.attn.qkv.kernel`
is `blocks.{i}.attn.qkv.weight` transposed, `ls1.gamma`, `mlp.fc1`, ...); the computation is a set
of pure functions over the parameter dict. That keeps the stacked blocks a plain pytree that
`jax.lax.scan` / `jax.checkpoint` walk directly, with no NNX graph transform (no shared Variables,
no module state lifted across trace levels), and makes the converter a dictionary.

Images are NHWC float32, already normalised. The blocks are stacked (leading axis = depth) and run
with `jax.lax.scan`; every parameter carries logical sharding names (`out_sharding` metadata).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.linen import with_logical_constraint
from jax.ad_checkpoint import checkpoint_name

from dinojax.models import attention as attention_impl
from dinojax.models.config import ViTConfig, get_config

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST

# ---------------------------------------------------------------------------------------------
# Initialisers (`dinov2/models/vision_transformer.py` `init_weights`; docs/parity.md
# "Initialisation")
# ---------------------------------------------------------------------------------------------


def _trunc_normal(std: float):
    # torch.nn.init.trunc_normal_(std=.02) truncates at absolute +-2, i.e. at +-100 sigma: a plain
    # normal in practice. Flax's truncated_normal takes the bounds in units of sigma.
    return jax.nn.initializers.truncated_normal(std, lower=-2.0 / std, upper=2.0 / std)


def _constant(value: float):
    def init(key, shape, dtype):
        return jnp.full(shape, value, dtype=dtype)

    return init


def _torch_default_uniform(fan_in: int):
    # nn.Conv2d / nn.Linear default init (kaiming_uniform a=sqrt(5)): U(-1/sqrt(fan_in), +).
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _param(rngs: nnx.Rngs, init, shape: Sequence[int], dtype, names: Sequence[str | None]):
    # eager_sharding=False: the logical names are metadata resolved by the trainer's rules
    # (creation happens under `jax.jit(..., out_shardings=...)`), not at construction.
    value = init(rngs.params(), tuple(shape), dtype)
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


# ---------------------------------------------------------------------------------------------
# Parameter holders. `layers` > 0 stacks the parameters with a leading axis of that size.
# ---------------------------------------------------------------------------------------------


def _stack(layers: int, shape: Sequence[int], names: Sequence[str | None]):
    if layers:
        return (layers, *shape), ("layers", *names)
    return tuple(shape), tuple(names)


class Linear(nnx.Module):
    def __init__(self, d_in, d_out, *, bias, names, layers, dtype, rngs):
        shape, kn = _stack(layers, (d_in, d_out), names)
        self.kernel = _param(rngs, _trunc_normal(0.02), shape, dtype, kn)
        if bias:
            shape, bn = _stack(layers, (d_out,), names[1:])
            self.bias = _param(rngs, jax.nn.initializers.zeros, shape, dtype, bn)


class LayerNorm(nnx.Module):
    def __init__(self, dim, *, layers, dtype, rngs):
        shape, names = _stack(layers, (dim,), ("norm",))
        self.scale = _param(rngs, jax.nn.initializers.ones, shape, dtype, names)
        self.bias = _param(rngs, jax.nn.initializers.zeros, shape, dtype, names)


class LayerScale(nnx.Module):
    def __init__(self, dim, init_value, *, layers, dtype, rngs):
        shape, names = _stack(layers, (dim,), ("norm",))
        self.gamma = _param(rngs, _constant(init_value), shape, dtype, names)


class Attention(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, layers, dtype, rngs):
        d = cfg.embed_dim
        self.qkv = Linear(
            d, 3 * d, bias=cfg.qkv_bias, names=("embed", "qkv"), layers=layers, dtype=dtype,
            rngs=rngs,
        )  # fmt: skip
        self.proj = Linear(
            d, d, bias=cfg.proj_bias, names=("qkv", "embed"), layers=layers, dtype=dtype, rngs=rngs
        )


class Mlp(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, layers, dtype, rngs):
        d, h = cfg.embed_dim, cfg.ffn_hidden_dim
        b = cfg.ffn_bias
        self.fc1 = Linear(
            d, h, bias=b, names=("embed", "mlp"), layers=layers, dtype=dtype, rngs=rngs
        )
        self.fc2 = Linear(
            h, d, bias=b, names=("mlp", "embed"), layers=layers, dtype=dtype, rngs=rngs
        )


class SwiGLUFFN(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, layers, dtype, rngs):
        d, h = cfg.embed_dim, cfg.ffn_hidden_dim
        b = cfg.ffn_bias
        self.w12 = Linear(d, 2 * h, bias=b, names=("embed", "mlp"), layers=layers, dtype=dtype,
                          rngs=rngs)  # fmt: skip
        self.w3 = Linear(
            h, d, bias=b, names=("mlp", "embed"), layers=layers, dtype=dtype, rngs=rngs
        )


class Block(nnx.Module):
    """Pre-norm block; all `depth` blocks live in one instance with stacked parameters."""

    def __init__(self, cfg: ViTConfig, *, layers: int, dtype, rngs: nnx.Rngs):
        d = cfg.embed_dim
        self.norm1 = LayerNorm(d, layers=layers, dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg, layers=layers, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(d, layers=layers, dtype=dtype, rngs=rngs)
        ffn = SwiGLUFFN if cfg.ffn_layer == "swiglu" else Mlp
        self.mlp = ffn(cfg, layers=layers, dtype=dtype, rngs=rngs)
        if cfg.layerscale_init:
            self.ls1 = LayerScale(d, cfg.layerscale_init, layers=layers, dtype=dtype, rngs=rngs)
            self.ls2 = LayerScale(d, cfg.layerscale_init, layers=layers, dtype=dtype, rngs=rngs)


class _Conv(nnx.Module):
    def __init__(self, p, d, *, dtype, rngs):
        init = _torch_default_uniform(3 * p * p)
        # Flax conv layout (p, p, 3, D) = torch OIHW weight transposed (2, 3, 1, 0).
        self.kernel = _param(rngs, init, (p, p, 3, d), dtype, (None, None, None, "embed"))
        self.bias = _param(rngs, init, (d,), dtype, ("embed",))


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, dtype, rngs):
        p, d = cfg.patch_size, cfg.embed_dim
        self.proj = _Conv(p, d, dtype=dtype, rngs=rngs)


# ---------------------------------------------------------------------------------------------
# Pure functions: the computation
# ---------------------------------------------------------------------------------------------


def _dense(p: dict, x: Array, dtype) -> Array:
    y = jnp.einsum("...i,io->...o", x, p["kernel"].astype(dtype))
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    return y


def layer_norm(p: dict, x: Array, eps: float) -> Array:
    """LayerNorm with float32 statistics and the variance taken around the mean: Flax's default
    fast variance, E[x^2] - E[x]^2, drifts from torch (docs/parity.md "Tokens, blocks and
    numerics")."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    y = y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def _gelu(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)  # official nn.GELU() is the exact erf form


def attention_probs(q: Array, k: Array, scale: float) -> Array:
    """softmax((q * scale) k^T) in float32, (B, heads, Nq, Nk); the PyPI reference's order."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def _padded_fused_attention(q, k, v, scale, implementation):
    # cuDNN's fused attention refuses odd sequence lengths in training (257/261 tokens): pad the
    # token axis to a multiple of 8 and pass the true lengths so padding is ignored.
    b, n = q.shape[:2]
    n_pad = -(-n // 8) * 8
    if n_pad != n:
        pad = ((0, 0), (0, n_pad - n), (0, 0), (0, 0))
        q, k, v = (jnp.pad(t, pad) for t in (q, k, v))
    lengths = jnp.full((b,), n, dtype=jnp.int32)
    out = jax.nn.dot_product_attention(
        q, k, v, scale=scale, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        implementation=implementation,
    )  # fmt: skip
    return out[:, :n]


def dot_product_attention(
    q, k, v, *, scale: float, implementation: str = "xla", name: str | None = None
) -> Array:
    """One entry point for attention: `xla` (float32 einsums, parity), fused `cudnn` (bf16 GPU),
    the Pallas `splash` kernel (TPU) or `auto` (the device's own; `dinojax.models.attention`).

    `name`: the `checkpoint_name` a remat policy saves the attention output under. The einsum
    paths name their output; splash names its kernel's residuals (output and logsumexp), which
    its backward reads, so the policy keeps those instead and the forward kernel is not rerun."""
    implementation = attention_impl.resolve(implementation, q.dtype)
    if implementation == "splash":
        return attention_impl.splash_attention(q, k, v, scale=scale, name=name)
    if implementation == "cudnn":
        out = _padded_fused_attention(q, k, v, scale, "cudnn")
    else:
        probs = attention_probs(q, k, scale)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    return out if name is None else checkpoint_name(out, name)


def _qkv(p: dict, x: Array, cfg: ViTConfig, dtype):
    b, n, _ = x.shape
    # qkv rows are [q | k | v], each split by heads of 64 (`dinov2/layers/attention.py`
    # `Attention`).
    qkv = checkpoint_name(_dense(p["qkv"], x, dtype), "qkv")
    qkv = qkv.reshape(b, n, 3, cfg.num_heads, cfg.head_dim)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def _attention(p: dict, x: Array, cfg: ViTConfig, dtype) -> Array:
    b, n, d = x.shape
    q, k, v = _qkv(p, x, cfg, dtype)
    o = dot_product_attention(
        q, k, v, scale=cfg.head_dim**-0.5, implementation=cfg.attention, name="attn_out"
    )
    o = o.reshape(b, n, d)
    return _dense(p["proj"], o, dtype)


def _ffn(p: dict, x: Array, cfg: ViTConfig, dtype) -> Array:
    if cfg.ffn_layer == "swiglu":
        h = checkpoint_name(_dense(p["w12"], x, dtype), "mlp_hidden")
        # x1 (first half) is the SiLU gate (`dinov2/layers/swiglu_ffn.py` `SwiGLUFFN`).
        x1, x2 = jnp.split(h, 2, axis=-1)
        return _dense(p["w3"], jax.nn.silu(x1) * x2, dtype)
    h = checkpoint_name(_gelu(_dense(p["fc1"], x, dtype)), "mlp_hidden")
    return _dense(p["fc2"], h, dtype)


def _drop_add_residual(x, residual_fn, rate, key, batch_subset, groups: int = 1):
    """Residual add with stochastic depth (`dinov2/layers/block.py`; docs/parity.md "Stochastic
    depth").

    `groups`: the batch is `groups` equal per-device batches, as on the official code's GPUs, and
    the batch subset is drawn in each of them (the official code draws it from each GPU's local
    batch). One subset drawn from the global batch would gather it across the batch shards: the
    TPU compiler showed every block all-reducing the subset's activations."""
    if batch_subset:
        # rate > 0.1: the residual is computed for a random subset of the batch only and added
        # back scaled by B / subset (drop_add_residual_stochastic_depth).
        b = x.shape[0]
        if groups == 1:
            keep = max(int(b * (1 - rate)), 1)
            idx = jax.random.permutation(key, b)[:keep]
            res = residual_fn(x[idx])
            return x.at[idx].add((res * (b / keep)).astype(x.dtype))
        if b % groups:
            raise ValueError(f"batch {b} is not divisible into {groups} drop-path groups")
        bg = b // groups
        keep = max(int(bg * (1 - rate)), 1)
        keys = jax.random.split(key, groups)
        idx = jax.vmap(lambda k: jax.random.permutation(k, bg)[:keep])(keys)  # (groups, keep)
        xg = x.reshape(groups, bg, *x.shape[1:])  # a batch-sharded x: one group per shard
        sub = jax.vmap(lambda xi, i: xi[i])(xg, idx)
        res = residual_fn(sub.reshape(groups * keep, *x.shape[1:]))
        res = (res * (bg / keep)).astype(x.dtype).reshape(groups, keep, *x.shape[1:])
        out = jax.vmap(lambda xi, i, r: xi.at[i].add(r))(xg, idx, res)
        return out.reshape(x.shape)
    keep_prob = 1.0 - rate
    mask = jax.random.bernoulli(key, keep_prob, (x.shape[0], 1, 1))
    return x + residual_fn(x) * (mask.astype(x.dtype) / keep_prob).astype(x.dtype)


def block_forward(
    p: dict, x: Array, cfg: ViTConfig, *, rate=0.0, key=None, drop_groups: int = 1
) -> Array:
    """One pre-norm block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""
    dtype = x.dtype
    eps = cfg.layernorm_eps

    def attn_res(y):
        y = _attention(p["attn"], layer_norm(p["norm1"], y, eps), cfg, dtype)
        return y * p["ls1"]["gamma"].astype(dtype) if "ls1" in p else y

    def ffn_res(y):
        y = _ffn(p["mlp"], layer_norm(p["norm2"], y, eps), cfg, dtype)
        return y * p["ls2"]["gamma"].astype(dtype) if "ls2" in p else y

    if key is None or (isinstance(rate, float) and rate == 0.0):
        x = x + attn_res(x)
        x = x + ffn_res(x)
    else:
        # v2 picks batch-subset stochastic depth above 0.1 (`dinov2/layers/block.py`
        # `Block.forward`); v1 is always per-sample (facebookresearch/dino `vision_transformer.py`
        # `drop_path`).
        batch_subset = cfg.family == "dinov2" and isinstance(rate, float) and rate > 0.1
        k1, k2 = jax.random.split(key)
        x = _drop_add_residual(x, attn_res, rate, k1, batch_subset, drop_groups)
        x = _drop_add_residual(x, ffn_res, rate, k2, batch_subset, drop_groups)
    return with_logical_constraint(x, ("batch", None, None))


# With `attention="splash"`, "attn_out" names the kernel's residuals (output and logsumexp), so
# the qkv_attn policies keep what its backward reads; `full` and `dots` recompute the forward
# kernel, as they recompute the `xla` path's (batched, hence unsaved by `dots`) einsums.
_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv_attn": jax.checkpoint_policies.save_only_these_names("qkv", "attn_out"),
    "qkv_attn_mlp": jax.checkpoint_policies.save_only_these_names("qkv", "attn_out", "mlp_hidden"),
}


def drop_path_rates(cfg: ViTConfig) -> list[float]:
    if cfg.drop_path_uniform:
        return [cfg.drop_path_rate] * cfg.depth
    return [float(r) for r in np.linspace(0, cfg.drop_path_rate, cfg.depth)]


def run_blocks(
    blocks: dict, x: Array, cfg: ViTConfig, start: int, stop: int, *, key=None, drop_groups: int = 1
) -> Array:
    """Blocks [start, stop) over stacked parameters: `lax.scan`, or a Python loop when per-layer
    rates must be static (non-uniform batch-subset drop path) or `scan_layers=False`.
    `drop_groups`: per-device batches the batch-subset drop path draws in (`_drop_add_residual`)."""
    if stop <= start:
        return x
    rates = drop_path_rates(cfg)[start:stop]
    train = key is not None and max(rates) > 0.0
    sl = jax.tree.map(lambda a: a[start:stop], blocks)

    def make_body(rate: float):
        # The rate is closed over, not passed: it must stay a static Python float (it picks
        # batch-subset vs per-sample drop path, and sets the subset size). As an argument of
        # `jax.checkpoint` it would become a tracer and silently select the per-sample path.
        def body(h, p, k):
            return block_forward(p, h, cfg, rate=rate, key=k, drop_groups=drop_groups)

        if cfg.remat_policy != "none":
            body = jax.checkpoint(body, policy=_REMAT[cfg.remat_policy], prevent_cse=False)
        return body

    keys = jax.random.split(key, cfg.depth)[start:stop] if train else None
    uniform = len(set(rates)) == 1
    if cfg.scan_layers and (uniform or not train):
        if train:
            body = make_body(rates[0])
            x, _ = jax.lax.scan(lambda h, pk: (body(h, pk[0], pk[1]), None), x, (sl, keys))
        else:
            body = make_body(0.0)
            x, _ = jax.lax.scan(lambda h, p: (body(h, p, None), None), x, sl)
        return x
    for i in range(stop - start):
        p_i = jax.tree.map(lambda a, i=i: a[i], sl)
        x = make_body(rates[i] if train else 0.0)(x, p_i, keys[i] if train else None)
    return x


def _fma32(a, b, c) -> np.ndarray:
    # float32 fused multiply-add: the product of two float32 values is exact in float64, so one
    # rounding to float32 follows (up to a rare double rounding through float64).
    return (np.asarray(a, np.float32).astype(np.float64) * np.float32(b) + c).astype(np.float32)


def _torch_cubic_coefficients(t: np.ndarray) -> list[np.ndarray]:
    """ATen get_cubic_upsample_coefficients (Keys, A = -0.75) for float32 `t`, with the fused
    multiply-adds the compiled kernels contract the polynomials to."""
    a = -0.75  # A, A + 2, A + 3, 5A, 8A and 4A are exact in float32

    def conv1(x):  # |x| <= 1: ((A + 2) x - (A + 3)) x x + 1
        return _fma32(_fma32(x, a + 2, -(a + 3)) * x, x, 1.0)

    def conv2(x):  # 1 < |x| < 2: ((A x - 5A) x + 8A) x - 4A
        return _fma32(_fma32(_fma32(x, a, -5 * a), x, 8 * a), x, -4 * a)

    one = np.float32(1)
    x2 = one - t
    return [conv2(t + one), conv1(t), conv1(x2), conv2(x2 + one)]


def torch_bicubic_weights(n_in: int, n_out: int, scale_factor: float | None) -> np.ndarray:
    """(n_out, n_in) float32 matrix of PyTorch's bicubic resampling without antialias
    (`F.interpolate(mode="bicubic")`, docs/parity.md "Position embeddings"): Keys a=-0.75, tap
    indices clamped to the edge.

    The sizes are static, so the matrix is built here in numpy, rounded like the ATen kernel:
    the scale is float32(1 / scale_factor) (`compute_scales_value`; float32(n_in) / n_out on the
    size path) and the source coordinate scale * (i + 0.5) - 0.5 is float32 and fused into one
    fma. That rounding matters: near coordinate 37 one float32 ulp is 3.8e-6, and evaluating
    the coordinate more exactly (or with jax.image.scale_and_translate's |x - j| distances)
    moved a unit-scale 37x37 grid by up to 3e-5 from F.interpolate when enlarging it.
    """
    f32 = np.float32
    scale = f32(1.0 / scale_factor) if scale_factor else f32(n_in) / f32(n_out)
    # area_pixel_compute_source_index as one fma: exact in float64, then one float32 rounding.
    src = (np.float64(scale) * (np.arange(n_out) + 0.5) - 0.5).astype(f32)
    idx = np.minimum(np.floor(src).astype(np.int64), n_in - 1)  # guard_index_and_lambda
    t = np.clip(src - idx.astype(f32), 0, 1).astype(f32)
    w = np.zeros((n_out, n_in), f32)
    rows = np.arange(n_out)
    for k, c in enumerate(_torch_cubic_coefficients(t)):
        np.add.at(w, (rows, np.clip(idx - 1 + k, 0, n_in - 1)), c)
    return w


def _resize_pos_grid(grid: Array, h0: int, w0: int, cfg: ViTConfig) -> Array:
    m = grid.shape[0]
    d = grid.shape[-1]
    off = cfg.interpolate_offset
    if not cfg.interpolate_antialias:
        # `dinov2/models/vision_transformer.py` `interpolate_pos_encoding` with an offset calls
        # F.interpolate(scale_factor=(h0 + 0.1) / M), which samples at (i + 0.5) * M / (h0 + 0.1)
        # - 0.5: NOT a resize to (h0, w0). Kernel: Keys a=-0.75 with clamped edges. Separable, W
        # (inner sum in ATen) first, then H.
        wy = torch_bicubic_weights(m, h0, (h0 + off) / m if off else None)
        wx = torch_bicubic_weights(m, w0, (w0 + off) / m if off else None)
        out = jnp.einsum("ox,yxd->yod", wx, grid, precision=_HIGHEST)
        return jnp.einsum("py,yod->pod", wy, out, precision=_HIGHEST)
    if off:
        # Antialiased scale-factor path (no official model uses it): torch's antialiased a=-0.5
        # filter.
        scale = jnp.array([(h0 + off) / m, (w0 + off) / m], jnp.float32)
        return jax.image.scale_and_translate(
            grid, (h0, w0, d), (0, 1), scale, jnp.zeros(2, jnp.float32),
            method="cubic-pytorch", antialias=True, precision=_HIGHEST,
        )  # fmt: skip
    # Register models: F.interpolate(size=(h0, w0), antialias=True), matched by the antialiased
    # a=-0.5 resize (docs/parity.md "Position embeddings").
    return jax.image.resize(
        grid, (h0, w0, d), method="cubic-pytorch", antialias=True, precision=_HIGHEST
    )


def interpolate_pos_encoding(
    pos_embed: Array, h0: int, w0: int, height: int, width: int, cfg: ViTConfig
) -> Array:
    """Pos-embed for an (h0, w0) patch grid from an (height, width) image: the official
    `interpolate_pos_encoding` (`dinov2/models/vision_transformer.py`)."""
    n = pos_embed.shape[1] - 1
    # Short-circuit only when the patch count matches AND the image is square in pixels.
    if h0 * w0 == n and height == width:
        return pos_embed
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"pos_embed has {n} patch positions, not a square grid")
    pe = pos_embed.astype(jnp.float32)
    grid = pe[0, 1:].reshape(m, m, -1)
    out = _resize_pos_grid(grid, h0, w0, cfg).reshape(1, h0 * w0, -1)
    return jnp.concatenate([pe[:, :1], out], axis=1).astype(pos_embed.dtype)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class DinoVisionTransformer(nnx.Module):
    """DINO / DINOv2 ViT. Parameter paths mirror the official state-dict keys (docs/parity.md
    "Checkpoints")."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = jnp.dtype(cfg.param_dtype)
        d, m = cfg.embed_dim, cfg.num_pos_patches
        self.patch_embed = PatchEmbed(cfg, dtype=dt, rngs=rngs)
        cls_init = _trunc_normal(0.02) if cfg.family == "dino" else jax.nn.initializers.normal(1e-6)
        self.cls_token = _param(rngs, cls_init, (1, 1, d), dt, (None, None, "embed"))
        self.pos_embed = _param(rngs, _trunc_normal(0.02), (1, m + 1, d), dt, (None, None, "embed"))
        if cfg.num_register_tokens:
            self.register_tokens = _param(
                rngs, jax.nn.initializers.normal(1e-6), (1, cfg.num_register_tokens, d), dt,
                (None, None, "embed"),
            )  # fmt: skip
        if cfg.has_mask_token:
            self.mask_token = _param(rngs, jax.nn.initializers.zeros, (1, d), dt, (None, "embed"))
        self.blocks = Block(cfg, layers=cfg.depth, dtype=dt, rngs=rngs)
        self.norm = LayerNorm(d, layers=0, dtype=dt, rngs=rngs)

    # -- helpers ------------------------------------------------------------------------------

    def params(self) -> dict:
        """The parameters as a plain nested dict of arrays."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def _grid(self, x: Array) -> tuple[int, int]:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected NHWC images with 3 channels, got shape {x.shape}")
        p = self.cfg.patch_size
        h, w = x.shape[1], x.shape[2]
        if self.cfg.family == "dinov2" and (h % p or w % p):
            # The v2 PatchEmbed asserts divisibility; hub depth heads pad with CenterPadding.
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        if h < p or w < p:
            raise ValueError(f"image size {h}x{w} is smaller than one patch ({p})")
        return h // p, w // p  # v1's strided conv drops the remainder pixels

    def prepare_tokens(self, params: dict, x: Array, masks: Array | None = None) -> Array:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        b, height, width, _ = x.shape
        h0, w0 = self._grid(x)
        p = cfg.patch_size
        # Patchify + matmul == the strided conv (row-major patch order, (ph, pw, c) pixel order).
        x = x[:, : h0 * p, : w0 * p].astype(dtype)
        x = x.reshape(b, h0, p, w0, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, h0 * w0, -1)
        pe = params["patch_embed"]["proj"]
        t = x @ pe["kernel"].reshape(-1, cfg.embed_dim).astype(dtype) + pe["bias"].astype(dtype)
        if masks is not None:
            if not cfg.has_mask_token:
                raise ValueError(f"{cfg.name} (DINO v1) has no mask token: masks are not supported")
            if masks.shape != (b, h0 * w0):
                raise ValueError(f"masks must have shape {(b, h0 * w0)}, got {masks.shape}")
            # The mask token replaces the patch embedding and still gets the pos-embed
            # (`dinov2/models/vision_transformer.py` `prepare_tokens_with_masks`).
            t = jnp.where(masks[..., None], params["mask_token"].astype(dtype)[None], t)
        cls = jnp.broadcast_to(params["cls_token"].astype(dtype), (b, 1, cfg.embed_dim))
        t = jnp.concatenate([cls, t], axis=1)
        pos = interpolate_pos_encoding(params["pos_embed"], h0, w0, height, width, cfg)
        t = t + pos.astype(dtype)
        if cfg.num_register_tokens:
            # Registers come after the pos-embed add and get no position
            # (`prepare_tokens_with_masks`).
            reg = jnp.broadcast_to(
                params["register_tokens"].astype(dtype), (b, cfg.num_register_tokens, cfg.embed_dim)
            )
            t = jnp.concatenate([t[:, :1], reg, t[:, 1:]], axis=1)
        return with_logical_constraint(t, ("batch", None, None))

    # -- public API ---------------------------------------------------------------------------

    def forward_features(
        self,
        x: Array,
        masks: Array | None = None,
        *,
        key: Array | None = None,
        drop_groups: int = 1,
    ) -> dict[str, Array]:
        """Official `forward_features`. `key` enables stochastic depth (training); `drop_groups`
        splits the batch into that many per-device batches for the batch-subset drop path, as
        the official code's GPUs each draw from their own batch."""
        params = self.params()
        cfg = self.cfg
        t = self.prepare_tokens(params, x, masks)
        t = run_blocks(params["blocks"], t, cfg, 0, cfg.depth, key=key, drop_groups=drop_groups)
        n = layer_norm(params["norm"], t, cfg.layernorm_eps)
        r = cfg.num_register_tokens
        return {
            "x_norm_clstoken": n[:, 0],
            "x_norm_regtokens": n[:, 1 : 1 + r],
            "x_norm_patchtokens": n[:, 1 + r :],
            "x_prenorm": t,
            "masks": masks,
        }

    def __call__(self, x: Array) -> Array:
        """Normalised CLS features, like the official `forward(x)`."""
        return self.forward_features(x)["x_norm_clstoken"]

    def get_intermediate_layers(
        self,
        x: Array,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last `n` blocks (or of the 0-based blocks listed in `n`), official
        semantics (`dinov2/models/vision_transformer.py` `get_intermediate_layers`): final norm
        applied when `norm`, registers dropped, `reshape` gives (B, h, w, D). Outputs come in block
        order whatever the order of `n`: the official code walks the blocks and appends block i when
        `i in n`."""
        cfg = self.cfg
        depth = cfg.depth
        take = list(range(depth - n, depth)) if isinstance(n, int) else [int(i) for i in n]
        if not take or any(i < 0 or i >= depth for i in take):
            raise ValueError(f"block indices {take} out of range for depth {depth}")
        if len(set(take)) != len(take):
            # The official code collects each block once and then asserts one output per index.
            raise ValueError(f"block indices {take} contain duplicates")
        take = sorted(take)
        params = self.params()
        h0, w0 = self._grid(x)
        t = self.prepare_tokens(params, x)
        outs: dict[int, Array] = {}
        pos = 0
        for i in take:
            t = run_blocks(params["blocks"], t, cfg, pos, i + 1)
            outs[i] = t
            pos = i + 1
        r = cfg.num_register_tokens
        results = []
        for i in take:
            o = layer_norm(params["norm"], outs[i], cfg.layernorm_eps) if norm else outs[i]
            cls, patches = o[:, 0], o[:, 1 + r :]
            if reshape:
                patches = patches.reshape(x.shape[0], h0, w0, -1)
            results.append((patches, cls) if return_class_token else patches)
        return tuple(results)

    def get_last_self_attention(self, x: Array) -> Array:
        """Attention probabilities of the last block, (B, heads, N, N) with N = 1 + R + patches:
        DINO v1's `get_last_selfattention` (facebookresearch/dino `vision_transformer.py`), for v2
        models too."""
        cfg = self.cfg
        params = self.params()
        t = self.prepare_tokens(params, x)
        t = run_blocks(params["blocks"], t, cfg, 0, cfg.depth - 1)
        last = jax.tree.map(lambda a: a[cfg.depth - 1], params["blocks"])
        y = layer_norm(last["norm1"], t, cfg.layernorm_eps)
        q, k, _ = _qkv(last["attn"], y, cfg, t.dtype)
        return attention_probs(q, k, cfg.head_dim**-0.5)


def create_model(name, *, seed: int = 0, **overrides):
    """Build an official architecture by name (e.g. 'dinov2_vitl14_reg', 'dinov3_vitb16') with
    random weights: a `DinoVisionTransformer` for DINO / DINOv2 names, a
    `dinojax.models.vit3.DinoV3VisionTransformer` for DINOv3 ViTs, and for 'dinov3_convnext*' the
    model `dinojax.models.convnext.create_model` builds.

    Overrides change config fields: img_size, drop_path_rate, layerscale_init,
    num_register_tokens, depth, dtype, attention, remat_policy, ...
    """
    if isinstance(name, str) and name.startswith("dinov3_convnext"):
        from dinojax.models import convnext

        return convnext.create_model(name, seed=seed, **overrides)
    cfg = name.replace(**overrides) if not isinstance(name, str) else get_config(name, **overrides)
    if isinstance(cfg, ViTConfig):
        return DinoVisionTransformer(cfg, rngs=nnx.Rngs(params=seed))
    from dinojax.models.config_v3 import DinoV3Config

    if isinstance(cfg, DinoV3Config):
        from dinojax.models.vit3 import DinoV3VisionTransformer

        return DinoV3VisionTransformer(cfg, rngs=nnx.Rngs(params=seed))
    from dinojax.models import convnext  # a ConvNeXt config object

    return convnext.create_model(cfg, seed=seed)


def abstract_params(cfg: ViTConfig) -> dict:
    """Shapes/dtypes of the parameter dict without allocating it."""
    model = nnx.eval_shape(lambda: DinoVisionTransformer(cfg, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
