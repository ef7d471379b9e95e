"""The PyTorch references the parity tests compare against.

- non-register DINOv2 backbones: the official constructors `vit_small` / `vit_base` / `vit_large`
  / `vit_giant2` of the official code (PyPI `dinov2==0.0.1.dev2`, --no-deps), called with the
  torch-hub keyword arguments (`HUB_KWARGS`, facebookresearch/dinov2 `dinov2/hub/backbones.py`
  `_make_dinov2_model`);
- register backbones: Hugging Face `Dinov2WithRegistersModel` built from the values of the
  published configs (`HF_REGISTER_CONFIGS`, facebook/dinov2-with-registers-* on the HF hub;
  size-path, antialiased pos-embed interpolation, like the official register models);
- DINO v1: the official v2 building blocks with the official v1 values written out here
  (`DINO_V1`, facebookresearch/dino `vision_transformer.py` `vit_small` / `vit_base`), state dict
  without `mask_token` -- the v1 hub key set.

None of these reads `dinojax.models.config`: a wrong value there cannot be copied into the
reference. The only override is `depth`, a test choice (ViT-L and ViT-g run at full width with 2
blocks on CPU), never an architecture fact. `official_vit(cfg)` builds from a `ViTConfig` for the
custom (narrow, shallow) architectures the converter and training tests use;
`tests/models/test_config_official.py` pins every hub `ViTConfig` to the official modules.

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

import dinov2.models.vision_transformer as official_vt  # noqa: E402
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


# facebookresearch/dinov2 `dinov2/hub/backbones.py`: each `dinov2_vit*14[_reg]` calls
# `_make_dinov2_model(arch_name=..., [ffn_layer="swiglufused" for g], [pretrained])` whose defaults
# are img_size=518, patch_size=14, init_values=1.0, ffn_layer="mlp", block_chunks=0,
# num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1; the `_reg` entries
# pass num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0.
HUB_CONSTRUCTORS = {"s": "vit_small", "b": "vit_base", "l": "vit_large", "g": "vit_giant2"}
HUB_KWARGS = dict(img_size=518, patch_size=14, init_values=1.0, block_chunks=0)
HUB_FFN = {"s": "mlp", "b": "mlp", "l": "mlp", "g": "swiglufused"}
# The hub values the PyPI snapshot (2023-04) has no keyword for: it hard-codes the offset 0.1,
# no-antialias scale-factor interpolation (`interpolate_pos_encoding`) and has no registers.
HUB_INTERPOLATION = {False: dict(interpolate_offset=0.1, interpolate_antialias=False),
                     True: dict(interpolate_offset=0.0, interpolate_antialias=True)}  # fmt: skip

# facebookresearch/dino `vision_transformer.py`: `vit_small(patch_size)` = VisionTransformer(
# embed_dim=384, depth=12, num_heads=6, mlp_ratio=4, qkv_bias=True,
# norm_layer=partial(nn.LayerNorm, eps=1e-6)); `vit_base` the same with 768 / 12 / 12;
# `VisionTransformer` defaults img_size=[224]; its blocks have no LayerScale and its
# `interpolate_pos_encoding` uses the scale-factor path with +0.1 and no antialias; the model has
# no mask token. The hub entries `dino_vit{s,b}{16,8}` set patch_size 16 or 8.
DINO_V1 = {
    "s": dict(embed_dim=384, depth=12, num_heads=6),
    "b": dict(embed_dim=768, depth=12, num_heads=12),
}
DINO_V1_COMMON = dict(img_size=224, mlp_ratio=4, qkv_bias=True, layernorm_eps=1e-6,
                      init_values=None, interpolate_offset=0.1, interpolate_antialias=False,
                      mask_token=False)  # fmt: skip

# The published Hugging Face configs (config.json of facebook/dinov2-with-registers-small, -base,
# -large, -giant): every one has image_size 518, patch_size 14, mlp_ratio 4,
# layer_norm_eps 1e-6, layerscale_value 1.0, num_register_tokens 4, qkv_bias true,
# hidden_act "gelu"; the sizes below; use_swiglu_ffn true for giant only.
HF_REGISTER_COMMON = dict(image_size=518, patch_size=14, mlp_ratio=4, layer_norm_eps=1e-6,
                          layerscale_value=1.0, num_register_tokens=4, qkv_bias=True,
                          hidden_act="gelu")  # fmt: skip
HF_REGISTER_CONFIGS = {
    "s": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, use_swiglu_ffn=False),
    "b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, use_swiglu_ffn=False),
    "l": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, use_swiglu_ffn=False
    ),  # fmt: skip
    "g": dict(
        hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True
    ),  # fmt: skip
}


def _hub_size(name: str) -> tuple[str, str, bool, int]:
    """'dinov2_vitl14_reg' -> ('dinov2', 'l', True, 14); 'dino_vitb8' -> ('dino', 'b', False, 8)."""
    family, rest = name.split("_vit", 1)
    reg = rest.endswith(("_reg", "_reg4"))
    rest = rest.split("_")[0]
    if family not in ("dinov2", "dino") or rest[0] not in "sblg" or not rest[1:].isdigit():
        raise ValueError(f"not an official hub name: {name!r}")
    return family, rest[0], reg, int(rest[1:])


def official_hub_vit(
    name: str, seed: int = 0, depth: int | None = None, *, randomize: bool = True
) -> torch.nn.Module:
    """The official backbone `name` (hub spelling), built from official values only: the PyPI
    constructor with the hub kwargs (v2), the v1 values above (v1) or the published HF config
    (registers). `depth` overrides the block count (a test choice: full width, fewer blocks)."""
    family, size, reg, patch = _hub_size(name)
    if reg:
        return hf_register_hub_vit(name, seed, depth, randomize=randomize)
    if family == "dino":
        v1 = {**DINO_V1[size], **({"depth": depth} if depth else {})}
        kw = dict(img_size=DINO_V1_COMMON["img_size"], patch_size=patch,
                  mlp_ratio=DINO_V1_COMMON["mlp_ratio"], qkv_bias=DINO_V1_COMMON["qkv_bias"],
                  init_values=DINO_V1_COMMON["init_values"], block_chunks=0,
                  block_fn=partial(Block, attn_class=MemEffAttention), **v1)  # fmt: skip
        with mock.patch.object(OfficialViT, "init_weights", lambda self: None):
            m = OfficialViT(**kw)
        # The v2 class hard-codes LayerNorm eps 1e-6, v1's own value (checked, not assumed).
        assert all(n.eps == DINO_V1_COMMON["layernorm_eps"] for n in _layer_norms(m))
    else:
        m = _build_official_v2(size, depth)
    if randomize:
        randomize_(m, seed)
    return m.eval()


def _build_official_v2(size: str, depth: int | None) -> torch.nn.Module:
    # The constructors pass depth themselves: wrap the class so only `depth` changes and every
    # other value comes from the official constructor.
    def make(**kw):
        if depth is not None:
            kw["depth"] = depth
        return OfficialViT(**kw)

    ctor = getattr(official_vt, HUB_CONSTRUCTORS[size])
    with (
        mock.patch.object(OfficialViT, "init_weights", lambda self: None),
        mock.patch.object(official_vt, "DinoVisionTransformer", make),
    ):
        return ctor(**HUB_KWARGS, ffn_layer=HUB_FFN[size])


def official_hub_kwargs(name: str) -> dict:
    """The keyword arguments the official constructor of `name` passes to DinoVisionTransformer
    (recorded, not rebuilt): depth, heads, widths, init_values, ffn_layer, ..."""
    family, size, reg, patch = _hub_size(name)
    assert family == "dinov2"
    seen = {}

    def record(**kw):
        seen.update(kw)
        raise _Recorded

    ctor = getattr(official_vt, HUB_CONSTRUCTORS[size])
    with mock.patch.object(official_vt, "DinoVisionTransformer", record):
        try:
            ctor(**HUB_KWARGS, ffn_layer=HUB_FFN[size])
        except _Recorded:
            pass
    return seen


class _Recorded(Exception):
    pass


def hf_register_hub_vit(
    name: str, seed: int = 0, depth: int | None = None, *, randomize: bool = True
) -> torch.nn.Module:
    """Hugging Face `Dinov2WithRegistersModel` with the published config of `name`'s size."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    family, size, reg, patch = _hub_size(name)
    assert family == "dinov2" and reg and patch == HF_REGISTER_COMMON["patch_size"]
    values = {**HF_REGISTER_COMMON, **HF_REGISTER_CONFIGS[size]}
    if depth is not None:
        values["num_hidden_layers"] = depth
    m = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**values))
    m.set_attn_implementation("eager")
    if randomize:
        randomize_(m, seed)
    return m.eval()


