"""Released DINOv2 depth heads <-> dinojax parameter trees (the "depth" task of
`dinojax.convert.dense`).

The files `dinov2_vit{s,b,l,g}14_{nyu,kitti}_{linear,linear4,dpt}_head.pth` hold the
`decode_head.*` weights of facebookresearch/dinov2 `dinov2/hub/depth/decode_heads.py`:

- `linear` / `linear4`: `BNHead` (built by `dinov2/hub/depthers.py`
  `_make_dinov2_linear_depth_head`): only `conv_depth`, a 1x1 `Conv2d(C, 256)` with
  C = 2 * embed_dim * layers (patch map and CLS per layer, 1 or 4 layers).
- `dpt`: `DPTHead` (`_make_dinov2_dpt_depth_head`: channels 256, post-process channels
  embed_dim // 8, // 4, // 2, // 1, readout "project"): `reassemble_blocks.{projects,
  readout_projects, resize_layers}`, `convs`, `fusion_blocks` (block 0 has no `res_conv_unit1`),
  `project`, `conv_depth.head.{0,2,4}` (`HeadDepth`).

dinojax keeps the same paths without `decode_head.`; `weight` becomes `kernel` in the JAX layout:
convolutions (O, I, kh, kw) -> (kh, kw, I, O), transposed convolutions (`resize_layers.0/1`,
torch (I, O, kh, kw)) -> (kh, kw, I, O), linears (O, I) -> (I, O).

The head config records what the weights cannot say: the backbone blocks the head reads
(`out_index`, from the architecture as in `depthers.py`) and the depth range (NYU 0.001-10 m,
KITTI 0.001-80 m, from the file name when it names the dataset; `dinojax.dense.depth` documents
the hub's linear-head range).
"""

from __future__ import annotations

import re

import jax
import numpy as np

from dinojax.convert.backbone import ConversionError

PREFIX = "decode_head."
N_BINS = 256
DPT_CHANNELS = 256
# dinov2/hub/depthers.py: `out_index` of the 4-layer heads (linear4, DPT) per backbone size; the
# 1-layer linear head reads the last block. Keyed by embed_dim (S/B/L/g = 384/768/1024/1536).
WIDTH_DEPTH = {384: 12, 768: 12, 1024: 24, 1536: 40}
OUT_INDEX_4 = {384: [2, 5, 8, 11], 768: [2, 5, 8, 11], 1024: [4, 11, 17, 23], 1536: [9, 19, 29, 39]}
# The released checkpoints' training sets (`depthers.py` `_get_depth_range`).
DATASET_RANGES = {"nyu": (0.001, 10.0), "kitti": (0.001, 80.0)}
TYPES = ("linear", "linear4", "dpt")
# dinojax.convert.dense passes the source file name to `from_official` (dataset, head type).
NAME_HINTS = True


def detect(sd: dict) -> bool:
    return any(k.startswith(PREFIX + "conv_depth") for k in sd)


# ---------------------------------------------------------------------------------------------
# Official key -> shape, for a head config
# ---------------------------------------------------------------------------------------------


