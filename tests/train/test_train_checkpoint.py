"""Checkpointer: atomic saves, keep-K, restore onto another mesh (typed PRNG keys included),
numpy restore of a subtree, clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from dinojax.train.checkpoint import Checkpointer, CheckpointError, abstract_state


def _mesh(shape):
    return jax.make_mesh(shape, ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)


def _state(mesh):
    w = jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16)
    return {
        "teacher": {"w": jax.device_put(w, NamedSharding(mesh, P(None, "fsdp")))},
        "student": {"w": jax.device_put(w + 1, NamedSharding(mesh, P("fsdp")))},
        "rng": jax.random.key(7),
        "step": jnp.int32(3),
    }


def test_save_on_2x4_restore_on_8x1(tmp_path):
    src = _state(_mesh((2, 4)))
    ckpt = Checkpointer(tmp_path, save_every=2)
    assert ckpt.save(2, src, {"step": 2}, {"name": "x"})
    ckpt.wait()
    dst_mesh = _mesh((8, 1))
    target = abstract_state(src)
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=NamedSharding(dst_mesh, P("data") if a.ndim else P())
        ),
        target,
    )
    state, data, config = ckpt.restore(None, target)
    ckpt.close()
    assert data == {"step": 2} and config == {"name": "x"}
    assert state["teacher"]["w"].sharding.mesh.shape == dst_mesh.shape
    assert state["teacher"]["w"].sharding.spec == P("data")
    np.testing.assert_array_equal(state["student"]["w"], src["student"]["w"])
    np.testing.assert_array_equal(
        jax.random.key_data(state["rng"]), jax.random.key_data(src["rng"])
    )
    assert int(state["step"]) == 3


def test_periodic_keep_and_force(tmp_path):
    mesh = _mesh((2, 4))
    ckpt = Checkpointer(tmp_path, save_every=2, keep=2)
    state = _state(mesh)
    saved = [s for s in range(1, 8) if ckpt.save(s, state, {"step": s}, {})]
    assert saved == [2, 4, 6]
    assert ckpt.save(7, state, {"step": 7}, {}, force=True)
    assert not ckpt.save(7, state, {"step": 7}, {}, force=True)  # already there
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7]
    np.testing.assert_array_equal(ckpt.restore_numpy(7, ("teacher",))["w"], state["teacher"]["w"])
    ckpt.close()


def test_half_written_checkpoint_is_never_restored(tmp_path):
    mesh = _mesh((2, 4))
    state = _state(mesh)
    ckpt = Checkpointer(tmp_path, save_every=2)
    ckpt.save(2, state, {"step": 2}, {})
    ckpt.close()
    # A save killed half-way leaves orbax's temporary directory, never a step directory.
    crashed = tmp_path / "4.orbax-checkpoint-tmp-1234"
    (crashed / "state").mkdir(parents=True)
    (crashed / "state" / "garbage").write_bytes(b"\0" * 10)
    ckpt = Checkpointer(tmp_path, save_every=2)
    assert ckpt.latest_step() == 2 and ckpt.all_steps() == [2]
    with pytest.raises(CheckpointError, match="no checkpoint for step 4"):
        ckpt.restore(4, abstract_state(state))
    ckpt.close()


def test_errors_are_one_line(tmp_path):
    ckpt = Checkpointer(tmp_path, save_every=2)
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        ckpt.restore(None, {})
    ckpt.save(2, {"w": jnp.zeros((4,))}, {"step": 2}, {})
    ckpt.wait()
    with pytest.raises(CheckpointError, match="no checkpoint for step 5"):
        ckpt.restore(5, {"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
    with pytest.raises(CheckpointError, match="cannot restore checkpoint 2"):
        ckpt.restore(2, {"w": jax.ShapeDtypeStruct((5,), jnp.float32)})
    with pytest.raises(CheckpointError, match="no teacher subtree"):
        ckpt.restore_numpy(2, ("teacher",))
    ckpt.close()
    with pytest.raises(ValueError, match="checkpoint_every"):
        Checkpointer(tmp_path, save_every=0)
