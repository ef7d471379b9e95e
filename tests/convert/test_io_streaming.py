"""The streaming reader and writers of dinojax/convert/io.py.

`read_file` gives the structure, shapes and dtypes of a checkpoint without reading its tensors
(torch's zip layout unpickled with a closed list of classes; the safetensors header), each tensor
read on access; `TensorFileWriter` writes `.pth` / `.safetensors` one tensor at a time. Checked
against torch.load / safetensors themselves, and that a bad checkpoint is refused before any
tensor is read.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from dinojax.convert import io as cio
from dinojax.convert.backbone import ConversionError, expected_official_shapes
from dinojax.convert.checkpoint import convert
from dinojax.models.config import ViTConfig


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _odd_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    return collections.OrderedDict(
        plain=torch.randn(3, 4, generator=g),
        transposed=torch.randn(4, 3, generator=g).t(),  # non-contiguous view
        strided=base[1:5, ::2],  # offset + strides into a shared storage
        shared=base,  # the same storage again
        param=torch.nn.Parameter(torch.ones(2)),
        bf16=torch.randn(3, generator=g).to(torch.bfloat16),  # read as float32
        half=torch.randn(2, 2, generator=g).half(),
        scalar=torch.tensor(7),
        empty=torch.zeros(0, 3),
    )


def test_pth_tensors_are_read_on_access_and_equal_torch_load(tmp_path):
    sd = _odd_tensors()
    torch.save({"model": sd, "epoch": 3, "args": __import__("argparse").Namespace(lr=0.1)},
               tmp_path / "c.pth")  # fmt: skip
    got = cio.read_file(tmp_path / "c.pth")
    assert got["epoch"] == 3 and got["args"].lr == 0.1
    unread = cio.unread(got)["model"]
    assert all(isinstance(v, cio.LazyTensor) for v in unread.values())
    assert unread["bf16"].dtype == np.float32 and unread["transposed"].shape == (3, 4)
    for k, t in sd.items():
        value = got["model"][k]
        assert isinstance(value, np.ndarray) and value.dtype == _numpy(t).dtype, k
        np.testing.assert_array_equal(value, _numpy(t), err_msg=k)


def test_safetensors_tensors_are_read_on_access(tmp_path):
    sd = {k: v.detach().contiguous() for k, v in _odd_tensors().items()}
    save_file(sd, str(tmp_path / "c.safetensors"))
    got = cio.read_file(tmp_path / "c.safetensors")
    assert isinstance(cio.unread(got)["plain"], cio.LazyTensor)
    for k, t in sd.items():
        np.testing.assert_array_equal(got[k], _numpy(t), err_msg=k)


def test_objects_outside_the_closed_list_fall_back_to_torch_load(tmp_path):
    # torch.Size is allowed by torch's weights_only unpickler but not by the lazy reader
    torch.save({"w": torch.arange(3.0), "size": torch.Size([2, 3])}, tmp_path / "s.pth")
    got = cio.read_file(tmp_path / "s.pth")
    np.testing.assert_array_equal(got["w"], [0.0, 1.0, 2.0])
    assert tuple(got["size"]) == (2, 3)


def _hub_state(cfg: ViTConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) for k, s in expected_official_shapes(cfg).items()}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_bad_checkpoint_is_refused_before_any_tensor_is_read(tmp_path, monkeypatch, suffix):
    cfg = ViTConfig(embed_dim=64, depth=2, num_heads=1, img_size=28, patch_size=14)
    sd = _hub_state(cfg)
    sd["blocks.1.mlp.fc2.weight"] = torch.zeros(64, 7)  # mis-shaped
    sd.pop("blocks.0.norm1.bias")  # missing
    src = tmp_path / f"bad{suffix}"
    torch.save(sd, src) if suffix == ".pth" else save_file(sd, str(src))
    reads = []
    real = np.fromfile
    monkeypatch.setattr(np, "fromfile", lambda *a, **k: reads.append(a) or real(*a, **k))
    with pytest.raises(ConversionError, match="blocks.1.mlp.fc2.weight: got \\(64, 7\\)"):
        convert(src, tmp_path / "out")
    assert reads == [] and not (tmp_path / "out").exists()
    # the good file is read tensor by tensor
    sd["blocks.1.mlp.fc2.weight"] = torch.zeros(64, 256)
    sd["blocks.0.norm1.bias"] = torch.zeros(64)
    torch.save(sd, src) if suffix == ".pth" else save_file(sd, str(src))
    convert(src, tmp_path / "out")
    assert len(reads) == len(sd)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_tensor_file_writer_round_trips(tmp_path, suffix):
    rng = np.random.default_rng(0)
    sd = {
        ("teacher", "backbone.w"): rng.standard_normal((5, 3)).astype(np.float32),
        ("teacher", "backbone.t"): rng.standard_normal((3, 5)).astype(np.float32).T,  # a view
        ("teacher", "empty"): np.zeros((0, 2), np.float32),
        ("teacher", "scalar"): np.asarray(2.5, np.float32),
    }
    path = tmp_path / f"w{suffix}"
    writer = cio.TensorFileWriter(path, {k: (v.shape, v.dtype) for k, v in sd.items()})
    for k, v in sd.items():
        writer.write(k, v)
    writer.close()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left
    if suffix == ".pth":
        for mmap in (False, True):  # mmap=True needs the 64-byte aligned storage records
            got = torch.load(path, weights_only=True, mmap=mmap)
            for (a, b), v in sd.items():
                assert got[a][b].is_contiguous()
                np.testing.assert_array_equal(got[a][b].numpy(), v)
    else:
        got = load_file(str(path))
        for k, v in sd.items():
            np.testing.assert_array_equal(got[".".join(k)], v)


def test_tensor_file_writer_refuses_out_of_order_or_missing_tensors(tmp_path):
    specs = {("a",): ((2,), np.float32), ("b",): ((2,), np.float32)}
    writer = cio.TensorFileWriter(tmp_path / "x.pth", specs)
    with pytest.raises(ConversionError, match="got b, expected \\('a',\\)"):
        writer.write(("b",), np.zeros(2, np.float32))
    writer.write(("a",), np.zeros(2, np.float32))
    with pytest.raises(ConversionError, match="1 tensors not written"):
        writer.close()
    writer.abort()
    assert list(tmp_path.iterdir()) == []
