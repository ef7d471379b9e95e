"""Mesh construction, logical-name -> mesh sharding rules, batch sharding, the sharded check."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from dinojax.models.config import get_config
from dinojax.models.heads import DINOHead
from dinojax.models.vit import DinoVisionTransformer
from dinojax.sharding import (
    assert_sharded,
    batch_axes,
    batch_sharding,
    hybrid_device_array,
    logical_names,
    logical_to_mesh_sharding,
    make_mesh,
    num_slices,
    spec_for,
)

RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", None),
    ("hidden", "fsdp"),
    ("prototypes", "fsdp"),
    ("layers", None),
)


def test_make_mesh_fills_minus_one_with_auto_axes():
    mesh = make_mesh()
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    mesh = make_mesh((2, -1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert dict(make_mesh((1, 1), devices=jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1}
    with pytest.raises(ValueError, match="does not divide"):
        make_mesh((3, -1))
    with pytest.raises(ValueError, match="more than one -1"):
        make_mesh((-1, -1))
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh((4, 4))
    with pytest.raises(ValueError, match="differ in length"):
        make_mesh((8,), ("data", "fsdp"))


class FakeSliceDevice:
    """A stand-in for a TPU device of a multi-slice pod: what `create_hybrid_device_mesh` reads
    (`slice_index`, and `platform` / `device_kind`, which send a non-TPU device list to a plain
    reshape inside each slice)."""

    platform = device_kind = "cpu"

    def __init__(self, id: int, slice_index: int):
        self.id, self.slice_index = id, slice_index

    def __repr__(self) -> str:
        return f"D{self.id}/s{self.slice_index}"


def test_hybrid_mesh_puts_slices_on_the_data_axis():
    # 8 devices of 2 slices, listed interleaved (as a multi-process device list may be)
    devices = [FakeSliceDevice(i, i % 2) for i in range(8)]
    assert num_slices(devices) == 2 and num_slices(jax.devices()) == 1
    # the recipes' mesh (1, -1) per slice; dcn unset: the slices go on the first axis
    arr = hybrid_device_array((1, -1), ("data", "fsdp"), devices)
    assert arr.shape == (2, 4)
    assert [[d.id for d in row] for row in arr] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    # every fsdp row lies in one slice: FSDP gathers never cross; data-parallel columns do
    assert all(len({d.slice_index for d in row}) == 1 for row in arr)
    assert all(len({d.slice_index for d in col}) == 2 for col in arr.T)
    # explicit dcn_shape across the second axis: each slice one contiguous block of columns
    arr = hybrid_device_array((2, -1), ("data", "fsdp"), devices, dcn_shape=(1, 2))
    assert arr.shape == (2, 4)
    assert {d.slice_index for d in arr[:, :2].flat} == {0}
    assert {d.slice_index for d in arr[:, 2:].flat} == {1}
    with pytest.raises(ValueError, match=r"dcn_shape \(4, 1\) needs 4 slices.*in 2") as e:
        hybrid_device_array((1, -1), ("data", "fsdp"), devices, dcn_shape=(4, 1))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="does not divide 4 devices per slice"):
        hybrid_device_array((3, -1), ("data", "fsdp"), devices)


def test_make_mesh_dcn_shape_on_one_slice():
    # CPU devices carry no slice_index: one slice. An explicit dcn_shape of 1s is the plain mesh;
    # asking for several slices is one line.
    assert dict(make_mesh((1, -1), dcn_shape=(1, 1)).shape) == {"data": 1, "fsdp": 8}
    with pytest.raises(ValueError, match="slice_index") as e:
        make_mesh((1, -1), dcn_shape=(2, 1))
    assert "\n" not in str(e.value)


def test_spec_rules_divisibility_and_axis_reuse():
    mesh = make_mesh((2, 4))
    assert spec_for((3, 64, 192), ("layers", "embed", "qkv"), mesh, RULES) == P(None, "fsdp")
    # not divisible by fsdp=4: replicated on that dim
    assert spec_for((3, 66, 192), ("layers", "embed", "qkv"), mesh, RULES) == P()
    # a mesh axis is used once per array: the second "embed" dim stays replicated
    assert spec_for((64, 64), ("embed", "embed"), mesh, RULES) == P("fsdp")
    # multi-axis rule
    assert spec_for((16, 5), ("batch", None), mesh, RULES) == P(("data", "fsdp"))
    assert spec_for((4,), None, mesh, RULES) == P()
    with pytest.raises(ValueError, match="do not match shape"):
        spec_for((4, 4), ("embed",), mesh, RULES)
    with pytest.raises(ValueError, match="unknown mesh axis"):
        spec_for((8,), ("embed",), mesh, (("embed", "model"),))


def test_logical_to_mesh_sharding_from_nnx_metadata():
    mesh = make_mesh((2, 4))
    cfg = get_config("dinov2_vits14", embed_dim=64, depth=2, num_heads=2, img_size=56)
    vit = nnx.eval_shape(lambda: DinoVisionTransformer(cfg, rngs=nnx.Rngs(0)))
    head = nnx.eval_shape(
        lambda: DINOHead(64, 256, hidden_dim=32, bottleneck_dim=16, rngs=nnx.Rngs(0))
    )
    sh = logical_to_mesh_sharding(vit, mesh, RULES)
    assert sh["blocks"]["attn"]["qkv"]["kernel"].spec == P(None, "fsdp")
    assert sh["blocks"]["mlp"]["fc2"]["kernel"].spec == P(None, None, "fsdp")
    assert sh["pos_embed"].spec == P(None, None, "fsdp")
    assert sh["blocks"]["norm1"]["scale"].spec == P()  # "norm" has no rule: replicated
    hs = logical_to_mesh_sharding(head, mesh, RULES)
    assert hs["mlp"][0]["kernel"].spec == P("fsdp")  # (embed, mlp)
    assert hs["mlp"][1]["kernel"].spec == P("fsdp")  # (hidden, mlp)
    assert hs["last_layer"]["weight_v"].spec == P(None, "fsdp")  # (bottleneck, prototypes)
    # the same through an explicit names tree on a plain pytree of ShapeDtypeStructs
    names = logical_names(head)
    abstract = nnx.to_pure_dict(nnx.state(head, nnx.Param))
    again = logical_to_mesh_sharding(abstract, mesh, RULES, names)
    assert jax.tree.map(lambda s: s.spec, again) == jax.tree.map(lambda s: s.spec, hs)
    # no names: everything replicated
    repl = logical_to_mesh_sharding(abstract, mesh, RULES)
    assert all(s.spec == P() for s in jax.tree.leaves(repl))


def test_batch_sharding_and_assert_sharded():
    mesh = make_mesh((2, 4))
    assert batch_axes(mesh, RULES) == ("data", "fsdp")
    assert batch_axes(mesh) == ("data", "fsdp")  # default: every mesh axis
    bs = batch_sharding(mesh, (("batch", "data"),))
    assert bs.spec == P("data")
    x = jax.device_put(jnp.zeros((16, 3)), batch_sharding(mesh, RULES))
    assert x.sharding.spec == P(("data", "fsdp"))
    big = jax.device_put(jnp.zeros((64, 64)), NamedSharding(mesh, P("fsdp")))
    small = jax.device_put(jnp.zeros((4,)), NamedSharding(mesh, P()))
    assert_sharded({"big": big, "small": small}, min_size=1000)
    repl = jax.device_put(jnp.zeros((64, 64)), NamedSharding(mesh, P()))
    with pytest.raises(AssertionError, match=r"\['repl'\] \(64, 64\)"):
        assert_sharded({"big": big, "repl": repl}, min_size=1000)
    # on a single device nothing can be sharded: no complaint
    one = make_mesh((1, 1), devices=jax.devices()[:1])
    assert_sharded({"x": jax.device_put(np.zeros((64, 64)), NamedSharding(one, P()))}, 10)
