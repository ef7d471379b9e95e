"""The official optimizer recipe: parameter groups, schedules, AdamW, clipping, last-layer freeze.

Everything here is a pure function of the integer step (schedules) or of plain parameter trees,
so the training step computes lr / wd / momentum / teacher temperature INSIDE the jit from
`state["step"]`: Python floats would either retrace the step or be frozen into it, so it never
recompiles.

Parameter groups (facebookresearch/dinov2 `dinov2/utils/param_groups.py`
`get_params_groups_with_decay`) become *per-leaf multipliers*. Blocks are stacked in
dinojax (leading axis = depth), so the layer-wise lr decay of a block parameter is an array along
that axis, `decay ** (L - i)` for block i, shaped (L, 1, ..., 1) to broadcast over the leaf.

AdamW is an optax `GradientTransformationExtraArgs` (`adamw`): optax.chain(clipping,
optax.partition({"rest", "last_layer", "frozen"})), each trainable partition an optax.chain of
Adam scaling, decoupled weight decay and the lr, which take the per-leaf multiplier trees and the
traced schedule values (lr, last-layer lr, wd) as extra arguments: optax's own scalar schedules
cannot carry array-valued multipliers, and optax's `scale_by_adam` rounds its bias correction in
float32 (see `scale_by_adam_torch`). DINO v1 freezes its last layer by *skipping* it (torch gives
those parameters no gradient, so AdamW leaves their moments AND their step count alone): the last
layer is its own partition, with its own Adam count, wrapped in `skip_unless_active`.
tests/ssl/test_optim.py checks the update against torch.optim.AdamW and optax.adamw.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array

LAYER0_NAMES = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")
STUDENT_SUBMODULES = ("backbone", "dino_head", "ibot_head")


# ---------------------------------------------------------------------------------------------
# Schedules (`dinov2/utils/utils.py` `CosineScheduler`, `dinov2/train/train.py` `build_schedulers`)
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
    """Base lr after the batch-size scaling rule (`dinov2/utils/config.py`
    `apply_scaling_rules_to_cfg`; v1: facebookresearch/dino `main_dino.py` `train_dino`)."""
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
# Parameter groups (`dinov2/utils/param_groups.py`; v1: facebookresearch/dino `utils.py`)
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
# Gradient clipping (`dinov2/train/train.py` `do_train`; v1: dino `utils.py` `clip_gradients`)
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
# AdamW as an optax GradientTransformation (docs/parity.md "Optimizer and schedules")
# ---------------------------------------------------------------------------------------------

# Extra arguments of `adamw(...).update`: traced scalars computed once per step from
# state["step"], not from an optimizer count (a nan-skipped step reverts the optimizer state but
# still advances the schedules, see dinojax.ssl.step). last_layer_active defaults to True.
EXTRA_ARGS = ("lr", "last_layer_lr", "wd", "last_layer_active")


def _is_masked(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def _map_masked(fn, updates, *trees):
    """`fn` over the leaves of `updates` that the enclosing `optax.partition` did not mask out
    (MaskedNode leaves come back as they are); `trees` match the full parameter structure."""
    return jax.tree.map(
        lambda u, *xs: u if _is_masked(u) else fn(u, *xs), updates, *trees, is_leaf=_is_masked
    )


def scale_by_adam_torch(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """`optax.scale_by_adam` with torch AdamW's arithmetic; same state (`ScaleByAdamState`).

    Not optax's own: its bias correction `1 - b2 ** t` is formed in float32, where 0.999 rounds
    to 0.99900001 and 1 - 0.999 ** 1 is 1.3e-5 relative off (6e-6 after the square root): four
    AdamW steps then differ from torch by 5.2e-6 relative, over the 1e-6 parity budget
    (measured in tests/ssl/test_optim.py, which also checks ours against torch). Here
    `1 - b ** t = -expm1(t log b)` with log b taken in double, and the moments use torch's
    `lerp` form. Moments are float32 whatever the parameter dtype.
    """
    one_minus_b1, one_minus_b2 = 1.0 - b1, 1.0 - b2  # in double, like torch's Python scalars
    log_b1, log_b2 = math.log1p(-one_minus_b1), math.log1p(-one_minus_b2)

    def init(params):
        zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)  # noqa: E731
        return optax.ScaleByAdamState(
            count=jnp.zeros((), jnp.int32),
            mu=jax.tree.map(zeros, params),
            nu=jax.tree.map(zeros, params),
        )

    def update(updates, state, params=None):
        del params
        count = state.count + 1
        t = count.astype(jnp.float32)
        bc1 = -jnp.expm1(t * jnp.float32(log_b1))
        bc2 = -jnp.expm1(t * jnp.float32(log_b2))
        g32 = jax.tree.map(lambda g: g.astype(jnp.float32), updates)
        mu = jax.tree.map(lambda g, m: m + jnp.float32(one_minus_b1) * (g - m), g32, state.mu)
        nu = jax.tree.map(
            lambda g, v: v * jnp.float32(b2) + jnp.float32(one_minus_b2) * g * g, g32, state.nu
        )
        out = jax.tree.map(
            lambda m, v: (m / bc1) / (jnp.sqrt(v) / jnp.sqrt(bc2) + jnp.float32(eps)), mu, nu
        )
        return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def add_scheduled_decay(groups: Mapping) -> optax.GradientTransformationExtraArgs:
    """`optax.add_decayed_weights` with the traced `wd` extra argument times each leaf's
    `wd_mult`: u + wd * wd_mult * p (decoupled: p is the parameter before this step)."""

    def update(updates, state, params=None, *, wd, **_):
        fn = lambda u, grp, p: u + (wd * jnp.float32(grp.wd_mult)) * p.astype(u.dtype)  # noqa: E731
        return _map_masked(fn, updates, groups, params), state

    return optax.GradientTransformationExtraArgs(lambda _: optax.EmptyState(), update)


def scale_by_scheduled_lr(groups: Mapping, which: str) -> optax.GradientTransformationExtraArgs:
    """`optax.scale_by_learning_rate` with the traced extra argument `which` ("lr" or
    "last_layer_lr") times each leaf's `lr_mult` array (per block for stacked leaves)."""

    def update(updates, state, params=None, **extra):
        lr = extra[which]
        fn = lambda u, grp: -(lr * jnp.asarray(grp.lr_mult)) * u  # noqa: E731
        return _map_masked(fn, updates, groups), state

    return optax.GradientTransformationExtraArgs(lambda _: optax.EmptyState(), update)


