"""Paper estimate: step time and memory per chip of the official ViT-g/14 DINOv2 recipe on TPU v5p.

Nothing here runs a model: it is arithmetic on the architecture (official-dino.md §1.2, §4.1) so the
assumptions are explicit and can be checked against a real run later.

    python bench/estimate_tpu.py [--batch 3072] [--hfu 0.45] [--markdown]

FLOPs use the same accounting as the PyTorch FLOP counter (2 per multiply-add; forward, and 2x
forward for the backward pass): per token and block `8 D^2 + 6 D h'` (qkv, proj, SwiGLU w12 / w3)
plus `4 N D` for the two attention matmuls; patch embedding; DINO head on the CLS tokens and iBOT
head on the masked tokens. Student: forward + backward over 2 global (224 px) + 8 local (98 px)
crops; teacher: forward over the 2 global crops. Full rematerialisation adds one student forward.

Memory per chip (FSDP over every chip): fp32 student, teacher, Adam moments and gradients, all
sharded; bf16 activations for the per-chip batch.
"""

from __future__ import annotations

import argparse
import json

# TPU v5p, per chip: 459 TFLOP/s dense bf16, 95 GiB HBM (public spec sheet).
PEAK = 459e12
HBM_GIB = 95.0

D, DEPTH, HEADS, HIDDEN = 1536, 40, 24, 4096  # ViT-g/14, SwiGLU hidden after 2/3 rounding
PATCH = 14
K = 131072  # prototypes (DINO and iBOT heads of vitg14.yaml)
DINO_BOTTLENECK, IBOT_BOTTLENECK, HEAD_HIDDEN = 384, 256, 2048
BACKBONE_PARAMS = 1_136_480_768  # official-dino.md §1.2 [verified]
MASKED_PER_IMAGE = 0.5 * 2 * 0.3 * 256  # half the global crops masked, mean ratio 0.3 of 256


def tokens(px: int) -> int:
    return (px // PATCH) ** 2 + 1


def backbone_fwd(n: int) -> float:
    per_block = n * (8 * D * D + 6 * D * HIDDEN) + 4 * n * n * D
    return DEPTH * per_block + 2 * (n - 1) * 3 * PATCH * PATCH * D


def head_fwd(bottleneck: int) -> float:
    mlp = 2 * (D * HEAD_HIDDEN + HEAD_HIDDEN * HEAD_HIDDEN + HEAD_HIDDEN * bottleneck)
    return mlp + 2 * bottleneck * K


def head_params(bottleneck: int) -> int:
    mlp = (D + 1) * HEAD_HIDDEN + (HEAD_HIDDEN + 1) * HEAD_HIDDEN + (HEAD_HIDDEN + 1) * bottleneck
    return mlp + bottleneck * K + K


def flops_per_image(remat: bool) -> float:
    g, loc = backbone_fwd(tokens(224)), backbone_fwd(tokens(98))
    student_fwd = 2 * g + 8 * loc + 10 * head_fwd(DINO_BOTTLENECK)
    student_fwd += MASKED_PER_IMAGE * head_fwd(IBOT_BOTTLENECK)
    teacher = 2 * g + 2 * head_fwd(DINO_BOTTLENECK) + MASKED_PER_IMAGE * head_fwd(IBOT_BOTTLENECK)
    return (4 if remat else 3) * student_fwd + teacher


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
    step_flops = batch * flops_per_image(remat)
    step_s = step_flops / (chips * PEAK * hfu)
    return {
        "chips": chips,
        "slice": f"v5p-{2 * chips}",
        "batch": batch,
        "per_chip_batch": per_chip_batch,
        "remat": remat,
        "step_tflop": step_flops / 1e12,
        "step_s": step_s,
        "img_s": batch / step_s,
        "mem_gib_per_chip": mem / 2**30,
        "fits": mem / 2**30 < 0.9 * HBM_GIB,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=3072, help="global batch (paper: 3072)")
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