def _layer_norms(m: torch.nn.Module) -> list[torch.nn.LayerNorm]:
    return [x for x in m.modules() if isinstance(x, torch.nn.LayerNorm)]


def official_vit(cfg: ViTConfig, seed: int = 0, block_chunks: int = 0) -> torch.nn.Module:
    """Official DinoVisionTransformer (PyPI code) for a non-register config; hub key names, or
    the chunked `blocks.{c}.{i}` names of training checkpoints with `block_chunks` > 0.

    The architecture comes from `cfg` (custom test architectures); the parity suite builds the
    hub architectures with `official_hub_vit`, which takes nothing from `ViTConfig`."""
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
        block_chunks=block_chunks,  # 0: hub key names (the class default, 1, chunks)
        block_fn=partial(Block, attn_class=MemEffAttention),
    )


def official_state_dict(model: torch.nn.Module, cfg: ViTConfig) -> dict[str, torch.Tensor]:
    sd = dict(model.state_dict())
    if cfg.family == "dino":
        sd.pop(
            "mask_token"
        )  # DINO v1 has no mask token (facebookresearch/dino `vision_transformer.py`)
    return sd


def hf_register_vit(cfg: ViTConfig, seed: int = 0) -> torch.nn.Module:
    """HF register model for a `ViTConfig` (custom architectures; hub ones: hf_register_hub_vit)."""
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
    model's own final norm and last attention block (the final LayerNorm is per-token, so
    norm(block output) is what the official forward_features / get_intermediate_layers(norm=True)
    return); with masks,
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
