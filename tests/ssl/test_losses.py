"""DINO / iBOT / KoLeo losses vs the official `dinov2.loss` objects, driven as `ssl_meta_arch` does.

Relative error = |ours - official| / |official| (float32 on both sides).
"""

from __future__ import annotations

import importlib.util
import logging
import random
import warnings
from functools import partial
from pathlib import Path

import dinov2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dinojax.ssl import centering, losses

logging.getLogger("dinov2").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="xFormers not available")

from dinov2.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss  # noqa: E402

# the official KoLeo enters torch.cuda.amp.autocast(enabled=False), deprecated in torch 2.13
pytestmark = pytest.mark.filterwarnings("ignore:.*autocast.*deprecated:FutureWarning")

K, B, N_LOCAL = 256, 4, 8
TOL = 1e-6


def _official_module(name: str):
    # dinov2.data's __init__ imports torchvision and more of the training stack than these modules
    # need: load the one file.
    path = Path(dinov2.__file__).parent / "data" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_official_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def logits(rs, n, k=K, scale=1.5):
    return rs.uniform(-scale, scale, (n, k)).astype(np.float32)


def t_(x):
    return torch.from_numpy(np.asarray(x))


# ---------------------------------------------------------------------------------------------
# DINO
# ---------------------------------------------------------------------------------------------


def official_dino_terms(dino: DINOLoss, t_cls, s_global, s_local, temp, mode):
    """The DINO part of facebookresearch/dinov2 `dinov2/train/ssl_meta_arch.py`
    `SSLMetaArch.forward_backward`."""
    chunks = t_(t_cls).chunk(2)
    t = torch.cat((chunks[1], chunks[0]))  # swapped
    if mode == "centering":
        p = dino.softmax_center_teacher(t, teacher_temp=temp).view(2, -1, K)
        dino.update_center(t)
    else:
        p = dino.sinkhorn_knopp_teacher(t, teacher_temp=temp).view(2, -1, K)
    n_local = s_local.shape[0] // B
    norm = 2 + max(2 * n_local, 1)
    local = dino(list(t_(s_local).chunk(n_local)), p) / norm if n_local else torch.tensor(0.0)
    glob = dino([t_(s_global)], [p.flatten(0, 1)]) * 2 / norm
    return local.item(), glob.item()


@jax.jit
def dino_step_centering(t_cls, s_global, s_local, center, temp):
    t = losses.swap_global_crops(t_cls)
    probs, center = centering.center_and_update(t, center, temp)
    return losses.dino_loss(s_global, s_local, probs), center


@jax.jit
def dino_step_sinkhorn(t_cls, s_global, s_local, temp):
    probs = centering.sinkhorn_knopp_teacher(losses.swap_global_crops(t_cls), temp)
    return losses.dino_loss(s_global, s_local, probs)


@pytest.mark.parametrize("mode", ["centering", "sinkhorn_knopp"])
def test_dino_loss_two_steps_match_official(mode):
    rs = np.random.RandomState(0)
    official = DINOLoss(K)
    center = centering.init_center(K)
    for step, temp in enumerate((0.04, 0.07)):
        t_cls = logits(rs, 2 * B)
        s_global, s_local = logits(rs, 2 * B), logits(rs, N_LOCAL * B)
        want = official_dino_terms(official, t_cls, s_global, s_local, temp, mode)
        args = (jnp.asarray(t_cls), jnp.asarray(s_global), jnp.asarray(s_local))
        if mode == "centering":
            got, center = dino_step_centering(*args, center, jnp.float32(temp))
        else:
            got = dino_step_sinkhorn(*args, jnp.float32(temp))
        for name, g, w in zip(("dino_local", "dino_global"), got, want):
            assert rel_err(g, w) <= TOL, (mode, step, name, rel_err(g, w))


def test_dino_loss_without_local_crops_uses_official_normaliser():
    rs = np.random.RandomState(1)
    t_cls, s_global = logits(rs, 2 * B), logits(rs, 2 * B)
    want = official_dino_terms(DINOLoss(K), t_cls, s_global, np.zeros((0, K)), 0.04, "centering")
    probs = centering.softmax_center_teacher(
        losses.swap_global_crops(jnp.asarray(t_cls)), centering.init_center(K), 0.04
    )
    local, glob = losses.dino_loss(jnp.asarray(s_global), None, probs)
    assert float(local) == 0.0
    assert rel_err(glob, want[1]) <= TOL  # normalised by 2 + max(0, 1) = 3


