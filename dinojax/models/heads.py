"""The DINO / iBOT projection head (`dinov2/layers/dino_head.py` `DINOHead`,
facebookresearch/dinov2).

`DINOHead` maps backbone tokens (CLS or masked patch tokens) to prototype logits:

    z = MLP(x)                        Linear -> GELU -> ... -> Linear(hidden, bottleneck)
    z = z / max(||z||_2, 1e-12)       F.normalize
    logits_k = g_k * <v_k / ||v_k||, z>   weight-normalised Linear(bottleneck, K), no bias

The MLP runs in the configurable compute `dtype` (bf16 for training); the normalisation and the
weight-normalised last layer always run in float32 because the logits are divided by a teacher
temperature of 0.04 and fed to softmax / Sinkhorn, where bf16 rounding would dominate.

Parameter paths are part of the checkpoint format (see `dinojax.convert.heads`):
`mlp.{i}.kernel (in, out)`, `mlp.{i}.bias (out,)`, `last_layer.weight_v (bottleneck, K)` (the
torch `weight_v (K, bottleneck)` transposed) and `last_layer.weight_g (K,)` (torch `(K, 1)`).

`weight_g` is always an `nnx.Param`. DINO v1's `norm_last_layer=True` (weight_g frozen at 1) is
a property of the optimizer, not of the module: the optimizer must leave `last_layer.weight_g`
untouched (no update, no weight decay) for that recipe. DINOv2 trains it (its `DINOHead` has no
`norm_last_layer` option).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

NORMALIZE_EPS = 1e-12  # F.normalize default; the fp16-only 1e-6 branch never applies (float32 here)

# Logical axis names of every head parameter, for the trainer's sharding rules.
LOGICAL_AXES = {
    "first": ("embed", "mlp"),  # mlp.0 when nlayers > 1
    "hidden": ("hidden", "mlp"),  # hidden -> hidden layers (rule "hidden" in config.mesh.rules)
    "last": ("mlp", "bottleneck"),  # hidden -> bottleneck
    "single": ("embed", "bottleneck"),  # nlayers == 1
    "weight_v": ("bottleneck", "prototypes"),
    "weight_g": ("prototypes",),
}


def _trunc_normal(std: float):
    # torch trunc_normal_(std=.02) cuts at absolute +-2 = +-100 sigma (torch.nn.init docs);
    # Flax's truncated_normal takes the bounds in units of sigma.
    return jax.nn.initializers.truncated_normal(std, lower=-2.0 / std, upper=2.0 / std)


def _torch_linear_default(fan_in: int):
    # nn.Linear's default kaiming_uniform(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _annotated(init, names: tuple[str, ...]):
    # Logical names are metadata resolved by the trainer's rules (same convention as the
    # backbone: no eager sharding at construction).
    return nnx.with_partitioning(init, names, eager_sharding=False)


def l2_normalize(x: Array, eps: float = NORMALIZE_EPS) -> Array:
    """`F.normalize(x, p=2, dim=-1, eps)`: x / max(||x||, eps), as in the official
    `DINOHead.forward`."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


class WeightNormLinear(nnx.Module):
    """Bias-free `weight_norm(nn.Linear(bottleneck, K))`: logits_k = g_k <v_k/||v_k||, z>."""

    def __init__(self, in_dim: int, out_dim: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        # The official `DINOHead` applies its init hook before creating `last_layer`, so weight_v
        # keeps nn.Linear's default init; weight_g = 1.
        v_init = _annotated(_torch_linear_default(in_dim), LOGICAL_AXES["weight_v"])
        g_init = _annotated(jax.nn.initializers.ones, LOGICAL_AXES["weight_g"])
        self.weight_v = nnx.Param(v_init(rngs.params(), (in_dim, out_dim), param_dtype))
        self.weight_g = nnx.Param(g_init(rngs.params(), (out_dim,), param_dtype))

    def __call__(self, z: Array) -> Array:
        v = self.weight_v[...].astype(jnp.float32)
        g = self.weight_g[...].astype(jnp.float32)
        # torch norm_except_dim(v, 2, dim=0): one norm per output unit k over the bottleneck axis.
        v_norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=0))
        # (z @ v) * (g/||v||) == z @ (v * g/||v||) without materialising the (bottleneck, K) W.
        return jnp.einsum("...i,ik->...k", z.astype(jnp.float32), v) * (g / v_norm)


class DINOHead(nnx.Module):
    """Official `dinov2.layers.dino_head.DINOHead` (use_bn=False) in Flax NNX.

    Args:
      in_dim: backbone embedding dim D.
      out_dim: number of prototypes K.
      nlayers: MLP depth (values < 1 are treated as 1, like the official code).
      hidden_dim, bottleneck_dim, mlp_bias: as in the official constructor (hidden_dim is unused,
        and may be None, when nlayers == 1).
      dtype: compute dtype of the MLP (e.g. jnp.bfloat16); the output logits are float32.
      param_dtype: storage dtype of all parameters.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        nlayers: int = 3,
        hidden_dim: int | None = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        nlayers = max(int(nlayers), 1)
        if nlayers > 1 and not hidden_dim:
            raise ValueError(
                f"DINOHead with nlayers={nlayers} needs a hidden_dim, got {hidden_dim}"
            )
        if nlayers == 1:
            dims = [(in_dim, bottleneck_dim, LOGICAL_AXES["single"])]
        else:
            dims = [(in_dim, hidden_dim, LOGICAL_AXES["first"])]
            dims += [(hidden_dim, hidden_dim, LOGICAL_AXES["hidden"])] * (nlayers - 2)
            dims += [(hidden_dim, bottleneck_dim, LOGICAL_AXES["last"])]
        # `DINOHead._init_weights`: every MLP Linear is trunc_normal(0.02) with zero bias.
        self.mlp = nnx.List(
            [
                nnx.Linear(
                    d_in,
                    d_out,
                    use_bias=mlp_bias,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    kernel_init=_annotated(_trunc_normal(0.02), names),
                    bias_init=_annotated(jax.nn.initializers.zeros, names[1:]),
                    rngs=rngs,
                )
                for d_in, d_out, names in dims
            ]
        )
        self.last_layer = WeightNormLinear(
            bottleneck_dim, out_dim, param_dtype=param_dtype, rngs=rngs
        )
        self.in_dim, self.out_dim, self.nlayers = in_dim, out_dim, nlayers
        self.hidden_dim, self.bottleneck_dim, self.mlp_bias = hidden_dim, bottleneck_dim, mlp_bias

    def __call__(self, x: Array) -> Array:
        """(..., in_dim) tokens -> (..., out_dim) float32 prototype logits."""
        n = len(self.mlp)
        for i, layer in enumerate(self.mlp):
            x = layer(x)
            if i < n - 1:
                x = jax.nn.gelu(x, approximate=False)  # nn.GELU() is the exact erf form
        z = l2_normalize(x.astype(jnp.float32))  # F.normalize, eps 1e-12
        return self.last_layer(z)
