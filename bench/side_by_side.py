"""The official PyTorch DINOv2 code and dinojax, timed side by side in one process on one device.

   python bench/side_by_side.py --mode train --arch vits14 --batch 2 --steps 3       # CPU
   python bench/side_by_side.py --mode infer --arch vitl14 --size 224 518
   python bench/side_by_side.py --mode train --arch vitl14 --batch 64 --device cuda --dtype bfloat16
   (GPU; add --torch-attention sdpa --set model.overrides.attention=cudnn for fused attention on
   both sides, --torch-compile for the compiled official side)

`train`: one full self-supervised training step of a DINOv2 recipe (`configs/dinov2_<arch>.py`,
or `--config file[:args]`), the same batch (2 global + N local crops and their iBOT masks) fed to
both sides, starting from the same weights:
  official  the backbone from the official constructor (`vit_small` / `vit_base` / `vit_large` /
            `vit_giant2` of `dinov2.models.vision_transformer`, PyPI `dinov2`) with the keyword
            arguments the official `build_model` passes, the official `DINOHead`(s), `DINOLoss`,
            `iBOTPatchLoss`, `KoLeoLoss`, torch AdamW over the official parameter groups
            (`get_params_groups_with_decay` + `fuse_params_groups` per student submodule, as
            `SSLMetaArch.get_params_groups` does), the official `CosineScheduler` schedules,
            `clip_grad_norm_` per submodule and the teacher EMA of `SSLMetaArch.update_teacher`.
            The iteration follows facebookresearch/dinov2 `dinov2/train/ssl_meta_arch.py`
            `forward_backward` and `dinov2/train/train.py` `do_train`; the batch comes from the
            official `collate_data_and_cast` with the official `MaskingGenerator`. Without
            xFormers the student backbone runs the global and the local crops in two calls
            (the official code fuses them into one nested-tensor call that needs xFormers).
  dinojax   `create_train_state` + `make_train_step` (one compiled step) of the same recipe, its
            student and teacher loaded with the official initial weights through dinojax's
            converters (`dinojax.convert.backbone.from_official`,
            `dinojax.convert.heads.dino_head_from_torch`).
With the drop-path rate at 0 both sides compute the same first-step loss (the JSON line records
both and their relative difference); with drop path on, each side draws its own masks.

`infer`: backbone `forward_features` of the hub architecture (the official constructor with the
hub's keyword arguments, official init), torch eval + inference_mode vs the jitted dinojax
forward on the converted weights, one line per `--size`; the largest difference of the CLS
features between the two sides is recorded.

Timing: compilation (dinojax) and the warm-up steps are excluded and reported apart; the two
sides then alternate (torch, dinojax, dinojax, torch, ...) so that a contended machine slows
both alike; the median of `--steps` timed calls is reported, with `jax.block_until_ready` and
`torch.cuda.synchronize` around each. Both sides are charged the same analytic FLOP count
(`dinojax.ssl.step.flops_per_step` for training, 24 N D^2 + 4 N^2 D per block plus the patch
embedding for inference), so TFLOP/s and MFU (`--peak_flops`, or the device kind's known bf16
peak) compare exactly like img/s. Appends one JSON line per measurement to
bench/results/side_by_side.jsonl.

dtype: `float32` (default) runs true float32 matmuls on both sides (JAX matmul precision
"highest", torch's TF32 left off, its default); `bfloat16` runs torch under
`torch.autocast(bfloat16)` and dinojax with `model.overrides.dtype=bfloat16`.
`--torch-attention sdpa` swaps the official eager attention for torch's fused
`scaled_dot_product_attention` (a stand-in for the xFormers kernel the official training uses on
GPUs; xFormers is not installed here).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "bench" / "results" / "side_by_side.jsonl"
# --arch -> the official constructor in dinov2.models.vision_transformer
CONSTRUCTORS = {
    "vits14": "vit_small",
    "vitb14": "vit_base",
    "vitl14": "vit_large",
    "vitg14": "vit_giant2",
}
# Fields the official constructors fix; `model.overrides` may shrink them (tests, smoke runs).
FIXED_BY_CONSTRUCTOR = ("embed_dim", "depth", "num_heads", "mlp_ratio")


# ---------------------------------------------------------------------------------------------
# Command line and configuration
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="side_by_side.py",
        description="Time the official PyTorch DINOv2 code and dinojax on the same device.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n")[1],
    )
    p.add_argument("--mode", choices=("train", "infer"), default="train")
    p.add_argument(
        "--arch",
        choices=sorted(CONSTRUCTORS),
        default=None,
        help="architecture (default vits14; train: the recipe's model.arch)",
    )
    p.add_argument(
        "--config",
        default=None,
        help="train: recipe file[:args] (default configs/dinov2_<arch>.py); its model.arch "
        "decides the architecture",
    )
    p.add_argument("--batch", type=int, default=None, help="images per step (train default 2, "
                   "infer default 8)")  # fmt: skip
    p.add_argument(
        "--size", type=int, nargs="+", default=[224], help="infer: resolutions (default 224)"
    )
    p.add_argument("--steps", type=int, default=3, help="timed steps per side (default 3)")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed steps per side after compiling (default 1)"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--torch-compile", action="store_true", help="torch.compile the official "
                   "backbones and heads")  # fmt: skip
    p.add_argument("--torch-attention", choices=("eager", "sdpa"), default="eager")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, dotted (e.g. model.overrides.depth=2, heads.out_dim=4096, "
        "data.local_crops_number=2); infer mode takes model.overrides.* only",
    )
    p.add_argument("--peak_flops", type=float, default=None, help="peak FLOP/s of the device "
                   "(default: the device kind's known dense bf16 peak; none on CPUs)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        default=str(DEFAULT_OUT),
        help="JSONL file to append to ('': none; default bench/results/side_by_side.jsonl)",
    )
    p.add_argument("--label", default="", help="free-form label stored with the result")
    args = p.parse_args(argv)
    if args.mode == "infer" and args.config:
        p.error("--config is for --mode train")
    if args.mode == "infer" and args.arch is None:
        args.arch = "vits14"
    if args.batch is None:
        args.batch = 2 if args.mode == "train" else 8
    for name in ("batch", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.mode == "train" and args.batch < 2:
        p.error("--batch must be >= 2 in train mode (KoLeo needs two images per global crop)")
    return args


def _prepare_environment(args: argparse.Namespace) -> None:
    """Before JAX is imported: pick its platform, and let torch share the GPU with it."""
    if "jax" in sys.modules:
        return  # imported already (tests): keep what the process has
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:
        # JAX's default preallocation (75% of the memory) would starve the torch side.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def load_recipe(spec: str):
    """`path/to/recipe.py[:args]` -> the ConfigDict its `get_config(args)` returns."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"error: config file {path!r} not found")
    mod_spec = importlib.util.spec_from_file_location(f"_recipe_{file.stem}", file)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def apply_overrides(config, items: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as Python literals, else strings)."""
    applied = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"error: --set expects KEY=VALUE, got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            if name not in node:
                raise SystemExit(f"error: --set {key}: no config section {name!r}")
            node = node[name]
        if leaf not in node and not (parents and parents[-1] == "overrides"):
            raise SystemExit(f"error: --set {key}: unknown key (known: {sorted(node.keys())})")
        old = node[leaf] if leaf in node else None
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        with config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext():
            node[leaf] = value
        applied[key] = value
    return applied


def _versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for dist in ("jax", "jaxlib", "flax", "torch", "dinov2"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


# ---------------------------------------------------------------------------------------------
# The official side
# ---------------------------------------------------------------------------------------------


def _quiet_official_imports() -> None:
    logging.getLogger("dinov2").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="xFormers not available")
    warnings.filterwarnings("ignore", message=".*weight_norm.*deprecated")
    warnings.filterwarnings("ignore", message=".*autocast.*deprecated")  # official KoLeoLoss


def _use_sdpa_attention() -> None:
    """Official attention with torch's fused kernel: same math (softmax(q k^T / sqrt(d)) v).
    Process-wide: patches the official classes."""
    import torch.nn.functional as F
    from dinov2.layers import attention

    def forward(self, x, attn_bias=None):
        if attn_bias is not None:
            raise ValueError("nested-tensor attention needs xFormers")
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(y))

    attention.Attention.forward = forward
    attention.MemEffAttention.forward = forward


def official_backbone(vit, arch: str, *, shrinkable: Sequence[str], **kwargs):
    """The official constructor `CONSTRUCTORS[arch]` called with `kwargs`.

    The constructor fixes width, depth, heads and MLP ratio. dinojax's architecture must agree
    with them, except for the fields in `shrinkable` (explicit `model.overrides`), which are
    passed through to the official class so that both sides build the same, smaller, model.
    Returns (module, {field: value} of what was replaced).
    """
    from dinov2.models import vision_transformer as vt

    real = vt.DinoVisionTransformer
    replaced: dict[str, Any] = {}

    def build(**kw):
        for field in FIXED_BY_CONSTRUCTOR:
            ours = getattr(vit, field)
            if kw[field] == ours:
                continue
            if field not in shrinkable:
                raise ValueError(
                    f"dinojax {vit.name} has {field}={ours}, the official {CONSTRUCTORS[arch]} "
                    f"builds {field}={kw[field]}"
                )
            kw[field] = replaced[field] = ours
        return real(**kw)

    with mock.patch.object(vt, "DinoVisionTransformer", build):
        model = getattr(vt, CONSTRUCTORS[arch])(**kwargs)
    return model, replaced


def _official_kwargs(vit) -> dict[str, Any]:
    """What the official `build_model` passes the constructor, for a dinojax ViTConfig."""
    if vit.num_register_tokens or vit.interpolate_offset != 0.1 or vit.interpolate_antialias:
        raise ValueError("PyPI dinov2 has no register tokens and interpolates with offset 0.1, "
                         f"no antialias; {vit.name} differs")  # fmt: skip
    if not (vit.qkv_bias and vit.proj_bias and vit.ffn_bias) or vit.layernorm_eps != 1e-6:
        raise ValueError(f"{vit.name}: the official constructors build biases and eps 1e-6")
    return dict(
        img_size=vit.img_size,
        patch_size=vit.patch_size,
        init_values=vit.layerscale_init,
        ffn_layer="swiglufused" if vit.ffn_layer == "swiglu" else "mlp",
        block_chunks=0,
    )


def _lr(config) -> float:
    """`apply_scaling_rules_to_cfg` of dinov2/utils/config.py (one process, global batch)."""
    o = config.optim
    if o.lr_scaling == "sqrt_wrt_1024":
        return o.base_lr * math.sqrt(config.batch_size / 1024.0)
    if o.lr_scaling == "linear_wrt_256":
        return o.base_lr * config.batch_size / 256.0
    if o.lr_scaling == "none":
        return o.base_lr
    raise ValueError(f"unknown optim.lr_scaling {o.lr_scaling!r}")


class OfficialTrainStep:
    """One official DINOv2 iteration on official modules (see the module docstring)."""

    def __init__(self, config, student: dict, teacher: dict, device, *, dtype: str,
                 compile_: bool):  # fmt: skip
        import torch
        from dinov2.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss
        from dinov2.utils.param_groups import fuse_params_groups, get_params_groups_with_decay
        from dinov2.utils.utils import CosineScheduler

        self.torch = torch
        self.config, self.device = config, device
        c, o, lo = config, config.optim, config.loss
        self.student = torch.nn.ModuleDict(student).to(device)
        # SSLMetaArch: the teacher (built without drop path) starts from the student's weights.
        self.teacher = torch.nn.ModuleDict(teacher).to(device)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.student.train()
        self.separate = "ibot_head" in student
        self.n_local = int(c.data.local_crops_number)
        self.autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if dtype == "bfloat16"
            else contextlib.nullcontext()
        )

        groups = []
        for m in self.student.values():  # SSLMetaArch.get_params_groups
            fused = fuse_params_groups(
                get_params_groups_with_decay(
                    m, lr_decay_rate=o.layerwise_decay, patch_embed_lr_mult=o.patch_embed_lr_mult
                )
            )
            for g in fused:
                g["foreach"] = True
            groups += list(fused)
        self.optimizer = torch.optim.AdamW(groups, betas=(o.b1, o.b2), eps=o.eps)

        ep = int(o.epoch_length)  # train.py build_schedulers
        total = int(o.epochs) * ep
        lr = dict(
            base_value=_lr(c),
            final_value=o.min_lr,
            total_iters=total,
            warmup_iters=int(o.warmup_epochs) * ep,
            start_warmup_value=0,
        )
        self.lr = CosineScheduler(**lr)
        self.wd = CosineScheduler(o.weight_decay, o.weight_decay_end, total)
        self.momentum = CosineScheduler(o.momentum_teacher, o.final_momentum_teacher, total)
        warm = int(lo.warmup_teacher_temp_epochs) * ep
        self.teacher_temp = CosineScheduler(
            lo.teacher_temp, lo.teacher_temp, warm, warmup_iters=warm,
            start_warmup_value=lo.warmup_teacher_temp,
        )  # fmt: skip
        self.last_layer_lr = CosineScheduler(**lr)
        self.last_layer_lr.schedule[: int(o.freeze_last_layer_epochs) * ep] = 0

        self.dino_loss = DINOLoss(int(c.heads.out_dim), lo.student_temp, lo.center_momentum)
        ibot_k = c.heads.ibot_out_dim if self.separate else c.heads.out_dim
        self.ibot_loss = iBOTPatchLoss(int(ibot_k), lo.student_temp, lo.center_momentum)
        self.dino_loss.to(device)
        self.ibot_loss.to(device)
        self.koleo_loss = KoLeoLoss()

        def maybe_compile(fn):
            return torch.compile(fn) if compile_ else fn

        self.s_backbone = maybe_compile(self.student.backbone.forward_features)
        self.t_backbone = maybe_compile(self.teacher.backbone.forward_features)
        self.s_heads = {k: maybe_compile(self.student[k]) for k in self.student if k != "backbone"}
        self.t_heads = {k: maybe_compile(self.teacher[k]) for k in self.teacher if k != "backbone"}
        self.iteration = 0

    def __call__(self, batch: dict) -> dict:
        torch, c = self.torch, self.config
        it = self.iteration
        lr, wd, mom = self.lr[it], self.wd[it], self.momentum[it]
        temp, last_lr = self.teacher_temp[it], self.last_layer_lr[it]
        for g in self.optimizer.param_groups:  # train.py apply_optim_scheduler
            g["weight_decay"] = wd * g["wd_multiplier"]
            g["lr"] = (last_lr if g["is_last_layer"] else lr) * g["lr_multiplier"]
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.forward_backward(batch, temp)
        for m in self.student.values():
            torch.nn.utils.clip_grad_norm_(m.parameters(), c.optim.clip_grad)
        self.optimizer.step()
        with torch.no_grad():  # SSLMetaArch.update_teacher
            s = [p for k in self.student for p in self.student[k].parameters()]
            t = [p for k in self.student for p in self.teacher[k].parameters()]
            torch._foreach_mul_(t, mom)
            torch._foreach_add_(t, s, alpha=1 - mom)
        self.iteration += 1
        return losses

    def _teacher_targets(self, batch: dict, temp: float):
        """ssl_meta_arch `get_teacher_output`: softmaxed-centered DINO and iBOT targets."""
        torch, lo = self.torch, self.config.loss
        gc, idx = batch["collated_global_crops"], batch["mask_indices_list"]
        n_masked, upper = idx.shape[0], batch["upperbound"]
        out = self.t_backbone(gc)
        cls = torch.cat(out["x_norm_clstoken"].chunk(2)[::-1])  # crop 1 is the target of 0
        patches = out["x_norm_patchtokens"].flatten(0, 1)
        n_cls, dim = cls.shape
        if self.separate:
            buf = patches.new_zeros(upper, dim)
            torch.index_select(patches, 0, idx, out=buf[:n_masked])
            cls_after = self.t_heads["dino_head"](cls)
            patch_after = self.t_heads["ibot_head"](buf)[:n_masked]
        else:
            buf = patches.new_zeros(upper + n_cls, dim)
            buf[:n_cls].copy_(cls)
            torch.index_select(patches, 0, idx, out=buf[n_cls : n_cls + n_masked])
            after = self.t_heads["dino_head"](buf)
            cls_after, patch_after = after[:n_cls], after[n_cls : n_cls + n_masked]
        if lo.centering == "centering":
            dino = self.dino_loss.softmax_center_teacher(cls_after, teacher_temp=temp)
            self.dino_loss.update_center(cls_after)
            patch_after = patch_after.unsqueeze(0)
            ibot = self.ibot_loss.softmax_center_teacher(
                patch_after[:, :n_masked], teacher_temp=temp
            ).squeeze(0)
            self.ibot_loss.update_center(patch_after[:n_masked])
        else:
            dino = self.dino_loss.sinkhorn_knopp_teacher(cls_after, teacher_temp=temp)
            ibot = self.ibot_loss.sinkhorn_knopp_teacher(
                patch_after, teacher_temp=temp, n_masked_patches_tensor=batch["n_masked_patches"]
            )
        return dino.view(2, -1, *cls_after.shape[1:]), ibot

    def forward_backward(self, batch: dict, temp: float) -> dict:
        """ssl_meta_arch `forward_backward`, global and local crops in two backbone calls."""
        torch, c = self.torch, self.config
        masks, idx = batch["collated_masks"], batch["mask_indices_list"]
        n_masked, upper = idx.shape[0], batch["upperbound"]
        n_local_terms = max(self.n_local * 2, 1)
        norm = 2 + n_local_terms  # global terms (2 x 1) + local terms
        with self.autocast:
            with torch.no_grad():
                t_dino, t_ibot = self._teacher_targets(batch, temp)
            s_glob = self.s_backbone(batch["collated_global_crops"], masks=masks)
            s_loc = self.s_backbone(batch["collated_local_crops"])
            g_cls, l_cls = s_glob["x_norm_clstoken"], s_loc["x_norm_clstoken"]
            patches = s_glob["x_norm_patchtokens"].flatten(0, 1)
            buf = patches.new_zeros(upper, patches.shape[-1])
            buf[:n_masked].copy_(torch.index_select(patches, 0, idx))
            if self.separate:
                patch_after = self.s_heads["ibot_head"](buf)[:n_masked]
                after = self.s_heads["dino_head"](torch.cat([l_cls, g_cls]))
            else:
                after = self.s_heads["dino_head"](torch.cat([l_cls, g_cls, buf]))
                patch_after = after[len(l_cls) + len(g_cls) :][:n_masked]
            l_after, g_after = after[: len(l_cls)], after[len(l_cls) : len(l_cls) + len(g_cls)]
            dino_local = self.dino_loss(l_after.chunk(self.n_local), t_dino) / norm
            dino_global = self.dino_loss([g_after], [t_dino.flatten(0, 1)]) * 2 / norm
            koleo = c.loss.koleo_loss_weight * sum(self.koleo_loss(p) for p in g_cls.chunk(2))
            ibot = self.ibot_loss.forward_masked(
                patch_after,
                t_ibot,
                student_masks_flat=masks,
                n_masked_patches=n_masked,
                masks_weight=batch["masks_weight"],
            )  # fmt: skip  (x 2 crops x 1/2 ibot_loss_scale)
            w_dino, w_ibot = c.loss.dino_loss_weight, c.loss.ibot_loss_weight
            loss = w_dino * (dino_local + dino_global) + koleo + w_ibot * ibot
        loss.backward()
        # the terms as they enter the loss (dinojax's metrics; the official loss_dict halves
        # koleo and ibot)
        terms = {"loss": loss, "dino_local_loss": w_dino * dino_local,
                 "dino_global_loss": w_dino * dino_global, "koleo_loss": koleo,
                 "ibot_loss": w_ibot * ibot}  # fmt: skip
        return {k: v.detach() for k, v in terms.items()}


# ---------------------------------------------------------------------------------------------
# Shared inputs and weights
# ---------------------------------------------------------------------------------------------


def official_batch(config, seed: int) -> dict:
    """Random crops collated by the official `collate_data_and_cast` with the official
    `MaskingGenerator` (settings of dinov2/train/train.py)."""
    import torch
    from dinov2.data.collate import collate_data_and_cast
    from dinov2.data.masking import MaskingGenerator

    d, p = config.data, int(config.model.overrides.patch_size)
    g, loc, n_local = int(d.global_crops_size), int(d.local_crops_size), int(d.local_crops_number)
    n = g // p
    gen = torch.Generator().manual_seed(seed)
    samples = [
        (
            {
                "global_crops": [torch.randn(3, g, g, generator=gen) for _ in range(2)],
                "local_crops": [torch.randn(3, loc, loc, generator=gen) for _ in range(n_local)],
            },
            None,
        )
        for _ in range(int(config.batch_size))
    ]
    random.seed(seed)  # the official masking draws from Python's `random`
    masking = MaskingGenerator(input_size=(n, n), max_num_patches=0.5 * g // p * g // p)
    return collate_data_and_cast(
        samples,
        mask_ratio_tuple=tuple(d.mask_ratio),
        mask_probability=float(d.mask_probability),
        dtype=torch.float32,
        n_tokens=n * n,
        mask_generator=masking,
    )


def dinojax_batch(batch: dict) -> dict:
    """The same batch in dinojax's layout (NHWC crops, static-size iBOT bookkeeping)."""
    import numpy as np

    from dinojax.data.masking import collate_masks

    nhwc = lambda t: np.ascontiguousarray(t.numpy().transpose(0, 2, 3, 1))  # noqa: E731
    out = {
        "global_crops": nhwc(batch["collated_global_crops"]),
        "local_crops": nhwc(batch["collated_local_crops"]),
    }
    out.update(collate_masks(batch["collated_masks"].numpy(), int(batch["upperbound"])))
    return out


