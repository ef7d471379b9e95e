"""The PyTorch references the parity tests compare against (official-dino.md §7).

- non-register DINOv2 backbones: the official code, PyPI `dinov2==0.0.1.dev2` (--no-deps);
- register backbones: Hugging Face `Dinov2WithRegistersModel` (size-path, antialiased pos-embed
  interpolation, like the official register models);
- DINO v1: the official v2 building blocks with v1 settings (no LayerScale, patch 16/8, offset
  0.1 interpolation), state dict without `mask_token` -- the v1 hub key set.

Weights are randomised everywhere (LayerScale, pos-embed, tokens and norms included), so a
converter or forward bug cannot hide behind an init value.
"""

from __future__ import annotations

import logging
import warnings
from functools import partial
from unittest import mock

import numpy as np
import torch

logging.getLogger("dinov2").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="xFormers not available")

from dinov2.layers import MemEffAttention  # noqa: E402
from dinov2.layers import NestedTensorBlock as Block  # noqa: E402
from dinov2.models.vision_transformer import DinoVisionTransformer as OfficialViT  # noqa: E402

from dinojax.models.config import ViTConfig  # noqa: E402


def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Replace every parameter with random values of a sensible scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith(("gamma", "lambda1")):
                p.copy_(0.2 + 0.8 * torch.rand(p.shape, generator=g))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * r)
            elif name.endswith("bias"):
                p.copy_(0.05 * r)
            elif name.endswith(("cls_token", "pos_embed", "position_embeddings", "mask_token",
                                "register_tokens")):  # fmt: skip
                p.copy_(0.5 * r)
            else:
                fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else p.shape[0]
                p.copy_(r / np.sqrt(fan_in))


def official_vit(cfg: ViTConfig, seed: int = 0, block_chunks: int = 0) -> torch.nn.Module:
    """Official DinoVisionTransformer (PyPI code) for a non-register config; hub key names, or
    the chunked `blocks.{c}.{i}` names of training checkpoints with `block_chunks` > 0."""
    assert cfg.num_register_tokens == 0
    # Every parameter is overwritten by randomize_: skip the official init (trunc_normal over
    # ~100M values costs seconds per model on a CI core).
    with mock.patch.object(OfficialViT, "init_weights", lambda self: None):
        m = _official_vit(cfg, block_chunks)
    randomize_(m, seed)
    return m.eval()


def _official_vit(cfg: ViTConfig, block_chunks: int) -> torch.nn.Module:
    return OfficialViT(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        init_values=cfg.layerscale_init,
        ffn_layer="swiglufused" if cfg.ffn_layer == "swiglu" else "mlp",
        block_chunks=block_chunks,  # 0: hub key names (§1.1: the class default chunks)
        block_fn=partial(Block, attn_class=MemEffAttention),
    )


def official_state_dict(model: torch.nn.Module, cfg: ViTConfig) -> dict[str, torch.Tensor]:
    sd = dict(model.state_dict())
    if cfg.family == "dino":
        sd.pop("mask_token")  # DINO v1 has no mask token (official-dino.md §1.4)
    return sd


def hf_register_vit(cfg: ViTConfig, seed: int = 0) -> torch.nn.Module:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    hf_cfg = Dinov2WithRegistersConfig(
        hidden_size=cfg.embed_dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        mlp_ratio=int(cfg.mlp_ratio),
        image_size=cfg.img_size,
        patch_size=cfg.patch_size,
        num_register_tokens=cfg.num_register_tokens,
        use_swiglu_ffn=cfg.ffn_layer == "swiglu",
        layerscale_value=1.0,
        layer_norm_eps=cfg.layernorm_eps,
        hidden_act="gelu",
    )
    m = Dinov2WithRegistersModel(hf_cfg)
    m.set_attn_implementation("eager")
    randomize_(m, seed)
    return m.eval()


