"""Reading and writing PyTorch-side files safely.

`.pth` files are read with `torch.load(weights_only=True)`: no arbitrary code is unpickled. The only
extra class allowed is `argparse.Namespace`, which DINO v1 training checkpoints store under
`args`. Every failure becomes one `ConversionError` line, never a traceback from a library.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from dinojax.convert.backbone import ConversionError

SAFE_GLOBALS = [argparse.Namespace]
TORCH_SUFFIXES = (".pth", ".pt", ".bin")  # .bin: Hugging Face pytorch_model.bin
FILE_SUFFIXES = frozenset((*TORCH_SUFFIXES, ".safetensors"))


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is in the test extra
        raise ConversionError(
            "reading or writing .pth files needs PyTorch: pip install 'dinojax[torch]'"
        ) from e
    return torch


def _to_numpy(obj):
    """Nested containers of tensors -> the same containers of numpy arrays."""
    torch = _torch()
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    if isinstance(obj, dict):
        return {k: _to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(v) for v in obj)
    return obj


def read_file(path: str | os.PathLike) -> dict:
    """A `.pth`/`.pt` or `.safetensors` file -> nested dict with numpy arrays."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file")
    if path.is_dir():
        raise ConversionError(
            f"{path} is a directory but not a dinojax checkpoint (no dinojax.json); expected "
            "a .pth or .safetensors file"
        )
    if path.suffix not in FILE_SUFFIXES:
        raise ConversionError(
            f"{path}: unknown checkpoint format {path.suffix or '(no extension)'!r} "
            f"(expected one of {sorted(FILE_SUFFIXES)})"
        )
    if path.stat().st_size == 0:
        raise ConversionError(f"{path} is empty")
    if path.suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file

            return dict(load_file(str(path)))
        except Exception as e:  # safetensors raises several types for bad headers/truncation
            raise ConversionError(f"{path} is not a readable safetensors file ({_brief(e)})") from e
    torch = _torch()
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint ({_brief(e)})") from e
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return _to_numpy(obj)


def _brief(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    first = msg[0] if msg else ""
    return f"{type(e).__name__}: {first[:200]}"


def write_file(state: dict, path: str | os.PathLike) -> None:
    """Write a state dict (flat, or nested like a training checkpoint) atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import save_file

            flat = _flatten_nested(state)
            save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, str(tmp))
        elif path.suffix in TORCH_SUFFIXES:
            torch = _torch()
            torch.save(_to_torch(state), str(tmp))
        else:
            raise ConversionError(f"{path}: unknown output format (use .pth or .safetensors)")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _to_torch(obj):
    torch = _torch()
    if isinstance(obj, np.ndarray):
        # ascontiguousarray turns a 0-d array into shape (1,): keep scalars (num_batches_tracked)
        return torch.from_numpy(np.ascontiguousarray(obj).reshape(obj.shape))
    if isinstance(obj, dict):
        return {k: _to_torch(v) for k, v in obj.items()}
    return obj


def _flatten_nested(state: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_flatten_nested(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
