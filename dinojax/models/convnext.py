"""The DINOv3 ConvNeXt backbones (tiny / small / base / large), readable top to bottom.

Follows facebookresearch/dinov3 `dinov3/models/convnext.py` `ConvNeXt` (hub constructors in
`dinov3/hub/backbones.py` `dinov3_convnext_*`; docs/parity.md "DINOv3 ConvNeXt"): a 4x4 stride-4
stem conv + channels-first LayerNorm, then four stages; stages 1-3 start with LayerNorm + a 2x2
stride-2 conv. A block is x + drop_path(gamma * pwconv2(GELU(pwconv1(LN(dwconv7x7(x)))))). The
"CLS" token is the global average pool of the last stage, concatenated in front of the stride-32
tokens and normalised with them by the final `norm`.

Like `dinojax.models.vit`, modules only hold parameters, named like the official state-dict keys
(`downsample_layers.{i}.{0,1}`, `stages.{i}.dwconv`, `stages.{i}.norm`, `stages.{i}.pwconv1`,
`stages.{i}.pwconv2`, `stages.{i}.gamma`, `norm`; conv / linear weights are `kernel`, LayerNorm
weights `scale`), and the computation is pure functions over the parameter dict. The blocks of a
stage are stacked (leading axis = the stage's depth; `stages.{i}.dwconv.kernel[j]` is the official
`stages.{i}.{j}.dwconv.weight`, transposed) and run with `jax.lax.scan`.

Images are NHWC float32, already normalised (the same convention as the ViTs). Every parameter
carries logical sharding names (`dinojax.sharding`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.linen import with_logical_constraint
from jax.ad_checkpoint import checkpoint_name

from dinojax.models.vit import (
    _REMAT,
    LayerNorm,
    Linear,
    _constant,
    _dense,
    _gelu,
    _param,
    _trunc_normal,
    layer_norm,
)

Array = jax.Array

CONVNEXT_REMAT_POLICIES = ("none", "full", "dots", "mlp")


@dataclass(frozen=True)
class ConvNeXtConfig:
    """Hyper-parameters of a `DinoConvNeXt` (facebookresearch/dinov3 `dinov3/models/convnext.py`
    `ConvNeXt.__init__`; the hub values are in `convnext_sizes` and `dinov3/hub/backbones.py`)."""

    name: str = "custom"
    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    # Stochastic depth: linspace(0, drop_path_rate, sum(depths)) over all blocks, per sample
    # (`ConvNeXt.__init__` dp_rates; `drop_path`). The hub constructors use 0.
    drop_path_rate: float = 0.0
    layer_scale_init: float = 1e-6
    # Every LayerNorm of the official module (stem, downsampling, blocks, final) uses eps 1e-6.
    layernorm_eps: float = 1e-6
    # The output stride of the last stage: the "patch size" of the token grid the tools reshape.
    patch_size: int = 32
    # Numerics and performance (not part of the architecture).
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    scan_layers: bool = True

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        if len(self.depths) != 4 or len(self.dims) != 4:
            raise ValueError(
                f"ConvNeXt has 4 stages: got depths {self.depths} and dims {self.dims}"
            )
        if min(self.depths) < 1 or min(self.dims) < 1:
            raise ValueError(f"depths and dims must be positive, got {self.depths}, {self.dims}")
        if self.patch_size != 32:
            raise ValueError(f"patch_size is the output stride of the 4 stages (32), got "
                             f"{self.patch_size}")  # fmt: skip
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if not self.layer_scale_init > 0:
            # The official module drops `gamma` for a value <= 0; no released model does.
            raise ValueError(f"layer_scale_init must be > 0, got {self.layer_scale_init}")
        if self.remat_policy not in CONVNEXT_REMAT_POLICIES:
            raise ValueError(
                f"remat_policy must be one of {CONVNEXT_REMAT_POLICIES}, got {self.remat_policy!r}"
            )

    # The attributes the eval tools read from a ViT config.
    family = "dinov3_convnext"
    num_register_tokens = 0

    @property
    def embed_dim(self) -> int:
        return self.dims[-1]

    @property
    def depth(self) -> int:
        """The number of "blocks" `get_intermediate_layers` indexes: the 4 stages (the official
        `n_blocks = len(downsample_layers)`)."""
        return len(self.dims)

    def drop_path_rates(self) -> list[float]:
        return [float(r) for r in np.linspace(0, self.drop_path_rate, sum(self.depths))]

    def replace(self, **overrides) -> ConvNeXtConfig:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown ConvNeXtConfig fields: {sorted(unknown)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "family": self.family}

    @classmethod
    def from_dict(cls, d: dict) -> ConvNeXtConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _convnext(size: str, depths, dims) -> ConvNeXtConfig:
    return ConvNeXtConfig(name=f"dinov3_convnext_{size}", depths=depths, dims=dims)


# facebookresearch/dinov3 `dinov3/models/convnext.py` `convnext_sizes` (the hub constructors
# `dinov3_convnext_{tiny,small,base,large}` use them with drop_path_rate 0, layer scale 1e-6).
CONVNEXT_ARCHITECTURES: dict[str, ConvNeXtConfig] = {
    c.name: c
    for c in (
        _convnext("tiny", (3, 3, 9, 3), (96, 192, 384, 768)),
        _convnext("small", (3, 3, 27, 3), (96, 192, 384, 768)),
        _convnext("base", (3, 3, 27, 3), (128, 256, 512, 1024)),
        _convnext("large", (3, 3, 27, 3), (192, 384, 768, 1536)),
    )
}


def get_convnext_config(name: str, **overrides) -> ConvNeXtConfig:
    """The official architecture `name` (e.g. 'dinov3_convnext_base'), with field overrides."""
    if name not in CONVNEXT_ARCHITECTURES:
        raise ValueError(
            f"unknown ConvNeXt architecture {name!r}; known: {sorted(CONVNEXT_ARCHITECTURES)}"
        )
    cfg = CONVNEXT_ARCHITECTURES[name]
    return cfg.replace(**overrides) if overrides else cfg


# ---------------------------------------------------------------------------------------------
# Parameter holders. Init: `ConvNeXt._init_weights` (trunc_normal std 0.02 for every Conv2d /
# Linear weight, zero biases, LayerNorms 1 / 0) and `init_weights` (gamma = layer_scale_init).
# ---------------------------------------------------------------------------------------------


class Conv(nnx.Module):
    """A k x k stride-k conv (stem: k = 4; downsampling: k = 2). Flax layout (k, k, in, out) =
    torch OIHW transposed (2, 3, 1, 0)."""

    def __init__(self, k: int, d_in: int, d_out: int, *, dtype, rngs: nnx.Rngs):
        self.kernel = _param(rngs, _trunc_normal(0.02), (k, k, d_in, d_out), dtype,
                             (None, None, None, "embed"))  # fmt: skip
        self.bias = _param(rngs, jax.nn.initializers.zeros, (d_out,), dtype, ("embed",))


class DepthwiseConv(nnx.Module):
    """7x7 depthwise conv, stacked over a stage's blocks: kernel (L, 7, 7, 1, C) (HWIO with one
    input channel per group) = torch (C, 1, 7, 7) transposed (2, 3, 1, 0)."""

    def __init__(self, dim: int, *, layers: int, dtype, rngs: nnx.Rngs):
        self.kernel = _param(rngs, _trunc_normal(0.02), (layers, 7, 7, 1, dim), dtype,
                             ("layers", None, None, None, "embed"))  # fmt: skip
        self.bias = _param(rngs, jax.nn.initializers.zeros, (layers, dim), dtype,
                           ("layers", "embed"))  # fmt: skip


class Stage(nnx.Module):
    """All blocks of one stage, parameters stacked on a leading axis of size `layers`."""

    def __init__(self, dim: int, cfg: ConvNeXtConfig, *, layers: int, dtype, rngs: nnx.Rngs):
        self.dwconv = DepthwiseConv(dim, layers=layers, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(dim, layers=layers, dtype=dtype, rngs=rngs)
        # pwconv1 / pwconv2 are nn.Linear in the official block (1x1 convs on channels-last x).
        self.pwconv1 = Linear(dim, 4 * dim, bias=True, names=("embed", "mlp"), layers=layers,
                              dtype=dtype, rngs=rngs)  # fmt: skip
        self.pwconv2 = Linear(4 * dim, dim, bias=True, names=("mlp", "embed"), layers=layers,
                              dtype=dtype, rngs=rngs)  # fmt: skip
        self.gamma = _param(rngs, _constant(cfg.layer_scale_init), (layers, dim), dtype,
                            ("layers", "norm"))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Pure functions: the computation
# ---------------------------------------------------------------------------------------------


def strided_conv(p: dict, x: Array, k: int) -> Array:
    """k x k conv with stride k and no padding (torch floors the output size: trailing rows /
    columns that do not fill a window are dropped). The windows do not overlap, so the conv is a
    patchify + matmul; patches are flattened (kh, kw, c), the order of the reshaped kernel."""
    b, h, w, c = x.shape
    h0, w0 = h // k, w // k
    x = x[:, : h0 * k, : w0 * k].reshape(b, h0, k, w0, k, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, h0, w0, k * k * c)
    kernel = p["kernel"].reshape(k * k * c, -1).astype(x.dtype)
    return jnp.einsum("bhwi,io->bhwo", x, kernel) + p["bias"].astype(x.dtype)


def depthwise_conv7(p: dict, x: Array) -> Array:
    """nn.Conv2d(C, C, kernel_size=7, padding=3, groups=C) on NHWC x."""
    y = jax.lax.conv_general_dilated(
        x, p["kernel"].astype(x.dtype), window_strides=(1, 1), padding=((3, 3), (3, 3)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1],
    )  # fmt: skip
    return y + p["bias"].astype(x.dtype)


def _drop_path(x: Array, rate, key: Array) -> Array:
    """Per-sample stochastic depth (`dinov3/models/convnext.py` `drop_path`): the branch of a
    sample is kept with probability 1 - rate and then divided by 1 - rate. `rate` may be traced
    (it only scales), so a stage with linspace rates still runs as one scan."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return (x / jnp.asarray(keep, x.dtype)) * mask.astype(x.dtype)


