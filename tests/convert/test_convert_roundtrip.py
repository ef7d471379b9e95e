"""JAX -> PyTorch -> JAX is bit-exact, and the exported files load strictly in the reference code.

hub `.pth` / `.safetensors` -> official `DinoVisionTransformer.load_state_dict(strict=True)`
(v2, v1);
`--format hf` -> `Dinov2WithRegistersModel` / `Dinov2Model` strict; `--format teacher` -> official
`DINOHead` strict for each head. Reloaded torch models give the same outputs bit for bit (same
tensors, same code), and converting the exported file back gives the identical JAX tree.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from reference import (
    hf_register_vit,
    official_dino_head,
    official_vit,
    randomize_,
    small_config,
)

import dinojax
from dinojax.convert.backbone import expected_official_shapes
from dinojax.convert.checkpoint import convert, export, restore_tree, save_model
from dinojax.convert.heads import dino_head_from_torch, head_config_from_torch
from dinojax.models.heads import DINOHead
from dinojax.models.vit import create_model


def _same_tree(a, b) -> bool:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb))


def _randomize_jax(model, seed: int) -> None:
    """Random values everywhere (LayerScale, tokens, norms too), so nothing hides at init."""
    params = model.params()
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    new = [rng.standard_normal(x.shape).astype(np.float32) * 0.1 for x in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, new))


def _load_torch(path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, weights_only=True)


def _torch_ff(model, x):
    with torch.no_grad():
        ff = model.forward_features(torch.from_numpy(x))
    return {k: v for k, v in ff.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("family", ["dinov2", "dino"])
def test_jax_to_official_to_jax_is_bit_exact(tmp_path, family, suffix):
    over = {"family": "dino", "layerscale_init": None} if family == "dino" else {}
    cfg = small_config(**over)
    model = create_model(cfg)
    _randomize_jax(model, seed=1)
    save_model(tmp_path / "jax", model)

    export(tmp_path / "jax", tmp_path / f"official{suffix}")
    sd = _load_torch(tmp_path / f"official{suffix}")
    ref = official_vit(cfg, seed=0)  # other random weights, replaced by the strict load
    if family == "dino":
        # v1 has no mask token; the v2 class always creates one (unused without masks).
        assert "mask_token" not in sd
        sd = {**sd, "mask_token": ref.mask_token.detach().clone()}
    ref.load_state_dict(sd, strict=True)

    x = np.random.default_rng(0).standard_normal((2, 3, 56, 84), dtype=np.float32)
    want = _torch_ff(ref, x)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(lambda m, v: m.forward_features(v))(model, x.transpose(0, 2, 3, 1))
    for k in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
        assert np.abs(np.asarray(got[k]) - want[k].numpy()).max() <= 1e-4, k

    convert(tmp_path / f"official{suffix}", tmp_path / "back")
    a, b = restore_tree(tmp_path / "jax")[0], restore_tree(tmp_path / "back")[0]
    assert _same_tree(a["backbone"], b["backbone"])
    assert _same_tree(a["backbone"], jax.tree.map(np.asarray, model.params()))
    # The exported file itself converts to an identical file again.
    export(tmp_path / "back", tmp_path / f"again{suffix}")
    again = _load_torch(tmp_path / f"again{suffix}")
    first = _load_torch(tmp_path / f"official{suffix}")
    assert set(again) == set(first) and all(torch.equal(again[k], first[k]) for k in first)


def _hf(cfg, seed):
    if cfg.num_register_tokens:
        return hf_register_vit(cfg, seed=seed)
    from transformers import Dinov2Config, Dinov2Model

    m = Dinov2Model(Dinov2Config(hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth,
                                 num_attention_heads=cfg.num_heads, image_size=cfg.img_size,
                                 patch_size=cfg.patch_size, layerscale_value=1.0))  # fmt: skip
    m.set_attn_implementation("eager")
    randomize_(m, seed)
    return m.eval()


@pytest.mark.parametrize("reg", [True, False], ids=["with_registers", "no_registers"])
def test_hf_export_loads_strictly_in_transformers(tmp_path, reg):
    from safetensors.torch import save_file

    cfg = small_config(
        num_register_tokens=4 if reg else 0,
        interpolate_offset=0.0,
        interpolate_antialias=True,
        ffn_layer="swiglu" if reg else "mlp",
    )
    hf = _hf(cfg, seed=2)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()},
              str(tmp_path / "in.safetensors"))  # fmt: skip
    convert(tmp_path / "in.safetensors", tmp_path / "ckpt")

    export(tmp_path / "ckpt", tmp_path / "out.safetensors", fmt="hf")
    fresh = _hf(cfg, seed=3)
    fresh.load_state_dict(_load_torch(tmp_path / "out.safetensors"), strict=True)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3, 70, 56), np.float32))
    with torch.no_grad():
        a = hf(pixel_values=x).last_hidden_state
        b = fresh(pixel_values=x).last_hidden_state
    assert torch.equal(a, b)

    # The official-format export has exactly the official key set and shapes.
    export(tmp_path / "ckpt", tmp_path / "hub.pth")
    sd = _load_torch(tmp_path / "hub.pth")
    model = dinojax.load(tmp_path / "ckpt")
    want = expected_official_shapes(model.cfg)
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    assert ("register_tokens" in sd) == reg
    convert(tmp_path / "hub.pth", tmp_path / "back")
    assert _same_tree(restore_tree(tmp_path / "ckpt")[0], restore_tree(tmp_path / "back")[0])


def test_teacher_export_loads_strictly_in_official_modules(tmp_path):
    cfg = small_config()
    model = create_model(cfg)
    _randomize_jax(model, seed=4)
    heads = {}
    for name, kw, seed in (("dino_head", dict(out_dim=96, hidden_dim=64, bottleneck_dim=32), 5),
                           ("ibot_head", dict(out_dim=80, nlayers=2, hidden_dim=48,
                                              bottleneck_dim=24), 6)):  # fmt: skip
        ref_head = official_dino_head(seed=seed, in_dim=128, **kw)
        sd = {k: v.numpy() for k, v in ref_head.state_dict().items()}
        hc = head_config_from_torch(sd)
        head = DINOHead(hc["in_dim"], hc["out_dim"], nlayers=hc["nlayers"],
                        hidden_dim=hc["hidden_dim"], bottleneck_dim=hc["bottleneck_dim"],
                        rngs=nnx.Rngs(0))  # fmt: skip
        nnx.update(head, dino_head_from_torch(sd))
        heads[name] = (head, kw)
    save_model(tmp_path / "jax", model, heads={n: h for n, (h, _) in heads.items()})

    export(tmp_path / "jax", tmp_path / "teacher_checkpoint.pth", fmt="teacher")
    obj = torch.load(tmp_path / "teacher_checkpoint.pth", weights_only=True)
    assert set(obj) == {"teacher"}
    t = obj["teacher"]
    backbone = official_vit(cfg, seed=9)
    backbone.load_state_dict({k[9:]: v for k, v in t.items() if k.startswith("backbone.")},
                             strict=True)  # fmt: skip
    z = np.random.default_rng(2).standard_normal((3, 128), np.float32)
    for name, (head, kw) in heads.items():
        official = official_dino_head(seed=11, in_dim=128, **kw)
        prefix = f"{name}."
        official.load_state_dict({k[len(prefix) :]: v for k, v in t.items()
                                  if k.startswith(prefix)}, strict=True)  # fmt: skip
        with torch.no_grad():
            want = official(torch.from_numpy(z)).numpy()
        with jax.default_matmul_precision("highest"):
            got = np.asarray(head(z))
        assert np.abs(got - want).max() <= 1e-5, name
    assert sum(1 for k in t if not k.startswith(("backbone.", "dino_head.", "ibot_head."))) == 0

    # teacher file -> dinojax -> identical tree (backbone and both heads).
    convert(tmp_path / "teacher_checkpoint.pth", tmp_path / "back")
    a, b = restore_tree(tmp_path / "jax"), restore_tree(tmp_path / "back")
    assert _same_tree(a[0], b[0])
    assert a[1]["heads"] == b[1]["heads"]
    _, loaded = dinojax.load(tmp_path / "back", heads=True)
    assert set(loaded) == {"dino_head", "ibot_head"}
