"""Reading and writing PyTorch-side files safely.

`.pth` files are read with `torch.load(weights_only=True)`: no arbitrary code is unpickled. The only
extra class allowed is `argparse.Namespace`, which DINO v1 training checkpoints store under
`args`. Every failure becomes one `ConversionError` line, never a traceback from a library.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
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


def read_file(path: str | os.PathLike) -> LazyStateDict:
    """A `.pth`/`.pt`/`.bin` or `.safetensors` file -> a read-only nested Mapping whose tensors are
    read from the file when accessed (numpy arrays; bfloat16 becomes float32).

    Nothing but the structure and each tensor's shape and dtype is read here (`tensors`), so a
    converter can check a checkpoint completely before reading any weights, then read them one at
    a time. Files this reader does not understand (pre-1.6 torch pickles, unusual pickled objects)
    fall back to `torch.load(weights_only=True)`, which holds the whole file in memory.
    """
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
            return LazyStateDict(read_safetensors_header(path))
        except Exception as e:  # bad header, truncation, unknown dtype
            raise ConversionError(f"{path} is not a readable safetensors file ({_brief(e)})") from e
    try:
        obj = read_torch_zip(path)
    except Exception:  # noqa: BLE001 - _Unsupported, or damage: torch.load has the last word
        obj = _torch_load(path)
    if not isinstance(obj, Mapping):
        what = "Tensor" if isinstance(obj, LazyTensor) else type(obj).__name__
        raise ConversionError(f"{path} holds a {what}, not a state dict")
    return LazyStateDict(obj)


def _torch_load(path: Path) -> dict:
    """The whole file through torch's own (weights-only) unpickler, as numpy arrays."""
    torch = _torch()
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint ({_brief(e)})") from e
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return _to_numpy(obj)


# ---------------------------------------------------------------------------------------------
# Lazy tensors
# ---------------------------------------------------------------------------------------------


class LazyTensor:
    """A tensor of a checkpoint file: shape and dtype known, values read by `load()`.

    `dtype` is the dtype `load()` returns (bfloat16 is widened to float32). `np.asarray(t)` loads
    it too, so numpy code that receives one still works.
    """

    __slots__ = ("dtype", "shape", "_read")

    def __init__(self, shape: tuple[int, ...], dtype, read: Callable[[], np.ndarray]):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._read = read

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def load(self) -> np.ndarray:
        value = self._read()
        if value.dtype != self.dtype:
            value = value.astype(self.dtype)
        if value.shape != self.shape:
            raise ConversionError(f"tensor read with shape {value.shape}, expected {self.shape}")
        return value

    def __array__(self, dtype=None, copy=None):
        value = self.load()
        return value if dtype is None else value.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype})"


def is_tensor(value) -> bool:
    return isinstance(value, (np.ndarray, LazyTensor))


def materialize(value) -> np.ndarray:
    """A LazyTensor's values (read now), or the array itself."""
    return value.load() if isinstance(value, LazyTensor) else np.asarray(value)


def lazy_concatenate(pieces: Sequence, axis: int = 0):
    """np.concatenate of arrays or LazyTensors, deferred until loaded when any piece is lazy."""
    if not any(isinstance(p, LazyTensor) for p in pieces):
        return np.concatenate([np.asarray(p) for p in pieces], axis=axis)
    shapes = [p.shape for p in pieces]
    shape = list(shapes[0])
    shape[axis] = sum(s[axis] for s in shapes)
    dtype = np.result_type(*(p.dtype for p in pieces))
    pieces = list(pieces)
    return LazyTensor(shape, dtype, lambda: np.concatenate([materialize(p) for p in pieces], axis))


class LazyStateDict(Mapping):
    """Read-only nested state dict: `sd[key]` reads a tensor from the file (numpy); nested dicts
    are LazyStateDicts, other values (ints, `argparse.Namespace`, ...) are as unpickled.
    `tensors()` gives the entries without reading them (LazyTensor / nested dict / other)."""

    def __init__(self, entries: Mapping):
        self._entries = {
            k: LazyStateDict(v) if isinstance(v, Mapping) and not isinstance(v, LazyStateDict)
            else v
            for k, v in entries.items()
        }  # fmt: skip

    def __getitem__(self, key):
        value = self._entries[key]
        return value.load() if isinstance(value, LazyTensor) else value

    def __iter__(self) -> Iterator:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def tensors(self) -> dict:
        """The entries, tensors unread (LazyTensor) and nested dicts as plain dicts."""
        return {
            k: v.tensors() if isinstance(v, LazyStateDict) else v for k, v in self._entries.items()
        }