def block_forward(p: dict, x: Array, cfg: ConvNeXtConfig, *, rate=0.0, key=None) -> Array:
    """One ConvNeXt block (`dinov3/models/convnext.py` `Block.forward`): dwconv -> LayerNorm ->
    pwconv1 -> GELU (exact erf) -> pwconv2 -> gamma, added to the input through drop path."""
    dtype = x.dtype
    y = depthwise_conv7(p["dwconv"], x)
    y = layer_norm(p["norm"], y, cfg.layernorm_eps)
    y = checkpoint_name(_gelu(_dense(p["pwconv1"], y, dtype)), "mlp_hidden")
    y = _dense(p["pwconv2"], y, dtype) * p["gamma"].astype(dtype)
    if key is not None:
        y = _drop_path(y, rate, key)
    return with_logical_constraint(x + y, ("batch", None, None, None))


_CONVNEXT_REMAT = {
    "full": _REMAT["full"],
    "dots": _REMAT["dots"],
    "mlp": jax.checkpoint_policies.save_only_these_names("mlp_hidden"),
}


def run_stage(
    p: dict, x: Array, cfg: ConvNeXtConfig, rates: Sequence[float], *, key: Array | None = None
) -> Array:
    """The blocks of one stage over stacked parameters (`lax.scan`, or a Python loop when
    `scan_layers=False`). `rates`: the stage's slice of the linspace drop-path rates; `key`
    enables drop path (training)."""
    n = len(rates)
    train = key is not None and max(rates) > 0.0

    def body(h, pk):
        q, rate, k = pk
        return block_forward(q, h, cfg, rate=rate, key=k)

    if cfg.remat_policy != "none":
        body = jax.checkpoint(body, policy=_CONVNEXT_REMAT[cfg.remat_policy], prevent_cse=False)
    keys = jax.random.split(key, n) if train else None
    r = jnp.asarray(rates, jnp.float32) if train else None
    if cfg.scan_layers:
        x, _ = jax.lax.scan(lambda h, pk: (body(h, pk), None), x, (p, r, keys))
        return x
    for i in range(n):
        q = jax.tree.map(lambda a, i=i: a[i], p)
        x = body(x, (q, r[i] if train else None, keys[i] if train else None))
    return x


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class DinoConvNeXt(nnx.Module):
    """DINOv3 ConvNeXt backbone with the public API of `DinoVisionTransformer` (`forward_features`,
    `get_intermediate_layers`, `__call__` -> CLS). Parameter paths mirror the official keys."""

    def __init__(self, cfg: ConvNeXtConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = jnp.dtype(cfg.param_dtype)
        dims = cfg.dims

        # downsample_layers.0 = (stem conv, LN); downsample_layers.i = (LN, 2x2 conv), i = 1..3.
        def ln(d):
            return LayerNorm(d, layers=0, dtype=dt, rngs=rngs)

        layers = [nnx.List([Conv(4, 3, dims[0], dtype=dt, rngs=rngs), ln(dims[0])])]
        for i in range(1, 4):
            layers.append(nnx.List([ln(dims[i - 1]), Conv(2, dims[i - 1], dims[i], dtype=dt,
                                                           rngs=rngs)]))  # fmt: skip
        self.downsample_layers = nnx.List(layers)
        self.stages = nnx.List(
            [Stage(dims[i], cfg, layers=cfg.depths[i], dtype=dt, rngs=rngs) for i in range(4)]
        )
        self.norm = LayerNorm(dims[-1], layers=0, dtype=dt, rngs=rngs)

    # -- helpers ------------------------------------------------------------------------------

    def params(self) -> dict:
        """The parameters as a plain nested dict of arrays (list indices are int keys)."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def _check(self, x: Array) -> None:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected NHWC images with 3 channels, got shape {x.shape}")
        if x.shape[1] < 32 or x.shape[2] < 32:
            raise ValueError(
                f"image size {x.shape[1]}x{x.shape[2]} is smaller than the output stride (32)"
            )

    def _stages(self, params: dict, x: Array, stop: int, key: Array | None):
        """Yields (stage index, output) of stages 0 .. stop-1 (`forward_features_list` loop)."""
        cfg = self.cfg
        eps = cfg.layernorm_eps
        rates = cfg.drop_path_rates()
        keys = jax.random.split(key, 4) if key is not None else [None] * 4
        x = x.astype(jnp.dtype(cfg.dtype))
        start = 0
        for i in range(stop):
            ds = params["downsample_layers"][i]
            if i == 0:
                x = layer_norm(ds[1], strided_conv(ds[0], x, 4), eps)
            else:
                x = strided_conv(ds[1], layer_norm(ds[0], x, eps), 2)
            x = with_logical_constraint(x, ("batch", None, None, None))
            n = cfg.depths[i]
            x = run_stage(params["stages"][i], x, cfg, rates[start : start + n], key=keys[i])
            start += n
            yield i, x

    @staticmethod
    def _pool(x: Array) -> Array:
        # Global average pool over (H, W): `x.mean([-2, -1])` on NCHW, here in float32.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)

    # -- public API ---------------------------------------------------------------------------

    def forward_features(
        self, x: Array, masks: Array | None = None, *, key: Array | None = None
    ) -> dict[str, Array]:
        """Official `forward_features` (`ConvNeXt.forward_features_list`): the pooled last stage
        and its (H/32 * W/32) tokens, normalised together by `norm`. `x_prenorm` holds the
        un-normalised patch tokens only (no pooled token), `x_storage_tokens` is empty (the
        official `n_storage_tokens = 0`). `masks` is passed through unused, as officially.
        `key` enables stochastic depth (training)."""
        self._check(x)
        params = self.params()
        *_, (_, x) = self._stages(params, x, 4, key)
        b, h, w, d = x.shape
        tokens = x.reshape(b, h * w, d)
        t = jnp.concatenate([self._pool(x)[:, None], tokens], axis=1)
        n = layer_norm(params["norm"], t, self.cfg.layernorm_eps)
        return {
            "x_norm_clstoken": n[:, 0],
            "x_storage_tokens": n[:, 1:1],
            "x_norm_patchtokens": n[:, 1:],
            "x_prenorm": tokens,
            "masks": masks,
        }

    def __call__(self, x: Array) -> Array:
        """Normalised CLS (pooled) features, like the official `forward(x)`."""
        return self.forward_features(x)["x_norm_clstoken"]

    def get_intermediate_layers(
        self,
        x: Array,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last `n` stages (or of the 0-based stages listed in `n`), official
        semantics (`ConvNeXt.get_intermediate_layers`): the "class token" of a stage is its
        global average pool; with `norm` only the last stage is normalised (the official
        `norms` are Identity for stages 0-2 and `norm` for stage 3). Patches are (B, h*w, C_i),
        or (B, h, w, C_i) with `reshape` (NHWC where the official code gives NCHW).

        Outputs come in stage order. The official code pairs the listed `norms` with the outputs
        in the order of `n` while producing the outputs in stage order; for sorted `n` (every
        int `n`) that is the pairing here, for unsorted `n` it would normalise the wrong stage
        (or fail on the channel count), so here each stage keeps its own norm."""
        take = list(range(4 - n, 4)) if isinstance(n, int) else [int(i) for i in n]
        if not take or any(i < 0 or i > 3 for i in take):
            raise ValueError(f"stage indices {take} out of range for the 4 ConvNeXt stages")
        if len(set(take)) != len(take):
            raise ValueError(f"stage indices {take} contain duplicates")
        self._check(x)
        params = self.params()
        eps = self.cfg.layernorm_eps
        results = []
        for i, y in self._stages(params, x, max(take) + 1, None):
            if i not in take:
                continue
            b, h, w, d = y.shape
            cls, patches = self._pool(y), y.reshape(b, h * w, d)
            if norm and i == 3:
                cls = layer_norm(params["norm"], cls, eps)
                patches = layer_norm(params["norm"], patches, eps)
            if reshape:
                patches = patches.reshape(b, h, w, d)
            results.append((patches, cls) if return_class_token else patches)
        return tuple(results)


def create_convnext(name: str | ConvNeXtConfig, *, seed: int = 0, **overrides) -> DinoConvNeXt:
    """Build an official DINOv3 ConvNeXt by name (e.g. 'dinov3_convnext_tiny') with random
    weights. Overrides change config fields: drop_path_rate, dtype, remat_policy, depths, ..."""
    if isinstance(name, ConvNeXtConfig):
        cfg = name.replace(**overrides)
    else:
        cfg = get_convnext_config(name, **overrides)
    return DinoConvNeXt(cfg, rngs=nnx.Rngs(params=seed))


def abstract_convnext_params(cfg: ConvNeXtConfig) -> dict:
    """Shapes/dtypes of the parameter dict without allocating it."""
    model = nnx.eval_shape(lambda: DinoConvNeXt(cfg, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# The name `dinojax.models.create_model` dispatches to for "dinov3_convnext*".
create_model = create_convnext