@torch.no_grad()
def torch_outputs(
    model, cfg: ViTConfig, x_nchw: np.ndarray, masks: np.ndarray | None = None, api: bool = True
):
    """All outputs the parity suite checks, from the reference model, as numpy arrays.

    Keys: the forward_features dict, `inter_a` (last 2 blocks, normed, reshaped NHWC, with class
    tokens), `inter_b` (blocks [0, depth-1], not normed, flat) and `attn` (last block's
    attention probabilities).

    `api=True` calls each official method (forward_features, get_intermediate_layers twice, the
    blocks for the attention map): 4 forward passes. `api=False` runs ONE official
    get_intermediate_layers pass returning every block's raw output and derives the rest with the
    model's own final norm and last attention block (official-dino.md §1.5: the final norm is
    per-token, so norm(block output) is what forward_features / norm=True return); with masks,
    forward_features is the official masked pass (a second pass).
    The HF register reference always needs a single call.
    """
    x = torch.from_numpy(x_nchw)
    m = None if masks is None else torch.from_numpy(masks)
    r = cfg.num_register_tokens
    depth = cfg.depth
    h0, w0 = x.shape[2] // cfg.patch_size, x.shape[3] // cfg.patch_size
    if cfg.num_register_tokens:
        out = model(pixel_values=x, bool_masked_pos=m, output_hidden_states=True,
                    output_attentions=True)  # fmt: skip
        n = out.last_hidden_state
        ff = {
            "x_norm_clstoken": n[:, 0],
            "x_norm_regtokens": n[:, 1 : 1 + r],
            "x_norm_patchtokens": n[:, 1 + r :],
            "x_prenorm": out.hidden_states[-1],
        }
        if m is not None:  # intermediate layers and attention maps take no masks
            out = model(pixel_values=x, output_hidden_states=True, output_attentions=True)
        hs = out.hidden_states  # hs[i + 1] is the output of block i
        attn = out.attentions[-1]
        norm = model.layernorm
    else:
        if cfg.family == "dino":
            # v1's strided conv drops the remainder pixels; the v2 blocks assert divisibility, so
            # crop: identical patches, and the pos-embed sizes come from the same h0, w0.
            x = x[:, :, : h0 * cfg.patch_size, : w0 * cfg.patch_size]
        norm = model.norm
        if api:
            ff = model.forward_features(x, masks=m)
            inter_a = model.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True)
            inter_a = [(p.permute(0, 2, 3, 1), c) for p, c in inter_a]
            inter_b = model.get_intermediate_layers(x, n=[0, depth - 1], norm=False)
            t = model.prepare_tokens_with_masks(x)
            for blk in model.blocks[:-1]:
                t = blk(t)
            attn = _official_attention_probs(model.blocks[-1], t)
            return _numpy(ff, inter_a, inter_b, attn)
        raw = model.get_intermediate_layers(x, n=list(range(depth)), return_class_token=True,
                                            norm=False)  # fmt: skip
        hs = [None] + [torch.cat([c[:, None], p], dim=1) for p, c in raw]
        if m is not None:  # masks change every token: the official masked pass
            ff = model.forward_features(x, masks=m)
        else:
            n = norm(hs[-1])
            ff = {"x_norm_clstoken": n[:, 0], "x_norm_patchtokens": n[:, 1:], "x_prenorm": hs[-1]}
        attn = _official_attention_probs(model.blocks[-1], hs[depth - 1]) if depth > 1 else None
        if attn is None:
            attn = _official_attention_probs(model.blocks[-1], model.prepare_tokens_with_masks(x))

    def inter(i, normed):
        o = norm(hs[i + 1]) if normed else hs[i + 1]
        return o[:, 1 + r :], o[:, 0]

    inter_a = [inter(i, True) for i in (depth - 2, depth - 1)]
    inter_a = [(p.reshape(p.shape[0], h0, w0, -1), c) for p, c in inter_a]
    inter_b = [inter(i, False)[0] for i in (0, depth - 1)]
    return _numpy(ff, inter_a, inter_b, attn)


def _numpy(ff, inter_a, inter_b, attn) -> dict:
    res = {k: v.numpy() for k, v in ff.items() if isinstance(v, torch.Tensor)}
    # The PyPI code (2023-04) predates registers and has no x_norm_regtokens: empty, like HEAD.
    res.setdefault("x_norm_regtokens", res["x_norm_patchtokens"][:, :0])
    res["inter_a"] = [(p.numpy(), c.numpy()) for p, c in inter_a]
    res["inter_b"] = [p.numpy() for p in inter_b]
    res["attn"] = attn.numpy()
    return res


def _official_attention_probs(block, x):
    # The official Attention.forward's `attn` (and DINO v1's get_last_selfattention).
    a = block.attn
    y = block.norm1(x)
    b, n, c = y.shape
    qkv = a.qkv(y).reshape(b, n, 3, a.num_heads, c // a.num_heads).permute(2, 0, 3, 1, 4)
    q, k = qkv[0] * a.scale, qkv[1]
    return (q @ k.transpose(-2, -1)).softmax(dim=-1)


def official_dino_head(seed: int = 0, **kw) -> torch.nn.Module:
    """`dinov2.layers.DINOHead` (also DINO v1's head layout) with every parameter randomised."""
    from dinov2.layers import DINOHead

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's old weight_norm API
        head = DINOHead(**kw)
    g = torch.Generator().manual_seed(seed)
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


def small_config(**overrides) -> ViTConfig:
    """A narrow, shallow v2 architecture (head dim 64) for converter tests that need no full
    width: 2 heads, 128 wide, 4 blocks, 56 px pos-embed grid (4x4)."""
    base = dict(name="custom", embed_dim=128, num_heads=2, depth=4, img_size=56)
    return ViTConfig(**{**base, **overrides})
