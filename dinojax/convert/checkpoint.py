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
from dinojax.convert.io import (
    FILE_SUFFIXES,
    TensorFileWriter,
    is_tensor,
    read_file,
    unread,
    write_file,
)
from dinojax.convert.layout import stack_blocks
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
    `hf_config`: a Hugging Face config.json found next to the file (checked for DINOv3).

    `obj` is a `read_file` result or an in-memory dict; the state dicts returned hold its
    tensors unread (`dinojax.convert.io.LazyTensor`) or its arrays."""
    if which not in ("teacher", "student"):
        raise ConversionError(f"which must be 'teacher' or 'student', got {which!r}")
    obj = unread(obj)  # tensors of a `read_file` result stay in the file until converted
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
    flat = {k: v for k, v in obj.items() if is_tensor(v)}
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

    Streams: the file's structure, shapes and dtypes are checked first (heads, which are small,
    are converted then too), then the backbone tensors are read one at a time into the stacked
    arrays, which orbax writes without copying: peak memory ~1x the backbone (README "Memory").
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
    heads, head_cfgs = {}, {}
    for name, sd in head_sds.items():
        from dinojax.convert import heads as head_conv

        try:
            head_cfgs[name] = head_conv.head_config_from_torch(sd)
            heads[name] = head_conv.dino_head_from_torch(sd)
        except ValueError as e:
            raise ConversionError(f"{name}: {e}") from e
    if kind == v3conv.VIT_V2:
        params = from_official(backbone_sd, cfg)
    else:
        kind, cfg, params = v3conv.convert_backbone(backbone_sd, arch)
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
        # Memory: orbax's default NumPy handler deep-copies every array before writing, and zstd
        # compression buffers the compressed chunks of every array at once; either doubles the
        # resident set. Without both, tensorstore writes straight from the arrays (float weights
        # barely compress anyway). Restoring reads either kind.
        registry = ocp.type_handlers.create_type_handler_registry(
            (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False))
        )
        handler = ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(tmp / "state", args=ocp.args.PyTreeSave(jax.tree.map(np.asarray, tree)))
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


def abstract_modules(meta: dict, **overrides) -> tuple[object, dict]:
    """The checkpoint's modules, abstract (`nnx.eval_shape`: shapes, dtypes and the parameters'
    logical axis names, nothing allocated) -> (backbone, {head name: head}). `overrides` change
    run-time fields of the backbone config."""
    from flax import nnx

    kind = v3conv.meta_kind(meta)
    cfg = v3conv.config_from_dict(kind, meta["arch"])
    if overrides:
        cfg = cfg.replace(**overrides)
    backbone = v3conv.build_abstract(kind, cfg)
    heads = {name: nnx.eval_shape(_head_module(h)) for name, h in meta["heads"].items()}
    return backbone, heads


def restore_target(
    path: str | os.PathLike, meta: dict | None = None, *, mesh=None, rules=None
) -> dict:
    """What `path` restores to, as ShapeDtypeStructs {backbone, heads, extras} (stacked blocks).

    With a `mesh`, each carries the NamedSharding its logical axis names get from `rules`
    (default `dinojax.sharding.FSDP_RULES`): large parameters split over the mesh, like the
    trainer's state. Nothing is allocated: `jax.eval_shape`-level, usable for memory planning.
    """
    from flax import nnx

    from dinojax.sharding import FSDP_RULES, logical_names, logical_to_mesh_sharding

    path = Path(path).absolute()
    meta = read_meta(path) if meta is None else meta
    backbone, heads = abstract_modules(meta)

    def pure(module):
        return nnx.to_pure_dict(nnx.state(module, nnx.Param))

    tree = {"backbone": pure(backbone), "heads": {n: pure(h) for n, h in heads.items()},
            "extras": {}}  # fmt: skip
    names = {"backbone": logical_names(backbone),
             "heads": {n: logical_names(h) for n, h in heads.items()}, "extras": {}}  # fmt: skip
    if meta.get("extras"):
        on_disk = _on_disk_metadata(path)
        for name in meta["extras"]:
            try:
                shape = tuple(on_disk["extras"][name].shape)
            except (KeyError, TypeError, AttributeError) as e:
                raise ConversionError(f"{path}: extra {name!r} is not in the checkpoint") from e
            tree["extras"][name] = jax.ShapeDtypeStruct(shape, np.float32)
    if mesh is None:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    shardings = logical_to_mesh_sharding(tree, mesh, FSDP_RULES if rules is None else rules, names)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )


def bytes_per_device(target) -> dict:
    """{position in the mesh (0..n-1): bytes} that a restore `target` (ShapeDtypeStructs with
    NamedShardings, on a `Mesh` or a deviceless `jax.sharding.AbstractMesh`) puts on each device.
    `spec_for` only splits evenly divisible axes, so every device holds the same shard shape."""
    out: dict = {}
    for a in jax.tree.leaves(target):
        shard = int(np.prod(a.sharding.shard_shape(a.shape))) * np.dtype(a.dtype).itemsize
        mesh = a.sharding.mesh
        n = int(np.prod(list(mesh.shape.values())))
        for d in range(n):
            out[d] = out.get(d, 0) + shard
    return out


def _on_disk_metadata(path: Path):
    import orbax.checkpoint as ocp

    try:
        on_disk = ocp.StandardCheckpointer().metadata(path / "state")
    except Exception as e:
        raise ConversionError(f"{path}: cannot read the checkpoint metadata ({_brief(e)})") from e
    return getattr(on_disk, "item_metadata", on_disk)


def _per_layer(target: dict) -> dict:
    """A stacked restore target in the per-layer layout (`blocks.{i}`, string keys as orbax
    stores them); a sharded stacked leaf gives per-layer leaves sharded the same way."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    def take(a):
        sh = a.sharding
        if isinstance(sh, NamedSharding):
            sh = NamedSharding(sh.mesh, P(*tuple(sh.spec)[1:]))
        return jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=sh)

    blocks = target["backbone"]["blocks"]
    depth = jax.tree.leaves(blocks)[0].shape[0]
    per = {str(i): jax.tree.map(take, blocks) for i in range(depth)}
    return {**target, "backbone": {**target["backbone"], "blocks": per}}


