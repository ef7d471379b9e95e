"""DINO, iBOT and KoLeo losses (facebookresearch/dinov2 `dinov2/loss/`), pure functions on GLOBAL
arrays.

Batch layout: `n_groups` blocks, each the official per-GPU collate (`dinov2/data/collate.py`
`collate_data_and_cast`, crop-major over the block's own images). Global crops are (2B, ...) =
[group 0: crop 0 of its b images, crop 1 of them; group 1: ...], b = B / n_groups, local crops
(n_local*B, ...) likewise; image j of group g is global image g*b + j. `n_groups=1` is one
crop-major batch of B images. Sharded over the batch devices with one group (or several whole
groups) per device, every crop of an image sits on the device of the image, so pairing crops
(the DINO terms, the crop swap, KoLeo) moves nothing between devices (nor across the slices of a
multi-slice pod): only the reductions (sums over the batch) communicate. B is the GLOBAL number
of images; the layout changes nothing in these formulas except for KoLeo (and optionally the
iBOT center), which the official code computes per GPU: there the number of data shards is an
explicit static argument.

How the trainer wires one step (`dinov2/train/ssl_meta_arch.py` `SSLMetaArch.forward_backward`;
teacher side under stop_gradient):

    # teacher: backbone(global crops) in eval mode, no masks
    t_cls = swap_global_crops(teacher_head(t_out["x_norm_clstoken"]))   # (2B, K), crop 1 first
    p_cls, center = centering.center_and_update(t_cls, center, temp)  # or sinkhorn_knopp_teacher
    buf = masked_token_buffer(masks, upperbound, n_shards=n_shards)    # masks (2B, N) bool
    t_patch = teacher_head(t_out["x_norm_patchtokens"].reshape(-1, D)[buf.indices])  # (U, K)
    p_patch, ibot_center = centering.ibot_center_and_update(
        t_patch, ibot_center, temp, buf.valid, shard_ids=buf.shard_ids, n_shards=n_shards)
    # (or centering.ibot_sinkhorn_knopp_teacher(t_patch, temp, buf.valid))
    # student: backbone(global crops, masks) and backbone(local crops)
    s_global = student_head(s_glob["x_norm_clstoken"])                 # (2B, K)
    s_local = student_head(s_loc["x_norm_clstoken"])                   # (n_local*B, K)
    s_patch = student_head(s_glob["x_norm_patchtokens"].reshape(-1, D)[buf.indices])
    dino_local, dino_global = dino_loss(s_global, s_local, p_cls)
    ibot = ibot_patch_loss(s_patch, p_patch, buf.weights, buf.valid, n_images=2 * B)
    koleo = koleo_loss(s_glob["x_norm_clstoken"], n_shards=n_shards)  # backbone CLS, pre-head
    loss = dino_w * (dino_local + dino_global) + koleo_w * koleo + ibot_w * ibot

`temp` (teacher temperature) may be a traced scalar computed from the step, so a scheduled
temperature neither retraces the step nor is baked into it as a constant.
`n_shards` is a static Python int: the number of data-parallel devices the batch is split over
(see `koleo_loss`); 1 reproduces a single-GPU run. This sketch reads one crop-major batch; the
training step (`dinojax/ssl/step.py`) passes `n_groups=n_shards` to the swap, `dino_loss`,
`koleo_loss` and `masked_token_buffer` (the layout of n_shards per-GPU blocks), gathers the
buffer per block and takes the iBOT center per block (`blocks=True`).

Arithmetic is float32 (float64 if the inputs are float64); bf16 inputs are promoted.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dinojax.ssl.numerics import to_float as _float
from dinojax.ssl.numerics import true_divide as _div

Array = jax.Array

STUDENT_TEMP = 0.1
KOLEO_EPS = 1e-8
_HIGHEST = jax.lax.Precision.HIGHEST


def crop_axis(x: Array, n_crops: int, n_groups: int = 1, what: str = "batch") -> Array:
    """(n_crops, B, ...): crop c of global image i at [c, i], from a batch of `n_groups` blocks
    (the module's layout). The image axis keeps the blocks' order, so a batch sharded by blocks
    stays sharded (on the image axis) and nothing moves."""
    if n_groups < 1 or x.shape[0] % (n_groups * n_crops):
        raise ValueError(
            f"{what}: expected {n_groups} crop-major blocks of {n_crops} crops, a leading size "
            f"that is a multiple of {n_groups * n_crops}, got {x.shape[0]}"
        )
    y = x.reshape(n_groups, n_crops, x.shape[0] // (n_groups * n_crops), *x.shape[1:])
    return jnp.swapaxes(y, 0, 1).reshape(n_crops, -1, *x.shape[1:])


def swap_global_crops(x: Array, n_global_crops: int = 2, *, n_groups: int = 1) -> Array:
    """Crop-major [crop0; crop1] -> [crop1; crop0] in each of the `n_groups` blocks, so student
    crop i meets teacher crop 1-i (`SSLMetaArch.forward_backward`).

    Apply it to the teacher CLS tokens (or logits) before centering / Sinkhorn, like the official
    code (`torch.cat((chunks[1], chunks[0]))`, on each GPU's batch).
    """
    if n_global_crops != 2:
        raise ValueError(f"the official crop swap needs 2 global crops, got {n_global_crops}")
    if n_groups < 1 or x.shape[0] % (2 * n_groups):
        raise ValueError(
            f"swap_global_crops: {x.shape[0]} rows, not a multiple of {n_groups} blocks x 2 crops"
        )
    y = x.reshape(n_groups, 2, x.shape[0] // (2 * n_groups), *x.shape[1:])
    return y[:, ::-1].reshape(x.shape)


def cross_entropy(teacher_probs: Array, student_logits: Array, student_temp=STUDENT_TEMP) -> Array:
    """Per-row H(p, s) = -sum_k p_k log_softmax(s / tau_s)_k (`DINOLoss.forward`)."""
    lsm = jax.nn.log_softmax(_div(_float(student_logits), student_temp), axis=-1)
    return -jnp.sum(_float(teacher_probs) * lsm, axis=-1)


def dino_loss(
    student_global_logits: Array,
    student_local_logits: Array | None,
    teacher_probs: Array,
    *,
    n_global_crops: int = 2,
    student_temp=STUDENT_TEMP,
    n_groups: int = 1,
) -> tuple[Array, Array]:
    """DINO CLS loss as the two official terms `(dino_local, dino_global)`
    (`SSLMetaArch.forward_backward`).

    Args:
      student_global_logits: (2B, K) student head logits of the global crops, crop-major.
      student_local_logits: (n_local*B, K) student head logits of the local crops, crop-major,
        or None / a (0, K) array when there are no local crops.
      teacher_probs: (2B, K) teacher targets ALREADY SWAPPED (`swap_global_crops` before
        centering/Sinkhorn): row r is the target of `student_global_logits[r]`.
      n_groups: the batch's blocks (module docstring); all three arrays in that layout.

    Both terms are normalised by n_global_terms + n_local_terms = 2*1 + max(2*n_local, 1)
    (18 for 2 + 8 crops); their sum is v1's mean over the 18 (teacher, student != teacher) pairs.
    """
    if n_global_crops != 2:
        raise ValueError(f"the official DINO loss needs 2 global crops, got {n_global_crops}")
    if student_global_logits.shape != teacher_probs.shape:
        raise ValueError(
            f"student global logits {student_global_logits.shape} and teacher targets "
            f"{teacher_probs.shape} must have the same (2B, K) shape"
        )
    n_images = teacher_probs.shape[0] // n_global_crops
    if student_local_logits is None or student_local_logits.shape[0] == 0:
        n_local = 0
    else:
        if student_local_logits.shape[0] % max(n_images, 1) or student_local_logits.ndim != 2:
            raise ValueError(
                f"local logits {student_local_logits.shape}: expected (n_local*B, K) with "
                f"B = {n_images} images"
            )
        n_local = student_local_logits.shape[0] // n_images
    n_global_terms = (n_global_crops - 1) * n_global_crops
    n_local_terms = max(n_local * n_global_crops, 1)
    norm = n_global_terms + n_local_terms  # forward_backward's term count: 2 + 16 = 18

    teacher = crop_axis(_float(teacher_probs), n_global_crops, n_groups, "teacher_probs")
    if n_local:
        lsm = jax.nn.log_softmax(_div(_float(student_local_logits), student_temp), axis=-1)
        lsm = crop_axis(lsm, n_local, n_groups, "student_local_logits")  # (n_local, B, K)
        total = jnp.zeros((), lsm.dtype)
        for i in range(n_global_crops):  # mean_b H(p_i, s_j), summed over teacher crops i ...
            total = total + jnp.sum(jnp.mean(-jnp.sum(teacher[i] * lsm, axis=-1), axis=-1))
        dino_local = total / norm  # ... and local crops j
    else:
        dino_local = jnp.zeros((), teacher.dtype)
    # global crops processed together: x loss_scales = 2 (official ssl_meta_arch); the rows are
    # paired as they lie, so the mean does not depend on the layout
    h = cross_entropy(teacher_probs, student_global_logits, student_temp)
    dino_global = jnp.mean(h) * 2 / norm
    return dino_local, dino_global


# ---------------------------------------------------------------------------------------------
# iBOT
# ---------------------------------------------------------------------------------------------


class MaskedTokens(NamedTuple):
    """Static-size buffer of masked patch tokens (padding rows: valid False, weight 0, index 0)."""

    indices: Array  # (U,) int32 into masks.reshape(-1) = (2B*N,) flattened (image, patch) tokens
    weights: Array  # (U,) float32 1 / max(1, #masked in the token's image); 0 on padding
    valid: Array  # (U,) bool
    shard_ids: Array  # (U,) int32 data shard of the token's image (for per-GPU iBOT centering)
    n_dropped: Array | int = 0  # () int32 masked tokens beyond a group's share of the buffer


def ibot_mask_weights(masks: Array) -> Array:
    """(n_images, N) bool masks -> per-token weight 1 / max(1, #masked in its image)
    (`masks_weight` of `dinov2/data/collate.py` `collate_data_and_cast`)."""
    count = jnp.sum(masks.astype(jnp.float32), axis=-1, keepdims=True)
    return jnp.broadcast_to(1 / jnp.maximum(count, 1.0), masks.shape)


def masked_token_buffer(
    masks: Array,
    upperbound: int,
    *,
    n_global_crops: int = 2,
    n_shards: int = 1,
    n_groups: int = 1,
) -> MaskedTokens:
    """Gather the masked tokens of (2B, N) masks (`n_groups` crop-major blocks, the module's
    layout) into a static buffer of `upperbound`.

    `n_groups=1`: one buffer in the official `mask_indices_list` order (row-major nonzero);
    `upperbound` must be at least the number of masked tokens (the collate's bound guarantees
    it). `n_groups > 1` (`upperbound` divisible by it): the buffer is `n_groups` equal blocks, block
    g holding group g's masked tokens in row-major order, as each official GPU's own buffer. A
    block's tokens then come from its group's rows only, so a batch sharded by groups gathers
    them without moving any; each group must hold at most `upperbound / n_groups` masked tokens
    (the pipeline's per-group bound, `mask_groups`: `upperbound` is the groups times it). Tokens
    beyond a bound would be silently dropped under jit: `n_dropped` of the result counts them.
    `n_shards` only fills `shard_ids`: global image i of every crop belongs to shard
    i // (B / n_shards), the images an official GPU holds.
    """
    n_images, n_tokens = masks.shape
    b = n_images // n_global_crops
    if n_images % (n_global_crops * n_groups) or b % n_shards:
        raise ValueError(
            f"masks {masks.shape}: expected (n_global_crops*B, N) with B divisible by "
            f"n_shards={n_shards} and n_groups={n_groups} (n_global_crops={n_global_crops})"
        )
    if upperbound % n_groups:
        raise ValueError(f"buffer size {upperbound} does not split into {n_groups} groups")
    cap = upperbound // n_groups
    rows = n_images // n_groups  # rows of one group

    def one(m):  # one group's (rows, N) masks: its own buffer, as one official GPU's
        (idx,) = jnp.nonzero(m.reshape(-1), size=cap, fill_value=0)
        count = jnp.sum(m.astype(jnp.int32))
        valid = jnp.arange(cap) < count
        w = jnp.where(valid, ibot_mask_weights(m).reshape(-1)[idx], 0.0)
        return idx, valid, w, jnp.maximum(count - cap, 0)

    local, valid, weights, dropped = jax.vmap(one)(masks.reshape(n_groups, rows, n_tokens))
    indices = (local + (jnp.arange(n_groups) * rows * n_tokens)[:, None]).reshape(-1)
    valid, weights = valid.reshape(-1), weights.reshape(-1)
    row = indices // n_tokens
    bg = b // n_groups  # images per group
    image = (row // rows) * bg + (row % rows) % bg  # global image index
    shard_ids = jnp.where(valid, image // (b // n_shards), 0).astype(jnp.int32)
    return MaskedTokens(indices.astype(jnp.int32), weights, valid, shard_ids, jnp.sum(dropped))


def ibot_patch_loss(
    student_logits: Array,
    teacher_probs: Array,
    weights: Array,
    valid: Array,
    n_images: int,
    *,
    student_temp=STUDENT_TEMP,
) -> Array:
    """iBOT masked-patch loss `iBOTPatchLoss.forward_masked` (`dinov2/loss/ibot_patch_loss.py`) on a
    padded buffer.

    -(1/n_images) sum_{real masked m} w_m sum_k p_{m,k} log_softmax(s_m / tau_s)_k, with
    n_images = 2B, the number of global-crop images (masked or not). Padded rows (valid False)
    are excluded. This is the value that enters the total loss (the official x loss_scales=2 x
    ibot_loss_scale=1/2 nets to 1); the official log shows it /2.
    """
    h = cross_entropy(teacher_probs, student_logits, student_temp)
    w = _float(weights).astype(h.dtype)
    return jnp.sum(jnp.where(valid, h * w, 0)) / n_images


# ---------------------------------------------------------------------------------------------
# KoLeo
# ---------------------------------------------------------------------------------------------


def koleo_loss_single(x: Array, *, n_shards: int = 1, eps: float = KOLEO_EPS) -> Array:
    """Official `KoLeoLoss()(x)` on each of `n_shards` equal contiguous slices of x (n, D).

    Per shard (`dinov2/loss/koleo_loss.py` `KoLeoLoss`): z = x / max(||x||, eps); nearest neighbour
    by the largest dot product with the diagonal set to -1; d = ||z - z_nn + eps||_2 (torch
    PairwiseDistance adds eps to the difference); loss = -mean log(d + eps). Returns the mean over
    shards, which is what averaging the per-GPU losses (DDP/FSDP gradient averaging) optimises.
    """
    n, dim = x.shape
    if n % n_shards:
        raise ValueError(f"KoLeo batch of {n} rows is not divisible into n_shards={n_shards}")
    z = _float(x).reshape(n_shards, n // n_shards, dim)
    z = _div(z, jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(z), axis=-1, keepdims=True)), eps))
    # HIGHEST: the argmax must not flip on bf16 passes of an f32 matmul (TPU/GPU defaults).
    dots = jnp.einsum("sid,sjd->sij", z, z, precision=_HIGHEST)
    eye = jnp.eye(n // n_shards, dtype=bool)
    dots = jnp.where(eye, -1, dots)
    nn_idx = jnp.argmax(dots, axis=-1)
    neighbour = jnp.take_along_axis(z, nn_idx[..., None], axis=1)
    d = jnp.sqrt(jnp.sum(jnp.square(z - neighbour + eps), axis=-1))
    return jnp.mean(-jnp.log(d + eps))


def koleo_loss(
    student_global_cls: Array,
    *,
    n_shards: int = 1,
    n_global_crops: int = 2,
    eps=KOLEO_EPS,
    n_groups: int = 1,
) -> Array:
    """Sum over global crops of the per-shard KoLeo on student backbone CLS (2B, D)
    (`SSLMetaArch.forward_backward` sums `KoLeoLoss` over the two global-crop chunks).

    Not multiplied by `koleo_loss_weight` (0.1 in the configs): the trainer does that. The
    official log shows (weight * this) / 2.

    `n_shards` (static int) is the number of data-parallel GPUs of the run being reproduced; the
    trainer passes the number of devices the batch axis is sharded over (e.g. the product of the
    mesh's data axes, `mesh.shape['data']`), so each shard holds B / n_shards images like one
    official GPU. Image b of each crop belongs to shard b // (B / n_shards): that is the
    definition, independent of where XLA physically places the rows (a mismatched placement is
    only a communication cost, never a different result). n_shards=1 is the single-GPU loss.
    `n_groups`: the batch's blocks (module docstring); with n_groups = n_shards each shard is one
    block (one official GPU's batch), and a batch sharded by blocks computes it in place.
    """
    crops = crop_axis(student_global_cls, n_global_crops, n_groups, "student_global_cls")
    total = jnp.zeros((), jnp.promote_types(crops.dtype, jnp.float32))
    for i in range(n_global_crops):  # official: sum(koleo(p) for p in cls.chunk(2))
        total = total + koleo_loss_single(crops[i], n_shards=n_shards, eps=eps)
    return total