def to_dinojax(modules: dict, vit) -> dict:
    """Official module weights -> dinojax parameter trees, through the project's converters."""
    from dinojax.convert.backbone import from_official
    from dinojax.convert.heads import dino_head_from_torch

    out = {}
    for k, m in modules.items():
        sd = {n: v.detach().float().cpu().numpy() for n, v in m.state_dict().items()}
        out[k] = from_official(sd, vit) if k == "backbone" else dino_head_from_torch(sd)
    return out


def _arranged_like(tree: dict, params: dict) -> dict:
    """`params` with the keys (and key types: head layer indices) of the state subtree `tree`;
    the shapes must agree."""
    if not isinstance(tree, dict):
        if tuple(tree.shape) != tuple(params.shape):
            raise ValueError(f"converted weight shape {params.shape} != state shape {tree.shape}")
        return params
    by_name = {str(k): k for k in params}
    if sorted(by_name) != sorted(str(k) for k in tree):
        raise ValueError(f"converted keys {sorted(by_name)} != state keys {sorted(map(str, tree))}")
    return {k: _arranged_like(v, params[by_name[str(k)]]) for k, v in tree.items()}


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def _alternate(sides: dict[str, Callable[[], Any]], steps: int) -> dict[str, list[float]]:
    """Time `steps` calls of each side, alternating the order (a, b, b, a, a, b, ...)."""
    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(steps):
        for n in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            sides[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def _side_figures(times: list[float], images: int, flops: float, peak: float | None) -> dict:
    step = statistics.median(times)
    tflops = flops / step / 1e12
    return {
        "step_s_median": step,
        "step_s_min": min(times),
        "step_s": times,
        "img_per_s": images / step,
        "tflops": tflops,
        "mfu": tflops * 1e12 / peak if peak else None,
    }


def _torch_sync(device) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _machine(args) -> dict:
    import jax
    import torch

    dev = jax.devices()[0]
    out = {
        "device": args.device,
        "jax_platform": dev.platform,
        "device_kind": dev.device_kind,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_start": list(os.getloadavg()),
    }
    if args.device == "cuda":
        out["torch_device_name"] = torch.cuda.get_device_name(0)
    return out


def _check_platform(args) -> None:
    import jax
    import torch

    plat = jax.devices()[0].platform
    want = "cpu" if args.device == "cpu" else "gpu"
    if plat != want:
        raise SystemExit(
            f"error: --device {args.device} but JAX runs on {plat} (set JAX_PLATFORMS)"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device")


def _peak(args) -> float | None:
    import jax

    from dinojax.train.metrics import peak_flops_per_device

    return args.peak_flops or peak_flops_per_device(jax.devices()[0].device_kind)


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------


def _train_config(args):
    from dinojax.train.trainer import resolve_durations

    spec = args.config or str(REPO / "configs" / f"dinov2_{args.arch or 'vits14'}.py")
    config = load_recipe(spec)
    overrides = apply_overrides(config, args.set)
    config.batch_size = args.batch
    config.mesh.shape = (1, 1)
    if args.dtype == "bfloat16":
        config.model.overrides.dtype = "bfloat16"
    if config.loss.family != "dinov2":
        raise SystemExit("error: side_by_side times DINOv2 recipes (loss.family='dinov2')")
    arch = str(config.model.arch).removeprefix("dinov2_")
    if arch not in CONSTRUCTORS:
        raise SystemExit(f"error: model.arch {config.model.arch!r} has no official constructor "
                         f"here (known: {['dinov2_' + a for a in CONSTRUCTORS]})")  # fmt: skip
    if args.arch is not None and arch != args.arch:
        raise SystemExit(f"error: --arch {args.arch} but the config's model.arch is {arch}")
    return resolve_durations(config), spec, overrides, arch


def official_modules(config, vit, arch: str, shrinkable, drop_path_rate: float):
    """{backbone, dino_head[, ibot_head]} as the official `SSLMetaArch.__init__` builds them."""
    from dinov2.layers import DINOHead

    backbone, replaced = official_backbone(
        vit, arch, shrinkable=shrinkable, **_official_kwargs(vit),
        drop_path_rate=drop_path_rate, drop_path_uniform=vit.drop_path_uniform,
    )  # fmt: skip
    h = config.heads
    modules = {"backbone": backbone}
    for name in ("dino_head", "ibot_head") if h.separate_ibot_head else ("dino_head",):
        p = "ibot_" if name == "ibot_head" else ""
        modules[name] = DINOHead(
            in_dim=vit.embed_dim,
            out_dim=int(h[f"{p}out_dim"]),
            hidden_dim=int(h[f"{p}hidden_dim"]),
            bottleneck_dim=int(h[f"{p}bottleneck_dim"]),
            nlayers=int(h.nlayers),
        )
    return modules, replaced


def run_train(args) -> dict:
    import jax
    import torch

    from dinojax.sharding import batch_sharding, make_mesh
    from dinojax.ssl import step as ssl_step

    config, spec, overrides, arch = _train_config(args)
    vit = ssl_step.vit_config(config)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    # Official modules, official initialisation; the teacher without drop path (build_model).
    shrinkable = [f for f in FIXED_BY_CONSTRUCTOR if f in config.model.overrides]
    student, replaced = official_modules(config, vit, arch, shrinkable, vit.drop_path_rate)
    teacher, _ = official_modules(config, vit, arch, shrinkable, 0.0)
    params = to_dinojax(student, vit)
    if config.loss.centering == "sinkhorn_knopp":
        _one_process_group(device)  # the official iBOT Sinkhorn all-reduces unconditionally
    official = OfficialTrainStep(
        config, student, teacher, device, dtype=args.dtype, compile_=args.torch_compile
    )

    # dinojax: the compiled step over a state holding the same weights.
    mesh = make_mesh((1, 1), devices=jax.devices()[:1])
    state, shardings = ssl_step.create_train_state(config, mesh)
    for which in ("student", "teacher"):
        tree = _arranged_like(jax.device_get(state[which]), params)
        state[which] = jax.tree.map(jax.device_put, tree, shardings[which])
    step = ssl_step.make_train_step(config, mesh, shardings)

    tb = official_batch(config, args.seed)
    jb = dinojax_batch(tb)
    sh = batch_sharding(mesh, tuple(tuple(r) for r in config.mesh.rules))
    jbatch = {k: jax.device_put(v, sh) for k, v in jb.items()}
    tbatch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in tb.items()}

    precision = "highest" if args.dtype == "float32" else None
    t0 = time.perf_counter()
    with jax.default_matmul_precision(precision):
        compiled = step.lower(state, jbatch).compile()
    compile_s = time.perf_counter() - t0

    sync = _torch_sync(device)
    holder = {"state": state}
    outputs: dict[str, list] = {"official": [], "dinojax": []}  # per call: the loss terms

    def jax_step():
        holder["state"], metrics = compiled(holder["state"], jbatch)
        jax.block_until_ready((holder["state"], metrics))
        outputs["dinojax"].append(metrics)

    def torch_step():
        outputs["official"].append(official(tbatch))
        sync()

    warm = {}
    for name, fn in (("official", torch_step), ("dinojax", jax_step)):
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            fn()
        warm[name] = time.perf_counter() - t0
    times = _alternate({"official": torch_step, "dinojax": jax_step}, args.steps)

    flops = float(ssl_step.flops_per_step(config, mask_upper_bound=int(tb["upperbound"])))
    peak = _peak(args)
    sides = {n: _side_figures(times[n], args.batch, flops, peak) for n in times}
    sides["official"]["warmup_s"] = warm["official"]
    sides["dinojax"].update(warmup_s=warm["dinojax"], compile_s=compile_s)
    terms = ("loss", "dino_local_loss", "dino_global_loss", "koleo_loss", "ibot_loss")
    for n in sides:
        calls = outputs[n]
        if n == "dinojax" and not all(bool(m["finite"]) for m in calls):
            raise FloatingPointError("the dinojax step produced a non-finite loss")
        sides[n]["losses_first"] = {k: float(calls[0][k]) for k in terms}
        sides[n]["losses_last"] = {k: float(calls[-1][k]) for k in terms}
    rel = {
        when: {
            k: abs(sides["dinojax"][when][k] - sides["official"][when][k])
            / max(abs(sides["official"][when][k]), 1e-30)
            for k in terms
        }
        for when in ("losses_first", "losses_last")
    }
    d = config.data
    result = {
        "mode": "train",
        "arch": f"dinov2_{arch}",
        "official_constructor": CONSTRUCTORS[arch],
        "official_constructor_replaced": replaced,
        "config": os.path.relpath(spec, REPO) if spec.startswith(str(REPO)) else spec,
        "set": overrides,
        "vit": {
            k: getattr(vit, k)
            for k in (
                "embed_dim",
                "depth",
                "num_heads",
                "patch_size",
                "img_size",
                "ffn_layer",
                "drop_path_rate",
            )
        },
        "heads": {
            k: config.heads[k]
            for k in ("out_dim", "hidden_dim", "bottleneck_dim", "nlayers", "separate_ibot_head")
        },
        "centering": config.loss.centering,
        "batch": args.batch,
        "global_crops": [2, int(d.global_crops_size)],
        "local_crops": [int(d.local_crops_number), int(d.local_crops_size)],
        "mask_upper_bound": int(tb["upperbound"]),
        "n_masked": int(tb["n_masked_patches"][0]),
        "flops_per_step": flops,
        # relative difference dinojax vs official, per loss term, first and last call
        "loss_rel_diff": {"first": rel["losses_first"], "last": rel["losses_last"]},
        "calls_per_side": args.warmup + args.steps,
        # each side draws its own drop-path masks: the losses agree only without drop path
        "losses_comparable": vit.drop_path_rate == 0.0,
        **sides_to_fields(sides),
    }
    return result


def sides_to_fields(sides: dict) -> dict:
    return {**sides, "ratio_img_per_s": ratio(sides)}


def _one_process_group(device) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    fd, path = tempfile.mkstemp(prefix="side_by_side_pg_")
    os.close(fd)
    os.unlink(path)  # the file store creates it
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{path}", rank=0, world_size=1)


def vit_forward_flops(vit, size: int) -> float:
    """Analytic forward FLOPs of one image: per block 8 N D^2 (qkv, proj) + MLP (16 N D^2, or
    6 N D h for SwiGLU) + 4 N^2 D (q k^T, attn v); plus the patch embedding 2 n 3 p^2 D."""
    n_patch = (size // vit.patch_size) ** 2
    n = n_patch + 1 + vit.num_register_tokens
    d = vit.embed_dim
    mlp = 6 * n * d * vit.ffn_hidden_dim if vit.ffn_layer == "swiglu" else 16 * n * d * d
    return float(vit.depth * (8 * n * d * d + mlp + 4 * n * n * d)
                 + 2 * n_patch * 3 * vit.patch_size**2 * d)  # fmt: skip


# hubconf `_make_dinov2_model` of facebookresearch/dinov2: the pretrained backbones' kwargs
HUB_KWARGS = dict(img_size=518, patch_size=14, init_values=1.0, block_chunks=0)


def run_infer(args) -> list[dict]:
    import jax
    import ml_collections
    import torch
    from flax import nnx

    from dinojax.models.config import get_config
    from dinojax.models.vit import DinoVisionTransformer

    cfg = ml_collections.ConfigDict({"model": {"arch": f"dinov2_{args.arch}", "overrides": {}}})
    overrides = apply_overrides(cfg, args.set)
    if any(not k.startswith("model.overrides.") for k in overrides):
        raise SystemExit("error: infer mode takes --set model.overrides.<field>=... only")
    fields = dict(cfg.model.overrides)
    if args.dtype == "bfloat16":
        fields["dtype"] = "bfloat16"
    vit = get_config(f"dinov2_{args.arch}", **fields)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    hub = dict(HUB_KWARGS, ffn_layer="swiglufused" if args.arch == "vitg14" else "mlp")
    model, replaced = official_backbone(vit, args.arch, shrinkable=list(fields), **hub)
    model = model.to(device).eval()
    params = to_dinojax({"backbone": model}, vit)["backbone"]  # strict: shapes must agree
    abstract = nnx.eval_shape(lambda: DinoVisionTransformer(vit, rngs=nnx.Rngs(0)))
    graphdef = nnx.split(abstract, nnx.Param)[0]
    jparams = jax.device_put(params, jax.devices()[0])

    @jax.jit
    def forward(p, x):
        out = nnx.merge(graphdef, p).forward_features(x)
        return {k: v for k, v in out.items() if v is not None}

    common = {
        "mode": "infer",
        "arch": f"dinov2_{args.arch}",
        "official_constructor": CONSTRUCTORS[args.arch],
        "official_constructor_replaced": replaced,
        "set": overrides,
        "vit": {k: getattr(vit, k) for k in ("embed_dim", "depth", "num_heads", "patch_size",
                                             "img_size", "ffn_layer")},
        "batch": args.batch,
    }  # fmt: skip
    results = []
    for size in args.size:
        if size % vit.patch_size:
            raise SystemExit(f"error: --size {size} is not a multiple of {vit.patch_size}")
        fig = _infer_one(args, model, forward, jparams, size, device)
        fig["flops_per_step"] = args.batch * vit_forward_flops(vit, size)
        for side in ("official", "dinojax"):
            fig[side].update(
                _side_figures(fig[side].pop("times"), args.batch, fig["flops_per_step"],
                              _peak(args))
            )  # fmt: skip
        results.append({**common, "size": size, **fig, "ratio_img_per_s": ratio(fig)})
    return results


def ratio(fig: dict) -> float:
    return fig["dinojax"]["img_per_s"] / fig["official"]["img_per_s"]


def _infer_one(args, model, forward, jparams, size: int, device) -> dict:
    """Compile, warm up and time both forwards on one batch at `size`; compare their CLS."""
    import jax
    import numpy as np
    import torch

    x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(size))
    xt = x.to(device)
    xj = jax.device_put(np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1)), jax.devices()[0])
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.dtype == "bfloat16"
        else contextlib.nullcontext()
    )
    sync = _torch_sync(device)
    t0 = time.perf_counter()
    with jax.default_matmul_precision("highest" if args.dtype == "float32" else None):
        compiled = forward.lower(jparams, xj).compile()
    compile_s = time.perf_counter() - t0
    out: dict[str, Any] = {}

    def official():
        with torch.inference_mode(), autocast:
            out["official"] = model.forward_features(xt)["x_norm_clstoken"]
        sync()

    def dinojax():
        out["dinojax"] = jax.block_until_ready(compiled(jparams, xj)["x_norm_clstoken"])

    warm = {}
    for name, fn in (("official", official), ("dinojax", dinojax)):
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            fn()
        warm[name] = time.perf_counter() - t0
    times = _alternate({"official": official, "dinojax": dinojax}, args.steps)
    a = out["official"].float().cpu().numpy()
    b = np.asarray(out["dinojax"], np.float32)
    return {
        "official": {"times": times["official"], "warmup_s": warm["official"]},
        "dinojax": {"times": times["dinojax"], "warmup_s": warm["dinojax"], "compile_s": compile_s},
        "cls_max_abs_diff": float(np.max(np.abs(a - b))),
        "cls_max_abs": float(np.max(np.abs(a))),
    }


