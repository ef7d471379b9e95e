"""DINOHead vs the official `dinov2.layers.dino_head.DINOHead`, and the strict head converter."""

from __future__ import annotations

import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dinojax.convert.heads import dino_head_from_torch, dino_head_to_torch, head_config_from_torch
from dinojax.models.heads import DINOHead

logging.getLogger("dinov2").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="xFormers not available")
warnings.filterwarnings("ignore", message=".*weight_norm.*deprecated", category=FutureWarning)

from dinov2.layers.dino_head import DINOHead as OfficialHead  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated:FutureWarning")


def official_head(seed=0, **kw) -> torch.nn.Module:
    """Official head with every parameter randomised (weight_g too, so it cannot hide)."""
    torch.manual_seed(seed)
    head = OfficialHead(**kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in head.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("weight_g"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            else:
                p.copy_(r / np.sqrt(p.shape[1]))
    return head.eval()


def state_dict_np(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def jax_head(cfg: dict, tree: dict, **kw) -> DINOHead:
    head = DINOHead(
        cfg["in_dim"], cfg["out_dim"], nlayers=cfg["nlayers"], hidden_dim=cfg["hidden_dim"],
        bottleneck_dim=cfg["bottleneck_dim"], mlp_bias=cfg["mlp_bias"], rngs=nnx.Rngs(0), **kw,
    )  # fmt: skip
    state = nnx.state(head, nnx.Param)
    nnx.replace_by_pure_dict(state, tree)
    nnx.update(head, state)
    return head


@pytest.mark.parametrize(
    "kw",
    [
        dict(in_dim=48, out_dim=96, nlayers=3, hidden_dim=64, bottleneck_dim=32),
        dict(in_dim=48, out_dim=96, nlayers=1, bottleneck_dim=32),
        dict(in_dim=48, out_dim=80, nlayers=4, hidden_dim=40, bottleneck_dim=24, mlp_bias=False),
    ],
    ids=["3layers", "1layer", "4layers_nobias"],
)
def test_head_matches_official_and_round_trips(kw):
    th = official_head(**kw)
    sd = state_dict_np(th)
    cfg = head_config_from_torch(sd)
    assert cfg == {
        "in_dim": kw["in_dim"], "out_dim": kw["out_dim"], "nlayers": kw["nlayers"],
        "hidden_dim": kw.get("hidden_dim") if kw["nlayers"] > 1 else None,
        "bottleneck_dim": kw["bottleneck_dim"], "mlp_bias": kw.get("mlp_bias", True),
    }  # fmt: skip
    tree = dino_head_from_torch(sd)
    head = jax_head(cfg, tree)
    x = np.random.RandomState(0).randn(2, 5, kw["in_dim"]).astype(np.float32)
    with torch.no_grad():
        want = th(torch.from_numpy(x)).numpy()
    with jax.default_matmul_precision("highest"):
        got = np.asarray(jax.jit(lambda m, v: m(v))(head, jnp.asarray(x)))
    assert got.dtype == np.float32 and got.shape == want.shape
    # relative to the largest output (elementwise is ill-conditioned: outputs cross zero);
    # measured 3.8e-7 - 4.3e-7, the same as torch float32 vs torch float64 (2.1e-7 - 4.3e-7)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= 1e-6, rel

    back = dino_head_to_torch(nnx.to_pure_dict(nnx.state(head, nnx.Param)))
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape, k
        assert np.array_equal(back[k], sd[k]), k  # bit-exact


def test_param_paths_shapes_and_logical_axes():
    head = DINOHead(16, 40, hidden_dim=24, bottleneck_dim=8, rngs=nnx.Rngs(0))
    state = nnx.state(head, nnx.Param)
    flat = {
        ".".join(map(str, path)): v for path, v in nnx.to_flat_state(state)
    }  # fmt: skip
    shapes = {k: v.shape for k, v in flat.items()}
    assert shapes == {
        "mlp.0.kernel": (16, 24), "mlp.0.bias": (24,), "mlp.1.kernel": (24, 24),
        "mlp.1.bias": (24,), "mlp.2.kernel": (24, 8), "mlp.2.bias": (8,),
        "last_layer.weight_v": (8, 40), "last_layer.weight_g": (40,),
    }  # fmt: skip
    names = {k: v.get_metadata()["out_sharding"] for k, v in flat.items()}
    assert names["mlp.0.kernel"] == ("embed", "mlp")
    assert names["mlp.2.kernel"] == ("mlp", "bottleneck")
    assert names["last_layer.weight_v"] == ("bottleneck", "prototypes")
    assert names["last_layer.weight_g"] == ("prototypes",)
    assert all(v.dtype == jnp.float32 and not v.weak_type for v in jax.tree.leaves(state))


def test_init_follows_official_recipe():
    head = DINOHead(64, 512, hidden_dim=256, bottleneck_dim=128, rngs=nnx.Rngs(3))
    p = nnx.to_pure_dict(nnx.state(head, nnx.Param))
    for i in range(3):
        k = np.asarray(p["mlp"][i]["kernel"])
        assert abs(k.std() - 0.02) < 0.002, (i, k.std())  # trunc_normal(0.02), untruncated
        assert np.all(np.asarray(p["mlp"][i]["bias"]) == 0)
    v = np.asarray(p["last_layer"]["weight_v"])
    bound = 1 / np.sqrt(128)  # nn.Linear default init kept for weight_v (official DINOHead)
    assert v.min() >= -bound and v.max() <= bound and v.max() > 0.95 * bound
    assert np.all(np.asarray(p["last_layer"]["weight_g"]) == 1)


def test_bf16_compute_keeps_float32_params_and_logits():
    th = official_head(in_dim=32, out_dim=64, hidden_dim=48, bottleneck_dim=16)
    sd = state_dict_np(th)
    cfg = head_config_from_torch(sd)
    head = jax_head(cfg, dino_head_from_torch(sd), dtype=jnp.bfloat16)
    x = np.random.RandomState(1).randn(4, 32).astype(np.float32)
    out = head(jnp.asarray(x))
    assert out.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(head, nnx.Param)))
    with torch.no_grad():
        want = th(torch.from_numpy(x)).numpy()
    # bf16 MLP: ~3 significant digits; logits are bounded by |g| <= 1.5 here.
    assert np.abs(np.asarray(out) - want).max() < 3e-2


def test_parametrizations_weight_norm_names_are_accepted():
    sd = state_dict_np(official_head(in_dim=8, out_dim=12, nlayers=2, hidden_dim=10,
                                     bottleneck_dim=6))  # fmt: skip
    new = {k: v for k, v in sd.items() if not k.startswith("last_layer")}
    new["last_layer.parametrizations.weight.original0"] = sd["last_layer.weight_g"]
    new["last_layer.parametrizations.weight.original1"] = sd["last_layer.weight_v"]
    a, b = dino_head_from_torch(sd), dino_head_from_torch(new)
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b))


