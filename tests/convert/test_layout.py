"""Stacked <-> per-layer block layouts: lossless both ways, per-layer checkpoints load, and the
unrolled (`scan_layers=False`) forward equals the scanned one."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import small_config

import dinojax
from dinojax.convert.backbone import ConversionError
from dinojax.convert.checkpoint import META, save_model
from dinojax.convert.layout import stack_blocks, unstack_blocks
from dinojax.models.vit import create_model


def _tree_equal(a, b) -> bool:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(np.array_equal(x, y) and x.dtype == y.dtype for x, y in zip(la, lb))


def test_unstack_then_stack_is_lossless():
    params = jax.tree.map(np.asarray, create_model(small_config(depth=3)).params())
    per = unstack_blocks(params)
    assert sorted(per["blocks"]) == [0, 1, 2]
    assert per["blocks"][1]["attn"]["qkv"]["kernel"].shape == (128, 384)
    assert np.array_equal(per["blocks"][2]["ls1"]["gamma"], params["blocks"]["ls1"]["gamma"][2])
    assert per["cls_token"] is params["cls_token"]
    assert _tree_equal(stack_blocks(per), params)
    # orbax hands back digit-string keys
    as_str = {**per, "blocks": {str(i): b for i, b in per["blocks"].items()}}
    assert _tree_equal(stack_blocks(as_str), params)


def test_stack_rejects_inconsistent_blocks():
    per = unstack_blocks(jax.tree.map(np.asarray, create_model(small_config(depth=3)).params()))
    with pytest.raises(ConversionError, match=r"0..depth-1, got \[0, 2\]"):
        stack_blocks({**per, "blocks": {0: per["blocks"][0], 2: per["blocks"][2]}})
    odd = dict(per["blocks"])
    norm1 = {"scale": np.zeros(5, np.float32), "bias": odd[1]["norm1"]["bias"]}
    odd[1] = {**odd[1], "norm1": norm1}
    with pytest.raises(ConversionError, match="block 1: shapes differ"):
        stack_blocks({**per, "blocks": odd})
    missing = dict(per["blocks"])
    missing[2] = {k: v for k, v in missing[2].items() if k != "ls2"}
    with pytest.raises(ConversionError, match=r"block 2: \['ls2.gamma'\]"):
        stack_blocks({**per, "blocks": missing})
    with pytest.raises(ConversionError, match="keyed 0..depth-1"):
        stack_blocks({**per, "blocks": {"first": per["blocks"][0]}})


def test_per_layer_checkpoint_directory_loads(tmp_path):
    import orbax.checkpoint as ocp

    model = create_model(small_config(depth=2), seed=3)
    save_model(tmp_path / "stacked", model)
    per = unstack_blocks(jax.tree.map(np.asarray, model.params()))
    per["blocks"] = {str(i): b for i, b in per["blocks"].items()}
    (tmp_path / "per").mkdir()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "per" / "state", {"backbone": per, "heads": {}, "extras": {}})
    ckptr.wait_until_finished()
    meta = json.loads((tmp_path / "stacked" / META).read_text())
    (tmp_path / "per" / META).write_text(json.dumps({**meta, "layout": "per_layer"}))
    loaded = dinojax.load(tmp_path / "per")
    assert _tree_equal(jax.tree.map(np.asarray, loaded.params()),
                       jax.tree.map(np.asarray, model.params()))  # fmt: skip


def test_scan_layers_false_gives_the_same_outputs():
    cfg = small_config(depth=2, drop_path_rate=0.2)
    scanned = create_model(cfg, seed=1)
    unrolled = create_model(cfg.replace(scan_layers=False), seed=1)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 56, 42, 3), np.float32))
    fwd = jax.jit(lambda m, v, k: m.forward_features(v, key=k))
    with jax.default_matmul_precision("highest"):
        for key in (None, jax.random.key(7)):  # eval, and training with stochastic depth
            a, b = fwd(scanned, x, key), fwd(unrolled, x, key)
            for k in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
                err = float(jnp.abs(a[k] - b[k]).max())
                assert err <= 1e-6, (key is not None, k, err)