def _describe(r: dict) -> str:
    o, j = r["official"], r["dinojax"]

    def side(s):
        mfu = f", MFU {100 * s['mfu']:.1f}%" if s["mfu"] is not None else ""
        return f"{s['img_per_s']:.2f} img/s ({1e3 * s['step_s_median']:.0f} ms, " \
               f"{s['tflops']:.3f} TFLOP/s{mfu})"  # fmt: skip

    if r["mode"] == "train":
        what = (
            f"train {r['arch']} batch {r['batch']} ({r['global_crops'][0]} x "
            f"{r['global_crops'][1]} + {r['local_crops'][0]} x {r['local_crops'][1]} crops)"
        )
        extra = (
            f"; first-step loss official {o['losses_first']['loss']:.6f}, dinojax "
            f"{j['losses_first']['loss']:.6f} (rel diff {r['loss_rel_diff']['first']['loss']:.1e}"
            f"{'' if r['losses_comparable'] else ', drop path on: not comparable'})"
        )
    else:
        what = f"infer {r['arch']} batch {r['batch']} at {r['size']} px"
        extra = f"; CLS max |diff| {r['cls_max_abs_diff']:.1e} (max |CLS| {r['cls_max_abs']:.1f})"
    return (f"{what}, {r['dtype']} on {r['machine']['device_kind']}:\n"
            f"  official {side(o)}\n  dinojax  {side(j)}\n"
            f"  ratio dinojax/official {r['ratio_img_per_s']:.2f}; dinojax compile "
            f"{j['compile_s']:.1f} s, warm-up calls: official {o['warmup_s']:.1f} s, dinojax "
            f"{j['warmup_s']:.1f} s{extra}")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the comparison; returns the result records (also appended to --out)."""
    args = parse_args(argv)
    _prepare_environment(args)
    _quiet_official_imports()
    if args.torch_attention == "sdpa":
        _use_sdpa_attention()
    _check_platform(args)
    machine = _machine(args)
    records = [run_train(args)] if args.mode == "train" else run_infer(args)
    machine["load_avg_end"] = list(os.getloadavg())
    common = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "label": args.label,
        "dtype": args.dtype,
        "torch_compile": args.torch_compile,
        "torch_attention": args.torch_attention,
        "steps": args.steps,
        "warmup": args.warmup,
        "seed": args.seed,
        "peak_flops": _peak(args),
        "machine": machine,
        "versions": _versions(),
    }
    records = [{**common, **r} for r in records]
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    for r in records:
        print(_describe(r), flush=True)
    return records


if __name__ == "__main__":
    main()
