"""The official training iterations the step parity tests compare against (test reference).

`OfficialV2Step`: the DINOv2 iteration, run on the official PyTorch parts from PyPI `dinov2`.
`dinov2.train.ssl_meta_arch` cannot be imported without xformers, so the glue of
`SSLMetaArch.forward_backward` (facebookresearch/dinov2 `dinov2/train/ssl_meta_arch.py`) is
written here line by line around the official parts it calls: the official backbone and
`dinov2.layers.DINOHead`, `DINOLoss` / `iBOTPatchLoss` / `KoLeoLoss` from `dinov2.loss`, the
param groups of `dinov2.utils.param_groups` (`SSLMetaArch.get_params_groups`), `CosineScheduler`,
torch AdamW, `clip_grad_norm_` per submodule and the `_foreach` EMA of
`SSLMetaArch.update_teacher`, with `dinov2/train/train.py` `do_train`'s per-iteration schedule
updates (`apply_optim_scheduler`). Only the xformers plumbing differs: the student backbone runs
global and local crops in two calls instead of one nested-tensor call, and the student head's
block-diagonal concatenation is a plain `torch.cat` (the head is per-token: same numbers).
`loss_dict` (after a call) is the official `forward_backward` return value, in its own names and
convention; the returned terms are those that enter the backpropagated loss.

`OfficialV1Step`: the DINO v1 iteration. facebookresearch/dino is not a package, so this one is
written from its source, each part beside the upstream function it follows (`main_dino.py`
`train_one_epoch`, `DINOLoss.forward` / `update_center`; `utils.py` `cosine_scheduler`,
`get_params_groups`, `clip_gradients`, `cancel_gradients_last_layer`, `MultiCropWrapper`), on
official modules from PyPI `dinov2` (the backbone with v1 settings, `DINOHead`, whose forward is
v1's without batch norm) and torch AdamW.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

logging.getLogger("dinov2").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="xFormers not available")

from dinov2.layers.dino_head import DINOHead  # noqa: E402
from dinov2.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss  # noqa: E402
from dinov2.utils.param_groups import fuse_params_groups, get_params_groups_with_decay  # noqa: E402
from dinov2.utils.utils import CosineScheduler  # noqa: E402
from reference import official_vit  # noqa: E402

from dinojax.convert.backbone import to_official  # noqa: E402
from dinojax.convert.heads import dino_head_to_torch  # noqa: E402


def to_torch_modules(params: dict, config, vit_cfg) -> dict[str, torch.nn.Module]:
    """Official modules holding the given dinojax parameters {backbone, dino_head, [ibot_head]}."""
    out = {}
    bb = official_vit(vit_cfg)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in to_official(params["backbone"]).items()}
    if vit_cfg.family == "dino":
        sd["mask_token"] = bb.mask_token.detach().clone()  # unused by v1 (no masks)
    bb.load_state_dict(sd, strict=True)
    out["backbone"] = bb
    h = config.heads
    for name in ("dino_head", "ibot_head"):
        if name not in params:
            continue
        p = "ibot_" if name == "ibot_head" else ""
        head = DINOHead(
            in_dim=vit_cfg.embed_dim,
            out_dim=int(h[f"{p}out_dim"]),
            nlayers=int(h.nlayers),
            hidden_dim=int(h[f"{p}hidden_dim"]),
            bottleneck_dim=int(h[f"{p}bottleneck_dim"]),
        )
        hsd = {
            k: torch.from_numpy(np.array(v)) for k, v in dino_head_to_torch(params[name]).items()
        }
        head.load_state_dict(hsd, strict=True)
        out[name] = head
    return out


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _lr(config) -> float:
    o = config.optim
    if o.lr_scaling == "sqrt_wrt_1024":
        return o.base_lr * math.sqrt(config.batch_size / 1024.0)
    if o.lr_scaling == "linear_wrt_256":
        return o.base_lr * config.batch_size / 256.0
    return o.base_lr


def _ema(student: torch.nn.ModuleDict, teacher: torch.nn.ModuleDict, m: float) -> None:
    # ssl_meta_arch.update_teacher
    s_list, t_list = [], []
    with torch.no_grad():
        for k in student.keys():
            s_list += list(student[k].parameters())
            t_list += list(teacher[k].parameters())
        torch._foreach_mul_(t_list, m)
        torch._foreach_add_(t_list, s_list, alpha=1 - m)


class OfficialV2Step:
    def __init__(self, config, student: dict, teacher: dict):
        c, o = config, config.optim
        self.c = c
        self.student = torch.nn.ModuleDict(student)
        self.teacher = torch.nn.ModuleDict(teacher)
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.teacher.eval()
        self.student.train()
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
        self.opt = torch.optim.AdamW(groups, betas=(o.b1, o.b2), eps=o.eps)
        ep = o.epoch_length
        total = o.epochs * ep
        lr = dict(
            base_value=_lr(c),
            final_value=o.min_lr,
            total_iters=total,
            warmup_iters=o.warmup_epochs * ep,
            start_warmup_value=0,
        )
        self.lr = CosineScheduler(**lr)
        self.wd = CosineScheduler(o.weight_decay, o.weight_decay_end, total)
        self.mom = CosineScheduler(o.momentum_teacher, o.final_momentum_teacher, total)
        w = c.loss.warmup_teacher_temp_epochs * ep
        self.temp = CosineScheduler(
            c.loss.teacher_temp,
            c.loss.teacher_temp,
            w,
            warmup_iters=w,
            start_warmup_value=c.loss.warmup_teacher_temp,
        )
        self.last_lr = CosineScheduler(**lr)
        self.last_lr.schedule[: o.freeze_last_layer_epochs * ep] = 0
        self.dino_loss = DINOLoss(int(c.heads.out_dim))
        self.separate = "ibot_head" in student
        ibot_k = c.heads.ibot_out_dim if self.separate else c.heads.out_dim
        self.ibot_loss = iBOTPatchLoss(int(ibot_k))
        self.koleo = KoLeoLoss()

    def __call__(self, it: int, batch: dict) -> dict:
        c = self.c
        lr, wd, mom = self.lr[it], self.wd[it], self.mom[it]
        temp, last_lr = self.temp[it], self.last_lr[it]
        for g in self.opt.param_groups:  # train.py apply_optim_scheduler
            g["weight_decay"] = wd * g["wd_multiplier"]
            g["lr"] = (last_lr if g["is_last_layer"] else lr) * g["lr_multiplier"]
        self.opt.zero_grad(set_to_none=True)
        losses = self.forward_backward(batch, temp)
        # do_train: `if cfg.optim.clip_grad`, each student submodule's clip_grad_norm_ (FSDP's
        # returns the norm before clipping, as torch's does); unclipped runs still report it
        clip = c.optim.clip_grad or float("inf")
        norms = {}
        for k, v in self.student.items():
            norms[k] = float(torch.nn.utils.clip_grad_norm_(v.parameters(), clip))
        self.opt.step()
        _ema(self.student, self.teacher, mom)
        return {
            **losses,
            **{f"grad_norm_{k}": v for k, v in norms.items()},
            "lr": lr,
            "wd": wd,
            "momentum": mom,
            "teacher_temp": temp,
            "last_layer_lr": last_lr,
        }

    def forward_backward(self, batch: dict, teacher_temp: float) -> dict:
        c = self.c
        n_local = c.data.local_crops_number
        global_crops, local_crops = nchw(batch["global_crops"]), nchw(batch["local_crops"])
        masks = torch.from_numpy(np.asarray(batch["masks"]))
        mask_indices_list = torch.from_numpy(np.flatnonzero(np.asarray(batch["masks"])))
        n_masked_patches = mask_indices_list.shape[0]
        n_masked_patches_tensor = torch.tensor([n_masked_patches])
        upperbound = int(np.asarray(batch["mask_indices"]).shape[0])
        per_img = np.asarray(batch["masks"]).sum(-1)
        w = 1.0 / np.maximum(per_img, 1).astype(np.float32)
        masks_weight = torch.from_numpy(
            w[np.flatnonzero(np.asarray(batch["masks"])) // masks.shape[1]]
        )
        n_local_terms = max(n_local * 2, 1)
        n_global_terms = 2
        ibot_loss_scale = 1.0 / 2

        with torch.no_grad():  # get_teacher_output
            out = self.teacher.backbone.forward_features(global_crops)
            t_cls = out["x_norm_clstoken"].chunk(2)
            t_cls = torch.cat((t_cls[1], t_cls[0]))
            t_patch = out["x_norm_patchtokens"]
            dim = t_patch.shape[-1]
            n_cls = t_cls.shape[0]
            if not self.separate:
                buf = t_patch.new_zeros(upperbound + n_cls, dim)
                buf[:n_cls].copy_(t_cls)
                torch.index_select(
                    t_patch.flatten(0, 1),
                    dim=0,
                    index=mask_indices_list,
                    out=buf[n_cls : n_cls + n_masked_patches],
                )
                after = self.teacher.dino_head(buf)
                t_cls_after = after[:n_cls]
                t_patch_after = after[n_cls : n_cls + n_masked_patches]
            else:
                buf = t_patch.new_zeros(upperbound, dim)
                torch.index_select(
                    t_patch.flatten(0, 1),
                    dim=0,
                    index=mask_indices_list,
                    out=buf[:n_masked_patches],
                )
                t_cls_after = self.teacher.dino_head(t_cls)
                t_patch_after = self.teacher.ibot_head(buf)[:n_masked_patches]
            if c.loss.centering == "centering":
                t_dino = self.dino_loss.softmax_center_teacher(
                    t_cls_after, teacher_temp=teacher_temp
                )
                t_dino = t_dino.view(2, -1, *t_cls_after.shape[1:])
                self.dino_loss.update_center(t_cls_after)
                t_patch_after = t_patch_after.unsqueeze(0)
                t_ibot = self.ibot_loss.softmax_center_teacher(
                    t_patch_after[:, :n_masked_patches], teacher_temp=teacher_temp
                ).squeeze(0)
                self.ibot_loss.update_center(t_patch_after[:n_masked_patches])
            else:
                t_dino = self.dino_loss.sinkhorn_knopp_teacher(
                    t_cls_after, teacher_temp=teacher_temp
                )
                t_dino = t_dino.view(2, -1, *t_cls_after.shape[1:])
                t_ibot = self.ibot_loss.sinkhorn_knopp_teacher(
                    t_patch_after,
                    teacher_temp=teacher_temp,
                    n_masked_patches_tensor=n_masked_patches_tensor,
                )

        s_glob = self.student.backbone.forward_features(global_crops, masks=masks)
        s_loc = self.student.backbone.forward_features(local_crops)
        s_local_cls = s_loc["x_norm_clstoken"]
        s_global_cls = s_glob["x_norm_clstoken"]
        s_patch = s_glob["x_norm_patchtokens"]
        dim = s_global_cls.shape[-1]
        pbuf = s_patch.new_zeros(upperbound, dim)
        pbuf[:n_masked_patches].copy_(
            torch.index_select(s_patch.flatten(0, 1), dim=0, index=mask_indices_list)
        )
        if not self.separate:
            cat = torch.cat([s_local_cls, s_global_cls, pbuf])
            after = self.student.dino_head(cat)
            s_local_after = after[: len(s_local_cls)]
            s_global_after = after[len(s_local_cls) : len(s_local_cls) + len(s_global_cls)]
            s_patch_after = after[len(s_local_cls) + len(s_global_cls) :][:n_masked_patches]
        else:
            s_patch_after = self.student.ibot_head(pbuf)[:n_masked_patches]
            after = self.student.dino_head(torch.cat([s_local_cls, s_global_cls]))
            s_local_after = after[: len(s_local_cls)]
            s_global_after = after[len(s_local_cls) :]

        norm = n_global_terms + n_local_terms
        dino_local = (
            self.dino_loss(
                student_output_list=s_local_after.chunk(n_local),
                teacher_out_softmaxed_centered_list=t_dino,
            )
            / norm
        )
        dino_global = (
            self.dino_loss(
                student_output_list=[s_global_after],
                teacher_out_softmaxed_centered_list=[t_dino.flatten(0, 1)],
            )
            * 2
            / norm
        )
        koleo = c.loss.koleo_loss_weight * sum(self.koleo(p) for p in s_global_cls.chunk(2))
        ibot = (
            self.ibot_loss.forward_masked(
                s_patch_after,
                t_ibot,
                student_masks_flat=masks,
                n_masked_patches=n_masked_patches,
                masks_weight=masks_weight,
            )
            * 2
            * ibot_loss_scale
        )
        w_d, w_i = c.loss.dino_loss_weight, c.loss.ibot_loss_weight
        total = w_d * dino_local + w_d * dino_global + koleo + w_i * ibot
        total.backward()
        # what forward_backward returns (and do_train logs, summed into `total_loss`): the DINO
        # terms unweighted, KoLeo (x weight) and iBOT (unweighted) halved ("loss_scales")
        self.loss_dict = {
            "dino_local_crops_loss": float(dino_local.detach()),
            "dino_global_crops_loss": float(dino_global.detach()),
            "koleo_loss": float(koleo.detach()) / 2,
            "ibot_loss": float(ibot.detach()) / 2,
        }
        terms = {
            "loss": total,
            "dino_local_loss": dino_local,
            "dino_global_loss": dino_global,
            "koleo_loss": koleo,
            "ibot_loss": w_i * ibot,
        }
        return {k: float(v.detach()) for k, v in terms.items()}


def v1_cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """facebookresearch/dino `utils.py` `cosine_scheduler`: a linear warm-up over whole epochs,
    then a half cosine over the remaining iterations, one value per iteration."""
    warmup_iters = warmup_epochs * niter_per_ep
    warm = np.array([])
    if warmup_epochs > 0:
        warm = np.linspace(start_warmup_value, base, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    out = np.concatenate((warm, cos))
    assert len(out) == epochs * niter_per_ep
    return out


class OfficialV1Step:
    """DINO v1 iteration (facebookresearch/dino `main_dino.py` `train_one_epoch`) on official
    PyTorch modules. Every constant that `train_dino` does not take from its arguments is the
    upstream one here, not the config's: DINOLoss's student temperature 0.1 and center momentum
    0.9, AdamW's default betas and eps, the linear lr scaling rule."""

    STUDENT_TEMP = 0.1  # main_dino.py DINOLoss.__init__ defaults (train_dino passes neither)
    CENTER_MOMENTUM = 0.9

    def __init__(self, config, student: dict, teacher: dict):
        c, o = config, config.optim
        self.c = c
        self.student = torch.nn.ModuleDict(student)
        self.teacher = torch.nn.ModuleDict(teacher)
        # train_dino: no gradient through the teacher; DINOHead(norm_last_layer=True) freezes
        # last_layer.weight_g (at 1)
        for p in self.teacher.parameters():
            p.requires_grad = False
        if c.heads.norm_last_layer:
            self.student.dino_head.last_layer.weight_g.requires_grad = False
        # utils.get_params_groups: biases and 1-D parameters unregularised, frozen ones left out
        regularized, not_regularized = [], []
        for name, p in self.student.named_parameters():
            if not p.requires_grad:
                continue
            if name.endswith(".bias") or len(p.shape) == 1:
                not_regularized.append(p)
            else:
                regularized.append(p)
        # train_dino: torch.optim.AdamW(params_groups), torch's default betas / eps
        self.opt = torch.optim.AdamW(
            [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]
        )
        ep = o.epoch_length  # len(data_loader)
        self.ep = ep
        # train_dino's three schedules; the lr always linearly scaled by the global batch / 256
        lr = o.base_lr * c.batch_size / 256.0
        self.lr = v1_cosine_scheduler(lr, o.min_lr, o.epochs, ep, warmup_epochs=o.warmup_epochs)
        self.wd = v1_cosine_scheduler(o.weight_decay, o.weight_decay_end, o.epochs, ep)
        self.mom = v1_cosine_scheduler(o.momentum_teacher, 1, o.epochs, ep)
        # DINOLoss.__init__: per-epoch teacher temperature, linear warm-up, then constant
        w = c.loss.warmup_teacher_temp_epochs
        self.temp = np.concatenate(
            (
                np.linspace(c.loss.warmup_teacher_temp, c.loss.teacher_temp, w),
                np.ones(o.epochs - w) * c.loss.teacher_temp,
            )
        )
        self.center = torch.zeros(1, int(c.heads.out_dim))  # DINOLoss's `center` buffer
        self.ncrops = 2 + c.data.local_crops_number
        self.param_norms: list[float] = []

    def dino_loss(self, student_output, teacher_output, epoch: int) -> torch.Tensor:
        """main_dino.py `DINOLoss.forward`: cross-entropy of every (teacher global view, student
        other view) pair, averaged; the center is updated after the loss (`update_center`)."""
        student_out = (student_output / self.STUDENT_TEMP).chunk(self.ncrops)
        temp = self.temp[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1)
        teacher_out = teacher_out.detach().chunk(2)
        total, n_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                n_terms += 1
        total = total / n_terms
        self.update_center(teacher_output)
        return total

    @torch.no_grad()
    def update_center(self, teacher_output) -> None:
        """main_dino.py `DINOLoss.update_center` with world size 1 (all_reduce is the identity)."""
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
        m = self.CENTER_MOMENTUM
        self.center = self.center * m + batch_center * (1 - m)

    def multi_crop(self, modules, crops: list[torch.Tensor]) -> torch.Tensor:
        """utils.py `MultiCropWrapper.forward`: one backbone call per run of same-resolution
        crops (here: the globals, then the locals), the head on the concatenated CLS tokens."""
        cls = [modules.backbone.forward_features(x)["x_norm_clstoken"] for x in crops]
        return modules.dino_head(torch.cat(cls))

    def __call__(self, it: int, batch: dict) -> dict:
        c, o = self.c, self.c.optim
        epoch = it // self.ep
        # train_one_epoch: every group's lr, only the first (regularised) group's weight decay
        for i, g in enumerate(self.opt.param_groups):
            g["lr"] = self.lr[it]
            if i == 0:
                g["weight_decay"] = self.wd[it]
        gc, lc = nchw(batch["global_crops"]), nchw(batch["local_crops"])
        crops = [gc, lc] if c.data.local_crops_number else [gc]
        teacher_output = self.multi_crop(self.teacher, [gc])  # only the 2 global views
        student_output = self.multi_crop(self.student, crops)
        temp = self.temp[epoch]
        loss = self.dino_loss(student_output, teacher_output, epoch)
        self.opt.zero_grad()
        loss.backward()
        self.param_norms = []
        if (
            o.clip_grad
        ):  # utils.clip_gradients: each tensor on its own, coefficient clip / (n + 1e-6)
            for _, p in self.student.named_parameters():
                if p.grad is not None:
                    param_norm = p.grad.data.norm(2)
                    self.param_norms.append(param_norm.item())
                    clip_coef = o.clip_grad / (param_norm + 1e-6)
                    if clip_coef < 1:
                        p.grad.data.mul_(clip_coef)
        # utils.cancel_gradients_last_layer(epoch, student, freeze_last_layer): after clipping
        if epoch < o.freeze_last_layer_epochs:
            for n, p in self.student.named_parameters():
                if "last_layer" in n:
                    p.grad = None
        self.opt.step()
        # train_one_epoch's EMA loop over the paired parameters
        with torch.no_grad():
            m = self.mom[it]
            for param_q, param_k in zip(self.student.parameters(), self.teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        return {
            "loss": float(loss.detach()),
            "lr": self.lr[it],
            "wd": self.wd[it],
            "momentum": self.mom[it],
            "teacher_temp": temp,
        }
