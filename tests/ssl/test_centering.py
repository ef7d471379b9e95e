"""Teacher targets vs the official `dinov2.loss` objects: lazy EMA centering and Sinkhorn-Knopp.

Relative error = max|ours - official| / max|official| (float32 on both sides).
"""

from __future__ import annotations

import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dinojax.ssl import centering

logging.getLogger("dinov2").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="xFormers not available")

from dinov2.loss import DINOLoss, iBOTPatchLoss  # noqa: E402

K = 256
TOL = 1e-6


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def logits(rs: np.random.RandomState, n: int, k: int = K) -> np.ndarray:
    # Head logits are bounded by |g_k| (unit-norm z and v), so [-1.5, 1.5] is the realistic range.
    return rs.uniform(-1.5, 1.5, (n, k)).astype(np.float32)


_center_step = jax.jit(centering.center_and_update)
_ibot_center_step = jax.jit(centering.ibot_center_and_update)

# Why the chained float32 comparison stops at the centers: from step 2 on the official and our
# probabilities use centers that agree to ~1 ulp (float32 sums in a different order). A 1-ulp
# change of c can flip the rounding of (t - c) by one ulp of t (1.2e-7 at |t| ~ 1.5), which the
# division by tau = 0.04 turns into a ~3e-6 relative change of a probability -- the official
# result is exactly as sensitive to its own summation order. So in float32 we check every center
# and each step's probabilities given the official center (<= 1e-6), and the whole chained
# sequence in float64 on both sides (official module `.double()`, JAX under enable_x64).
DINO_STEPS = ((16, 0.04), (16, 0.055))
IBOT_STEPS = ((37, 0.04), (51, 0.06))
IBOT_UPPER = 64


def _dino_sequences(dtype):
    """(official probs, official next centers, our probs, our next centers) over two steps."""
    rs = np.random.RandomState(0)
    official = DINOLoss(K).to(getattr(torch, dtype))
    center = centering.init_center(K, dtype=dtype)
    assert center.shape == official.center.shape
    out = ([], [], [], [], [])
    for n, temp in DINO_STEPS:
        t = logits(rs, n).astype(dtype)
        out[0].append(official.softmax_center_teacher(torch.from_numpy(t), teacher_temp=temp))
        used = official.center.numpy().copy()
        official.update_center(torch.from_numpy(t))
        official.apply_center_update()  # idempotent: the next softmax call will not re-apply
        out[1].append(official.center.numpy().copy())
        # the official center of this step fed to our formula (isolates the formula)
        out[4].append(centering.softmax_center_teacher(jnp.asarray(t), jnp.asarray(used), temp))
        probs, center = _center_step(jnp.asarray(t), center, jnp.asarray(temp, dtype))
        out[2].append(probs)
        out[3].append(center)
    return out


def test_dino_lazy_centering_two_steps_matches_official_float32():
    want_p, want_c, got_p, got_c, isolated = _dino_sequences("float32")
    assert rel_err(got_p[0], want_p[0].numpy()) <= TOL  # step 1 uses c = 0
    for step in range(2):
        assert got_c[step].shape == (1, K) and got_c[step].dtype == jnp.float32
        assert rel_err(got_c[step], want_c[step]) <= TOL, step
        assert rel_err(isolated[step], want_p[step].numpy()) <= TOL, step


def test_dino_lazy_centering_two_steps_matches_official_float64():
    with jax.enable_x64(True):
        want_p, want_c, got_p, got_c, _ = _dino_sequences("float64")
        for step in range(2):
            assert got_p[step].dtype == jnp.float64
            assert rel_err(got_p[step], want_p[step].numpy()) <= 1e-12, step
            assert rel_err(got_c[step], want_c[step]) <= 1e-12, step


