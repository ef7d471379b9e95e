"""Where the float32 parity differences come from, and what a LayerNorm eps mistake would do.

For each architecture (random weights, the official reference of `tests/reference.py`), at
224 x 224, batch 2, on every output the parity suite checks, the max abs distance of:

- JAX float32 (highest matmul precision) to the official module run in float64 (same weights);
- the official module in float32 to the same float64 run;
- JAX float32 to the official float32 (what the parity tests bound);
- the float64 official module with every LayerNorm eps 1e-5 instead of 1e-6 (a config mistake);

and the largest |value| of each output.

    PYTHONPATH=. python bench/parity_float64.py dino_vits16 dinov2_vits14 dinov2_vitg14:2

(`name:depth` reduces the depth, as the parity suite does for ViT-L and ViT-g.) One JSON line per
architecture on stdout. Measured 2026-12-01 (torch 2.14.1, jax 0.10.2, CPU): the JAX float32
distance to float64 is 0.5x to 1.6x the official float32 one on every output (ViT-S/14, S/14-reg,
B/14, S/16, B/16, and g/14 and L/14-reg at 2 blocks), and the eps mistake moves the normed
outputs by >= 1.65e-5 (see the README, "Parity with the official PyTorch code").
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import reference  # noqa: E402

from dinojax.convert.backbone import from_hf, from_official, is_hf  # noqa: E402
from dinojax.models.config import get_config  # noqa: E402
from dinojax.models.vit import DinoVisionTransformer  # noqa: E402

KEYS = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "attn")


def _flat(o: dict) -> dict[str, np.ndarray]:
    d = {k: np.asarray(o[k], np.float64) for k in KEYS}
    d["intermediate"] = np.concatenate(
        [np.asarray(a, np.float64).ravel() for pair in o["inter_a"] for a in pair]
    )
    raw = [np.asarray(a, np.float64).ravel() for a in o["inter_b"]]
    d["intermediate_raw"] = np.concatenate(raw)
    return d


def _max_diff(a: dict, b: dict) -> dict[str, float]:
    return {k: float(np.abs(a[k] - b[k]).max()) if a[k].size else 0.0 for k in a}


@jax.jit
def _jax_outputs(model, x):
    depth = model.cfg.depth
    ff = model.forward_features(x)
    ff.pop("masks")
    return {
        **ff,
        "inter_a": model.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True),
        "inter_b": model.get_intermediate_layers(x, n=[0, depth - 1], norm=False),
        "attn": model.get_last_self_attention(x),
    }


def measure(name: str, depth: int | None = None, seed: int = 1) -> dict:
    cfg = get_config(name)
    if depth:
        cfg = cfg.replace(depth=depth)
    ref = reference.official_hub_vit(name, seed, depth)
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    t32 = _flat(reference.torch_outputs(ref, cfg, x, None, api=False))

    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    if is_hf(sd):
        sd = from_hf(sd)
    if not cfg.has_mask_token:
        sd.pop("mask_token")
    model = nnx.eval_shape(lambda: DinoVisionTransformer(cfg, rngs=nnx.Rngs(0)))
    nnx.update(model, jax.tree.map(jnp.asarray, from_official(sd, cfg)))
    with jax.default_matmul_precision("highest"):
        j32 = _flat(jax.device_get(_jax_outputs(model, jnp.asarray(x.transpose(0, 2, 3, 1)))))

    ref64 = ref.double()
    x64 = x.astype(np.float64)
    t64 = _flat(reference.torch_outputs(ref64, cfg, x64, None, api=False))
    norms = [m for m in ref64.modules() if isinstance(m, torch.nn.LayerNorm)]
    for m in norms:
        m.eps = 1e-5
    eps = _flat(reference.torch_outputs(ref64, cfg, x64, None, api=False))
    return {
        "arch": name,
        "size": "224x224",
        "depth": cfg.depth,
        "jax32_to_float64": _max_diff(j32, t64),
        "official32_to_float64": _max_diff(t32, t64),
        "jax32_to_official32": _max_diff(j32, t32),
        "eps_1e-5_effect": _max_diff(eps, t64),
        "max_abs": {k: float(np.abs(v).max()) if v.size else 0.0 for k, v in t64.items()},
    }


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: parity_float64.py NAME[:DEPTH] ...")
    for arg in argv:
        name, _, depth = arg.partition(":")
        print(json.dumps(measure(name, int(depth) if depth else None)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
