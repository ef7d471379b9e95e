"""Pretrained models by name: download, verify, cache and convert once.

    model = dinojax.load("dinov2_vitb14_reg")                 # DINOv2 backbone, with registers
    model = dinojax.load("dino_vits16")                       # DINO v1 backbone
    head = dinojax.load("dinov2_vitb14_reg_linear4_head")     # {"weight", "bias"} ImageNet head
    model = dinojax.load("hf:facebook/dinov2-base")           # a Hugging Face repository

Names: the official torch.hub backbones (facebookresearch/dinov2 `dinov2/hub/backbones.py`,
facebookresearch/dino `hubconf.py`) and the released ImageNet linear heads
(facebookresearch/dinov2 `dinov2/hub/classifiers.py`, `dinov2_<arch>[_reg]_linear[4]_head`);
`names()` lists them. The files are fetched from `https://dl.fbaipublicfiles.com` or from the base
URL in `DINOJAX_WEIGHTS_URL` (a mirror keeping the same relative paths: an http(s) URL, `file://`
URL or a local directory). `register(name, url, arch)` adds an entry.

Cache (`cache_dir()`): `$DINOJAX_HOME`, else `$XDG_CACHE_HOME/dinojax`, else `~/.cache/dinojax`:

    downloads/<relative path>               the official file, e.g. dinov2/dinov2_vits14/...pth
    downloads/<relative path>.meta.json     its size and SHA-256, recorded at the first download
    models/<relative path without suffix>/  the converted dinojax checkpoint (`dinojax.load` dir)
    models/<...>_head.safetensors           a converted linear head

A load whose converted checkpoint exists reads only that checkpoint: no network, no conversion.
Otherwise the file is downloaded (tqdm progress bar) to `<file>.part`, resumed with an HTTP Range
request after an interruption (`DINOJAX_DOWNLOAD_RETRIES` retries, default 4, and on the next
call), each socket operation bounded by `DINOJAX_DOWNLOAD_TIMEOUT` seconds (default 60). The part
is renamed to its final name only once it is complete (the size the server announced) and
verified: against the hash prefix in the file name where there is one (torch.hub's
`name-<sha256 prefix>.pth` convention; the DINOv2 and DINO v1 file names carry none), against the
SHA-256 recorded at the first download otherwise. A mismatch deletes the part and raises, so a
partial or corrupt file is never used. The converter then runs with its strict checks, and the
architecture it detects must be the one the name promises.

Concurrency: a file lock (`fcntl.flock` on `<file>.lock`) makes concurrent loads of one name by
several processes download and convert once; the others wait, then read the converted checkpoint.
Offline (`DINOJAX_OFFLINE=1`, or no network) a cached model loads; an uncached one is one error
naming the URL and the cache path.

Multi-host (`jax.process_count() > 1`): every process calls `dinojax.load(name)` (it is a
collective). Each process writes a marker file into the cache, and after a barrier
(`jax.experimental.multihost_utils.sync_global_devices`) the processes that see each other's
markers share a filesystem: in each such group the process with the lowest index downloads and
converts, the others wait at a second barrier and then read the converted checkpoint. So with a
per-host cache process 0 of every host downloads, and with a cache on a shared filesystem one
process of the whole job does.

Hugging Face (`hf:owner/repo[@revision]`): the weights come through `huggingface_hub` (its cache,
its offline mode `HF_HUB_OFFLINE`, its token `HF_TOKEN` / `huggingface-cli login` for gated
repositories); the converted checkpoint is cached here per repository commit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "BASE_URL",
    "Entry",
    "HubError",
    "cache_dir",
    "download",
    "entry",
    "fetch",
    "is_name",
    "load",
    "names",
    "register",
]

log = logging.getLogger(__name__)

BASE_URL = "https://dl.fbaipublicfiles.com"
KINDS = ("backbone", "linear_head")
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{6,64})\.[^.]+$")  # torch.hub: name-<sha256 prefix>.ext
_CHUNK = 1 << 20
_T = TypeVar("_T")


class HubError(ValueError):
    """A model name that cannot be resolved, downloaded, verified or converted (one line)."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One model name: `url` is relative to the base URL (or absolute), `arch` the dinojax
    architecture the file must hold (None: whatever it holds), `layers` the number of blocks a
    linear head reads (1 or 4)."""

    name: str
    url: str
    arch: str | None
    kind: str = "backbone"
    sha256: str | None = None
    layers: int | None = None

    @property
    def relpath(self) -> str:
        """The file's path in the cache (and under a mirror base URL)."""
        parsed = urllib.parse.urlparse(self.url)
        if parsed.scheme:  # an absolute URL: keep the host so that two servers never collide
            return f"{parsed.netloc or 'local'}/{parsed.path.lstrip('/')}"
        return self.url

    def resolved_url(self) -> str:
        if urllib.parse.urlparse(self.url).scheme:
            return self.url
        base = os.environ.get("DINOJAX_WEIGHTS_URL") or BASE_URL
        if "://" not in base:  # a local mirror directory
            base = Path(base).absolute().as_uri()
        return f"{base.rstrip('/')}/{self.url}"


