"""The DINOv3 ConvNeXt parity figures: max |JAX - transformers| per output, what a LayerNorm eps of
1e-5 instead of 1e-6 would change, and the bfloat16 cosine, with the helpers of
`tests/models/test_convnext_parity.py` (random weights, HF -> official -> dinojax).

    PYTHONPATH=. python bench/parity_convnext.py tiny,small,base,large 224x224,208x416 \\
        >> bench/results/parity_convnext.jsonl

One JSON line per (size, image size, seed 0 and 1) on stdout: `diffs` (float32, "highest"),
`eps_mistake` (the same weights with eps 1e-5), `bf16_cos` (smallest per-token cosine of
bfloat16 compute), `scale` (largest |value| of each reference output). Measured 2026-12-01
(torch 2.14.1, jax 0.10.2, transformers 5.24, CPU): the README table and the tolerances of the
test file come from these rows.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "models")
)
import test_convnext_parity as P  # noqa: E402


def main(archs: str, sizes: str) -> None:
    for arch in archs.split(","):
        for size in [tuple(int(v) for v in s.split("x")) for s in sizes.split(",")]:
            for seed in (0, 1):
                ref, model = P.build(arch, seed=seed)
                x = P.images(size, seed)
                xj = jnp.asarray(x.transpose(0, 2, 3, 1))
                t = P.torch_outputs(ref, x)
                eps = P.with_cfg(model, layernorm_eps=1e-5)
                bf = P.with_cfg(model, dtype="bfloat16")
                row = {
                    "arch": arch,
                    "size": list(size),
                    "seed": seed,
                    "diffs": P.max_diffs(P.jax_outputs(model, xj), t),
                    "eps_mistake": P.max_diffs(P.jax_outputs(eps, xj), t),
                    "bf16_cos": P.min_cosines(P.jax_outputs(bf, xj, precision="default"), t),
                    "scale": {
                        k: max(float(np.abs(v).max()) for v in jax.tree.leaves(t[k])) for k in t
                    },  # fmt: skip
                }
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: parity_convnext.py tiny,small,base,large 224x224,208x416")
    main(sys.argv[1], sys.argv[2])
