"""Fixtures for the SSL parity tests: the official code's torch.distributed requirement."""

from __future__ import annotations

import socket

import pytest
import torch.distributed as dist


@pytest.fixture(scope="session")
def torch_process_group():
    """A one-process gloo group: the official iBOT Sinkhorn calls `dist.all_reduce` unconditionally.

    With world size 1 every official all-reduce is the identity, so the official objects compute
    the single-process quantities our global-array functions are compared with.
    """
    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