def unread(sd: Mapping) -> dict:
    """A state dict as a plain (nested) dict whose tensors are not read yet: LazyTensors for a
    `read_file` result, the arrays themselves for an in-memory dict."""
    if isinstance(sd, LazyStateDict):
        return sd.tensors()
    return {k: unread(v) if isinstance(v, Mapping) else v for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------
# safetensors: an 8-byte little-endian header size, a JSON header, then the raw tensors
# (https://github.com/huggingface/safetensors#format)
# ---------------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bfloat16",
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}  # fmt: skip


def _np_dtype(name) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # a JAX dependency

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _loaded_dtype(stored: np.dtype) -> np.dtype:
    return np.dtype(np.float32) if stored.name == "bfloat16" else stored


def _reader(path: Path, offset: int, stored: np.dtype, shape: tuple, strides=None):
    """A function reading one tensor with plain file reads (no mmap: pages read this way do not
    stay in the process's resident set). `strides` (elements) for non-contiguous torch views."""

    def read() -> np.ndarray:
        if strides is None or _contiguous(shape, strides):
            count = math.prod(shape)
            data = np.fromfile(path, dtype=stored, count=count, offset=offset)
            if data.size != count:
                raise ConversionError(f"{path}: file is truncated")
            data = data.reshape(shape)
        else:
            extent = 1 + sum((n - 1) * s for n, s in zip(shape, strides)) if all(shape) else 0
            flat = np.fromfile(path, dtype=stored, count=extent, offset=offset)
            if flat.size != extent:
                raise ConversionError(f"{path}: file is truncated")
            step = stored.itemsize
            data = np.lib.stride_tricks.as_strided(
                flat, shape, tuple(s * step for s in strides)
            ).copy()
        return data.astype(np.float32) if stored.name == "bfloat16" else data

    return read


def _contiguous(shape, strides) -> bool:
    expected = 1
    for n, s in reversed(list(zip(shape, strides))):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def read_safetensors_header(path: Path) -> dict[str, LazyTensor]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("no header")
        n = struct.unpack("<Q", head)[0]
        if n > min(size - 8, 100 << 20):
            raise ValueError(f"header size {n} exceeds the file")
        header = json.loads(f.read(n))
    base = 8 + n
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{key}: unsupported dtype {info['dtype']}")
        stored = _np_dtype(_ST_DTYPES[info["dtype"]])
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
        if end - begin != math.prod(shape) * stored.itemsize or base + end > size:
            raise ValueError(f"{key}: data offsets {begin}..{end} do not fit shape {shape}")
        out[key] = LazyTensor(shape, _loaded_dtype(stored), _reader(path, base + begin, stored,
                                                                     shape))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# torch.save zip files: `<archive>/data.pkl` (the object, storages as persistent ids) and one
# uncompressed `<archive>/data/<key>` record per storage (torch/serialization.py `_save`)
# ---------------------------------------------------------------------------------------------


class _Unsupported(Exception):
    """Something this reader does not handle: use torch.load instead."""


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}  # fmt: skip


class _StorageType:
    def __init__(self, name: str):
        self.dtype = _np_dtype(_STORAGE_DTYPES[name])


class _Storage:
    def __init__(self, path: Path, offset: int, size: int, dtype: np.dtype):
        self.path, self.offset, self.size, self.dtype = path, offset, size, dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    shape, strides = tuple(size), tuple(stride)
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, strides)) if all(shape) else 0
    if storage_offset + extent > storage.size // storage.dtype.itemsize:
        raise ValueError("a tensor extends past its storage")
    offset = storage.offset + storage_offset * storage.dtype.itemsize
    return LazyTensor(shape, _loaded_dtype(storage.dtype),
                      _reader(storage.path, offset, storage.dtype, shape, strides))  # fmt: skip


def _rebuild_parameter(data, *_):
    return data