def _ibot_sequences(dtype):
    rs = np.random.RandomState(1)
    official = iBOTPatchLoss(K).to(getattr(torch, dtype))
    center = centering.init_center(K, ibot=True, dtype=dtype)
    assert center.shape == official.center.shape
    out = ([], [], [], [], [])
    for n, temp in IBOT_STEPS:
        buf = logits(rs, IBOT_UPPER).astype(dtype)
        buf[n:] = 50.0  # padding rows must not leak into any sum
        valid = np.arange(IBOT_UPPER) < n
        # as facebookresearch/dinov2 `dinov2/train/ssl_meta_arch.py` `forward_backward`'s
        # get_teacher_output: (n, K) -> unsqueeze(0) -> center -> squeeze
        tok = torch.from_numpy(buf[:n]).unsqueeze(0)
        want = official.softmax_center_teacher(tok[:, :n], teacher_temp=temp).squeeze(0)
        out[0].append(want.numpy())
        used = official.center.numpy().copy()
        official.update_center(tok[:n])
        official.apply_center_update()
        out[1].append(official.center.numpy().copy())
        iso = centering.ibot_softmax_center_teacher(
            jnp.asarray(buf), jnp.asarray(used), temp, jnp.asarray(valid)
        )
        out[4].append(np.asarray(iso)[:n])
        probs, center = _ibot_center_step(
            jnp.asarray(buf), center, jnp.asarray(temp, dtype), jnp.asarray(valid)
        )
        probs = np.asarray(probs)
        assert np.all(probs[n:] == 0)
        out[2].append(probs[:n])
        out[3].append(center)
    return out


def test_ibot_lazy_centering_two_steps_matches_official_float32():
    want_p, want_c, got_p, got_c, isolated = _ibot_sequences("float32")
    assert rel_err(got_p[0], want_p[0]) <= TOL
    for step in range(2):
        assert got_c[step].shape == (1, 1, K) and got_c[step].dtype == jnp.float32
        assert rel_err(got_c[step], want_c[step]) <= TOL, step
        assert rel_err(isolated[step], want_p[step]) <= TOL, step


def test_ibot_lazy_centering_two_steps_matches_official_float64():
    with jax.enable_x64(True):
        want_p, want_c, got_p, got_c, _ = _ibot_sequences("float64")
        for step in range(2):
            assert rel_err(got_p[step], want_p[step]) <= 1e-12, step
            assert rel_err(got_c[step], want_c[step]) <= 1e-12, step


def test_ibot_center_per_shard_mean_like_official_per_gpu():
    """shard_ids: the mean of per-GPU means, the quantity an n-GPU official run all-reduces."""
    rs = np.random.RandomState(2)
    upper, counts = 40, (9, 14)  # tokens of shard 0 and shard 1, then padding
    buf = logits(rs, upper)
    n = sum(counts)
    valid = np.arange(upper) < n
    shard_ids = np.r_[np.zeros(counts[0]), np.ones(counts[1]), np.zeros(upper - n)].astype(np.int32)
    # per GPU, the official object computes sum(tokens.mean(1)) over its own tokens ...
    per_gpu = []
    for lo, hi in ((0, counts[0]), (counts[0], n)):
        obj = iBOTPatchLoss(K)
        obj.reduce_center_update(torch.from_numpy(buf[lo:hi]).unsqueeze(0))
        if obj.reduce_handle is not None:
            obj.reduce_handle.wait()
        per_gpu.append(obj.async_batch_center.numpy())
    # ... which is all-reduced (summed) and divided by len * world_size = 1 * 2
    want = 0.1 * (per_gpu[0] + per_gpu[1]) / 2
    got = centering.ibot_update_center(
        centering.init_center(K, ibot=True), jnp.asarray(buf), jnp.asarray(valid),
        shard_ids=jnp.asarray(shard_ids), n_shards=2,
    )  # fmt: skip
    assert rel_err(got, want) <= TOL
    single = centering.ibot_update_center(
        centering.init_center(K, ibot=True), jnp.asarray(buf), jnp.asarray(valid)
    )
    assert rel_err(single, 0.1 * buf[:n].mean(0)) <= TOL  # one shard: the plain mean


def test_sinkhorn_knopp_matches_official():
    rs = np.random.RandomState(3)
    t = logits(rs, 24)
    want = DINOLoss(K).sinkhorn_knopp_teacher(torch.from_numpy(t), teacher_temp=0.04).numpy()
    got = jax.jit(centering.sinkhorn_knopp_teacher)(jnp.asarray(t), jnp.float32(0.04))
    assert rel_err(got, want) <= TOL, rel_err(got, want)
    np.testing.assert_allclose(np.asarray(got).sum(-1), 1.0, rtol=1e-5)


