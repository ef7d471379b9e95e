"""The test harness itself: child processes die with their test, reserved ports stay reserved."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from cpu_flags import CPU_COLLECTIVE_FLAGS


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0); it has exited all the same
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_children_kill_the_whole_process_group(tmp_path, children):
    """A child that started a grandchild and then timed out: both are gone after `kill_all`."""
    pidfile = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time; "
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        f"open({str(pidfile)!r}, 'w').write(str(g.pid)); time.sleep(600)"
    )
    with pytest.raises(subprocess.TimeoutExpired):
        children.run([sys.executable, "-c", code], timeout=5)
    deadline = time.monotonic() + 30
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    grandchild = int(pidfile.read_text())
    assert _alive(grandchild)
    children.kill_all()  # what the fixture does when a test ends
    deadline = time.monotonic() + 30
    while _alive(grandchild):
        assert time.monotonic() < deadline, "the grandchild survived its test"
        time.sleep(0.05)


def test_reserved_port_refuses_other_binds(reserve_port):
    port = reserve_port()
    with socket.socket() as s, pytest.raises(OSError):
        s.bind(("127.0.0.1", port))
    with socket.socket() as s:  # the kernel's own choice avoids it too
        s.bind(("127.0.0.1", 0))
        assert s.getsockname()[1] != port


def test_collective_timeout_flags_reach_xla(children):
    """This session and the child processes of the tests run with XLA's CPU collective timeout
    raised (tests/cpu_flags.py says why): XLA accepts the flags (a misspelt one is a fatal error
    at start) and an 8-device all-reduce runs under them."""
    assert CPU_COLLECTIVE_FLAGS in os.environ["XLA_FLAGS"]
    code = (
        "import jax, numpy as np; jax.config.update('jax_num_cpu_devices', 8); "
        "from jax.sharding import NamedSharding, PartitionSpec as P; "
        "mesh = jax.make_mesh((8,), ('d',)); "
        "x = jax.device_put(np.arange(8.0, dtype=np.float32), NamedSharding(mesh, P('d'))); "
        "print('SUM', float(jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, 'd'), mesh=mesh, "
        "in_specs=P('d'), out_specs=P()))(x)[0]))"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=CPU_COLLECTIVE_FLAGS)
    # The child takes 2.2 s here (2 cores); the limit only turns a hang into a failure.
    out = children.run([sys.executable, "-c", code], env=env, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "SUM 28.0" in out.stdout
