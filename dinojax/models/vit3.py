"""The DINOv3 vision transformer (ViT-S/16 to ViT-7B/16), readable top to bottom.

Flax NNX `DinoV3VisionTransformer` following facebookresearch/dinov3
`dinov3/models/vision_transformer.py` `DinoVisionTransformer` (docs/parity.md "DINOv3
backbones"). Same conventions as the DINOv2 model in `dinojax.models.vit`, whose parameter holders
and numerics it reuses: modules only hold parameters named like the official state-dict keys, the
computation is pure functions over the parameter dict, the blocks are stacked and scanned, every
parameter carries logical sharding names.

What differs from DINOv2: no learned position embedding but axial RoPE on the patch tokens
(`rope_*` below), 4 storage tokens after CLS that RoPE leaves alone, a key-bias mask in the qkv
projection, SwiGLU with separate w1/w2/w3, LayerNorm eps 1e-5, optional untied CLS norms, and
batch-subset stochastic depth at every rate. Images are NHWC float32, already normalised.
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

from dinojax.models.config_v3 import FFN_ALIGN, DinoV3Config
from dinojax.models.vit import (
    _REMAT,
    LayerNorm,
    LayerScale,
    Linear,
    Mlp,
    PatchEmbed,
    _dense,
    _drop_add_residual,
    _gelu,
    _param,
    attention_probs,
    dot_product_attention,
    layer_norm,
)

Array = jax.Array

# ---------------------------------------------------------------------------------------------
# Parameter holders (official keys: `blocks.{i}.attn.qkv`, `mlp.w1/w2/w3`, `ls1.gamma`, ...)
# ---------------------------------------------------------------------------------------------


class Attention(nnx.Module):
    def __init__(self, cfg: DinoV3Config, *, layers, dtype, rngs):
        d = cfg.embed_dim
        # The official `qkv.bias_mask` buffer is not a parameter: it is fixed by the architecture
        # (`LinearKMaskedBias`, [1 | 0 | 1]) and applied in `_qkv`; the converter writes it back.
        self.qkv = Linear(
            d, 3 * d, bias=cfg.qkv_bias, names=("embed", "qkv"), layers=layers, dtype=dtype,
            rngs=rngs,
        )  # fmt: skip
        self.proj = Linear(
            d, d, bias=cfg.proj_bias, names=("qkv", "embed"), layers=layers, dtype=dtype, rngs=rngs
        )


class SwiGLUFFN(nnx.Module):
    """`dinov3/layers/ffn_layers.py` `SwiGLUFFN`: w3(silu(w1 x) * w2 x), three separate Linears."""

    def __init__(self, cfg: DinoV3Config, *, layers, dtype, rngs):
        d, h, b = cfg.embed_dim, cfg.ffn_hidden_dim, cfg.ffn_bias
        kw = dict(bias=b, layers=layers, dtype=dtype, rngs=rngs)
        self.w1 = Linear(d, h, names=("embed", "mlp"), **kw)
        self.w2 = Linear(d, h, names=("embed", "mlp"), **kw)
        self.w3 = Linear(
            h, d, bias=b, names=("mlp", "embed"), layers=layers, dtype=dtype, rngs=rngs
        )


class Block(nnx.Module):
    """`dinov3/layers/block.py` `SelfAttentionBlock`; all blocks stacked in one instance."""

    def __init__(self, cfg: DinoV3Config, *, layers: int, dtype, rngs: nnx.Rngs):
        d = cfg.embed_dim
        self.norm1 = LayerNorm(d, layers=layers, dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg, layers=layers, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(d, layers=layers, dtype=dtype, rngs=rngs)
        ffn = SwiGLUFFN if cfg.ffn_layer in FFN_ALIGN else Mlp
        self.mlp = ffn(cfg, layers=layers, dtype=dtype, rngs=rngs)
        if cfg.layerscale_init:
            self.ls1 = LayerScale(d, cfg.layerscale_init, layers=layers, dtype=dtype, rngs=rngs)
            self.ls2 = LayerScale(d, cfg.layerscale_init, layers=layers, dtype=dtype, rngs=rngs)


# ---------------------------------------------------------------------------------------------
# RoPE (`dinov3/layers/rope_position_encoding.py` `RopePositionEmbedding`), float32 throughout
# ---------------------------------------------------------------------------------------------


def rope_periods(cfg: DinoV3Config) -> np.ndarray:
    """The `rope_embed.periods` buffer: base ** (2k / (D_head / 2)) for k < D_head / 4.

    The exponent is rounded to float32 first and the power rounded once from float64, which is
    bit for bit what the official float32 `_init_weights` stores (pinned in the tests)."""
    dh = cfg.head_dim
    expo = (2 * np.arange(dh // 4, dtype=np.float32)) / np.float32(dh // 2)
    return (np.float64(cfg.rope_base) ** expo.astype(np.float64)).astype(np.float32)


def rope_coords(h: int, w: int, normalize: str = "separate") -> np.ndarray:
    """(h * w, 2) float32 patch-centre coordinates (y, x) in [-1, 1], row-major: (arange + 0.5)
    divided by the side ("separate"), or by the shorter / longer side ("min" / "max")."""
    div = {"separate": (h, w), "min": (min(h, w),) * 2, "max": (max(h, w),) * 2}[normalize]
    ch = (np.arange(h, dtype=np.float32) + np.float32(0.5)) / np.float32(div[0])
    cw = (np.arange(w, dtype=np.float32) + np.float32(0.5)) / np.float32(div[1])
    coords = np.stack(np.meshgrid(ch, cw, indexing="ij"), axis=-1).reshape(-1, 2)
    return (np.float32(2.0) * coords - np.float32(1.0)).astype(np.float32)


def augment_coords(coords: Array, key: Array, cfg: DinoV3Config) -> Array:
    """Training-time coordinate augmentations, one draw for the whole batch: shift by
    U(-shift, shift) per axis, then scale by exp(U(-log jitter, log jitter)) per axis, then by
    exp(U(-log rescale, log rescale)) shared by both axes (`RopePositionEmbedding.forward`)."""
    k_shift, k_jitter, k_rescale = jax.random.split(key, 3)
    coords = jnp.asarray(coords, jnp.float32)
    if cfg.rope_shift_coords is not None:
        s = cfg.rope_shift_coords
        coords = coords + jax.random.uniform(k_shift, (2,), jnp.float32, -s, s)[None]
    if cfg.rope_jitter_coords is not None:
        j = math.log(cfg.rope_jitter_coords)
        coords = coords * jnp.exp(jax.random.uniform(k_jitter, (2,), jnp.float32, -j, j))[None]
    if cfg.rope_rescale_coords is not None:
        r = math.log(cfg.rope_rescale_coords)
        coords = coords * jnp.exp(jax.random.uniform(k_rescale, (1,), jnp.float32, -r, r))
    return coords


def rope_sincos(coords: Array, periods: Array) -> tuple[Array, Array]:
    """(sin, cos), each (h * w, D_head) float32: angles 2 pi c / period laid out [y | x] and tiled
    twice, matching the halves `rope_rotate_half` swaps."""
    two_pi = np.float32(2 * math.pi)  # the official Python scalar, applied in float32
    angles = two_pi * jnp.asarray(coords, jnp.float32)[:, :, None] / jnp.asarray(periods)
    angles = angles.reshape(angles.shape[0], -1)  # [y periods | x periods]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.sin(angles), jnp.cos(angles)


def _rotate_half(x: Array) -> Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: Array, sin: Array, cos: Array) -> Array:
    """x (B, N, heads, D_head): the last h * w tokens rotated, the prefix (CLS + storage) kept.
    Computed in the float32 of sin/cos and cast back (`SelfAttention.apply_rope`)."""
    n_prefix = x.shape[1] - sin.shape[0]
    xf = x.astype(jnp.float32)
    patches = xf[:, n_prefix:]
    s, c = sin[None, :, None, :], cos[None, :, None, :]
    patches = patches * c + _rotate_half(patches) * s
    return jnp.concatenate([xf[:, :n_prefix], patches], axis=1).astype(x.dtype)


def _rope_for(cfg: DinoV3Config, coords: np.ndarray, key: Array | None):
    periods = jnp.asarray(rope_periods(cfg))
    if key is not None:
        return rope_sincos(augment_coords(coords, key, cfg), periods)
    return rope_sincos(coords, periods)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


def _qkv(p: dict, x: Array, cfg: DinoV3Config, dtype, rope):
    b, n, _ = x.shape
    lin = p["qkv"]
    if cfg.has_bias_mask:
        # `LinearKMaskedBias.forward`: bias * bias_mask, the mask zero on the key third.
        d = cfg.embed_dim
        mask = jnp.concatenate([jnp.ones(d), jnp.zeros(d), jnp.ones(d)]).astype(lin["bias"].dtype)
        lin = {**lin, "bias": lin["bias"] * mask}
    qkv = checkpoint_name(_dense(lin, x, dtype), "qkv")
    qkv = qkv.reshape(b, n, 3, cfg.num_heads, cfg.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if rope is not None:
        sin, cos = rope
        q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
    return q, k, v


def _attention(p: dict, x: Array, cfg: DinoV3Config, dtype, rope) -> Array:
    b, n, d = x.shape
    q, k, v = _qkv(p, x, cfg, dtype, rope)
    o = dot_product_attention(
        q, k, v, scale=cfg.head_dim**-0.5, implementation=cfg.attention, name="attn_out"
    )
    o = o.reshape(b, n, d)
    return _dense(p["proj"], o, dtype)


def _ffn(p: dict, x: Array, cfg: DinoV3Config, dtype) -> Array:
    if cfg.ffn_layer in FFN_ALIGN:
        x1 = checkpoint_name(_dense(p["w1"], x, dtype), "mlp_hidden")
        x2 = checkpoint_name(_dense(p["w2"], x, dtype), "mlp_hidden")
        return _dense(p["w3"], jax.nn.silu(x1) * x2, dtype)
    h = checkpoint_name(_gelu(_dense(p["fc1"], x, dtype)), "mlp_hidden")
    return _dense(p["fc2"], h, dtype)


def block_forward(
    p: dict,
    x: Array,
    cfg: DinoV3Config,
    rope,
    *,
    rate: float = 0.0,
    key: Array | None = None,
    drop_groups: int = 1,
) -> Array:
    """x + ls1(attn(norm1(x), rope)), then x + ls2(mlp(norm2(x))). With `key` and a rate > 0:
    batch-subset stochastic depth at any rate, a fresh subset for each residual
    (`dinov3/layers/block.py` `SelfAttentionBlock._forward`)."""
    dtype = x.dtype
    eps = cfg.layernorm_eps

    def attn_res(y):
        y = _attention(p["attn"], layer_norm(p["norm1"], y, eps), cfg, dtype, rope)
        return y * p["ls1"]["gamma"].astype(dtype) if "ls1" in p else y

    def ffn_res(y):
        y = _ffn(p["mlp"], layer_norm(p["norm2"], y, eps), cfg, dtype)
        return y * p["ls2"]["gamma"].astype(dtype) if "ls2" in p else y

    if key is None or rate == 0.0:
        x = x + attn_res(x)
        x = x + ffn_res(x)
    else:
        # RoPE has no batch axis (one draw per batch), so the subset reuses it unindexed
        # (`SelfAttentionBlock._maybe_index_rope`).
        k1, k2 = jax.random.split(key)
        x = _drop_add_residual(x, attn_res, rate, k1, True, drop_groups)
        x = _drop_add_residual(x, ffn_res, rate, k2, True, drop_groups)
    return with_logical_constraint(x, ("batch", None, None))


def _augments(cfg: DinoV3Config) -> bool:
    return any(
        v is not None
        for v in (cfg.rope_shift_coords, cfg.rope_jitter_coords, cfg.rope_rescale_coords)
    )


def run_blocks(
    blocks: dict,
    x: Array,
    cfg: DinoV3Config,
    coords: np.ndarray,
    start: int,
    stop: int,
    *,
    key: Array | None = None,
    drop_groups: int = 1,
) -> Array:
    """Blocks [start, stop). Eval: one RoPE table for all blocks. Training (`key`): the official
    model calls `rope_embed` once per block, so every block draws its own coordinate
    augmentation, and its own drop-path subsets (the rate is the same in every block)."""
    if stop <= start:
        return x
    sl = jax.tree.map(lambda a: a[start:stop], blocks)
    rate = float(cfg.drop_path_rate)
    train = key is not None and (rate > 0.0 or _augments(cfg))
    rope_fixed = None if train else _rope_for(cfg, coords, None)

    def body(h, p, k):
        if k is None:
            return block_forward(p, h, cfg, rope_fixed)
        k_rope, k_drop = jax.random.split(k)
        rope = _rope_for(cfg, coords, k_rope if _augments(cfg) else None)
        return block_forward(p, h, cfg, rope, rate=rate, key=k_drop, drop_groups=drop_groups)

    if cfg.remat_policy != "none":
        body = jax.checkpoint(body, policy=_REMAT[cfg.remat_policy], prevent_cse=False)
    keys = jax.random.split(key, cfg.depth)[start:stop] if train else None
    if cfg.scan_layers:
        if train:
            x, _ = jax.lax.scan(lambda h, pk: (body(h, pk[0], pk[1]), None), x, (sl, keys))
        else:
            x, _ = jax.lax.scan(lambda h, p: (body(h, p, None), None), x, sl)
        return x
    for i in range(stop - start):
        p_i = jax.tree.map(lambda a, i=i: a[i], sl)
        x = body(x, p_i, keys[i] if train else None)
    return x


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class DinoV3VisionTransformer(nnx.Module):
    """DINOv3 ViT with the interface of `dinojax.models.vit.DinoVisionTransformer` (same methods,
    same output keys, plus `x_storage_tokens` and `return_extra_tokens`)."""

    def __init__(self, cfg: DinoV3Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = jnp.dtype(cfg.param_dtype)
        d = cfg.embed_dim
        # `DinoVisionTransformer.init_weights`: CLS and storage tokens N(0, 0.02), mask token 0.
        self.patch_embed = PatchEmbed(cfg, dtype=dt, rngs=rngs)
        normal = jax.nn.initializers.normal(0.02)
        self.cls_token = _param(rngs, normal, (1, 1, d), dt, (None, None, "embed"))
        if cfg.num_storage_tokens:
            self.storage_tokens = _param(
                rngs, normal, (1, cfg.num_storage_tokens, d), dt, (None, None, "embed")
            )
        self.mask_token = _param(rngs, jax.nn.initializers.zeros, (1, d), dt, (None, "embed"))
        self.blocks = Block(cfg, layers=cfg.depth, dtype=dt, rngs=rngs)
        self.norm = LayerNorm(d, layers=0, dtype=dt, rngs=rngs)
        if cfg.untie_cls_and_patch_norms:
            self.cls_norm = LayerNorm(d, layers=0, dtype=dt, rngs=rngs)
        if cfg.untie_global_and_local_cls_norm:
            self.local_cls_norm = LayerNorm(d, layers=0, dtype=dt, rngs=rngs)

    # -- helpers ------------------------------------------------------------------------------

    def params(self) -> dict:
        """The parameters as a plain nested dict of arrays."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def _grid(self, x: Array) -> tuple[int, int]:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected NHWC images with 3 channels, got shape {x.shape}")
        p = self.cfg.patch_size
        h, w = x.shape[1], x.shape[2]
        if h < p or w < p:
            raise ValueError(f"image size {h}x{w} is smaller than one patch ({p})")
        return h // p, w // p  # the strided conv drops the remainder pixels (no assert in v3)

    def _coords(self, x: Array) -> np.ndarray:
        h0, w0 = self._grid(x)
        return rope_coords(h0, w0, self.cfg.rope_normalize_coords)

    def prepare_tokens(self, params: dict, x: Array, masks: Array | None = None) -> Array:
        """[CLS, storage tokens, patch embeddings] (`prepare_tokens_with_masks`); no position
        is added here, RoPE acts inside attention."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        b = x.shape[0]
        h0, w0 = self._grid(x)
        p, d = cfg.patch_size, cfg.embed_dim
        x = x[:, : h0 * p, : w0 * p].astype(dtype)
        x = x.reshape(b, h0, p, w0, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, h0 * w0, -1)
        pe = params["patch_embed"]["proj"]
        t = x @ pe["kernel"].reshape(-1, d).astype(dtype) + pe["bias"].astype(dtype)
        if masks is not None:
            if masks.shape != (b, h0 * w0):
                raise ValueError(f"masks must have shape {(b, h0 * w0)}, got {masks.shape}")
            t = jnp.where(masks[..., None], params["mask_token"].astype(dtype)[None], t)
        parts = [jnp.broadcast_to(params["cls_token"].astype(dtype), (b, 1, d))]
        if cfg.num_storage_tokens:
            st = params["storage_tokens"].astype(dtype)
            parts.append(jnp.broadcast_to(st, (b, cfg.num_storage_tokens, d)))
        t = jnp.concatenate([*parts, t], axis=1)
        return with_logical_constraint(t, ("batch", None, None))

    def _norm_prefix(self, params: dict, t: Array, *, local: bool = False) -> Array:
        """The norm of CLS + storage tokens: `local_cls_norm` for local crops in training,
        `cls_norm` when untied, else the shared `norm` (`forward_features_list`)."""
        eps = self.cfg.layernorm_eps
        if local and "local_cls_norm" in params:
            return layer_norm(params["local_cls_norm"], t, eps)
        if "cls_norm" in params:
            return layer_norm(params["cls_norm"], t, eps)
        return layer_norm(params["norm"], t, eps)

    # -- public API ---------------------------------------------------------------------------

    def forward_features(
        self,
        x: Array,
        masks: Array | None = None,
        *,
        key: Array | None = None,
        drop_groups: int = 1,
        local_crops: bool = False,
    ) -> dict[str, Array]:
        """Official `forward_features`. `key` turns on training behaviour (stochastic depth, RoPE
        coordinate augmentations); `local_crops` marks the batch as the local crops of a training
        step, normalised by `local_cls_norm` where the model has one."""
        params = self.params()
        cfg = self.cfg
        t = self.prepare_tokens(params, x, masks)
        coords = self._coords(x)
        t = run_blocks(params["blocks"], t, cfg, coords, 0, cfg.depth, key=key,
                       drop_groups=drop_groups)  # fmt: skip
        r1 = 1 + cfg.num_storage_tokens
        prefix = self._norm_prefix(params, t[:, :r1], local=local_crops)
        patches = layer_norm(params["norm"], t[:, r1:], cfg.layernorm_eps)
        return {
            "x_norm_clstoken": prefix[:, 0],
            "x_storage_tokens": prefix[:, 1:],
            "x_norm_regtokens": prefix[:, 1:],  # the v2 name, for tools written for both
            "x_norm_patchtokens": patches,
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
        return_extra_tokens: bool = False,
    ) -> tuple:
        """Outputs of the last `n` blocks (or the 0-based blocks listed), in block order, with
        the official semantics (`get_intermediate_layers`): `norm` applies the final norm (the
        untied `cls_norm` to CLS + storage tokens where the model has one), `reshape` gives
        (B, h, w, D) (NHWC, like the rest of dinojax), and each entry is patches, or a tuple
        (patches, cls), (patches, storage) or (patches, cls, storage)."""
        cfg = self.cfg
        depth = cfg.depth
        take = list(range(depth - n, depth)) if isinstance(n, int) else [int(i) for i in n]
        if not take or any(i < 0 or i >= depth for i in take):
            raise ValueError(f"block indices {take} out of range for depth {depth}")
        if len(set(take)) != len(take):
            raise ValueError(f"block indices {take} contain duplicates")
        take = sorted(take)
        params = self.params()
        h0, w0 = self._grid(x)
        coords = self._coords(x)
        t = self.prepare_tokens(params, x)
        outs, pos = [], 0
        for i in take:
            t = run_blocks(params["blocks"], t, cfg, coords, pos, i + 1)
            outs.append(t)
            pos = i + 1
        r1 = 1 + cfg.num_storage_tokens
        results = []
        for o in outs:
            if norm:
                prefix = self._norm_prefix(params, o[:, :r1])
                patches = layer_norm(params["norm"], o[:, r1:], cfg.layernorm_eps)
                o = jnp.concatenate([prefix, patches], axis=1)
            cls, extra, patches = o[:, 0], o[:, 1:r1], o[:, r1:]
            if reshape:
                patches = patches.reshape(x.shape[0], h0, w0, -1)
            entry = (patches,)
            if return_class_token:
                entry += (cls,)
            if return_extra_tokens:
                entry += (extra,)
            results.append(entry if len(entry) > 1 else patches)
        return tuple(results)

    def get_last_self_attention(self, x: Array) -> Array:
        """Attention probabilities of the last block, (B, heads, N, N) with N = 1 + storage +
        patches, RoPE applied to the patch queries and keys."""
        cfg = self.cfg
        params = self.params()
        coords = self._coords(x)
        t = self.prepare_tokens(params, x)
        t = run_blocks(params["blocks"], t, cfg, coords, 0, cfg.depth - 1)
        last = jax.tree.map(lambda a: a[cfg.depth - 1], params["blocks"])
        y = layer_norm(last["norm1"], t, cfg.layernorm_eps)
        q, k, _ = _qkv(last["attn"], y, cfg, t.dtype, _rope_for(cfg, coords, None))
        return attention_probs(q, k, cfg.head_dim**-0.5)


def create_model(
    name: str | DinoV3Config, *, seed: int = 0, **overrides
) -> DinoV3VisionTransformer:
    """A DINOv3 ViT by hub name (e.g. 'dinov3_vitb16') with random weights; overrides change
    config fields (depth, dtype, attention, remat_policy, drop_path_rate, ...)."""
    from dinojax.models.config import get_config

    cfg = (
        name.replace(**overrides)
        if isinstance(name, DinoV3Config)
        else get_config(name, **overrides)
    )
    if not isinstance(cfg, DinoV3Config):
        raise ValueError(f"{cfg.name!r} is not a DINOv3 ViT")
    return DinoV3VisionTransformer(cfg, rngs=nnx.Rngs(params=seed))


def abstract_params(cfg: DinoV3Config) -> dict:
    """Shapes/dtypes of the parameter dict without allocating it."""
    model = nnx.eval_shape(lambda: DinoV3VisionTransformer(cfg, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