def skip_unless_active(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """DINO v1 `cancel_gradients_last_layer`: while the `last_layer_active` extra argument is
    False, zero updates and the OLD inner state (torch gives the parameters no gradient, so
    AdamW leaves their moments and step count alone); `inner` runs when it is True."""
    inner = optax.with_extra_args_support(inner)

    def update(updates, state, params=None, *, last_layer_active=True, **extra):
        new_updates, new_state = inner.update(updates, state, params, **extra)
        active = jnp.asarray(last_layer_active, bool)
        pick = lambda new, old: jnp.where(active, new, old)  # noqa: E731
        zeros = jax.tree.map(jnp.zeros_like, new_updates)
        return jax.tree.map(pick, new_updates, zeros), jax.tree.map(pick, new_state, state)

    return optax.GradientTransformationExtraArgs(inner.init, update)


def clip_transform(groups: Mapping, mode: str, max_norm: float) -> optax.GradientTransformation:
    """The official clipping as a stateless transformation (identity when max_norm <= 0)."""
    if max_norm <= 0:
        return optax.identity()
    if mode == "per_submodule":
        return optax.stateless(lambda g, _: clip_per_submodule(g, max_norm)[0])
    if mode == "per_tensor":
        return optax.stateless(lambda g, _: clip_per_tensor(g, groups, max_norm))
    raise ValueError(f"optim.clip_mode must be 'per_submodule' or 'per_tensor', got {mode!r}")


def leaf_labels(groups: Mapping) -> dict:
    """Partition of the leaves: "frozen" (untrainable: no update, no state), "last_layer" (own
    lr schedule, v1 skip, own Adam step count) and "rest"."""
    label = lambda g: "frozen" if not g.trainable else ("last_layer" if g.last_layer else "rest")  # noqa: E731
    return _map_groups(label, groups)


def adamw(
    groups: Mapping,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_mode: str = "per_submodule",
    clip_grad: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """The official optimizer: clipping, then per partition AdamW with the parameter groups.

        tx = adamw(param_groups(params, config), ...)
        state = tx.init(params)
        updates, state = tx.update(grads, state, params, lr=.., last_layer_lr=.., wd=..,
                                   last_layer_active=..)
        params = optax.apply_updates(params, updates)

    Per leaf: p <- p - lr_leaf * (m_hat / (sqrt(v_hat) + eps) + wd_leaf * p), optax's decoupled
    form, which equals torch's `p *= 1 - lr wd; p -= lr / bc1 m / (sqrt(v) / sqrt(bc2) + eps)`
    (both decay the OLD p). lr_leaf = (last_layer_lr if last layer else lr) * lr_mult,
    wd_leaf = wd * wd_mult. The last layer is its own partition so that v1's skip-freeze leaves
    its moments and step count unchanged; untrainable leaves (v1 norm_last_layer weight_g) get
    `optax.set_to_zero`. The state is a pytree of optax states (namedtuples, dicts, arrays).
    """

    def chain(which: str):
        return optax.chain(
            scale_by_adam_torch(b1, b2, eps),
            add_scheduled_decay(groups),
            scale_by_scheduled_lr(groups, which),
        )

    labels = leaf_labels(groups)
    present = set(jax.tree.leaves(labels))
    transforms = {
        "rest": chain("lr"),
        "last_layer": skip_unless_active(chain("last_layer_lr")),
        "frozen": optax.set_to_zero(),
    }
    transforms = {k: v for k, v in transforms.items() if k in present}
    # untrainable leaves have no gradient in torch: out of the clipping norms too
    keep = lambda grp, x: x if grp.trainable else jnp.zeros_like(x)  # noqa: E731
    drop_frozen = optax.stateless(lambda g, _: _map_groups(keep, groups, g))
    tx = optax.chain(
        drop_frozen,
        clip_transform(groups, clip_mode, clip_grad),
        optax.partition(transforms, labels),
    )

    def update(updates, state, params=None, **extra):
        missing = [k for k in EXTRA_ARGS[:3] if k not in extra]
        unknown = [k for k in extra if k not in EXTRA_ARGS]
        if missing or unknown:
            raise TypeError(
                f"adamw update needs the extra arguments {EXTRA_ARGS[:3]} (and optionally "
                f"last_layer_active); missing {missing}, unknown {unknown}"
            )
        if params is None:
            raise TypeError("adamw update needs params (decoupled weight decay)")
        return tx.update(updates, state, params, **extra)

    return optax.GradientTransformationExtraArgs(tx.init, update)


def adam_state(opt_state, label: str = "rest") -> optax.ScaleByAdamState | None:
    """The Adam state (count, mu, nu) of one partition of an `adamw` state ("rest" or
    "last_layer"; mu / nu hold MaskedNode at the other partitions' leaves); None if absent."""
    inner = opt_state[-1].inner_states.get(label)
    return None if inner is None else inner.inner_state[0]


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