def _official_table() -> dict[str, Entry]:
    table: dict[str, Entry] = {}
    for size in "sblg":
        base = f"dinov2_vit{size}14"
        for reg in (False, True):
            name = base + ("_reg" if reg else "")
            stem = base + ("_reg4" if reg else "")  # the file names spell out the register count
            table[name] = Entry(name, f"dinov2/{base}/{stem}_pretrain.pth", name)
            for layers in (1, 4):
                suffix = f"linear{'4' if layers == 4 else ''}_head"
                head = f"{name}_{suffix}"
                table[head] = Entry(
                    head, f"dinov2/{base}/{stem}_{suffix}.pth", name, "linear_head", layers=layers
                )
    for name, stem in (
        ("dino_vits16", "dino_deitsmall16"),
        ("dino_vits8", "dino_deitsmall8"),
        ("dino_vitb16", "dino_vitbase16"),
        ("dino_vitb8", "dino_vitbase8"),
    ):
        table[name] = Entry(name, f"dino/{stem}_pretrain/{stem}_pretrain.pth", name)
    return table


_TABLE: dict[str, Entry] = _official_table()
OFFICIAL_NAMES: tuple[str, ...] = tuple(_TABLE)


def _canonical(name: str) -> str:
    # The official file names say "reg4"; accept that spelling of the hub names too.
    return re.sub(r"^(dinov2_vit[sblg]14)_reg4(?=_|$)", r"\1_reg", name)


def names() -> list[str]:
    """Every registered model name (the official table plus `register`ed entries)."""
    return sorted(_TABLE)


def register(
    name: str,
    url: str,
    arch: str | None = None,
    *,
    kind: str = "backbone",
    sha256: str | None = None,
    layers: int | None = None,
) -> Entry:
    """Add (or replace) a name: `url` absolute, or relative to the base URL; `arch` the
    architecture the file must hold (a name of `dinojax.ARCHITECTURES`, or None for any);
    `sha256` the file's full hash if known."""
    from dinojax.models.config import get_config

    if kind not in KINDS:
        raise HubError(f"register {name!r}: kind must be one of {KINDS}, got {kind!r}")
    if not name or name.startswith("hf:") or "/" in name:
        raise HubError(f"register: {name!r} is not a valid model name")
    if arch is not None:
        get_config(arch)  # unknown architecture: ValueError listing the known ones
    if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise HubError(f"register {name!r}: sha256 must be 64 lowercase hex digits")
    e = Entry(name, url, arch, kind, sha256, layers)
    _TABLE[name] = e
    return e


def entry(name: str) -> Entry:
    """The table entry of `name` (HubError listing the names if unknown)."""
    e = _TABLE.get(_canonical(name))
    if e is None:
        raise HubError(f"unknown model name {name!r}; known names: {', '.join(names())}")
    return e


def is_name(spec: Any) -> bool:
    """Whether `spec` is a model name (`hf:...` or a table name) rather than a path. An existing
    file or directory of that name wins."""
    if not isinstance(spec, str):
        return False
    if spec.startswith("hf:"):
        return True
    return _canonical(spec) in _TABLE and not os.path.exists(spec)