def _rebuild_from_type(func, _new_type, args, _state):
    return func(*args)


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
    """Only the classes of a state dict (a closed list: nothing else is constructed); tensors
    become LazyTensors pointing into the zip file."""

    def __init__(self, data: bytes, path: Path, records: dict[str, tuple[int, int]]):
        super().__init__(io.BytesIO(data))
        self.path, self.records = path, records

    def find_class(self, module, name):
        if (module, name) not in _GLOBALS:
            raise _Unsupported(f"{module}.{name}")
        return _GLOBALS[(module, name)]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise _Unsupported(f"persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType) or key not in self.records:
            raise _Unsupported(f"storage {key!r}")
        offset, size = self.records[key]
        return _Storage(self.path, offset, size, storage_type.dtype)


def read_torch_zip(path: Path):
    """The object `torch.save` wrote, with LazyTensors for its tensors (nothing read yet)."""
    if not zipfile.is_zipfile(path):
        raise _Unsupported("not a zip file (legacy torch format)")
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(names) != 1:
            raise _Unsupported("no single <archive>/data.pkl")
        prefix = names[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in zf.namelist() and zf.read(byteorder).strip() != b"little":
            raise _Unsupported("big-endian file")
        data = zf.read(names[0])
        records = {}
        with open(path, "rb") as f:
            for info in zf.infolist():
                if not info.filename.startswith(prefix + "data/"):
                    continue
                if info.compress_type != zipfile.ZIP_STORED:
                    raise _Unsupported("compressed storage record")
                # The data follows the local header, whose extra field (torch pads it to align
                # the data) may differ from the central directory's.
                f.seek(info.header_offset)
                local = f.read(30)
                if local[:4] != b"PK\x03\x04":
                    raise ValueError(f"bad zip local header for {info.filename}")
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                start = info.header_offset + 30 + name_len + extra_len
                records[info.filename[len(prefix + "data/") :]] = (start, info.file_size)
    return _Unpickler(data, path, records).load()


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


# ---------------------------------------------------------------------------------------------
# Streaming writers: the file's layout is fixed from the tensors' shapes and dtypes first, then
# each tensor is written as it is produced and dropped, so a whole state dict is never held.
# ---------------------------------------------------------------------------------------------

_ALIGN = 64  # torch aligns storage records to 64 bytes (`.storage_alignment`; mmap loading)


class TensorFileWriter:
    """Write a (possibly nested) state dict to a `.pth` or `.safetensors` file one tensor at a
    time: `specs` maps each key path (tuple of dict keys) to (shape, dtype) in the order
    `write` will be called; `close()` checks every tensor was written and renames the file into
    place (nothing is left behind on error, see `abort`).

    `.pth`: the zip layout `torch.save` writes (`<archive>/data.pkl` pickling each tensor as
    `torch._utils._rebuild_tensor_v2` of a storage record `<archive>/data/<i>`), loadable by
    `torch.load(weights_only=True)`. `.safetensors`: keys joined with ".".
    """

    def __init__(self, path: str | os.PathLike, specs: dict[tuple[str, ...], tuple]):
        self.path = Path(path)
        if self.path.suffix != ".safetensors" and self.path.suffix not in TORCH_SUFFIXES:
            raise ConversionError(f"{path}: unknown output format (use .pth or .safetensors)")
        self.specs = {k: (tuple(int(n) for n in s), np.dtype(d)) for k, (s, d) in specs.items()}
        self.order = list(self.specs)
        self.done = 0
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        if self.path.suffix == ".safetensors":
            self._open_safetensors()
        else:
            self._open_torch()

    # safetensors: header with every offset first, then the bytes in `specs` order
    def _open_safetensors(self):
        names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                 np.dtype(np.float64): "F64", np.dtype(np.int64): "I64",
                 np.dtype(np.int32): "I32", np.dtype(np.uint8): "U8"}  # fmt: skip
        header, offset = {}, 0
        for key, (shape, dtype) in self.specs.items():
            if dtype not in names:
                raise ConversionError(f"{'.'.join(key)}: cannot write dtype {dtype} to safetensors")
            size = math.prod(shape) * dtype.itemsize
            header[".".join(key)] = {
                "dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]
            }  # fmt: skip
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.file = open(self.tmp, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    # torch zip: storage records as tensors come, data.pkl and the small records at the end
    def _open_torch(self):
        _torch()  # needed for data.pkl at the end: fail (and import) before any tensor
        self.archive = self.path.stem or "archive"
        self.zip = zipfile.ZipFile(self.tmp, "w", zipfile.ZIP_STORED, allowZip64=True)

    def write(self, key: tuple[str, ...], value: np.ndarray) -> None:
        if self.done >= len(self.order) or self.order[self.done] != key:
            want = self.order[self.done] if self.done < len(self.order) else "nothing"
            raise ConversionError(f"writer: got {'.'.join(key)}, expected {want}")
        shape, dtype = self.specs[key]
        value = np.asarray(value, dtype=dtype)
        if not value.flags.c_contiguous:  # (np.ascontiguousarray would make 0-d arrays 1-d)
            value = value.copy(order="C")
        if value.shape != shape:
            raise ConversionError(f"{'.'.join(key)}: got shape {value.shape}, expected {shape}")
        data = memoryview(value.reshape(-1)).cast("B") if value.size else b""
        if self.path.suffix == ".safetensors":
            self.file.write(data)
        else:
            name = f"{self.archive}/data/{self.done}"
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.file_size = value.nbytes
            zip64 = value.nbytes * 1.05 > zipfile.ZIP64_LIMIT
            start = self.zip.fp.tell() + 30 + len(name.encode()) + 4 + (20 if zip64 else 0)
            pad = -start % _ALIGN
            info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            with self.zip.open(info, "w", force_zip64=zip64) as f:
                f.write(data)
        self.done += 1

    def close(self, structure_order: list[tuple[str, ...]] | None = None) -> None:
        """Finish the file and move it into place. `structure_order`: the key order of the
        dicts in the file (default: the write order)."""
        if self.done != len(self.order):
            raise ConversionError(f"writer: {len(self.order) - self.done} tensors not written")
        try:
            if self.path.suffix == ".safetensors":
                self.file.close()
            else:
                index = {k: i for i, k in enumerate(self.order)}
                obj: dict = {}
                for key in structure_order or self.order:
                    node = obj
                    for part in key[:-1]:
                        node = node.setdefault(part, {})
                    node[key[-1]] = _TensorRef(index[key], *self.specs[key])
                self._record("data.pkl", _pickle_state(obj))
                self._record("byteorder", b"little")
                self._record("version", b"3\n")
                self._record(".format_version", b"1")
                self._record(".storage_alignment", str(_ALIGN).encode())
                self.zip.close()
            os.replace(self.tmp, self.path)
        finally:
            self.abort()

    def _record(self, name: str, data: bytes) -> None:
        info = zipfile.ZipInfo(f"{self.archive}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
        self.zip.writestr(info, data, compress_type=zipfile.ZIP_STORED)

    def abort(self) -> None:
        """Close and delete the temporary file (after `close`, a no-op)."""
        for handle in ("file", "zip"):
            if hasattr(self, handle):
                try:
                    getattr(self, handle).close()
                except Exception:  # noqa: BLE001 - already failing or closed: just clean up
                    pass
        if self.tmp.exists():
            self.tmp.unlink()


class _TensorRef:
    def __init__(self, key: int, shape: tuple, dtype: np.dtype):
        self.key, self.shape, self.dtype = key, shape, dtype


_TORCH_STORAGE = {np.dtype(v): k for k, v in _STORAGE_DTYPES.items() if v != "bfloat16"}


def _pickle_state(obj: dict) -> bytes:
    """data.pkl of `torch.save(obj)` for a nested dict of `_TensorRef`s: protocol 2, each tensor
    `torch._utils._rebuild_tensor_v2(storage, 0, shape, stride, False, OrderedDict())` with the
    storage as the persistent id ("storage", torch.<Type>Storage, key, "cpu", numel)."""
    torch = _torch()
    rebuild = torch._utils._rebuild_tensor_v2

    class _Storage:
        def __init__(self, ref):
            self.ref = ref

    class _Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _Storage):
                r = o.ref
                kind = getattr(torch, _TORCH_STORAGE[r.dtype])
                return ("storage", kind, str(r.key), "cpu", math.prod(r.shape))
            return None

        def reducer_override(self, o):
            if isinstance(o, _TensorRef):
                stride, step = [], 1
                for n in reversed(o.shape):
                    stride.insert(0, step)
                    step *= n
                args = (_Storage(o), 0, tuple(o.shape), tuple(stride), False,
                        collections.OrderedDict())  # fmt: skip
                return rebuild, args
            return NotImplemented

    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()