def _restore(path: Path, target: dict, *, as_numpy: bool, partial: bool = False) -> dict:
    """Restore `target` (ShapeDtypeStructs, sharded or not) from `path/state`: numpy arrays, or
    jax arrays placed by the targets' shardings (each device reads its own shards)."""
    import orbax.checkpoint as ocp

    def args(a):
        if as_numpy:
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype)
        return ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype)

    try:
        restore = ocp.args.PyTreeRestore(
            item=target, restore_args=jax.tree.map(args, target), partial_restore=partial
        )
        with ocp.PyTreeCheckpointer() as ckptr:
            return ckptr.restore(path / "state", args=restore)
    except Exception as e:
        raise ConversionError(f"{path}: cannot restore the checkpoint ({_brief(e)})") from e


def _layout(path: Path, meta: dict) -> str:
    layout = meta.get("layout", "stacked")
    if layout not in LAYOUTS:
        raise ConversionError(f"{path}: unknown block layout {layout!r} (expected {LAYOUTS})")
    return layout


def restore_tree(path: str | os.PathLike) -> tuple[dict, dict]:
    """-> (tree of numpy arrays, metadata), blocks stacked. Shapes are checked against the
    recorded architecture. Host memory: one copy of the checkpoint."""
    path = Path(path).absolute()
    meta = read_meta(path)
    target = restore_target(path, meta)
    if _layout(path, meta) == "per_layer":
        tree = _restore(path, _per_layer(target), as_numpy=True)
        tree["backbone"] = stack_blocks(tree["backbone"])
        return tree, meta
    return _restore(path, target, as_numpy=True), meta


def restore_sharded(path: str | os.PathLike, mesh=None, rules=None) -> tuple[dict, dict]:
    """-> (tree of jax arrays sharded over `mesh`, metadata); see `load`."""
    from dinojax.sharding import make_mesh

    path = Path(path).absolute()
    meta = read_meta(path)
    mesh = make_mesh((1, -1), ("data", "fsdp")) if mesh is None else mesh
    target = restore_target(path, meta, mesh=mesh, rules=rules)
    if _layout(path, meta) == "stacked":
        return _restore(path, target, as_numpy=False), meta
    tree = _restore(path, _per_layer(target), as_numpy=False)
    per = tree["backbone"]["blocks"]
    stacked = jax.tree.map(
        lambda t, *xs: jax.jit(lambda *x: jax.numpy.stack(x), out_shardings=t.sharding)(*xs),
        target["backbone"]["blocks"], *(per[str(i)] for i in range(len(per))),
    )  # fmt: skip
    tree["backbone"] = {**tree["backbone"], "blocks": stacked}
    return tree, meta