def test_dino_loss_gradient_matches_official():
    rs = np.random.RandomState(2)
    t_cls, s_global, s_local = logits(rs, 2 * B), logits(rs, 2 * B), logits(rs, N_LOCAL * B)
    sg, sl = t_(s_global).requires_grad_(), t_(s_local).requires_grad_()
    chunks = t_(t_cls).chunk(2)
    p = DINOLoss(K).softmax_center_teacher(torch.cat((chunks[1], chunks[0])), 0.04).view(2, -1, K)
    dino = DINOLoss(K)
    loss = dino(list(sl.chunk(N_LOCAL)), p) / 18 + dino([sg], [p.flatten(0, 1)]) * 2 / 18
    loss.backward()

    probs = centering.softmax_center_teacher(
        losses.swap_global_crops(jnp.asarray(t_cls)), centering.init_center(K), 0.04
    )
    grads = jax.grad(lambda g, loc: sum(losses.dino_loss(g, loc, probs)), argnums=(0, 1))(
        jnp.asarray(s_global), jnp.asarray(s_local)
    )
    assert rel_err(grads[0], sg.grad.numpy()) <= TOL
    assert rel_err(grads[1], sl.grad.numpy()) <= TOL


# ---------------------------------------------------------------------------------------------
# iBOT
# ---------------------------------------------------------------------------------------------


def official_collate(seed: int, grid: int = 8):
    """The official `dinov2/data/collate.py` `collate_data_and_cast` + `dinov2/data/masking.py`
    `MaskingGenerator` on dummy crops."""
    masking, collate = _official_module("masking"), _official_module("collate")
    gen = masking.MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid)
    crop = torch.zeros(3, 2, 2)
    samples = [({"global_crops": [crop, crop], "local_crops": [crop]}, 0) for _ in range(B)]
    random.seed(seed)
    np.random.seed(seed)
    return collate.collate_data_and_cast(
        samples, mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5, dtype=torch.float32,
        n_tokens=grid * grid, mask_generator=gen,
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["centering", "sinkhorn_knopp"])
def test_ibot_patch_loss_two_steps_match_official(mode, torch_process_group):
    rs = np.random.RandomState(3)
    official = iBOTPatchLoss(K)
    center = centering.init_center(K, ibot=True)

    @jax.jit
    def ours(masks, t_all, s_all, center, temp):
        buf = losses.masked_token_buffer(masks, upperbound)
        t = t_all[buf.indices]  # padding rows gather token 0: real values, must be excluded
        if mode == "centering":
            probs, center = centering.ibot_center_and_update(t, center, temp, buf.valid)
        else:
            probs = centering.ibot_sinkhorn_knopp_teacher(t, temp, buf.valid)
        loss = losses.ibot_patch_loss(
            s_all[buf.indices], probs, buf.weights, buf.valid, n_images=masks.shape[0]
        )
        return loss, center, buf

    for step, temp in enumerate((0.04, 0.06)):
        c = official_collate(seed=step)
        masks = c["collated_masks"]
        idx, n, upperbound = c["mask_indices_list"], len(c["mask_indices_list"]), c["upperbound"]
        t_all, s_all = logits(rs, masks.numel()), logits(rs, masks.numel())
        # official: teacher/student head outputs at mask_indices_list (ssl_meta_arch)
        t_masked, s_masked = t_(t_all)[idx], t_(s_all)[idx]
        if mode == "centering":
            p = official.softmax_center_teacher(t_masked.unsqueeze(0)[:, :n], teacher_temp=temp)
            p = p.squeeze(0)
            official.update_center(t_masked.unsqueeze(0)[:n])
        else:
            p = official.sinkhorn_knopp_teacher(
                t_masked, teacher_temp=temp, n_masked_patches_tensor=c["n_masked_patches"].clone()
            )
        want = official.forward_masked(
            s_masked, p, student_masks_flat=masks, n_masked_patches=n,
            masks_weight=c["masks_weight"],
        ) * 2 * 0.5  # fmt: skip  # loss_scales * ibot_loss_scale
        loss, center, buf = ours(
            jnp.asarray(masks.numpy()), jnp.asarray(t_all), jnp.asarray(s_all), center,
            jnp.float32(temp),
        )  # fmt: skip
        assert upperbound > n  # the buffer really has padding
        np.testing.assert_array_equal(np.asarray(buf.indices)[:n], idx.numpy())
        np.testing.assert_array_equal(np.asarray(buf.weights)[:n], c["masks_weight"].numpy())
        assert int(buf.valid.sum()) == n and np.all(np.asarray(buf.weights)[n:] == 0)
        assert rel_err(loss, want.item()) <= TOL, (mode, step, rel_err(loss, want.item()))
    if mode == "centering":
        official.apply_center_update()
        assert rel_err(center, official.center.numpy()) <= TOL


