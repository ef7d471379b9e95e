"""Torch references of the released DINOv2 depth heads, written from their documented semantics
(facebookresearch/dinov2 `dinov2/hub/depth/decode_heads.py`, `encoder_decoder.py`,
`dinov2/hub/depthers.py`); the official modules import mmcv-era code, so they are restated here
with the same module names (a released `state_dict` loads into them with strict=True).

Nothing here reads dinojax: a wrong value in the port cannot be copied into the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvModule(nn.Module):
    """`ConvModule` without norm: `.conv`, then the activation when given (order conv, act)."""

    def __init__(self, cin, cout, k, *, stride=1, padding=0, bias=True, act=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias)
        self.act = act

    def forward(self, x):
        x = self.conv(x)
        return F.relu(x) if self.act else x


class BNHead(nn.Module):
    """`BNHead` as built by `_make_dinov2_linear_depth_head` (classify=True, n_bins=256,
    bins_strategy "UD", norm_strategy "linear", upsample=4, input_transform "resize_concat",
    align_corners=False); `depth_pred` of `DepthBaseDecodeHead`."""

    def __init__(self, embed_dim, layers, min_depth, max_depth, n_bins=256):
        super().__init__()
        self.upsample, self.n_bins = 4, n_bins
        self.min_depth, self.max_depth = min_depth, max_depth
        self.conv_depth = nn.Conv2d(embed_dim * layers * 2, n_bins, kernel_size=1)

    def forward(self, inputs):
        xs = []
        for x, cls in inputs:  # `_forward_feature`: concat(patch map, CLS broadcast)
            xs.append(torch.cat((x, cls[:, :, None, None].expand_as(x)), 1))
        size = [s * self.upsample for s in xs[0].shape[2:]]  # `_transform_inputs`
        x = torch.cat(
            [F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in xs], dim=1
        )
        logit = self.conv_depth(x)  # `depth_pred`
        bins = torch.linspace(self.min_depth, self.max_depth, self.n_bins)
        logit = torch.relu(logit) + 0.1
        logit = logit / logit.sum(dim=1, keepdim=True)
        return torch.einsum("ikmn,k->imn", [logit, bins]).unsqueeze(dim=1)


class PreActResidualConvUnit(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = ConvModule(c, c, 3, padding=1, bias=False)
        self.conv2 = ConvModule(c, c, 3, padding=1, bias=False)

    def forward(self, x):  # order (act, conv, norm), no norm
        y = self.conv1(F.relu(x))
        y = self.conv2(F.relu(y))
        return y + x


class FeatureFusionBlock(nn.Module):
    def __init__(self, c, first):
        super().__init__()
        self.project = ConvModule(c, c, 1)
        self.res_conv_unit1 = None if first else PreActResidualConvUnit(c)
        self.res_conv_unit2 = PreActResidualConvUnit(c)

    def forward(self, *inputs):
        x = inputs[0]
        if len(inputs) == 2:
            res = inputs[1]
            if x.shape != res.shape:
                res = F.interpolate(res, size=x.shape[2:], mode="bilinear", align_corners=False)
            x = x + self.res_conv_unit1(res)
        x = self.res_conv_unit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.project(x)


class ReassembleBlocks(nn.Module):
    def __init__(self, d, post):
        super().__init__()
        self.projects = nn.ModuleList([ConvModule(d, c, 1) for c in post])
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(post[0], post[0], kernel_size=4, stride=4, padding=0),
                nn.ConvTranspose2d(post[1], post[1], kernel_size=2, stride=2, padding=0),
                nn.Identity(),
                nn.Conv2d(post[3], post[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        self.readout_projects = nn.ModuleList(
            [nn.Sequential(nn.Linear(2 * d, d), nn.GELU()) for _ in post]
        )

    def forward(self, inputs):
        out = []
        for i, (x, cls) in enumerate(inputs):  # readout_type "project"
            shape = x.shape
            x = x.flatten(2).permute(0, 2, 1)
            x = self.readout_projects[i](torch.cat((x, cls.unsqueeze(1).expand_as(x)), -1))
            x = x.permute(0, 2, 1).reshape(shape)
            out.append(self.resize_layers[i](self.projects[i](x)))
        return out


class HeadDepth(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.head = nn.Sequential(
            nn.Conv2d(c, c // 2, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(c // 2, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 1, 1),
        )

    def forward(self, x):
        return self.head(x)


class DPTHead(nn.Module):
    """`DPTHead` as built by `_make_dinov2_dpt_depth_head` (channels 256, post-process channels
    D // 8, D // 4, D // 2, D, readout "project", no norm)."""

    def __init__(self, d, min_depth, max_depth, channels=256):
        super().__init__()
        post = [d // 2 ** (3 - i) for i in range(4)]
        self.min_depth, self.max_depth = min_depth, max_depth
        self.reassemble_blocks = ReassembleBlocks(d, post)
        self.convs = nn.ModuleList(
            [ConvModule(c, channels, 3, padding=1, bias=False) for c in post]
        )
        self.fusion_blocks = nn.ModuleList([FeatureFusionBlock(channels, i == 0) for i in range(4)])
        self.project = ConvModule(channels, channels, 3, padding=1, act=True)
        self.conv_depth = HeadDepth(channels)

    def forward(self, inputs):
        x = self.reassemble_blocks(list(inputs))
        x = [self.convs[i](f) for i, f in enumerate(x)]
        out = self.fusion_blocks[0](x[-1])
        for i in range(1, 4):
            out = self.fusion_blocks[i](out, x[-(i + 1)])
        out = self.project(out)
        return F.relu(self.conv_depth(out)) + self.min_depth  # `depth_pred`, classify=False


def center_padding(img, multiple=14):
    """`dinov2/hub/utils.py` `CenterPadding`."""
    pads = []
    for size in img.shape[-2:][::-1]:
        new = -(-size // multiple) * multiple
        pads += [(new - size) // 2, new - size - (new - size) // 2]
    return F.pad(img, pads)


@torch.no_grad()
def encode_decode(backbone, head, img, out_index):
    """`DepthEncoderDecoder.encode_decode(img, None)` with the hub's backbone forward
    (`get_intermediate_layers(n=out_index, reshape=True, return_class_token=True, norm=False)`
    after the CenterPadding pre-hook)."""
    feats = backbone.get_intermediate_layers(
        center_padding(img), n=out_index, reshape=True, return_class_token=True, norm=False
    )
    out = torch.clamp(head(feats), min=head.min_depth, max=head.max_depth)
    return F.interpolate(out, size=img.shape[2:], mode="bilinear", align_corners=False)


def randomize_head_(head: nn.Module, seed: int) -> None:
    """Random weights keeping activations O(1)-O(10) through the head (fan-in scaled, the residual
    units at half scale), biases non-zero; the DPT's last bias puts the depth mostly inside
    0.001-10 m (a map clamped everywhere would test little)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in head.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                p.copy_(0.1 * r)
            else:
                fan_in = p.shape[1] * (p[0, 0].numel() if p.ndim == 4 else 1)
                if "resize_layers.0" in name or "resize_layers.1" in name:
                    fan_in = p.shape[0]  # ConvTranspose2d weight (in, out, k, k)
                gain = 0.5 if "res_conv_unit" in name else 1.0
                p.copy_(gain * r / fan_in**0.5)
        if isinstance(head, DPTHead):
            head.conv_depth.head[4].bias.fill_(3.0)


def official_state_dict(head: nn.Module) -> dict:
    """The released file's `state_dict`: `decode_head.` + the module paths."""
    return {f"decode_head.{k}": v.detach().clone() for k, v in head.state_dict().items()}
