"""Test-session set-up and shared fixtures.

8 simulated CPU devices are configured before any JAX op: `jax_num_cpu_devices` only takes effect
before the CPU backend is first initialised (JAX docs, "Running on multiple simulated devices").
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from cpu_flags import CPU_COLLECTIVE_FLAGS  # tests/ is on the pythonpath (pyproject.toml)

# Raised collective timeouts (cpu_flags.py says why); child processes get the same flags.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_COLLECTIVE_FLAGS}".strip()
# Before JAX is imported, and inherited by subprocess tests: with libtpu installed (the `test`
# extra, for bench/compile_tpu.py's deviceless TPU compiles) JAX would otherwise try the TPU first.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

# The tiny TFDS builders (tests/data/tfds_builders.py) serve the data and the eval tests alike.
sys.path.insert(0, str(Path(__file__).resolve().parent / "data"))


def in_ci() -> bool:
    """True on the CI runner (`CI=true`, as GitHub Actions, GitLab CI and most others set it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def torchvision():
    """The real torchvision (the `test` extra pins it beside torch), for the bit-exactness checks
    of the input pipeline and the eval transform. Missing: a skip on a developer's machine, a
    failure under CI=true, where those checks must run."""
    try:
        import torchvision
        from torchvision.transforms import functional  # noqa: F401  (fails on a torch mismatch)
    except (ImportError, RuntimeError) as e:
        msg = f"torchvision does not import beside this torch ({type(e).__name__}: {e})"
        if in_ci():
            pytest.fail(f"CI=true: {msg}; install the `test` extra", pytrace=False)
        pytest.skip(msg)
    return torchvision


class Children:
    """Child processes of one test. Each starts in its own session (process group), so at the end
    of the test, passed or failed or timed out, the whole group is killed: the child and anything
    it started (grain workers, a second train.py), never left running after the test."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []

    def popen(self, args: Sequence[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(list(args), start_new_session=True, **kw)
        self._procs.append(p)
        return p

    def run(
        self, args: Sequence[str], *, timeout: float, input: bytes | str | None = None, **kw
    ) -> subprocess.CompletedProcess:
        """`subprocess.run(args, capture_output=True, timeout=timeout)`; on a timeout the
        exception propagates and the process group is killed at teardown."""
        p = self.popen(
            args,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            **kw,
        )
        out, err = p.communicate(input, timeout=timeout)
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    def kill_all(self) -> None:
        for p in self._procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the group outlives its leader while in use
            except (ProcessLookupError, PermissionError):
                pass
        for p in self._procs:
            try:
                p.communicate(timeout=30)  # reap it and close its pipes
            except (subprocess.TimeoutExpired, ValueError, OSError):
                pass
        self._procs.clear()


@pytest.fixture
def children() -> Iterator[Children]:
    """Start a test's subprocesses with `children.popen` / `children.run`: all are killed (with
    their process groups) when the test ends, however it ends."""
    c = Children()
    try:
        yield c
    finally:
        c.kill_all()


@pytest.fixture
def reserve_port() -> Iterator[Callable[[], int]]:
    """`reserve_port()` -> a free TCP port on 127.0.0.1 that stays bound by this test until it
    ends, so no other process can take it between the choice and the child's bind.

    The reservation socket sets SO_REUSEPORT and never listens: the jax.distributed coordinator
    (a gRPC server, which sets SO_REUSEPORT on its listening socket) can bind the same port from
    a child process of the same user, while a plain bind or the kernel's port-0 choice for any
    other socket is refused it (socket(7), SO_REUSEPORT)."""
    held: list[socket.socket] = []

    def reserve() -> int:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        held.append(s)
        return s.getsockname()[1]

    try:
        yield reserve
    finally:
        for s in held:
            s.close()


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
    the single-process quantities our global-array functions are compared with. The rendezvous is
    an in-memory `HashStore`: no TCP port to choose.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