def test_ibot_patch_loss_excludes_padding_even_with_garbage():
    rs = np.random.RandomState(8)
    n, upper = 11, 16
    s, t = logits(rs, upper), np.asarray(jax.nn.softmax(logits(rs, upper) / 0.04))
    w = rs.uniform(0.1, 0.5, upper).astype(np.float32)
    valid = np.arange(upper) < n
    s_pad, t_pad, w_pad = s.copy(), t.copy(), w.copy()
    s_pad[n:], t_pad[n:], w_pad[n:] = 1e4, 7.0, 3.0  # padding rows hold garbage
    f = partial(losses.ibot_patch_loss, n_images=6)
    want = f(jnp.asarray(s[:n]), jnp.asarray(t[:n]), jnp.asarray(w[:n]), jnp.ones(n, bool))
    got, grad = jax.value_and_grad(f)(
        jnp.asarray(s_pad), jnp.asarray(t_pad), jnp.asarray(w_pad), jnp.asarray(valid)
    )
    assert rel_err(got, want) <= TOL
    assert np.all(np.asarray(grad)[n:] == 0) and np.all(np.isfinite(np.asarray(grad)))


def test_masked_token_buffer_shard_ids():
    masks = np.zeros((2 * 4, 6), bool)  # 2 crops x 4 images, 6 tokens
    masks[1, 2] = masks[3, 0] = masks[4, 5] = masks[6, 1] = masks[6, 3] = True
    buf = losses.masked_token_buffer(jnp.asarray(masks), 8, n_shards=2)
    # rows: crop0 img1, crop0 img3, crop1 img0, crop1 img2 (x2); shard = img // 2
    np.testing.assert_array_equal(np.asarray(buf.indices)[:5], [8, 18, 29, 37, 39])
    np.testing.assert_array_equal(np.asarray(buf.shard_ids)[:5], [0, 1, 0, 1, 1])
    np.testing.assert_array_equal(np.asarray(buf.weights), [1, 1, 1, 0.5, 0.5, 0, 0, 0])
    with pytest.raises(ValueError, match="n_shards=3"):
        losses.masked_token_buffer(jnp.asarray(masks), 8, n_shards=3)
    # the same rows read as 2 per-GPU blocks (images 0-1, then 2-3, crop-major in each): each
    # block's tokens in its own half of the buffer, padded there
    buf = losses.masked_token_buffer(jnp.asarray(masks), 8, n_shards=2, n_groups=2)
    np.testing.assert_array_equal(np.asarray(buf.indices), [8, 18, 0, 0, 29, 37, 39, 24])
    np.testing.assert_array_equal(np.asarray(buf.valid), [1, 1, 0, 0, 1, 1, 1, 0])
    # rows 1, 3: image 1 (crops 0, 1); rows 4, 6: image 2 = block 1's image 0
    np.testing.assert_array_equal(np.asarray(buf.shard_ids), [0, 0, 0, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(np.asarray(buf.weights), [1, 1, 0, 0, 1, 0.5, 0.5, 0])
    assert int(buf.n_dropped) == 0
    # a block with more masked tokens than its share of the buffer: counted, not silent
    assert int(losses.masked_token_buffer(jnp.asarray(masks), 4, n_groups=2).n_dropped) == 1
    with pytest.raises(ValueError, match="does not split into 2 groups"):
        losses.masked_token_buffer(jnp.asarray(masks), 7, n_groups=2)


def to_blocks(x: np.ndarray, n_crops: int, n_groups: int) -> np.ndarray:
    """Crop-major rows (crop c of image i at c*B + i) -> `n_groups` crop-major blocks (block g:
    its images g*b..(g+1)*b, crop c of image j at g*n_crops*b + c*b + j)."""
    y = x.reshape(n_crops, n_groups, -1, *x.shape[1:])
    return np.swapaxes(y, 0, 1).reshape(x.shape)


def test_per_gpu_blocks_equal_crop_major():
    """The step's layout: G blocks, each one official GPU's crop-major batch. Every loss and
    statistic on it (n_groups=G) equals the same images in the global crop-major order with G
    official GPUs (n_groups=1, n_shards=G), and, sharded one block per device, its compiled
    program pairs the crops in place: no all-gather, all-to-all or collective-permute, only
    reductions (the crop-major order, sharded the same way, needs them)."""
    G, b, n_tok, upper = 8, 16, 6, 8 * 24  # b: global images
    rs = np.random.RandomState(8)
    s_g, s_l, t_raw = logits(rs, 2 * b), logits(rs, N_LOCAL * b), logits(rs, 2 * b)
    cls = koleo_input(9, 2 * b)
    masks = np.zeros((2 * b, n_tok), bool)
    for r in range(2 * b):  # at most 3 tokens per crop: a group's 4 crops fit its 24 slots
        masks[r, rs.choice(n_tok, size=rs.randint(0, 4), replace=False)] = True
    tok = logits(rs, 2 * b * n_tok)  # a logit row per (crop, token) of the global crops

    def all_losses(s_g, s_l, t_raw, cls, masks, tok, n_groups):
        t = losses.swap_global_crops(t_raw, n_groups=n_groups)
        p = jax.nn.softmax(t / 0.04)
        local, glob = losses.dino_loss(s_g, s_l, p, n_groups=n_groups)
        koleo = losses.koleo_loss(cls, n_shards=G, n_groups=n_groups)
        buf = losses.masked_token_buffer(masks, upper, n_shards=G, n_groups=n_groups)
        # each block of the buffer gathers from its group's rows (as the step does)
        tg = tok.reshape(n_groups, -1, K)
        at = buf.indices.reshape(n_groups, -1) - (jnp.arange(n_groups) * tg.shape[1])[:, None]
        pt = jnp.take_along_axis(tg, at[..., None], axis=1).reshape(-1, K)
        ibot = losses.ibot_patch_loss(pt, jax.nn.softmax(pt / 0.04), buf.weights, buf.valid, 2 * b)
        center = centering.ibot_update_center(
            jnp.zeros((1, 1, K)), pt, buf.valid, shard_ids=buf.shard_ids, n_shards=G,
            blocks=n_groups == G,
        )  # fmt: skip
        return local, glob, koleo, ibot, center, buf.n_dropped

    ref = jax.jit(partial(all_losses, n_groups=1))(s_g, s_l, t_raw, cls, masks, tok)
    blocked = (
        to_blocks(s_g, 2, G), to_blocks(s_l, N_LOCAL, G), to_blocks(t_raw, 2, G),
        to_blocks(cls, 2, G), to_blocks(masks, 2, G),
        to_blocks(tok.reshape(2 * b, n_tok, K), 2, G).reshape(-1, K),
    )  # fmt: skip
    mesh = jax.make_mesh((G,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, P("data"))
    f = jax.jit(partial(all_losses, n_groups=G))
    got = f(*[jax.device_put(a, rows) for a in blocked])
    names = ("dino_local", "dino_global", "koleo", "ibot", "ibot_center")
    for name, g, r in zip(names, got, ref):
        assert rel_err(g, r) <= TOL, (name, rel_err(g, r))
    assert int(got[-1]) == int(ref[-1]) == 0
    # the swap pairs teacher crop 1 - i with student crop i inside each block
    swapped = losses.swap_global_crops(jnp.asarray(blocked[2]), n_groups=G)
    np.testing.assert_array_equal(swapped, to_blocks(np.concatenate([t_raw[b:], t_raw[:b]]), 2, G))

    def moves(fn, args):
        hlo = fn.lower(*[jax.device_put(a, rows) for a in args]).compile().as_text()
        return {c for c in ("all-gather", "all-to-all", "collective-permute") if c in hlo}

    assert moves(f, blocked) == set()
    crop_major = (s_g, s_l, t_raw, cls, masks, tok)
    assert moves(jax.jit(partial(all_losses, n_groups=1)), crop_major)  # what the blocks avoid


# ---------------------------------------------------------------------------------------------
# KoLeo
# ---------------------------------------------------------------------------------------------


def official_koleo_per_gpu(cls: np.ndarray, n_gpus: int) -> float:
    """n_gpus official GPUs: GPU g holds images g*b..(g+1)*b of both crops (crop-major locally);
    its loss is sum(koleo(p) for p in local_cls.chunk(2)); DDP averages the GPUs' losses."""
    crops = np.split(cls, 2)
    b = crops[0].shape[0] // n_gpus
    koleo, per_gpu = KoLeoLoss(), []
    for g in range(n_gpus):
        local = t_(np.concatenate([c[g * b : (g + 1) * b] for c in crops]))
        per_gpu.append(sum(koleo(p) for p in local.chunk(2)).item())
    return float(np.mean(per_gpu))


def koleo_input(seed: int, n: int, d: int = 64) -> np.ndarray:
    x = np.random.RandomState(seed).randn(n, d).astype(np.float32)
    x[5] = x[2]  # identical vectors: d = ||0 + 1e-8|| = 1e-8 sqrt(D), the PairwiseDistance quirk
    return x


@pytest.mark.parametrize("n_shards", [1, 2, 4])
def test_koleo_matches_official_per_gpu(n_shards):
    x = koleo_input(4, 2 * 8)
    want = official_koleo_per_gpu(x, n_shards)
    got = jax.jit(partial(losses.koleo_loss, n_shards=n_shards))(jnp.asarray(x))
    assert rel_err(got, want) <= TOL, (n_shards, rel_err(got, want))


def test_koleo_gradient_matches_official():
    x = koleo_input(5, 2 * 8)
    xt = t_(x).requires_grad_()
    sum(KoLeoLoss()(p) for p in xt.chunk(2)).backward()
    g = jax.grad(losses.koleo_loss)(jnp.asarray(x))
    assert rel_err(g, xt.grad.numpy()) <= TOL, rel_err(g, xt.grad.numpy())


# ---------------------------------------------------------------------------------------------
# Sharding and input checks
# ---------------------------------------------------------------------------------------------


def test_sharded_losses_equal_unsharded():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, P("data"))
    rs = np.random.RandomState(6)
    b, upper = 8, 64
    s_global, s_local, t_probs = logits(rs, 2 * b), logits(rs, N_LOCAL * b), logits(rs, 2 * b)
    t_probs = np.asarray(jax.nn.softmax(t_probs / 0.04))
    s_patch, t_patch = logits(rs, upper), np.asarray(jax.nn.softmax(logits(rs, upper) / 0.04))
    valid = np.arange(upper) < 41
    weights = np.where(valid, rs.uniform(0.02, 0.5, upper), 0).astype(np.float32)
    cls = koleo_input(7, 2 * 16)

    def all_losses(s_global, s_local, t_probs, s_patch, t_patch, weights, valid, cls):
        local, glob = losses.dino_loss(s_global, s_local, t_probs)
        ibot = losses.ibot_patch_loss(s_patch, t_patch, weights, valid, n_images=2 * b)
        k1 = losses.koleo_loss(cls, n_shards=1)
        k8 = losses.koleo_loss(cls, n_shards=8)
        return local, glob, ibot, k1, k8

    args = (s_global, s_local, t_probs, s_patch, t_patch, weights, valid, cls)
    ref = jax.jit(all_losses)(*map(jnp.asarray, args))
    sharded = [jax.device_put(a, rows) for a in args]
    got = jax.jit(all_losses)(*sharded)
    for name, g, r in zip(("dino_local", "dino_global", "ibot", "koleo1", "koleo8"), got, ref):
        assert rel_err(g, r) <= TOL, (name, rel_err(g, r))


def test_bad_inputs_raise_clear_errors():
    x = jnp.zeros((8, 4))
    with pytest.raises(ValueError, match="same"):
        losses.dino_loss(x, None, jnp.zeros((6, 4)))
    with pytest.raises(ValueError, match="n_local"):
        losses.dino_loss(x, jnp.zeros((6, 4)), x)
    with pytest.raises(ValueError, match="n_shards=3"):
        losses.koleo_loss_single(x, n_shards=3)
    with pytest.raises(ValueError, match="multiple"):
        losses.swap_global_crops(jnp.zeros((7, 4)))
