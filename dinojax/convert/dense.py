"""Released DINOv2 dense heads (segmentation, depth) <-> dinojax head directories.

A converted head is a directory like a backbone checkpoint, with its own format tag:

    DST/dinojax.json   {"format": "dinojax-head", "version", "task", "head": {...config},
                        "backbone_arch": official backbone name or null, "source": {...}}
    DST/state/         orbax checkpoint of {"head": params}

The official files keep their weights under `["state_dict"]` with `decode_head.*` keys
(facebookresearch/dinov2 `dinov2/eval/segmentation/models/decode_heads/linear_head.py`,
`dinov2/hub/depth/decode_heads.py`). Each task lives in its own module with the same interface:

    detect(sd) -> bool
    from_official(sd, arch: str | None) -> (params: dict of numpy, head_cfg: dict)
    to_official(params, head_cfg) -> flat state dict of numpy (the `state_dict` of the file)
    abstract_params(head_cfg) -> params tree of jax.ShapeDtypeStruct (for restoring)
"""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np

from dinojax.convert.backbone import ConversionError
from dinojax.convert.io import read_file, write_file

FORMAT = "dinojax-head"
VERSION = 1
META = "dinojax.json"
TASK_MODULES = {
    "segmentation": "dinojax.convert.dense_seg",
    "depth": "dinojax.convert.dense_depth",
}


def _task_module(task: str):
    if task not in TASK_MODULES:
        raise ConversionError(f"unknown dense task {task!r}; known: {sorted(TASK_MODULES)}")
    return importlib.import_module(TASK_MODULES[task])


def head_state_dict(obj: Mapping) -> dict:
    """The `state_dict` of an official head file (or an already flat head state dict)."""
    sd = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(sd, Mapping) or not any(str(k).startswith("decode_head.") for k in sd):
        raise ConversionError("not a dense head checkpoint (no 'decode_head.*' weights)")
    return {k: v for k, v in sd.items() if isinstance(v, np.ndarray)}


def is_head_file(obj) -> bool:
    """True for an official segmentation / depth head file."""
    try:
        head_state_dict(obj)
    except ConversionError:
        return False
    return True


def file_is_head(path: str | os.PathLike) -> bool:
    """Whether an official file is a dense head, from its keys only: the tensors are memory-mapped
    and never read, so asking this of a multi-GB backbone file costs nothing."""
    from dinojax.convert.io import SAFE_GLOBALS, TORCH_SUFFIXES, _torch

    path = Path(path)
    if not path.is_file() or path.suffix not in TORCH_SUFFIXES:
        return False
    torch = _torch()
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable: let the backbone path report it in its own words
        return False
    sd = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    return isinstance(sd, Mapping) and any(str(k).startswith("decode_head.") for k in sd)


def _detects(task: str, sd: dict) -> bool:
    try:
        module = _task_module(task)
    except ModuleNotFoundError as e:  # a task module not installed in this checkout
        if e.name == TASK_MODULES[task]:
            return False
        raise
    return module.detect(sd)


def detect_task(sd: dict) -> str:
    found = [task for task in TASK_MODULES if _detects(task, sd)]
    if len(found) != 1:
        keys = sorted({".".join(k.split(".")[:2]) for k in sd})[:8]
        raise ConversionError(
            f"cannot tell the head type from its keys {keys} (expected a released "
            "segmentation head (decode_head.conv_seg) or depth head (decode_head.conv_depth))"
        )
    return found[0]


def from_official(
    obj: dict, *, arch: str | None = None, name: str | None = None
) -> tuple[dict, dict]:
    """An official head file's contents -> (params, meta), in memory. `name` (the file name) is
    passed on to task modules that read hints from it (`NAME_HINTS`: the depth heads' dataset)."""
    sd = head_state_dict(obj)
    task = detect_task(sd)
    mod = _task_module(task)
    hints = {"name": name} if getattr(mod, "NAME_HINTS", False) else {}
    params, head_cfg = mod.from_official(sd, arch, **hints)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "task": task,
        "head": head_cfg,
        "backbone_arch": arch,
        "source": {"format": "official"},
    }
    return params, meta


def arch_from_name(path: str | os.PathLike) -> str | None:
    """The backbone named by a released head's file name (`dinov2_vits14_ade20k_ms_head.pth` ->
    `dinov2_vits14`), used when no --arch is given; None if the name has none."""
    m = re.match(r"(dinov2_vit[sblg]14(?:_reg4?)?)_", Path(path).name)
    return m.group(1) if m else None


def is_head_dir(path: str | os.PathLike) -> bool:
    meta = Path(path) / META
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("format") == FORMAT
    except ValueError:
        return False


def read_head_meta(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not is_head_dir(path):
        raise ConversionError(f"{path} is not a converted dense head directory (no {META} "
                              f"with format {FORMAT!r})")  # fmt: skip
    meta = json.loads((path / META).read_text())
    if meta.get("version", 0) > VERSION:
        raise ConversionError(f"{path}: unsupported head format version {meta['version']!r}")
    _task_module(meta.get("task"))
    return meta


def save_head(dst: str | os.PathLike, params: dict, meta: dict, *, overwrite: bool = False):
    """Write a head directory (atomically, like backbone checkpoints)."""
    from dinojax.convert.checkpoint import save

    save(dst, {"head": params}, meta, overwrite=overwrite)


def load_head(path: str | os.PathLike, *, arch: str | None = None) -> tuple[dict, dict]:
    """A head directory, or an official head `.pth` (converted in memory) -> (params, meta)."""
    import orbax.checkpoint as ocp

    path = Path(path)
    if path.is_dir():
        meta = read_head_meta(path)
        target = {"head": _task_module(meta["task"]).abstract_params(meta["head"])}
        try:
            tree = ocp.StandardCheckpointer().restore(path.absolute() / "state", target)
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise ConversionError(f"{path}: cannot restore the head ({type(e).__name__}: "
                                  f"{first})") from e  # fmt: skip
        return jax.tree.map(np.asarray, tree["head"]), meta
    return from_official(read_file(path), arch=arch or arch_from_name(path), name=path.name)


def convert_head(
    src: str | os.PathLike, dst: str | os.PathLike, *, arch: str | None = None,
    overwrite: bool = False,
) -> dict:  # fmt: skip
    """Official head `.pth` -> head directory; returns the metadata. Nothing written on error."""
    params, meta = from_official(
        read_file(src), arch=arch or arch_from_name(src), name=Path(src).name
    )
    meta["source"] = {"format": "official", "file": Path(src).name}
    save_head(dst, params, meta, overwrite=overwrite)
    return meta


def export_head(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False):
    """Head directory -> official head `.pth` ({"state_dict": ...}, the released layout)."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} exists (pass --overwrite to replace it)")
    params, meta = load_head(src)
    sd = _task_module(meta["task"]).to_official(params, meta["head"])
    write_file({"state_dict": sd}, dst)
    return meta