def test_ibot_sinkhorn_knopp_matches_official(torch_process_group):
    rs = np.random.RandomState(4)
    upper, n = 48, 29
    buf = logits(rs, upper)
    buf[n:] = 30.0  # padding: exp(30/0.04) would overflow if it leaked in
    valid = np.arange(upper) < n
    n_tensor = torch.full((1,), n, dtype=torch.long)
    want = iBOTPatchLoss(K).sinkhorn_knopp_teacher(
        torch.from_numpy(buf[:n]), teacher_temp=0.05, n_masked_patches_tensor=n_tensor
    )
    got = jax.jit(centering.ibot_sinkhorn_knopp_teacher)(
        jnp.asarray(buf), jnp.float32(0.05), jnp.asarray(valid)
    )
    got = np.asarray(got)
    assert rel_err(got[:n], want.numpy()) <= TOL, rel_err(got[:n], want.numpy())
    assert np.all(got[n:] == 0) and np.all(np.isfinite(got))


def test_sharded_equals_unsharded():
    """Batch axis sharded over 8 devices: the global sums are all-reduces inserted by XLA."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, P("data"))
    rs = np.random.RandomState(5)
    t, buf = logits(rs, 32), logits(rs, 64)
    valid = np.arange(64) < 45
    shard_ids = (np.arange(64) * 3) % 8  # arbitrary token -> shard assignment
    temp = jnp.float32(0.04)

    def targets(t, buf, valid, shard_ids, c, ci, temp):
        p, c2 = centering.center_and_update(t, c, temp)
        pi, ci2 = centering.ibot_center_and_update(
            buf, ci, temp, valid, shard_ids=shard_ids, n_shards=8
        )
        sk = centering.sinkhorn_knopp_teacher(t, temp)
        ski = centering.ibot_sinkhorn_knopp_teacher(buf, temp, valid)
        return p, c2, pi, ci2, sk, ski

    c, ci = centering.init_center(K) + 0.01, centering.init_center(K, ibot=True) - 0.02
    args = (t, buf, valid, shard_ids)
    ref = jax.jit(targets)(*map(jnp.asarray, args), c, ci, temp)
    sharded = [jax.device_put(a, rows) for a in args]
    assert len(sharded[0].sharding.device_set) == 8
    got = jax.jit(targets)(*sharded, c, ci, temp)
    for name, a, b in zip(("probs", "center", "ibot", "ibot_center", "sk", "ibot_sk"), got, ref):
        assert rel_err(a, b) <= TOL, (name, rel_err(a, b))


@pytest.mark.parametrize("momentum", [0.9, jnp.float32(0.9)])
def test_update_center_keeps_shape_dtype_and_accepts_traced_momentum(momentum):
    c = centering.init_center(8)
    t = jnp.ones((4, 8), jnp.bfloat16)
    new = jax.jit(centering.update_center)(c, t, momentum)
    assert new.shape == (1, 8) and new.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(new), 0.1, rtol=1e-6)


def test_center_state_round_trip_compiles_once():
    """The new center has the input center's exact type (no weak type): feeding it back to the
    jitted step must not retrace (a weak type is part of the jit cache key: JAX documentation,
    "Type promotion semantics", weakly-typed values)."""
    # fresh wrappers: jit caches are shared by every jax.jit of the same function object
    step = jax.jit(lambda *a: centering.center_and_update(*a))
    ibot_step = jax.jit(lambda *a: centering.ibot_center_and_update(*a))
    c, ci = centering.init_center(8), centering.init_center(8, ibot=True)
    t, valid = jnp.ones((4, 8)), jnp.arange(4) < 3
    for i in range(3):
        _, c = step(t, c, jnp.float32(0.04 + i / 100))
        _, ci = ibot_step(t, ci, jnp.float32(0.04), valid)
    assert step._cache_size() == 1 and ibot_step._cache_size() == 1
