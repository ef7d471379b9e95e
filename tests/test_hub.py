"""dinojax.hub against a real HTTP server on 127.0.0.1 (no test touches the internet).

The server serves tiny random official-format backbones (the official `DinoVisionTransformer`
from PyPI dinov2, saved with torch.save under hub key names) and an `nn.Linear` head; routes can
cut the connection mid-file, serve corrupted bytes or stall. Test names are added with
`hub.register`; the official names are checked against the table without any network.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cpu_flags import CPU_COLLECTIVE_FLAGS

from dinojax import hub
from dinojax.convert.backbone import to_official

ROOT = Path(__file__).resolve().parents[1]
TINY = "test/tiny_pretrain.pth"


# ---------------------------------------------------------------------------------------------
# Fixtures: tiny official files, the HTTP server, an isolated cache
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> dict:
    """{"bytes": a .pth of a 4-block 128-wide official v2 backbone, "sd": its numpy state dict,
    "head": a .pth of nn.Linear(2 * 128, 1000)}."""
    from reference import official_state_dict, official_vit, small_config

    cfg = small_config()
    sd = official_state_dict(official_vit(cfg, seed=3), cfg)
    buf = io.BytesIO()
    torch.save(sd, buf)
    head = torch.nn.Linear(2 * cfg.embed_dim, 1000)
    hbuf = io.BytesIO()
    torch.save(head.state_dict(), hbuf)
    return {
        "bytes": buf.getvalue(),
        "sd": {k: v.numpy() for k, v in sd.items()},
        "head": hbuf.getvalue(),
        "head_sd": {k: v.detach().numpy() for k, v in head.state_dict().items()},
    }


class Server:
    """http.server on 127.0.0.1:<free port>. `files[path] = bytes`; `routes[path]` options:
    cut_at (first GET ends the connection after that many bytes), stall_at / stall_s (first GET
    sends that many bytes then goes silent), corrupt (flip one byte), chunk_s (pause between 64 KiB
    chunks). Range requests get 206 + Content-Range. `log` holds (path, Range header) per GET."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.routes: dict[str, dict] = {}
        self.log: list[tuple[str, str | None]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                with server._lock:
                    server.log.append((self.path, self.headers.get("Range")))
                    first = sum(p == self.path for p, _ in server.log) == 1
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                opts = server.routes.get(self.path, {})
                if opts.get("corrupt"):
                    data = data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:]
                start, status = 0, 200
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if m:
                    start, status = int(m.group(1)), 206
                    if start >= len(data):
                        self.send_error(416)
                        return
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                try:
                    if first and "cut_at" in opts:
                        self.wfile.write(body[: opts["cut_at"] - start])
                        return  # HTTP/1.0: the connection closes, short of Content-Length
                    if first and "stall_at" in opts:
                        self.wfile.write(body[: opts["stall_at"]])
                        self.wfile.flush()
                        time.sleep(opts["stall_s"])
                        return
                    for i in range(0, len(body), 1 << 16):
                        self.wfile.write(body[i : i + (1 << 16)])
                        if opts.get("chunk_s"):
                            self.wfile.flush()
                            time.sleep(opts["chunk_s"])
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def gets(self, path: str) -> list[str | None]:
        return [r for p, r in self.log if p == path]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tiny):
    s = Server()
    s.files["/" + TINY] = tiny["bytes"]
    yield s
    s.stop()


