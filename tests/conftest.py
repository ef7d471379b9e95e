"""Test-session set-up: 8 simulated CPU devices before any JAX op (jax-ecosystem.md pitfall 27)."""

import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

# The tiny TFDS builders (tests/data/tfds_builders.py) serve the data and the eval tests alike.
sys.path.insert(0, str(Path(__file__).resolve().parent / "data"))


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> str:
    """A TFDS data_dir holding the tiny Tensor-feature and Image-feature datasets (array_record,
    built without TensorFlow)."""
    import tfds_builders

    d = str(tmp_path_factory.mktemp("tfds"))
    tfds_builders.build(tfds_builders.DinojaxTinyTensor, d)
    tfds_builders.build(tfds_builders.DinojaxTinyImage, d)
    return d


@pytest.fixture(scope="session")
def torch_process_group():
    """A one-process gloo group for the official code's torch.distributed calls (the iBOT
    Sinkhorn's unconditional `dist.all_reduce`, KnnModule's broadcasts and gathers).

    With world size 1 every official collective is the identity, so the official objects compute
    the single-process quantities our global-array functions are compared with.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
