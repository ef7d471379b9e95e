"""Official checkpoints <-> dinojax orbax checkpoint directories.

A converted checkpoint is a directory:

    DST/dinojax.json   format version, architecture (ViTConfig), head configs, source
    DST/state/         orbax checkpoint of {"backbone": params, "heads": {...}, "extras": {...}}

Accepted sources (detected from the contents; docs/parity.md "Checkpoints"):
  hub      official hub backbone `.pth` (v2, v2 with registers, v1): flat backbone keys
  teacher  DINOv2 `teacher_checkpoint.pth`: {"teacher": {"backbone.blocks.{c}.{i}...",
           "dino_head.*", "ibot_head.*"}}
  dino_v1  DINO v1 full training checkpoint: {"student": {"module.backbone.*", "module.head.*"},
           "teacher": {...}, "dino_loss": {"center"}, "args": Namespace, ...}
  hf       Hugging Face Dinov2Model / Dinov2WithRegistersModel safetensors
DINOv3 ViTs (official `.pth`, Hugging Face DINOv3ViTModel safetensors) and ConvNeXts are routed
by `dinojax.convert.v3`; the metadata then records `"model": "dinov3_vit"` or
`"dinov3_convnext"` (absent: the DINO / DINOv2 ViT).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np

from dinojax.convert import v3 as v3conv
from dinojax.convert.backbone import (
    ConversionError,
    dechunk,
    detect_config,
    from_hf,
    from_official,
    is_hf,
    to_hf,
    to_official,
)
from dinojax.convert.io import FILE_SUFFIXES, read_file, write_file
from dinojax.convert.layout import stack_blocks, unstack_blocks
from dinojax.models.config import ViTConfig

FORMAT_VERSION = 1
META = "dinojax.json"
LAYOUTS = ("stacked", "per_layer")  # how `backbone.blocks` is stored (see dinojax.convert.layout)
EXPORT_FORMATS = ("hub", "teacher", "hf")


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _unwrap(sd: dict) -> dict:
    return {k.removeprefix("module."): v for k, v in sd.items()}


def split_checkpoint(
    obj: dict, which: str = "teacher", hf_config: dict | None = None
) -> tuple[str, dict, dict, dict]:
    """Identify the format -> (format, backbone state dict, {head name: state dict}, extras).
    `hf_config`: a Hugging Face config.json found next to the file (checked for DINOv3)."""
    if which not in ("teacher", "student"):
        raise ConversionError(f"which must be 'teacher' or 'student', got {which!r}")
    if any(isinstance(v, dict) for v in obj.values()):
        if which not in obj or not isinstance(obj[which], dict):
            raise ConversionError(
                f"training checkpoint has no {which!r} state dict (top-level keys: {sorted(obj)})"
            )
        model = _unwrap(obj[which])
        v1 = "student" in obj and "dino_loss" in obj
        backbone = dechunk(_strip(model, "backbone."))
        if not backbone:
            raise ConversionError(f"{which!r} state dict has no 'backbone.' keys")
        heads = {}
        for prefix, name in (("dino_head.", "dino_head"), ("ibot_head.", "ibot_head"),
                             ("head.", "dino_head")):  # fmt: skip
            sub = _strip(model, prefix)
            if sub:
                heads[name] = sub
        known = ("backbone.", "dino_head.", "ibot_head.", "head.")
        stray = sorted(k for k in model if not k.startswith(known))
        if stray:
            raise ConversionError(f"unexpected keys in the {which!r} state dict: {stray}")
        extras = {}
        if v1 and isinstance(obj.get("dino_loss"), dict) and "center" in obj["dino_loss"]:
            extras["dino_center"] = np.asarray(obj["dino_loss"]["center"], np.float32)
        return ("dino_v1" if v1 else "teacher"), backbone, heads, extras
    flat = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if len(flat) != len(obj):
        bad = sorted(f"{k}: {type(v).__name__}" for k, v in obj.items() if k not in flat)
        raise ConversionError(
            f"state dict holds non-tensor values [{'; '.join(bad)}]: not a backbone checkpoint"
        )
    v3 = v3conv.split_flat(_unwrap(flat), hf_config)
    if v3 is not None:
        return v3[0], v3[1], {}, {}
    if is_hf(flat):
        return "hf", from_hf(flat), {}, {}
    return "hub", dechunk(_unwrap(flat)), {}, {}


def _head_module(cfg: dict):
    from dinojax.models.heads import DINOHead

    def make():
        from flax import nnx

        return DINOHead(
            cfg["in_dim"], cfg["out_dim"], nlayers=cfg["nlayers"], hidden_dim=cfg["hidden_dim"],
            bottleneck_dim=cfg["bottleneck_dim"], mlp_bias=cfg.get("mlp_bias", True),
            rngs=nnx.Rngs(0),
        )  # fmt: skip

    return make


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    arch: str | None = None,
    which: str = "teacher",
    overwrite: bool = False,
) -> ViTConfig:
    """Convert an official checkpoint file to a dinojax checkpoint directory (atomically).
    Returns the detected config: a `ViTConfig`, or for DINOv3 a `DinoV3Config` / ConvNeXt config."""
    dst = Path(dst)
    if dst.suffix in FILE_SUFFIXES:
        raise ConversionError(
            f"{dst}: a dinojax checkpoint is a directory; SRC {src} is not a dinojax checkpoint "
            "directory, so there is nothing to export"
        )
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise ConversionError(f"{dst} exists and is not empty (use --overwrite)")
    obj = read_file(src)
    fmt, backbone_sd, head_sds, extras = split_checkpoint(obj, which, _hf_config(src))
    kind = v3conv.backbone_kind(backbone_sd, arch)  # family vs --arch: one error line
    if kind == v3conv.VIT_V2:
        cfg = detect_config(backbone_sd, arch)
        params = from_official(backbone_sd, cfg)
    else:
        kind, cfg, params = v3conv.convert_backbone(backbone_sd, arch)
    heads, head_cfgs = {}, {}
    for name, sd in head_sds.items():
        from dinojax.convert import heads as head_conv

        try:
            head_cfgs[name] = head_conv.head_config_from_torch(sd)
            heads[name] = head_conv.dino_head_from_torch(sd)
        except ValueError as e:
            raise ConversionError(f"{name}: {e}") from e
    tree = {"backbone": params, "heads": heads, "extras": extras}
    meta = {
        "format": "dinojax",
        "version": FORMAT_VERSION,
        "layout": "stacked",
        "arch": cfg.to_dict(),
        "heads": head_cfgs,
        "extras": sorted(extras),
        "source": {"path": str(src), "format": fmt, "which": which},
    }
    if kind != v3conv.VIT_V2:
        meta["model"] = kind
    save(dst, tree, meta, overwrite=overwrite)
    return cfg


def _hf_config(src) -> dict | None:
    """The Hugging Face config.json next to a .safetensors file, if any."""
    path = Path(src).with_name("config.json")
    if Path(src).suffix != ".safetensors" or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise ConversionError(f"{path} is not valid JSON ({_brief(e)})") from e
    return config if isinstance(config, dict) else None


def save_model(
    dst: str | os.PathLike, model, *, heads: dict | None = None, overwrite: bool = False
) -> None:
    """A JAX `DinoVisionTransformer` (and optional `{name: DINOHead}`) -> checkpoint directory,
    the same layout `convert` writes, so `export` turns it into official files."""
    from flax import nnx

    from dinojax.convert import heads as head_conv

    tree = {"backbone": model.params(), "heads": {}, "extras": {}}
    head_cfgs = {}
    for name, head in (heads or {}).items():
        pure = nnx.to_pure_dict(nnx.state(head, nnx.Param))
        head_cfgs[name] = head_conv.head_config_from_torch(head_conv.dino_head_to_torch(pure))
        tree["heads"][name] = pure
    meta = {
        "format": "dinojax",
        "version": FORMAT_VERSION,
        "layout": "stacked",
        "arch": model.cfg.to_dict(),
        "heads": head_cfgs,
        "extras": [],
        "source": {"format": "dinojax"},
    }
    if v3conv.kind_of_config(model.cfg) != v3conv.VIT_V2:
        meta["model"] = v3conv.kind_of_config(model.cfg)
    save(dst, tree, meta, overwrite=overwrite)


def save(dst: str | os.PathLike, tree: dict, meta: dict, *, overwrite: bool = False) -> None:
    """Write {backbone, heads, extras} + metadata to `dst` via a temp dir and a rename."""
    import orbax.checkpoint as ocp

    dst = Path(dst).absolute()
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "state", jax.tree.map(np.asarray, tree))
        ckptr.wait_until_finished()
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if dst.exists():
            if not overwrite and any(dst.iterdir()):
                raise ConversionError(f"{dst} exists and is not empty")
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def read_meta(path: str | os.PathLike) -> dict:
    path = Path(path)
    meta_file = path / META
    if not meta_file.is_file():
        raise ConversionError(f"{path} is not a dinojax checkpoint directory (no {META})")
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ConversionError(f"{meta_file} is not valid JSON ({_brief(e)})") from e
    if not isinstance(meta, dict) or meta.get("format") != "dinojax":
        raise ConversionError(f"{meta_file} does not describe a dinojax checkpoint")
    version = meta.get("version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ConversionError(f"{path}: unsupported checkpoint format version {version!r}")
    if not isinstance(meta.get("arch"), dict) or not isinstance(meta.get("heads", {}), dict):
        raise ConversionError(f"{meta_file}: no architecture ('arch') recorded")
    try:
        v3conv.config_from_dict(v3conv.meta_kind(meta), meta["arch"])
    except (TypeError, ValueError, ImportError) as e:
        raise ConversionError(f"{meta_file}: invalid architecture ({e})") from e
    meta.setdefault("heads", {})
    return meta


def restore_tree(path: str | os.PathLike) -> tuple[dict, dict]:
    """-> (tree of numpy arrays, metadata). Shapes are checked against the recorded config."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from dinojax.models.vit import abstract_params

    path = Path(path).absolute()
    meta = read_meta(path)
    kind = v3conv.meta_kind(meta)
    cfg = v3conv.config_from_dict(kind, meta["arch"])
    heads = {}
    for name, hcfg in meta["heads"].items():
        head = nnx.eval_shape(_head_module(hcfg))
        heads[name] = nnx.to_pure_dict(nnx.state(head, nnx.Param))
    layout = meta.get("layout", "stacked")
    if layout not in LAYOUTS:
        raise ConversionError(f"{path}: unknown block layout {layout!r} (expected {LAYOUTS})")
    if kind == v3conv.VIT_V2:
        backbone = abstract_params(cfg)
    else:
        backbone = nnx.to_pure_dict(nnx.state(v3conv.build_abstract(kind, cfg), nnx.Param))
    if layout == "per_layer":
        # orbax stores dict keys as strings
        per = unstack_blocks(backbone)
        backbone = {**per, "blocks": {str(i): b for i, b in per["blocks"].items()}}
    target = {"backbone": backbone, "heads": heads, "extras": {}}
    ckptr = ocp.StandardCheckpointer()
    try:
        on_disk = ckptr.metadata(path / "state")
        on_disk = getattr(on_disk, "item_metadata", on_disk)
        for name in meta.get("extras", []):
            target["extras"][name] = jax.ShapeDtypeStruct(
                tuple(on_disk["extras"][name].shape), np.float32
            )
        sds = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), target)
        tree = ckptr.restore(path / "state", sds)
    except Exception as e:
        raise ConversionError(f"{path}: cannot restore the checkpoint ({_brief(e)})") from e
    tree = jax.tree.map(np.asarray, tree)
    if layout == "per_layer":
        tree["backbone"] = stack_blocks(tree["backbone"])
    return tree, meta