def cache_dir() -> Path:
    """`$DINOJAX_HOME`, else `$XDG_CACHE_HOME/dinojax`, else `~/.cache/dinojax`."""
    home = os.environ.get("DINOJAX_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "dinojax"


def _offline() -> bool:
    return os.environ.get("DINOJAX_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise HubError(f"{name}={raw!r} is not a number") from None
    if value < 0:
        raise HubError(f"{name}={raw!r} must not be negative")
    return value


# ---------------------------------------------------------------------------------------------
# Locks, downloads, verification
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(path: Path, what: str) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process fetching %s (lock %s)", what, path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _Incomplete(OSError):
    """The server delivered less than it announced (a cut connection): retried, resumed."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _meta_path(dst: Path) -> Path:
    return dst.with_name(dst.name + ".meta.json")


def _recorded(dst: Path) -> dict:
    try:
        rec = json.loads(_meta_path(dst).read_text())
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def _expected_hash(url: str, dst: Path, sha256: str | None) -> tuple[str | None, str]:
    """(expected full hash or prefix, where it comes from)."""
    if sha256:
        return sha256, "the registered SHA-256"
    m = _HASH_IN_NAME.search(urllib.parse.urlparse(url).path)
    if m:
        return m.group(1), "the hash prefix in the file name"
    rec = _recorded(dst).get("sha256")
    if isinstance(rec, str):
        return rec, f"the SHA-256 recorded at the first download ({_meta_path(dst)})"
    return None, ""


def _stream(url: str, part: Path, *, timeout: float, progress: bool, desc: str) -> None:
    """Fetch `url` into `part`, resuming from its current size with a Range request."""
    from tqdm.auto import tqdm

    from dinojax import __version__

    offset = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": f"dinojax/{__version__}"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout or None)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the part is not a prefix the server can continue
            part.unlink()
            raise _Incomplete(f"the server refused to resume at byte {offset}") from None
        raise
    with resp:
        status = getattr(resp, "status", None) or 200
        length = resp.headers.get("Content-Length")
        total = None
        mode = "wb"
        if offset and status == 206:
            m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:  # not the range asked for: start over
                part.unlink()
                raise _Incomplete(
                    f"the server answered a resume at byte {offset} with a wrong range"
                )
            mode = "ab"
            total = int(m.group(2)) if m.group(2) != "*" else None
            if total is None and length is not None:
                total = offset + int(length)
        if mode == "wb":  # a full response (no or ignored Range): start over
            offset = 0
            total = int(length) if length is not None else None
        with (
            open(part, mode) as f,
            tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                desc=desc, disable=not progress, leave=False,
            ) as bar,
        ):  # fmt: skip
            # read1: whatever has arrived, so that bytes received before a stall are kept
            while chunk := resp.read1(_CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Incomplete(f"the connection ended after {size} of {total} bytes")


def _download(url: str, dst: Path, *, sha256: str | None = None, progress: bool = True) -> Path:
    """`url` -> `dst` (caller holds the lock): resumable, verified, renamed only when complete."""
    if dst.is_file():
        rec = _recorded(dst)
        if rec.get("size") == dst.stat().st_size:
            return dst
        if not rec:  # renamed into place, then interrupted before the record was written
            _record(dst, url)
            return dst
        log.warning("%s: size differs from the recorded %s bytes; downloading again", dst, rec)
        dst.unlink()
    if _offline():
        raise HubError(
            f"{url} is not in the cache ({dst}) and DINOJAX_OFFLINE is set: download it there "
            "or unset DINOJAX_OFFLINE"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(dst.name + ".part")
    retries = int(_env_number("DINOJAX_DOWNLOAD_RETRIES", 4))
    timeout = _env_number("DINOJAX_DOWNLOAD_TIMEOUT", 60.0)
    for attempt in range(retries + 1):
        try:
            if urllib.parse.urlparse(url).scheme == "file":  # a local mirror: plain copy
                src = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
                shutil.copyfile(src, part)
            else:
                _stream(url, part, timeout=timeout, progress=progress, desc=dst.name)
            break
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code not in (408, 429):
                raise HubError(
                    f"cannot download {url} (HTTP {e.code} {e.reason}); cache path {dst}"
                ) from None
            err: Exception = e
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, cut connections
            if isinstance(e, FileNotFoundError) and not isinstance(e, urllib.error.URLError):
                raise HubError(f"cannot download {url}: no such file; cache path {dst}") from None
            err = e
        if attempt < retries:
            delay = 0.5 * 2**attempt
            log.warning("download of %s failed (%s); retrying in %.1f s", url, _brief(err), delay)
            time.sleep(delay)
    else:
        kept = f"; the partial file {part} is kept and resumed next time" if part.exists() else ""
        raise HubError(
            f"cannot download {url} to {dst} after {retries + 1} attempt(s) ({_brief(err)})"
            f"{kept}; set DINOJAX_WEIGHTS_URL to a mirror, or put the file at that path"
        )
    digest = _sha256(part)
    expected, source = _expected_hash(url, dst, sha256)
    if expected is not None and not digest.startswith(expected):
        part.unlink()
        raise HubError(
            f"{url}: the downloaded file is corrupt (SHA-256 {digest[:16]}... does not match "
            f"{expected[:16]}... from {source}); it was discarded: try again"
            + (
                f", or delete {_meta_path(dst)} if the file changed upstream"
                if "recorded" in source
                else ""
            )
        )
    os.replace(part, dst)
    _record(dst, url, digest)
    log.info("downloaded %s (%d bytes, sha256 %s)", dst, dst.stat().st_size, digest)
    return dst


def _record(dst: Path, url: str, digest: str | None = None) -> None:
    rec = {"url": url, "size": dst.stat().st_size, "sha256": digest or _sha256(dst)}
    tmp = _meta_path(dst).with_name(f".{_meta_path(dst).name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(rec, indent=1) + "\n")
    os.replace(tmp, _meta_path(dst))


def _brief(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


# ---------------------------------------------------------------------------------------------
# Multi-host: one downloader per filesystem
# ---------------------------------------------------------------------------------------------


def _once_per_filesystem(key: str, work: Callable[[bool], _T]) -> _T:
    """Run `work(may_download)`: with several JAX processes, only the lowest process index of
    each group sharing the cache directory may download; the others run after a barrier, from
    the cache. Every process must call this (it holds barriers)."""
    import jax

    if jax.process_count() == 1:
        return work(True)
    import numpy as np
    from jax.experimental import multihost_utils

    me = jax.process_index()
    token = int(
        multihost_utils.broadcast_one_to_all(np.int32(int.from_bytes(os.urandom(3), "little")))
    )
    markers = cache_dir() / ".processes"
    markers.mkdir(parents=True, exist_ok=True)
    mine = markers / f"{token:06x}-{me}"
    mine.touch()
    multihost_utils.sync_global_devices(f"dinojax.hub markers {key}")
    seen = [int(p.name.rsplit("-", 1)[1]) for p in markers.glob(f"{token:06x}-*")]
    leader = min(seen, default=me)
    result: Any = None
    error: BaseException | None = None
    if leader == me:
        try:
            result = work(True)
        except Exception as e:  # noqa: BLE001 - raised after the barrier, so no process hangs
            error = e
    multihost_utils.sync_global_devices(f"dinojax.hub fetched {key}")
    mine.unlink(missing_ok=True)
    if error is not None:
        raise error
    if leader != me:
        try:
            result = work(False)
        except HubError as e:
            raise HubError(
                f"{e} (process {leader}, which shares this cache, was to fetch it: see its error)"
            ) from None
    return result


# ---------------------------------------------------------------------------------------------
# Fetch and convert
# ---------------------------------------------------------------------------------------------


def _converted_path(e: Entry) -> Path:
    stem = e.relpath.rsplit(".", 1)[0] if "." in Path(e.relpath).name else e.relpath
    root = cache_dir() / "models"
    return root / (stem + ".safetensors") if e.kind == "linear_head" else root / stem


def _is_converted(path: Path) -> bool:
    from dinojax.convert.checkpoint import META

    return path.is_file() if path.suffix == ".safetensors" else (path / META).is_file()


def download(name: str, *, progress: bool = True) -> Path:
    """The official file of `name` in the cache (downloaded once, verified), unconverted."""
    e = entry(name)
    dst = cache_dir() / "downloads" / e.relpath

    def work(may_download: bool) -> Path:
        if not may_download and not dst.is_file():
            raise HubError(f"{e.resolved_url()} is not in the cache ({dst})")
        with _file_lock(dst.with_name(dst.name + ".lock"), e.name):
            return _download(e.resolved_url(), dst, sha256=e.sha256, progress=progress)

    return _once_per_filesystem(e.name, work)


def fetch(name: str, *, progress: bool = True) -> Path:
    """The converted checkpoint of `name` (a directory for `dinojax.load`, or a head
    `.safetensors`), downloading and converting it first if it is not cached."""
    if name.startswith("hf:"):
        return _fetch_hf(name, progress=progress)
    e = entry(name)
    conv = _converted_path(e)
    dst = cache_dir() / "downloads" / e.relpath

    def work(may_download: bool) -> Path:
        if _is_converted(conv):
            return conv
        if not may_download:
            raise HubError(f"{e.name}: not in the cache ({conv}) after the download step")
        with _file_lock(dst.with_name(dst.name + ".lock"), e.name):
            if _is_converted(conv):  # another process finished while this one waited
                return conv
            raw = _download(e.resolved_url(), dst, sha256=e.sha256, progress=progress)
            _convert(e, raw, conv)
        return conv

    return _once_per_filesystem(e.name, work)


def _convert(e: Entry, raw: Path, conv: Path) -> None:
    from dinojax.models.config import get_config

    log.info("converting %s -> %s", raw, conv)
    conv.parent.mkdir(parents=True, exist_ok=True)
    if e.kind == "linear_head":
        from dinojax.convert.io import write_file
        from dinojax.eval.linear import load_linear_head

        head = load_linear_head(raw)
        if e.arch is not None:
            d = get_config(e.arch).embed_dim
            want = (1000, (1 + (e.layers or 1)) * d)
            if head["weight"].shape != want:
                raise HubError(
                    f"{e.name}: {raw} holds a head of shape {head['weight'].shape}, expected "
                    f"{want} for {e.arch}"
                )
        write_file(head, conv)
        return
    try:
        cfg = _convert_backbone(raw, conv)
    except ValueError as err:
        raise HubError(f"{e.name}: {raw} ({e.resolved_url()}): {err}") from None
    if e.arch is not None and cfg.name != get_config(e.arch).name:
        shutil.rmtree(conv)
        raise HubError(
            f"{e.name}: {e.resolved_url()} holds a {cfg.name} backbone ({cfg.depth} blocks, dim "
            f"{cfg.embed_dim}, patch {cfg.patch_size}), not {e.arch}; the converted copy was "
            f"discarded (the download is kept at {raw})"
        )


_CONVERT_CHILD = """
import sys
from dinojax.convert.checkpoint import convert
try:
    convert(sys.argv[1], sys.argv[2])
except ValueError as e:
    print(" ".join(str(e).split()), file=sys.stderr)
    sys.exit(2)
"""


def _convert_backbone(raw: Path, conv: Path):
    """`dinojax.convert.checkpoint.convert(raw, conv)` -> its ViTConfig. With several JAX
    processes an orbax save is a collective, but here only one process per filesystem converts:
    it does so in a single-process child on the CPU (the parent holds the accelerators)."""
    import jax

    from dinojax.convert.checkpoint import convert, read_meta
    from dinojax.models.config import ViTConfig

    if jax.process_count() == 1:
        return convert(raw, conv)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    root = str(Path(__file__).resolve().parents[1])  # this dinojax, wherever it is imported from
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    r = subprocess.run(
        [sys.executable, "-c", _CONVERT_CHILD, str(raw), str(conv)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if r.returncode:
        lines = r.stderr.strip().splitlines() or [f"exit code {r.returncode}"]
        raise HubError(f"converting {raw} failed: {lines[-1]}")
    return ViTConfig.from_dict(read_meta(conv)["arch"])


def _fetch_hf(spec: str, *, progress: bool = True) -> Path:
    repo, _, revision = spec[3:].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise HubError(f"{spec!r}: expected hf:OWNER/REPO[@REVISION]")
    try:
        import huggingface_hub  # noqa: F401
        from huggingface_hub import errors as hf_errors
    except ImportError:
        raise HubError(f"{spec}: loading from Hugging Face needs huggingface_hub") from None

    root = cache_dir() / "models" / "hf" / repo.replace("/", "--")
    ref = root / f"{(revision or 'default').replace('/', '--')}.json"  # revision -> commit

    def work(may_download: bool) -> Path:
        from huggingface_hub import hf_hub_download

        offline = _offline() or not may_download
        raw = None
        for fname in ("model.safetensors", "pytorch_model.bin"):
            try:
                raw = Path(
                    hf_hub_download(
                        repo, fname, revision=revision or None, local_files_only=offline,
                        library_name="dinojax",
                    )
                )  # fmt: skip
                break
            except hf_errors.LocalEntryNotFoundError:
                continue
            except hf_errors.GatedRepoError:
                raise HubError(
                    f"{spec}: gated repository: accept its license on huggingface.co and set "
                    "HF_TOKEN (or run `hf auth login`)"
                ) from None
            except hf_errors.RemoteEntryNotFoundError:
                continue
            except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError) as err:
                raise HubError(f"{spec}: {_brief(err)}") from None
            except OSError as err:  # network failures that the HF cache could not cover
                raise HubError(f"{spec}: cannot download ({_brief(err)})") from None
        if raw is None and offline:
            # The raw file may be gone (or on another host's Hugging Face cache) while the
            # converted copy that a previous load recorded is still here.
            try:
                conv = root / json.loads(ref.read_text())["commit"]
            except (OSError, ValueError, KeyError, TypeError):
                conv = None
            if conv is not None and _is_converted(conv):
                return conv
        if raw is None:
            from huggingface_hub import constants

            how = "offline, and not in" if offline else "no model.safetensors or .bin in"
            raise HubError(
                f"{spec}: {how} the Hugging Face cache ({constants.HF_HUB_CACHE}); "
                f"https://huggingface.co/{repo}"
            )
        conv = root / raw.parent.name  # the repository commit: .../snapshots/<commit>/<file>
        if not _is_converted(conv):
            with _file_lock(root.with_name(root.name + ".lock"), spec):
                if not _is_converted(conv):
                    log.info("converting %s -> %s", raw, conv)
                    try:
                        _convert_backbone(raw, conv)
                    except ValueError as err:
                        raise HubError(f"{spec}: {err}") from None
        tmp = ref.with_name(f".{ref.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"commit": conv.name}) + "\n")
        os.replace(tmp, ref)
        return conv

    return _once_per_filesystem(spec, work)


def load(name: str, *, expect: str | None = None, **kwargs):
    """`name` -> a `DinoVisionTransformer` (kwargs as `dinojax.load`: `heads`, config overrides)
    or, for a linear head name, its `{"weight": (1000, in), "bias": (1000,)}` numpy arrays.
    `expect` ("backbone" or "linear_head") refuses the other kind before anything is fetched."""
    kind = "backbone" if name.startswith("hf:") else entry(name).kind
    if expect is not None and kind != expect:
        what = {"backbone": "a backbone", "linear_head": "a linear head"}
        raise HubError(f"{name} is {what[kind]}, not {what.get(expect, expect)}")
    path = fetch(name)
    if path.suffix == ".safetensors":
        if kwargs:
            raise HubError(f"{name} is a linear head: no options apply ({sorted(kwargs)})")
        from dinojax.eval.linear import load_linear_head

        return load_linear_head(path)
    from dinojax.convert.checkpoint import load as load_checkpoint

    return load_checkpoint(path, **kwargs)