def official_shapes(head_cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every `decode_head.*` key of the released file for `head_cfg`, with its torch shape."""
    d = int(head_cfg["embed_dim"])
    if head_cfg["type"] in ("linear", "linear4"):
        c = 2 * d * len(head_cfg["out_index"])
        nb = int(head_cfg.get("n_bins", N_BINS))
        return {PREFIX + "conv_depth.weight": (nb, c, 1, 1), PREFIX + "conv_depth.bias": (nb,)}
    ch = int(head_cfg["channels"])
    post = [int(c) for c in head_cfg["post_process_channels"]]
    s: dict[str, tuple[int, ...]] = {}
    rb = PREFIX + "reassemble_blocks."
    for i, c in enumerate(post):
        s[f"{rb}projects.{i}.conv.weight"] = (c, d, 1, 1)
        s[f"{rb}projects.{i}.conv.bias"] = (c,)
        s[f"{rb}readout_projects.{i}.0.weight"] = (d, 2 * d)
        s[f"{rb}readout_projects.{i}.0.bias"] = (d,)
    # ReassembleBlocks: ConvTranspose2d k4 s4, ConvTranspose2d k2 s2, Identity, Conv2d k3 s2.
    s[f"{rb}resize_layers.0.weight"] = (post[0], post[0], 4, 4)
    s[f"{rb}resize_layers.0.bias"] = (post[0],)
    s[f"{rb}resize_layers.1.weight"] = (post[1], post[1], 2, 2)
    s[f"{rb}resize_layers.1.bias"] = (post[1],)
    s[f"{rb}resize_layers.3.weight"] = (post[3], post[3], 3, 3)
    s[f"{rb}resize_layers.3.bias"] = (post[3],)
    for i, c in enumerate(post):
        s[f"{PREFIX}convs.{i}.conv.weight"] = (ch, c, 3, 3)  # ConvModule bias=False
    for i in range(len(post)):
        fb = f"{PREFIX}fusion_blocks.{i}."
        s[fb + "project.conv.weight"] = (ch, ch, 1, 1)
        s[fb + "project.conv.bias"] = (ch,)
        for unit in ("res_conv_unit1", "res_conv_unit2") if i else ("res_conv_unit2",):
            for conv in ("conv1", "conv2"):
                s[f"{fb}{unit}.{conv}.conv.weight"] = (ch, ch, 3, 3)
    s[PREFIX + "project.conv.weight"] = (ch, ch, 3, 3)
    s[PREFIX + "project.conv.bias"] = (ch,)
    hd = PREFIX + "conv_depth.head."
    for idx, (o, i, k) in {0: (ch // 2, ch, 3), 2: (32, ch // 2, 3), 4: (1, 32, 1)}.items():
        s[f"{hd}{idx}.weight"] = (o, i, k, k)
        s[f"{hd}{idx}.bias"] = (o,)
    return s


def _kind(key: str) -> str:
    if re.search(r"reassemble_blocks\.resize_layers\.[01]\.weight$", key):
        return "conv_transpose"
    if "readout_projects" in key and key.endswith("weight"):
        return "linear"
    return "conv" if key.endswith("weight") else "bias"


def _to_jax(key: str, a: np.ndarray) -> np.ndarray:
    kind = _kind(key)
    if kind == "conv":  # (O, I, kh, kw) -> (kh, kw, I, O)
        return a.transpose(2, 3, 1, 0)
    if kind == "conv_transpose":  # (I, O, kh, kw) -> (kh, kw, I, O)
        return a.transpose(2, 3, 0, 1)
    if kind == "linear":
        return a.T
    return a


def _to_torch(key: str, a: np.ndarray) -> np.ndarray:
    kind = _kind(key)
    if kind == "conv":
        return a.transpose(3, 2, 0, 1)
    if kind == "conv_transpose":
        return a.transpose(2, 3, 0, 1)
    if kind == "linear":
        return a.T
    return a


def _path(key: str) -> list[str]:
    parts = key[len(PREFIX) :].split(".")
    return parts[:-1] + ["kernel" if parts[-1] == "weight" else "bias"]


def _set(tree: dict, path: list[str], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree: dict, path: list[str]):
    for p in path:
        tree = tree[p]
    return tree


def jax_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_to_jax(key, np.empty(shape, np.int8)).shape)


# ---------------------------------------------------------------------------------------------
# Config from the weights (+ architecture, + file name)
# ---------------------------------------------------------------------------------------------


def _arch_config(arch: str):
    from dinojax.models.config import get_config

    try:
        return get_config(arch)
    except (KeyError, ValueError) as e:
        raise ConversionError(f"--arch {arch!r}: {e}") from None


def check_backbone(
    head_cfg: dict,
    *,
    embed_dim: int,
    num_register_tokens: int,
    depth: int,
    head_name: str,
    backbone_name: str,
) -> None:
    """One line naming both when a head cannot run on a backbone (width, registers, blocks)."""
    what = f"depth head {head_name} ({head_cfg['type']}, width {head_cfg['embed_dim']}"
    if int(head_cfg["embed_dim"]) != int(embed_dim):
        raise ConversionError(
            f"{what}) does not match backbone {backbone_name} (width {embed_dim})"
        )
    regs = int(head_cfg.get("num_register_tokens", 0))
    if regs != int(num_register_tokens):
        released = " (the released depth heads are for non-register backbones)" if not regs else ""
        raise ConversionError(
            f"{what}, {regs} registers) does not match backbone "
            f"{backbone_name} ({num_register_tokens} registers){released}"
        )
    if max(head_cfg["out_index"]) >= depth:
        raise ConversionError(
            f"{what}, reads blocks {head_cfg['out_index']}) does not match "
            f"backbone {backbone_name} ({depth} blocks)"
        )


def _name_hints(name: str | None) -> tuple[str | None, str | None]:
    """(dataset, head type) named by a released file name, e.g. `..._nyu_linear4_head.pth`."""
    if not name:
        return None, None
    low = name.lower()
    dataset = next((d for d in DATASET_RANGES if re.search(rf"(^|[_\W]){d}([_\W]|$)", low)), None)
    m = re.search(r"_(linear4|linear|dpt)_head", low)
    return dataset, (m.group(1) if m else None)


def _linear_type(c: int, arch_cfg, type_hint: str | None, name: str) -> tuple[str, int]:
    if arch_cfg is not None:
        d = arch_cfg.embed_dim
        for t, layers in (("linear", 1), ("linear4", 4)):
            if c == 2 * d * layers:
                return t, d
        raise ConversionError(
            f"depth head {name} (conv_depth input {c} channels) does not match "
            f"backbone {arch_cfg.name} (width {d}: expected {2 * d} for a linear "
            f"or {8 * d} for a linear4 head)"
        )
    cands = [
        (t, c // (2 * n))
        for t, n in (("linear", 1), ("linear4", 4))
        if c % (2 * n) == 0 and c // (2 * n) in WIDTH_DEPTH
    ]
    if type_hint in ("linear", "linear4"):
        cands = [x for x in cands if x[0] == type_hint]
    if len(cands) == 1:
        return cands[0]
    if not cands:
        raise ConversionError(
            f"depth head {name}: conv_depth input of {c} channels fits no "
            "released backbone width (384/768/1024/1536): pass --arch"
        )
    raise ConversionError(
        f"depth head {name}: conv_depth input of {c} channels is a linear head "
        f"of width {cands[0][1]} or a linear4 head of width {cands[1][1]}: pass "
        "--arch (e.g. dinov2_vits14)"
    )


def _infer_cfg(sd: dict, arch: str | None, name: str | None) -> dict:
    label = name or "(in memory)"
    arch_cfg = _arch_config(arch) if arch else None
    dataset, type_hint = _name_hints(name)
    w = sd.get(PREFIX + "conv_depth.weight")
    if w is not None:  # BNHead
        if w.ndim != 4 or w.shape[2:] != (1, 1):
            raise ConversionError(
                f"depth head {label}: decode_head.conv_depth.weight has shape "
                f"{tuple(w.shape)}, expected (256, C, 1, 1)"
            )
        kind, d = _linear_type(int(w.shape[1]), arch_cfg, type_hint, label)
        cfg = {"type": kind, "embed_dim": d, "n_bins": int(w.shape[0])}
    else:
        key = PREFIX + "reassemble_blocks.readout_projects.0.0.weight"
        if key not in sd:
            found = sorted({".".join(k.split(".")[:3]) for k in sd})[:6]
            raise ConversionError(
                f"depth head {label}: neither a linear head "
                "(decode_head.conv_depth.weight) nor a DPT head "
                f"({key}); found {found}"
            )
        d = int(sd[key].shape[0])
        post = []
        for i in range(4):
            k = f"{PREFIX}reassemble_blocks.projects.{i}.conv.weight"
            if k not in sd:
                raise ConversionError(f"depth head {label}: missing key {k}")
            post.append(int(sd[k].shape[0]))
        k = PREFIX + "convs.0.conv.weight"
        ch = int(sd[k].shape[0]) if k in sd else DPT_CHANNELS
        cfg = {"type": "dpt", "embed_dim": d, "channels": ch, "post_process_channels": post}
        if arch_cfg is not None and arch_cfg.embed_dim != d:
            raise ConversionError(
                f"depth head {label} (dpt, width {d}) does not match backbone "
                f"{arch_cfg.name} (width {arch_cfg.embed_dim})"
            )
    d = cfg["embed_dim"]
    if arch_cfg is not None:
        depth = arch_cfg.depth
        if arch_cfg.num_register_tokens:
            raise ConversionError(
                f"depth head {label} ({cfg['type']}) was released for "
                f"non-register backbones, not {arch_cfg.name} "
                f"({arch_cfg.num_register_tokens} registers)"
            )
    elif d in WIDTH_DEPTH:
        depth = WIDTH_DEPTH[d]
    else:
        raise ConversionError(
            f"depth head {label}: width {d} is no released backbone's: pass "
            "--arch to say which blocks it reads"
        )
    if cfg["type"] == "linear":
        cfg["out_index"] = [depth - 1]
    elif d in OUT_INDEX_4 and depth == WIDTH_DEPTH[d]:
        cfg["out_index"] = list(OUT_INDEX_4[d])
    else:
        raise ConversionError(
            f"depth head {label}: no released 4-layer indices for width {d} and {depth} blocks"
        )
    lo, hi = DATASET_RANGES.get(dataset, (None, None))
    cfg.update(dataset=dataset, min_depth=lo, max_depth=hi, num_register_tokens=0)
    return cfg


def _check_keys(sd: dict, head_cfg: dict, label: str) -> None:
    want = official_shapes(head_cfg)
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing {missing[:5]}" + (f" (+{len(missing) - 5})" if len(missing) > 5 else "")
            )
        if unexpected:
            parts.append(
                f"unexpected {unexpected[:5]}"
                + (f" (+{len(unexpected) - 5})" if len(unexpected) > 5 else "")
            )
        raise ConversionError(f"depth head {label} ({head_cfg['type']}): " + "; ".join(parts))
    bad = [
        f"{k} {tuple(sd[k].shape)} (expected {want[k]})"
        for k in sorted(want)
        if tuple(sd[k].shape) != want[k]
    ]
    if bad:
        raise ConversionError(
            f"depth head {label} ({head_cfg['type']}): mis-shaped " + ", ".join(bad[:4])
        )


# ---------------------------------------------------------------------------------------------
# The task interface
# ---------------------------------------------------------------------------------------------


def from_official(sd: dict, arch: str | None, name: str | None = None) -> tuple[dict, dict]:
    """Official `decode_head.*` state dict -> (params of numpy float32, head config)."""
    sd = {k: np.asarray(v) for k, v in sd.items()}
    head_cfg = _infer_cfg(sd, arch, name)
    _check_keys(sd, head_cfg, name or "(in memory)")
    params: dict = {}
    for k, v in sd.items():
        _set(params, _path(k), np.ascontiguousarray(_to_jax(k, v.astype(np.float32))))
    return params, head_cfg


def to_official(params: dict, head_cfg: dict) -> dict:
    """Params (any array type) -> the released flat `state_dict` (numpy float32)."""
    out = {}
    for k, shape in official_shapes(head_cfg).items():
        try:
            a = np.asarray(_get(params, _path(k)), np.float32)
        except KeyError:
            raise ConversionError(f"depth head params have no {'.'.join(_path(k))}") from None
        if a.shape != jax_shape(k, shape):
            raise ConversionError(
                f"depth head param {'.'.join(_path(k))} has shape {a.shape}, "
                f"expected {jax_shape(k, shape)}"
            )
        out[k] = np.ascontiguousarray(_to_torch(k, a))
    return out


def abstract_params(head_cfg: dict) -> dict:
    tree: dict = {}
    for k, shape in official_shapes(head_cfg).items():
        _set(tree, _path(k), jax.ShapeDtypeStruct(jax_shape(k, shape), np.float32))
    return tree