def _brief(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def load(path: str | os.PathLike, *, heads: bool = False, **overrides):
    """A converted checkpoint -> `DinoVisionTransformer` (and `{name: DINOHead}` if `heads`).

    `overrides` change run-time fields of the config (dtype, attention, remat_policy, ...).
    """
    from flax import nnx

    tree, meta = restore_tree(path)
    kind = v3conv.meta_kind(meta)
    cfg = v3conv.config_from_dict(kind, meta["arch"])
    if overrides:
        cfg = cfg.replace(**overrides)
    model = v3conv.build_abstract(kind, cfg)
    nnx.update(model, jax.tree.map(jax.numpy.asarray, tree["backbone"]))
    if not heads:
        return model
    out = {}
    for name, hcfg in meta["heads"].items():
        head = nnx.eval_shape(_head_module(hcfg))
        nnx.update(head, jax.tree.map(jax.numpy.asarray, tree["heads"][name]))
        out[name] = head
    return model, out


def export(
    src: str | os.PathLike, dst: str | os.PathLike, *, fmt: str = "hub", overwrite: bool = False
) -> None:
    """A dinojax checkpoint directory -> an official-format `.pth` / `.safetensors` file.

    fmt="hub": the backbone state dict the official hub models load with strict=True.
    fmt="teacher": {"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}} like DINOv2's
    teacher_checkpoint.pth, with flat `blocks.{i}` keys (an official model built with
    block_chunks=0 loads it strictly); DINO v1 heads are written as "head.*".
    fmt="hf": the backbone with Hugging Face Dinov2Model / Dinov2WithRegistersModel names.
    """
    dst = Path(dst)
    if fmt not in EXPORT_FORMATS:
        raise ConversionError(f"unknown export format {fmt!r} (one of {EXPORT_FORMATS})")
    if dst.suffix not in FILE_SUFFIXES:
        raise ConversionError(
            f"{dst}: unknown output format {dst.suffix or '(no extension)'!r} "
            f"(use one of {sorted(FILE_SUFFIXES)})"
        )
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} exists (use --overwrite)")
    tree, meta = restore_tree(src)
    kind = v3conv.meta_kind(meta)
    if kind == v3conv.VIT_V2:
        sd = to_official(tree["backbone"])
    else:
        cfg = v3conv.config_from_dict(kind, meta["arch"])
        sd = v3conv.backbone_to_official(kind, tree["backbone"], cfg)
    v1 = meta["arch"].get("family") == "dino"
    if fmt == "hub":
        write_file(sd, dst)
        return
    if fmt == "hf":
        if v1:
            raise ConversionError("DINO v1 backbones have no Hugging Face Dinov2 equivalent")
        if kind == v3conv.CONVNEXT:
            raise ConversionError("export to Hugging Face names is not available for ConvNeXts")
        write_file(v3conv.to_hf(sd, cfg) if kind == v3conv.VIT_V3 else to_hf(sd), dst)
        return
    model = {f"backbone.{k}": v for k, v in sd.items()}
    for name, head in tree["heads"].items():
        from dinojax.convert import heads as head_conv

        prefix = "head." if v1 and name == "dino_head" else f"{name}."
        model.update({prefix + k: v for k, v in head_conv.dino_head_to_torch(head).items()})
    write_file({"teacher": model}, dst)