def test_bad_state_dicts_name_every_offending_key():
    sd = state_dict_np(official_head(in_dim=8, out_dim=12, hidden_dim=10, bottleneck_dim=6))
    bad = dict(sd)
    del bad["mlp.2.bias"]
    bad["mlp.4.weight"] = np.zeros((6, 11), np.float32)  # wrong shape
    bad["mlp.1.running_mean"] = np.zeros(10, np.float32)  # BatchNorm head: unsupported
    bad["extra"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError) as e:
        dino_head_from_torch(bad)
    msg = str(e.value)
    for key in ("mlp.2.bias", "mlp.4.weight", "mlp.1.running_mean", "extra", "(6, 10)"):
        assert key in msg, (key, msg)

    with pytest.raises(ValueError, match="last_layer.weight_v"):
        dino_head_from_torch({k: v for k, v in sd.items() if "weight_v" not in k})
    with pytest.raises(ValueError, match="mlp.0.weight"):
        dino_head_from_torch({"last_layer.weight_v": sd["last_layer.weight_v"]})
    g_bad = dict(sd, **{"last_layer.weight_g": np.ones((12,), np.float32)})
    with pytest.raises(ValueError, match=r"last_layer.weight_g: got \(12,\), expected \(12, 1\)"):
        dino_head_from_torch(g_bad)


def test_bad_trees_are_rejected():
    tree = dino_head_from_torch(
        state_dict_np(official_head(in_dim=8, out_dim=12, hidden_dim=10, bottleneck_dim=6))
    )
    str_keys = {
        "last_layer": tree["last_layer"],
        "mlp": {str(k): v for k, v in tree["mlp"].items()},
    }
    assert set(dino_head_to_torch(str_keys)) == set(dino_head_to_torch(tree))
    with pytest.raises(ValueError, match="expected keys"):
        dino_head_to_torch({"mlp": tree["mlp"]})
    with pytest.raises(ValueError, match="0..n-1"):
        dino_head_to_torch({**tree, "mlp": {0: tree["mlp"][0], 2: tree["mlp"][2]}})
    wrong = {**tree, "last_layer": {**tree["last_layer"], "weight_v": np.zeros((7, 12))}}
    with pytest.raises(ValueError, match="wrong shapes"):  # bottleneck 7 vs the MLP's 6
        dino_head_to_torch(wrong)