def _brief(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def load(path: str | os.PathLike, *, heads: bool = False, mesh=None, rules=None, **overrides):
    """A converted checkpoint -> `DinoVisionTransformer` (and `{name: DINOHead}` if `heads`).

    The parameters are restored straight into arrays sharded over `mesh` (default: every device,
    `("data", "fsdp")` = `(1, n)`, as training shards them) by `rules` (default
    `dinojax.sharding.FSDP_RULES`): each device reads only its own shards, so no device and no
    host array ever holds the whole model. `overrides` change run-time fields of the config
    (dtype, attention, remat_policy, ...).
    """
    from flax import nnx

    tree, meta = restore_sharded(path, mesh, rules)
    model, head_modules = abstract_modules(meta, **overrides)
    if v3conv.meta_kind(meta) == v3conv.CONVNEXT:
        from dinojax.convert.convnext import convnext_int_keys

        tree["backbone"] = convnext_int_keys(tree["backbone"])  # orbax gives list indices as str
    nnx.update(model, tree["backbone"])
    if not heads:
        return model
    for name, head in head_modules.items():
        nnx.update(head, tree["heads"][name])
    return model, head_modules


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
    src = Path(src).absolute()
    meta = read_meta(src)
    if v3conv.meta_kind(meta) != v3conv.VIT_V2:
        return _export_v3(src, dst, meta, fmt)
    v1 = meta["arch"]["family"] == "dino"
    if fmt == "hf" and v1:
        raise ConversionError("DINO v1 backbones have no Hugging Face Dinov2 equivalent")
    target = restore_target(src, meta)
    per_layer = _layout(src, meta) == "per_layer"
    head_sds = {}
    if fmt == "teacher" and target["heads"]:
        from dinojax.convert import heads as head_conv

        item = _per_layer(target) if per_layer else target
        heads = _restore(src, {"heads": item["heads"]}, as_numpy=True, partial=True)["heads"]
        for name, head in heads.items():
            prefix = "head." if v1 and name == "dino_head" else f"{name}."
            sd = head_conv.dino_head_to_torch(head)
            head_sds.update({(prefix + k): v for k, v in sd.items()})

    def tensors(path: tuple[str, ...], value) -> dict[tuple[str, ...], np.ndarray]:
        """One backbone leaf (stacked) -> its tensors in the output file."""
        tree: dict = {}
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
        sd = to_official(tree)
        if fmt == "hf":
            sd = to_hf(sd)
        if fmt == "teacher":
            return {("teacher", f"backbone.{k}"): v for k, v in sd.items()}
        return {(k,): v for k, v in sd.items()}

    # The file's layout first, from shapes alone (broadcast zeros allocate nothing) ...
    leaves = [(tuple(str(k.key) for k in p), a) for p, a in
              jax.tree_util.tree_leaves_with_path(target["backbone"])]  # fmt: skip
    specs = {}
    for path, a in leaves:
        zeros = np.broadcast_to(np.zeros((), a.dtype), a.shape)
        specs.update({k: (v.shape, v.dtype) for k, v in tensors(path, zeros).items()})
    specs.update({("teacher", k): (v.shape, v.dtype) for k, v in head_sds.items()})
    # ... then one stacked leaf restored, split into its tensors, written and dropped at a time.
    writer = TensorFileWriter(dst, specs)
    try:
        for path, _ in leaves:
            value = _restore_leaf(src, target, path, per_layer)
            for key, v in tensors(path, value).items():
                writer.write(key, v)
            del value
        for k, v in head_sds.items():
            writer.write(("teacher", k), v)
        writer.close()
    finally:
        writer.abort()


def _restore_leaf(src: Path, target: dict, path: tuple[str, ...], per_layer: bool) -> np.ndarray:
    """One backbone leaf as numpy (stacked), restored alone (orbax partial restore)."""

    leaf = _get(target["backbone"], path)
    if per_layer and path[0] == "blocks":
        rest = path[1:]
        sds = jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
        items = {"blocks": {str(i): _nest(rest, sds) for i in range(leaf.shape[0])}}
        got = _restore(src, {"backbone": items}, as_numpy=True, partial=True)["backbone"]
        return np.stack([_get(got["blocks"][str(i)], rest) for i in range(leaf.shape[0])])
    got = _restore(src, {"backbone": _nest(path, leaf)}, as_numpy=True, partial=True)
    return _get(got["backbone"], path)


def _nest(path: tuple[str, ...], value) -> dict:
    for k in reversed(path):
        value = {k: value}
    return value


def _get(tree: dict, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def _export_v3(src: Path, dst: Path, meta: dict, fmt: str) -> None:
    """DINOv3 ViT / ConvNeXt -> official (or Hugging Face) file. Not streamed: the backbone is
    restored whole (one copy in host memory), converted by `dinojax.convert.v3`, then written."""
    kind = v3conv.meta_kind(meta)
    cfg = v3conv.config_from_dict(kind, meta["arch"])
    tree, _ = restore_tree(src)
    backbone = tree["backbone"]
    if kind == v3conv.CONVNEXT:
        from dinojax.convert.convnext import convnext_int_keys

        backbone = convnext_int_keys(backbone)
    sd = v3conv.backbone_to_official(kind, backbone, cfg)
    if fmt == "hf":
        if kind == v3conv.CONVNEXT:
            from dinojax.convert.convnext import convnext_to_hf

            sd = convnext_to_hf(sd)
        else:
            sd = v3conv.to_hf(sd, cfg)
    elif fmt == "teacher":
        sd = {"teacher": {f"backbone.{k}": v for k, v in sd.items()}}
    write_file(sd, dst)
