"""Paper estimate: step time and memory per chip of the official ViT-g/14 DINOv2 recipe on TPU v5p.

Nothing here runs a model: it is arithmetic on the recipe (`configs/dinov2_vitg14.py`, after
facebookresearch/dinov2 `dinov2/configs/train/vitg14.yaml` and `dinov2/hub/backbones.py`) so the
assumptions are explicit and can be checked against a real run.

    python bench/estimate_tpu.py [--batch 3072] [--hfu 0.45] [--markdown]

FLOPs are the training step's own accounting, `dinojax.ssl.step.flops_per_step` (what the trainer
logs as TFLOP/s and MFU): 2 per multiply-add, the backward pass twice the forward; student forward
and backward over 2 global (224 px) + 8 local (98 px) crops with the DINO head on the CLS tokens
and the iBOT head on the masked-token buffer, teacher forward over the global crops. Full
rematerialisation adds one student forward.

Memory per chip (FSDP over every chip, the recipes' default mesh): fp32 student, teacher, Adam
moments and gradients, all sharded; bf16 activations for the per-chip batch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs.dinov2_vitg14 import get_config  # noqa: E402
from dinojax.ssl.step import flops_per_step, vit_config  # noqa: E402

# TPU v5p, per chip: 459 TFLOP/s dense bf16, 95 GiB HBM (public spec sheet).
PEAK = 459e12
HBM_GIB = 95.0

RECIPE = get_config()
_VIT = vit_config(RECIPE)
D, DEPTH, HEADS, HIDDEN = _VIT.embed_dim, _VIT.depth, _VIT.num_heads, _VIT.ffn_hidden_dim
PATCH = _VIT.patch_size
K = int(RECIPE.heads.out_dim)  # prototypes (DINO and iBOT heads of vitg14.yaml)
DINO_BOTTLENECK = int(RECIPE.heads.bottleneck_dim)
IBOT_BOTTLENECK = int(RECIPE.heads.ibot_bottleneck_dim)
HEAD_HIDDEN = int(RECIPE.heads.hidden_dim)
BACKBONE_PARAMS = 1_136_480_768  # hub dinov2_vitg14; tests/models/test_vit_build.py checks it
MASKED_PER_IMAGE = 0.5 * 2 * 0.3 * 256  # half the global crops masked, mean ratio 0.3 of 256


def tokens(px: int) -> int:
    return (px // PATCH) ** 2 + 1


def head_params(bottleneck: int) -> int:
    mlp = (D + 1) * HEAD_HIDDEN + (HEAD_HIDDEN + 1) * HEAD_HIDDEN + (HEAD_HIDDEN + 1) * bottleneck
    return mlp + bottleneck * K + K


def step_flops(batch: int, remat: bool) -> float:
    """`flops_per_step` of the recipe at `batch`; with remat plus one student forward, which is
    the global-crop part G (teacher and student alike) plus the local-crop part L of
    `flops_per_step = 3 (G + L) + G`, G read off the same recipe without local crops (= 4 G)."""
    c = RECIPE.copy_and_resolve_references()
    c.batch_size = batch
    model = flops_per_step(c)
    if not remat:
        return model
    c.data.local_crops_number = 0
    g = flops_per_step(c) / 4
    return model + g + (model - 4 * g) / 3


def activation_bytes_per_image(remat: bool) -> float:
    crops = [(tokens(224), 2), (tokens(98), 8)]
    if remat:  # block inputs only (bf16), plus one block's working set at a time (small)
        saved = sum(c * n * D * 2 * DEPTH for n, c in crops)
        working = sum(c * n * (3 * D + 2 * HIDDEN + HIDDEN + 2 * D) * 2 for n, c in crops)
        working += sum(c * HEADS * n * n * 4 for n, c in crops)
    else:  # every block keeps qkv, attention probabilities (f32), outputs, MLP hidden, norms
        per_tok = (3 * D + D + 2 * HIDDEN + HIDDEN + 4 * D) * 2
        saved = sum(c * DEPTH * (n * per_tok + HEADS * n * n * 4) for n, c in crops)
        working = 0.0
    # head logits: student and teacher softmaxes over K, f32, with their gradients
    n_head_tokens = 10 + 2 + 2 * MASKED_PER_IMAGE
    logits = n_head_tokens * K * 4 * 3
    return saved + working + logits


def estimate(batch: int, chips: int, hfu: float, remat: bool) -> dict:
    params = BACKBONE_PARAMS + head_params(DINO_BOTTLENECK) + head_params(IBOT_BOTTLENECK)
    state_bytes = params * 4 * 5  # student, teacher, 2 Adam moments, gradients (fp32)
    per_chip_batch = batch / chips
    mem = state_bytes / chips + per_chip_batch * activation_bytes_per_image(remat)
    flops = step_flops(batch, remat)
    step_s = flops / (chips * PEAK * hfu)
    return {
        "chips": chips,
        "slice": f"v5p-{2 * chips}",
        "batch": batch,
        "per_chip_batch": per_chip_batch,
        "remat": remat,
        "step_tflop": flops / 1e12,
        "step_s": step_s,
        "img_s": batch / step_s,
        "mem_gib_per_chip": mem / 2**30,
        "fits": mem / 2**30 < 0.9 * HBM_GIB,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=RECIPE.batch_size,
                    help=f"global batch (default: the recipe's {RECIPE.batch_size})")  # fmt: skip
    ap.add_argument("--hfu", type=float, default=0.45, help="assumed hardware FLOP utilisation")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    sizes = (64, 128, 256, 512)
    rows = [estimate(args.batch, c, args.hfu, r) for c in sizes for r in (True, False)]
    if args.markdown:
        print("| slice (chips) | per-chip batch | remat | step time | img/s | memory / chip |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            fit = "" if r["fits"] else " (does not fit)"
            print(f"| {r['slice']} ({r['chips']}) | {r['per_chip_batch']:g} | "
                  f"{'full' if r['remat'] else 'none'} | {r['step_s']:.2f} s | {r['img_s']:,.0f} | "
                  f"{r['mem_gib_per_chip']:.1f} GiB{fit} |")  # fmt: skip
    else:
        for r in rows:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
