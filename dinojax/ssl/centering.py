"""Teacher targets: EMA centering + sharpening and Sinkhorn-Knopp (facebookresearch/dinov2
`dinov2/loss/dino_clstoken_loss.py` `DINOLoss`, `dinov2/loss/ibot_patch_loss.py` `iBOTPatchLoss`).

Every function is pure, jit-friendly, and written on GLOBAL arrays: a batch axis sharded over a
mesh is reduced with plain `jnp.sum`/`jnp.mean`, and XLA inserts the all-reduce that the official
code issues with `torch.distributed.all_reduce`. Nothing here knows about devices.

Centering is functional. The official `DINOLoss` / `iBOTPatchLoss` objects apply the center
*lazily*: `update_center(T_n)` only stores the batch statistics, and the update
`c <- m c + (1 - m) mean(T_n)` happens at the start of the next `softmax_center_teacher`. Step n
therefore uses the center built from teacher outputs up to step n-1, and step 1 uses c = 0. The
same sequence, with the center as trainer state, is

    probs, new_center = center_and_update(teacher_logits, center, teacher_temp)
    # use `probs` for this step's loss; store `new_center` for the next step

(`softmax_center_teacher` with the stored center, then `update_center` on this step's logits).

Arithmetic runs in float32, or in float64 if the inputs are float64 (used by the parity tests);
bf16 inputs are promoted to float32, like the official `.float()` / float32 center buffer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dinojax.ssl.numerics import to_float as _float
from dinojax.ssl.numerics import true_divide as _div

Array = jax.Array

CENTER_MOMENTUM = 0.9  # official DINOLoss / iBOTPatchLoss default
SINKHORN_ITERATIONS = 3


def init_center(out_dim: int, *, ibot: bool = False, dtype=jnp.float32) -> Array:
    """Zero center with the official buffer shape: DINO (1, K), iBOT (1, 1, K); float32."""
    return jnp.zeros((1, 1, out_dim) if ibot else (1, out_dim), dtype)


# ---------------------------------------------------------------------------------------------
# DINO (CLS) targets
# ---------------------------------------------------------------------------------------------


def softmax_center_teacher(teacher_logits: Array, center: Array, teacher_temp) -> Array:
    """softmax((T - c) / tau_t) over prototypes; `center` broadcastable to (K,)
    (`DINOLoss.softmax_center_teacher`)."""
    t = _float(teacher_logits)
    c = jnp.reshape(center, (-1,)).astype(t.dtype)
    return jax.nn.softmax(_div(t - c, teacher_temp), axis=-1)


def update_center(center: Array, teacher_logits: Array, momentum=CENTER_MOMENTUM) -> Array:
    """Next center m c + (1 - m) mean_rows(T), mean over the GLOBAL batch
    (`DINOLoss.update_center` / `apply_center_update`).

    `teacher_logits` is (2B, K) (any row order: the mean is permutation invariant). Returns an
    array of the shape and dtype of `center`.
    """
    t = _float(teacher_logits)
    t = jnp.reshape(t, (-1, t.shape[-1]))
    # official: async all-reduce of sum(T, 0) then / (len * world) = global row mean
    batch_center = _div(jnp.sum(t, axis=0), t.shape[0])
    c = jnp.reshape(center, (-1,)).astype(t.dtype)
    new = c * momentum + batch_center * (1 - momentum)
    return new.reshape(center.shape).astype(center.dtype)


def center_and_update(
    teacher_logits: Array, center: Array, teacher_temp, momentum=CENTER_MOMENTUM
) -> tuple[Array, Array]:
    """(teacher probabilities for this step, center for the next step) -- the lazy update."""
    probs = softmax_center_teacher(teacher_logits, center, teacher_temp)
    return probs, update_center(center, teacher_logits, momentum)


def sinkhorn_knopp_teacher(
    teacher_logits: Array, teacher_temp, n_iterations: int = SINKHORN_ITERATIONS
) -> Array:
    """Sinkhorn-Knopp targets (`DINOLoss.sinkhorn_knopp_teacher`) for (N, K) logits, N = global
    rows.

    float32, no max-subtraction (|logit_k| <= |g_k| keeps exp finite at tau = 0.04), prototype
    sums over the global batch, and B = N (global count). Each row of the result sums to 1.
    """
    q = _float(teacher_logits)
    return _sinkhorn(jnp.exp(_div(q, teacher_temp)), q.shape[0], n_iterations, valid=None)


def _sinkhorn(q: Array, count, n_iterations: int, valid: Array | None) -> Array:
    # Layout (N samples, K prototypes): the official code works on Q.T (K x B); the operations
    # and their order (each division separately, as in torch) are the same.
    k = q.shape[-1]
    b = jnp.asarray(count, q.dtype)
    q = _div(q, jnp.sum(q))  # global total (all-reduced in torch)
    for _ in range(n_iterations):
        q = _div(q, jnp.sum(q, axis=0, keepdims=True))  # per prototype, global (all-reduced)
        q = _div(q, k)
        col = jnp.sum(q, axis=1, keepdims=True)  # per sample (local in torch: same thing)
        if valid is not None:  # padded samples: 0/0 -> keep them at exactly 0
            col = jnp.where(valid[:, None], col, 1)
        q = _div(q, col)
        q = _div(q, b)
    return q * b


# ---------------------------------------------------------------------------------------------
# iBOT (masked patch) targets on a static padded buffer of masked tokens
# ---------------------------------------------------------------------------------------------


def ibot_softmax_center_teacher(
    teacher_logits: Array, center: Array, teacher_temp, valid: Array | None = None
) -> Array:
    """softmax((T - c_ibot) / tau_t) for (M, K) masked-token logits; padded rows set to 0
    (`iBOTPatchLoss.softmax_center_teacher`)."""
    probs = softmax_center_teacher(teacher_logits, center, teacher_temp)
    if valid is not None:
        probs = jnp.where(valid[:, None], probs, 0)
    return probs


def ibot_update_center(
    center: Array,
    teacher_logits: Array,
    valid: Array,
    momentum=CENTER_MOMENTUM,
    *,
    shard_ids: Array | None = None,
    n_shards: int = 1,
    blocks: bool = False,
) -> Array:
    """Next iBOT center m c + (1 - m) mean over the real masked tokens
    (`iBOTPatchLoss.update_center`).

    `teacher_logits` (M, K) is a padded buffer, `valid` (M,) marks the real masked tokens.
    Officially each GPU takes the mean over *its own* masked tokens and the per-GPU means are
    averaged. `shard_ids=None` (or n_shards=1) is the single-process case: one mean over all real
    tokens. To reproduce a run on `n_shards` GPUs exactly, pass the per-token shard index in
    [0, n_shards) (`dinojax.ssl.losses.masked_token_buffer(..., n_shards)` returns it): the
    result is then the mean of the per-shard means. A shard without masked tokens contributes 0
    (the official code would produce NaN). `blocks=True`: the buffer is `n_shards` equal
    consecutive blocks, block s holding shard s's tokens (`masked_token_buffer` with n_groups =
    n_shards); the per-shard sums are then taken block by block, in place on a buffer sharded by
    blocks (a scatter by `shard_ids` would sum an (n_shards, K) array over every device).
    """
    t = _float(teacher_logits)
    w = valid.astype(t.dtype)[:, None]
    tv = jnp.where(valid[:, None], t, 0)  # padded rows excluded from every sum
    if blocks and n_shards > 1:
        k = t.shape[-1]
        sums = jnp.sum(tv.reshape(n_shards, -1, k), axis=1)
        counts = jnp.sum(w.reshape(n_shards, -1, 1), axis=1)
        batch_center = _div(jnp.sum(_div(sums, jnp.maximum(counts, 1)), axis=0), n_shards)
    elif shard_ids is None or n_shards == 1:
        batch_center = _div(jnp.sum(tv, axis=0), jnp.maximum(jnp.sum(w), 1))
    else:
        sums = jax.ops.segment_sum(tv, shard_ids, num_segments=n_shards)
        counts = jax.ops.segment_sum(w, shard_ids, num_segments=n_shards)
        batch_center = _div(jnp.sum(_div(sums, jnp.maximum(counts, 1)), axis=0), n_shards)
    c = jnp.reshape(center, (-1,)).astype(t.dtype)
    new = c * momentum + batch_center * (1 - momentum)
    return new.reshape(center.shape).astype(center.dtype)


def ibot_center_and_update(
    teacher_logits: Array,
    center: Array,
    teacher_temp,
    valid: Array,
    momentum=CENTER_MOMENTUM,
    *,
    shard_ids: Array | None = None,
    n_shards: int = 1,
    blocks: bool = False,
) -> tuple[Array, Array]:
    """(iBOT teacher probabilities for this step, iBOT center for the next step)."""
    probs = ibot_softmax_center_teacher(teacher_logits, center, teacher_temp, valid)
    new = ibot_update_center(
        center,
        teacher_logits,
        valid,
        momentum,
        shard_ids=shard_ids,
        n_shards=n_shards,
        blocks=blocks,
    )
    return probs, new


def ibot_sinkhorn_knopp_teacher(
    teacher_logits: Array, teacher_temp, valid: Array, n_iterations: int = SINKHORN_ITERATIONS
) -> Array:
    """iBOT Sinkhorn-Knopp over a padded (M, K) buffer (`iBOTPatchLoss.sinkhorn_knopp_teacher`).

    B = global number of real masked tokens (`sum(valid)`); padded rows are excluded from every
    sum and come back as zero rows.
    """
    t = _float(teacher_logits)
    t = jnp.where(valid[:, None], t, 0)
    q = jnp.where(valid[:, None], jnp.exp(_div(t, teacher_temp)), 0)
    return _sinkhorn(q, jnp.sum(valid.astype(jnp.int32)), n_iterations, valid=valid)