@pytest.fixture
def env(server, tmp_path, monkeypatch) -> Path:
    """An empty cache, the server as DINOJAX_WEIGHTS_URL, no retries, a private name table."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DINOJAX_HOME", str(cache))
    monkeypatch.setenv("DINOJAX_WEIGHTS_URL", server.url)
    monkeypatch.setenv("DINOJAX_DOWNLOAD_RETRIES", "0")
    monkeypatch.setenv("DINOJAX_DOWNLOAD_TIMEOUT", "10")
    monkeypatch.delenv("DINOJAX_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_TABLE", dict(hub._TABLE))
    hub.register("tiny", TINY)
    return cache


def _assert_weights(model, sd: dict) -> None:
    got = to_official(model.params())
    assert sorted(got) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(np.asarray(got[k]), sd[k], err_msg=k)


# ---------------------------------------------------------------------------------------------
# The official table (no network)
# ---------------------------------------------------------------------------------------------


def test_every_official_name_has_a_url_and_a_known_architecture(monkeypatch):
    from dinojax.models.config import ARCHITECTURES, get_config

    monkeypatch.delenv("DINOJAX_WEIGHTS_URL", raising=False)
    official = hub.OFFICIAL_NAMES
    assert len(official) == 28  # 8 DINOv2 backbones, their 16 linear heads, 4 DINO v1 backbones
    for name in official:
        e = hub.entry(name)
        assert e.resolved_url().startswith(hub.BASE_URL + "/"), name
        assert e.resolved_url().endswith(".pth")
        assert e.arch in ARCHITECTURES, name
        if e.kind == "linear_head":
            assert e.layers in (1, 4) and name.startswith(e.arch + "_linear")
        else:
            assert get_config(e.arch).name == name
    # Spot checks against the URLs built by dinov2/hub/backbones.py, classifiers.py and
    # dino/hubconf.py.
    expected = {
        "dinov2_vits14": "dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
        "dinov2_vitb14_reg": "dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth",
        "dinov2_vitg14_reg": "dinov2/dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth",
        "dinov2_vitl14_linear_head": "dinov2/dinov2_vitl14/dinov2_vitl14_linear_head.pth",
        "dinov2_vits14_linear4_head": "dinov2/dinov2_vits14/dinov2_vits14_linear4_head.pth",
        "dinov2_vitb14_reg_linear4_head": (
            "dinov2/dinov2_vitb14/dinov2_vitb14_reg4_linear4_head.pth"
        ),
        "dino_vits16": "dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
        "dino_vits8": "dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
        "dino_vitb16": "dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
        "dino_vitb8": "dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
    }
    for name, rel in expected.items():
        assert hub.entry(name).resolved_url() == f"https://dl.fbaipublicfiles.com/{rel}"
    assert hub.entry("dinov2_vitb14_reg4").name == "dinov2_vitb14_reg"  # file-name spelling
    monkeypatch.setenv("DINOJAX_WEIGHTS_URL", "http://mirror.example/w/")
    assert hub.entry("dino_vitb8").resolved_url() == (
        "http://mirror.example/w/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"
    )
    with pytest.raises(hub.HubError, match="unknown model name 'dinov2_vitx14'"):
        hub.entry("dinov2_vitx14")
    assert hub.is_name("hf:facebook/dinov2-base") and not hub.is_name("ckpt/")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("DINOJAX_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "dinojax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert hub.cache_dir() == Path.home() / ".cache" / "dinojax"
    monkeypatch.setenv("DINOJAX_HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home"


# ---------------------------------------------------------------------------------------------
# Download, convert once, cache hit offline
# ---------------------------------------------------------------------------------------------


def test_load_downloads_converts_once_then_reads_only_the_converted_copy(
    env, server, tiny, monkeypatch
):
    import dinojax
    from dinojax.convert import checkpoint

    model = dinojax.load("tiny")
    _assert_weights(model, tiny["sd"])
    assert server.gets("/" + TINY) == [None]
    raw = env / "downloads" / TINY
    assert raw.read_bytes() == tiny["bytes"]
    rec = hub._recorded(raw)
    assert rec["sha256"] == hashlib.sha256(tiny["bytes"]).hexdigest()
    assert rec["size"] == len(tiny["bytes"])
    assert (env / "models" / "test" / "tiny_pretrain" / "dinojax.json").is_file()
    assert not list(env.rglob("*.part"))

    # Second load: no raw file, no server, offline, and any conversion would fail the test.
    raw.rename(raw.with_name("moved.pth"))
    server.stop()
    monkeypatch.setenv("DINOJAX_OFFLINE", "1")

    def no_conversion(*args, **kwargs):
        raise AssertionError("the second load converted again")

    monkeypatch.setattr(checkpoint, "convert", no_conversion)
    _assert_weights(dinojax.load("tiny"), tiny["sd"])


def test_offline_or_unreachable_without_a_cache_is_one_clear_error(env, server, monkeypatch):
    import dinojax

    url = f"{server.url}/{TINY}"
    monkeypatch.setenv("DINOJAX_OFFLINE", "1")
    with pytest.raises(hub.HubError) as e:
        dinojax.load("tiny")
    assert url in str(e.value) and str(env / "downloads" / TINY) in str(e.value)
    assert server.log == []
    monkeypatch.delenv("DINOJAX_OFFLINE")
    server.stop()  # no network: connection refused
    with pytest.raises(hub.HubError) as e:
        dinojax.load("tiny")
    assert url in str(e.value) and str(env / "downloads" / TINY) in str(e.value)
    assert "\n" not in str(e.value)
    assert not (env / "downloads" / TINY).exists()


def test_local_mirror_directory(env, tiny, monkeypatch, tmp_path):
    mirror = tmp_path / "mirror"
    (mirror / "test").mkdir(parents=True)
    (mirror / TINY).write_bytes(tiny["bytes"])
    monkeypatch.setenv("DINOJAX_WEIGHTS_URL", str(mirror))
    assert hub.download("tiny").read_bytes() == tiny["bytes"]


# ---------------------------------------------------------------------------------------------
# Interrupted, corrupt and slow downloads
# ---------------------------------------------------------------------------------------------


def test_cut_connection_keeps_the_part_and_the_next_attempt_resumes(env, server, tiny):
    cut = 1_000_000
    server.routes["/" + TINY] = {"cut_at": cut}
    raw = env / "downloads" / TINY
    with pytest.raises(hub.HubError, match="partial file .* is kept"):
        hub.download("tiny", progress=False)
    assert not raw.exists()
    assert raw.with_name(raw.name + ".part").stat().st_size == cut
    assert hub.download("tiny", progress=False).read_bytes() == tiny["bytes"]
    assert server.gets("/" + TINY) == [None, f"bytes={cut}-"]
    assert not raw.with_name(raw.name + ".part").exists()


def test_retry_resumes_within_one_call(env, server, tiny, monkeypatch):
    monkeypatch.setenv("DINOJAX_DOWNLOAD_RETRIES", "1")
    server.routes["/" + TINY] = {"cut_at": 700_001}
    assert hub.download("tiny", progress=False).read_bytes() == tiny["bytes"]
    assert server.gets("/" + TINY) == [None, "bytes=700001-"]


def test_corrupt_file_with_a_hash_name_is_discarded(env, server, tiny):
    digest = hashlib.sha256(tiny["bytes"]).hexdigest()
    path = f"/test/tiny-{digest[:8]}.pth"  # torch.hub's name-<sha256 prefix> convention
    server.files[path] = tiny["bytes"]
    server.routes[path] = {"corrupt": True}
    hub.register("tiny_hashed", path.lstrip("/"))
    raw = env / "downloads" / path.lstrip("/")
    with pytest.raises(hub.HubError, match="corrupt .* discarded"):
        hub.download("tiny_hashed", progress=False)
    assert not raw.exists() and not raw.with_name(raw.name + ".part").exists()
    server.routes[path] = {}
    assert hub.download("tiny_hashed", progress=False).read_bytes() == tiny["bytes"]


def test_changed_file_is_caught_by_the_hash_recorded_at_first_download(env, server, tiny):
    raw = hub.download("tiny", progress=False)
    meta = raw.with_name(raw.name + ".meta.json")
    meta.unlink()  # as if interrupted between the rename and the record: recorded again
    assert hub.download("tiny", progress=False) == raw
    assert hub._recorded(raw)["sha256"] == hashlib.sha256(tiny["bytes"]).hexdigest()
    assert len(server.gets("/" + TINY)) == 1
    raw.unlink()  # the record of the first download's SHA-256 stays
    server.routes["/" + TINY] = {"corrupt": True}
    with pytest.raises(hub.HubError, match="recorded at the first download"):
        hub.download("tiny", progress=False)
    assert not raw.exists()


def test_stalled_connection_times_out_and_resumes(env, server, tiny, monkeypatch):
    monkeypatch.setenv("DINOJAX_DOWNLOAD_TIMEOUT", "0.3")
    server.routes["/" + TINY] = {"stall_at": 300_000, "stall_s": 3.0}
    with pytest.raises(hub.HubError, match="timed out"):
        hub.download("tiny", progress=False)
    monkeypatch.setenv("DINOJAX_DOWNLOAD_RETRIES", "1")
    assert hub.download("tiny", progress=False).read_bytes() == tiny["bytes"]
    assert server.gets("/" + TINY) == [None, "bytes=300000-"]


def test_missing_file_is_not_retried(env, server, monkeypatch):
    monkeypatch.setenv("DINOJAX_DOWNLOAD_RETRIES", "3")
    hub.register("absent", "test/absent.pth")
    with pytest.raises(hub.HubError, match="HTTP 404"):
        hub.download("absent", progress=False)
    assert len(server.gets("/test/absent.pth")) == 1


# ---------------------------------------------------------------------------------------------
# Architecture checks, linear heads, the CLI
# ---------------------------------------------------------------------------------------------


def test_official_name_served_the_wrong_architecture_is_refused(env, server, tiny):
    import dinojax

    rel = "dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
    server.files["/" + rel] = tiny["bytes"]  # a tiny model where ViT-S/14 is expected
    with pytest.raises(hub.HubError, match="holds a custom backbone .* not dinov2_vits14"):
        dinojax.load("dinov2_vits14")
    assert server.gets("/" + rel) == [None]  # DINOJAX_WEIGHTS_URL kept the relative path
    assert not (env / "models" / "dinov2" / "dinov2_vits14" / "dinov2_vits14_pretrain").exists()


def test_linear_head_by_name(env, server, tiny):
    import dinojax
    from dinojax.eval.linear import load_linear_head

    server.files["/test/tiny_linear_head.pth"] = tiny["head"]
    hub.register("tiny_head", "test/tiny_linear_head.pth", kind="linear_head")
    head = dinojax.load("tiny_head")
    for k in ("weight", "bias"):
        np.testing.assert_array_equal(head[k], tiny["head_sd"][k])
    assert (env / "models" / "test" / "tiny_linear_head.safetensors").is_file()
    np.testing.assert_array_equal(load_linear_head("tiny_head")["bias"], tiny["head_sd"]["bias"])
    assert len(server.gets("/test/tiny_linear_head.pth")) == 1
    with pytest.raises(hub.HubError, match="is a backbone, not a linear head"):
        load_linear_head("tiny")
    # Released heads are checked against the backbone they belong to.
    server.files["/test/s14_linear4_head.pth"] = tiny["head"]
    hub.register(
        "tiny_head_s14", "test/s14_linear4_head.pth", "dinov2_vits14", kind="linear_head", layers=4
    )
    with pytest.raises(hub.HubError, match=r"expected \(1000, 1920\) for dinov2_vits14"):
        dinojax.load("tiny_head_s14")


def test_cli_checkpoint_accepts_a_name(env, server, tiny):
    import argparse

    from dinojax.eval import cli

    p = argparse.ArgumentParser()
    cli.add_model_args(p)
    _assert_weights(cli.load_model(p.parse_args(["--checkpoint", "tiny"])), tiny["sd"])
    server.files["/test/h.pth"] = tiny["head"]
    hub.register("tiny_head", "test/h.pth", kind="linear_head")
    with pytest.raises(ValueError, match="is a linear head, not a backbone"):
        cli.load_model(p.parse_args(["--checkpoint", "tiny_head"]))
    assert server.gets("/test/h.pth") == []  # refused before any download
    with pytest.raises(ValueError, match="--arch does not apply to the model name tiny"):
        cli.load_model(p.parse_args(["--checkpoint", "tiny", "--arch", "dinov2_vits14"]))


# ---------------------------------------------------------------------------------------------
# Hugging Face (offline, from a prepared huggingface_hub cache)
# ---------------------------------------------------------------------------------------------


def test_hugging_face_repository_from_its_cache(env, tiny, tmp_path, monkeypatch):
    from huggingface_hub import constants
    from safetensors.numpy import save_file

    import dinojax
    from dinojax.convert.backbone import to_hf

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--facebook--dinov2-tiny"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file(to_hf(tiny["sd"]), str(repo / "snapshots" / commit / "model.safetensors"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("DINOJAX_OFFLINE", "1")  # also means huggingface_hub local_files_only

    _assert_weights(dinojax.load("hf:facebook/dinov2-tiny"), tiny["sd"])
    assert (env / "models" / "hf" / "facebook--dinov2-tiny" / commit / "dinojax.json").is_file()
    (repo / "snapshots" / commit / "model.safetensors").unlink()  # the converted copy suffices
    _assert_weights(dinojax.load("hf:facebook/dinov2-tiny"), tiny["sd"])
    with pytest.raises(hub.HubError, match="offline, and not in the Hugging Face cache"):
        dinojax.load("hf:facebook/dinov2-absent")
    with pytest.raises(hub.HubError, match="expected hf:OWNER/REPO"):
        dinojax.load("hf:nothing")


# ---------------------------------------------------------------------------------------------
# Concurrency: processes on one host, and JAX processes of a multi-host job
# ---------------------------------------------------------------------------------------------

_LOADER = """
import hashlib, logging, sys
import numpy as np
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
import dinojax
from dinojax import hub
from dinojax.convert.backbone import to_official
hub.register("tiny", {tiny!r})
sd = to_official(dinojax.load("tiny").params())
blob = b"".join(np.asarray(sd[k]).tobytes() for k in sorted(sd))
print("DIGEST", hashlib.sha256(blob).hexdigest())
"""


def _digest(sd: dict) -> str:
    return hashlib.sha256(b"".join(np.asarray(sd[k]).tobytes() for k in sorted(sd))).hexdigest()


def _env(cache: Path, server: Server) -> dict:
    e = dict(os.environ, DINOJAX_HOME=str(cache), DINOJAX_WEIGHTS_URL=server.url)
    e.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    e["XLA_FLAGS"] = CPU_COLLECTIVE_FLAGS  # not the caller's own flags
    return e


def test_two_processes_loading_at_once_download_and_convert_once(server, tiny, tmp_path, children):
    server.routes["/" + TINY] = {"chunk_s": 0.03}  # ~1.5 s: both processes are in flight
    env = _env(tmp_path / "cache", server)
    code = _LOADER.format(tiny=TINY)
    procs = [
        children.popen(
            [sys.executable, "-c", code],
            env=env,
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=180) for p in procs]  # the fixture kills them on any failure
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert f"DIGEST {_digest(tiny['sd'])}" in out
    assert server.gets("/" + TINY) == [None]
    logs = "".join(err for _, err in outs)
    assert logs.count("dinojax.hub converting") == 1, logs[-3000:]


_WORKER = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid = sys.argv[1], int(sys.argv[2])
jax.distributed.initialize(f"127.0.0.1:{{port}}", num_processes=2, process_id=pid)
import os
from dinojax import hub
hub.register("tiny", {tiny!r})
hub.register("tiny2", "test/tiny2_pretrain.pth")
import dinojax
dinojax.load("tiny")                                  # one cache shared by both processes
os.environ["DINOJAX_HOME"] = sys.argv[3]              # then one cache per process ("host")
dinojax.load("tiny2")
print("OK", jax.process_index())
"""


@pytest.mark.slow
def test_multihost_one_download_per_filesystem(server, tiny, tmp_path, children, reserve_port):
    server.files["/test/tiny2_pretrain.pth"] = tiny["bytes"]
    port = reserve_port()  # held until the test ends: no other process can take it meanwhile
    env = _env(tmp_path / "shared", server)
    env["JAX_NUM_CPU_DEVICES"] = "1"
    code = textwrap.dedent(_WORKER.format(tiny=TINY))
    procs = [
        children.popen(
            [sys.executable, "-c", code, str(port), str(i), str(tmp_path / f"host{i}")],
            env=env,
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"OK {i}" in out, out[-3000:]
    assert server.gets("/" + TINY) == [None]  # shared cache: one process of the job
    assert server.gets("/test/tiny2_pretrain.pth") == [None, None]  # one per "host"
    for i in range(2):
        assert (tmp_path / f"host{i}" / "models" / "test" / "tiny2_pretrain").is_dir()
