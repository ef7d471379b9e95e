"""The official optimizer recipe: parameter groups, schedules, AdamW, clipping, last-layer freeze.

Everything here is a pure function of the integer step (schedules) or of plain parameter trees,
so the training step computes lr / wd / momentum / teacher temperature INSIDE the jit from
`state["step"]` (jax-ecosystem.md pitfall 25) and never recompiles.

Parameter groups (official-dino.md §4.3) become *per-leaf multipliers*. Blocks are stacked in
dinojax (leading axis = depth), so the layer-wise lr decay of a block parameter is an array along
that axis, `decay ** (L - i)` for block i, shaped (L, 1, ..., 1) to broadcast over the leaf.

AdamW. Written out instead of `optax.adamw` for two reasons: the lr / wd multipliers are arrays
(optax schedules are scalars), and DINO v1 freezes its last layer by *skipping* it (torch gives
those parameters no gradient, so AdamW leaves their moments AND their step count alone), which
needs a step count per parameter. The update is optax's decoupled form
`p <- p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)`, which equals torch's
`p *= 1 - lr * wd; p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)` (both use the OLD p in the
decay term); tests/ssl/test_optim.py checks it against both optax.adamw and torch.optim.AdamW.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

LAYER0_NAMES = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")
STUDENT_SUBMODULES = ("backbone", "dino_head", "ibot_head")


# ---------------------------------------------------------------------------------------------
# Schedules (official-dino.md §4.2)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cosine:
    """`dinov2.utils.utils.CosineScheduler` as a jit-friendly function of the iteration.

    schedule = [0] * freeze + linspace(start_warmup, base, warmup) + cosine(base -> final) over the
    remaining `total - warmup - freeze` iterations; any it >= total gives `final`.
    `zero_until` reproduces the official last-layer trick `schedule[:n] = 0` (it overwrites the
    first n entries, warmup included, rather than shifting the schedule like `freeze`).
    """

    base: float
    final: float
    total: int
    warmup: int = 0
    start_warmup: float = 0.0
    freeze: int = 0
    zero_until: int = 0

    def __post_init__(self):
        if self.total < self.warmup + self.freeze or min(self.total, self.warmup, self.freeze) < 0:
            raise ValueError(
                f"schedule lengths must satisfy 0 <= warmup + freeze <= total, got {self}"
            )

    def __call__(self, it) -> Array:
        it = jnp.asarray(it, jnp.int32)
        f32 = jnp.float32
        n_cos = self.total - self.warmup - self.freeze
        # Warmup: np.linspace(start, base, w) = start + i * (base - start) / (w - 1), last = base.
        i_w = it - self.freeze
        if self.warmup > 1:
            step = (self.base - self.start_warmup) / (self.warmup - 1)
            warm = jnp.where(
                i_w == self.warmup - 1,
                f32(self.base),
                f32(self.start_warmup) + i_w.astype(f32) * f32(step),
            )
        else:
            warm = jnp.full((), self.start_warmup, f32)
        # Cosine: final + 0.5 (base - final)(1 + cos(pi i / n)). Written as base + (final - base)
        # sin^2(pi i / 2n) in the first half and final + (base - final) sin^2(pi (n - i) / 2n) in
        # the second, so each half adds a term at most half the range to its own endpoint: full
        # float32 relative precision everywhere (1 + cos(.) cancels at the end of the lr schedule,
        # which ends at base / 4000, and a rising wd schedule would cancel at its start).
        if n_cos > 0:
            i_c = it - self.freeze - self.warmup
            half = f32(math.pi / 2)
            s_a = jnp.sin(half * (i_c.astype(f32) / f32(n_cos)))
            s_b = jnp.sin(half * ((n_cos - i_c).astype(f32) / f32(n_cos)))
            first = f32(self.base) + f32(self.final - self.base) * s_a * s_a
            second = f32(self.final) + f32(self.base - self.final) * s_b * s_b
            cos = jnp.where(2 * i_c < n_cos, first, second)
        else:
            cos = jnp.full((), self.final, f32)
        value = jnp.where(i_w < self.warmup, warm, cos)
        value = jnp.where(it < self.freeze, f32(0.0), value)
        value = jnp.where(it < self.zero_until, f32(0.0), value)
        return jnp.where(it >= self.total, f32(self.final), value)


def scaled_lr(config) -> float:
    """Base lr after the batch-size scaling rule (official-dino.md §4.1)."""
    o = config.optim
    rule = o.lr_scaling
    if rule == "sqrt_wrt_1024":
        return o.base_lr * math.sqrt(config.batch_size / 1024.0)
    if rule == "linear_wrt_256":  # DINO v1: lr * batch / 256
        return o.base_lr * config.batch_size / 256.0
    if rule == "none":
        return float(o.base_lr)
    raise ValueError(
        f"optim.lr_scaling must be sqrt_wrt_1024, linear_wrt_256 or none; got {rule!r}"
    )


def total_steps(config) -> int:
    return int(config.optim.epochs) * int(config.optim.epoch_length)


@dataclasses.dataclass(frozen=True)
class Schedules:
    """All per-iteration values of the recipe; `__call__(step)` returns traced float32 scalars."""

    lr: Cosine
    last_layer_lr: Cosine
    wd: Cosine
    momentum: Cosine
    teacher_temp: Cosine
    teacher_temp_per_epoch: bool
    epoch_length: int

    def __call__(self, step) -> dict[str, Array]:
        step = jnp.asarray(step, jnp.int32)
        t_it = step // self.epoch_length if self.teacher_temp_per_epoch else step
        return {
            "lr": self.lr(step),
            "last_layer_lr": self.last_layer_lr(step),
            "wd": self.wd(step),
            "momentum": self.momentum(step),
            "teacher_temp": self.teacher_temp(t_it),
        }


def make_schedules(config) -> Schedules:
    """The official schedules of a config (dinov2 train.py build_schedulers / DINO v1 main)."""
    o, loss = config.optim, config.loss
    ep = int(o.epoch_length)
    total = total_steps(config)
    lr = Cosine(scaled_lr(config), o.min_lr, total, warmup=int(o.warmup_epochs) * ep)
    freeze = int(o.freeze_last_layer_epochs) * ep
    if o.freeze_mode == "lr_zero":  # v2: the last layer's lr is 0 (moments still accumulate)
        last = dataclasses.replace(lr, zero_until=freeze)
    elif o.freeze_mode == "skip":  # v1: handled by `last_layer_active`, not by the lr
        last = lr
    else:
        raise ValueError(f"optim.freeze_mode must be 'lr_zero' or 'skip', got {o.freeze_mode!r}")
    per = loss.teacher_temp_per
    if per not in ("step", "epoch"):
        raise ValueError(f"loss.teacher_temp_per must be 'step' or 'epoch', got {per!r}")
    # v2 warms the temperature up per iteration; v1 per epoch (np.linspace over epochs).
    w = int(loss.warmup_teacher_temp_epochs) * (ep if per == "step" else 1)
    temp = Cosine(loss.teacher_temp, loss.teacher_temp, w, warmup=w,
                  start_warmup=loss.warmup_teacher_temp)  # fmt: skip
    return Schedules(
        lr=lr,
        last_layer_lr=last,
        wd=Cosine(o.weight_decay, o.weight_decay_end, total),
        momentum=Cosine(o.momentum_teacher, o.final_momentum_teacher, total),
        teacher_temp=temp,
        teacher_temp_per_epoch=per == "epoch",
        epoch_length=ep,
    )


def last_layer_active(config, step) -> Array:
    """v1 freeze (`cancel_gradients_last_layer`): the last layer is skipped while epoch < n."""
    o = config.optim
    if o.freeze_mode != "skip":
        return jnp.ones((), bool)
    return jnp.asarray(step, jnp.int32) >= int(o.freeze_last_layer_epochs) * int(o.epoch_length)


# ---------------------------------------------------------------------------------------------
# Parameter groups (official-dino.md §4.3)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class LeafGroup:
    """Optimizer treatment of one parameter leaf (a pytree leaf itself: not registered).

    lr_mult: float32 array broadcastable to the leaf ((L, 1, ...) for stacked blocks).
    wd_mult: weight-decay multiplier. last_layer: uses the last-layer lr / freeze.
    trainable: False only for v1's frozen weight_g (norm_last_layer). stacked: leading axis is
    the block index (per-tensor clipping then works per block).
    """

    name: str
    lr_mult: np.ndarray
    wd_mult: float
    last_layer: bool
    trainable: bool
    stacked: bool


def _paths(tree: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in tree.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        out += _paths(v, name) if isinstance(v, Mapping) else [(name, v)]
    return out


def _rebuild(tree: Mapping, values: dict[str, Any], prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        out[k] = _rebuild(v, values, name) if isinstance(v, Mapping) else values[name]
    return out


def _v2_group(sub: str, name: str, shape, depth: int, o) -> LeafGroup:
    # dinov2/utils/param_groups.py: lr_multiplier = decay ** (L + 1 - layer_id) per submodule
    # (heads: layer_id = L + 1 -> 1), x patch_embed_lr_mult; wd 0 for biases, norms, gamma.
    decay = float(o.layerwise_decay)
    stacked = sub == "backbone" and name.startswith("blocks.")
    mult: Any = 1.0
    if sub == "backbone":
        if any(t in name for t in LAYER0_NAMES):
            mult = decay ** (depth + 1)
        elif stacked:
            mult = np.array([decay ** (depth - i) for i in range(depth)], np.float64)
            mult = mult.reshape((depth,) + (1,) * (len(shape) - 1))
    if "patch_embed" in name:
        mult = mult * float(o.patch_embed_lr_mult)
    no_wd = name.endswith("bias") or "norm" in name or "gamma" in name
    return LeafGroup(name, np.asarray(mult, np.float32), 0.0 if no_wd else 1.0,
                     "last_layer" in name, True, stacked)  # fmt: skip


def _v1_group(sub: str, name: str, shape, config) -> LeafGroup:
    # DINO v1 utils.get_params_groups: no decay for biases and 1-d tensors (torch shapes: blocks
    # are not stacked there, and weight_g is (K, 1), so it IS decayed when trainable).
    stacked = sub == "backbone" and name.startswith("blocks.")
    ndim = len(shape) - int(stacked) + int(name.endswith("weight_g"))
    regularized = not name.endswith("bias") and ndim >= 2
    trainable = not (name.endswith("last_layer.weight_g") and config.heads.norm_last_layer)
    return LeafGroup(name, np.ones((), np.float32), 1.0 if regularized else 0.0,
                     "last_layer" in name, trainable, stacked)  # fmt: skip


def param_groups(params: Mapping, config) -> dict:
    """Tree (same structure as the student params {backbone, dino_head, [ibot_head]}) of
    `LeafGroup`s for config.optim.param_groups ("dinov2" or "dino")."""
    kind = config.optim.param_groups
    if kind not in ("dinov2", "dino"):
        raise ValueError(f"optim.param_groups must be 'dinov2' or 'dino', got {kind!r}")
    out = {}
    for sub, tree in params.items():
        if sub not in STUDENT_SUBMODULES:
            raise ValueError(f"unknown student submodule {sub!r}; expected {STUDENT_SUBMODULES}")
        depth = int(np.shape(tree["blocks"]["norm1"]["scale"])[0]) if sub == "backbone" else 0
        groups = {}
        for name, leaf in _paths(tree):
            shape = np.shape(leaf)
            if kind == "dinov2":
                groups[name] = _v2_group(sub, name, shape, depth, config.optim)
            else:
                groups[name] = _v1_group(sub, name, shape, config)
        out[sub] = _rebuild(tree, groups)
    return out


def _map_groups(fn, groups, *trees):
    return jax.tree.map(fn, groups, *trees, is_leaf=lambda x: isinstance(x, LeafGroup))


# ---------------------------------------------------------------------------------------------
# Gradient clipping (official-dino.md §4.4)
# ---------------------------------------------------------------------------------------------


def global_norm(tree) -> Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def clip_per_submodule(grads: Mapping, max_norm: float) -> tuple[dict, dict[str, Array]]:
    """v2: `clip_grad_norm_(max_norm)` separately for each student submodule; returns the
    clipped grads and the pre-clip norms. coef = min(max_norm / (norm + 1e-6), 1)."""
    out, norms = {}, {}
    for sub, g in grads.items():
        norm = global_norm(g)
        coef = jnp.minimum(max_norm / (norm + 1e-6), 1.0)
        out[sub] = jax.tree.map(lambda x, c=coef: x * c.astype(x.dtype), g)
        norms[sub] = norm
    return out, norms


def clip_per_tensor(grads: Mapping, groups: Mapping, max_norm: float) -> dict:
    """v1 `clip_gradients`: each tensor scaled by 3 / (||g|| + 1e-6) when that is < 1 (per block
    for stacked leaves, which are separate tensors in torch)."""

    def clip(group: LeafGroup, g):
        axes = tuple(range(1, g.ndim)) if group.stacked else None
        norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=axes, keepdims=True))
        coef = max_norm / (norm + 1e-6)
        return g * jnp.where(coef < 1.0, coef, 1.0).astype(g.dtype)

    return _map_groups(clip, groups, grads)


# ---------------------------------------------------------------------------------------------
# AdamW with per-leaf lr / wd multipliers and per-leaf step counts
# ---------------------------------------------------------------------------------------------


def adamw_init(params: Mapping) -> dict:
    """{mu, nu: zeros like params (float32), count: int32 scalar per leaf}."""
    zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)  # noqa: E731
    return {
        "mu": jax.tree.map(zeros, params),
        "nu": jax.tree.map(zeros, params),
        "count": jax.tree.map(lambda p: jnp.zeros((), jnp.int32), params),
    }


def adamw_update(
    grads: Mapping,
    opt_state: Mapping,
    params: Mapping,
    groups: Mapping,
    *,
    lr,
    last_layer_lr,
    wd,
    last_layer_active=True,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> tuple[dict, dict]:
    """One AdamW step for every leaf; returns (new params, new opt state).

    Leaf lr = (last_layer_lr if group.last_layer else lr) * group.lr_mult, leaf wd = wd *
    group.wd_mult. A leaf whose group is not trainable, or a last-layer leaf while
    `last_layer_active` is False (v1 freeze), keeps its value, moments and count unchanged.
    """
    one_minus_b1, one_minus_b2 = 1.0 - b1, 1.0 - b2  # in double, like torch's Python scalars
    log_b1, log_b2 = math.log1p(-one_minus_b1), math.log1p(-one_minus_b2)
    active_ll = jnp.asarray(last_layer_active, bool)

    def update(group: LeafGroup, g, p, mu, nu, count):
        if not group.trainable:
            return p, mu, nu, count
        g = g.astype(jnp.float32)
        p32 = p.astype(jnp.float32)
        new_count = count + 1
        t = new_count.astype(jnp.float32)
        new_mu = mu + jnp.float32(one_minus_b1) * (g - mu)  # torch: exp_avg.lerp_(g, 1 - b1)
        new_nu = nu * jnp.float32(b2) + jnp.float32(one_minus_b2) * g * g
        # 1 - b**t via expm1: 1 - 0.999**t in float32 would lose 1e-5 relative at t = 1.
        bc1 = -jnp.expm1(t * jnp.float32(log_b1))
        bc2 = -jnp.expm1(t * jnp.float32(log_b2))
        step = (new_mu / bc1) / (jnp.sqrt(new_nu) / jnp.sqrt(bc2) + jnp.float32(eps))
        leaf_lr = (last_layer_lr if group.last_layer else lr) * jnp.asarray(group.lr_mult)
        leaf_wd = wd * jnp.float32(group.wd_mult)
        new_p = (p32 - leaf_lr * (leaf_wd * p32 + step)).astype(p.dtype)
        if group.last_layer:
            keep = ~active_ll
            return (
                jnp.where(keep, p, new_p),
                jnp.where(keep, mu, new_mu),
                jnp.where(keep, nu, new_nu),
                jnp.where(keep, count, new_count),
            )
        return new_p, new_mu, new_nu, new_count

    out = _map_groups(
        update, groups, grads, params, opt_state["mu"], opt_state["nu"], opt_state["count"]
    )
    is_tuple = lambda x: isinstance(x, tuple)  # noqa: E731
    pick = lambda i: jax.tree.map(lambda t: t[i], out, is_leaf=is_tuple)  # noqa: E731
    return pick(0), {"mu": pick(1), "nu": pick(2), "count": pick(3)}


def group_summary(groups: Mapping) -> list[dict]:
    """Human-readable rows (name, lr multipliers, wd multiplier, last layer) for logs / tests."""
    rows = []
    for sub, tree in groups.items():
        for name, g in _paths(tree):
            rows.append(
                dict(
                    name=f"{sub}.{name}",
                    lr_mult=np.asarray(g.lr_mult).reshape(-1).tolist(),
                    wd_mult=g.wd_mult,
                    last_layer=g.last_layer,
                    trainable=g.trainable,
                )
            )
    return rows
