"""Shared command-line pieces of the eval tools: model arguments, loading, one-line errors."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["add_model_args", "load_model", "parse_overrides", "run_main", "write_json"]


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--checkpoint",
        help="dinojax checkpoint directory (convert_weights.py output or a training export); an "
        "official .pth / .safetensors backbone file is converted in memory; a model name "
        "(dinov2_vitb14_reg, dino_vits16, hf:facebook/dinov2-base) is downloaded and cached",
    )
    g.add_argument("--arch", help="architecture name (with --random, or for an ambiguous .pth)")
    g.add_argument("--random", action="store_true", help="random weights for --arch (smoke tests)")
    g.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE",
        help="ViTConfig field override, e.g. depth=2 or dtype=bfloat16 (repeatable)",
    )  # fmt: skip
    g.add_argument("--seed-model", type=int, default=0, help="seed of the --random weights")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--override expects KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare string such as dtype=bfloat16
        out[key] = value
    return out


def _check_override_types(overrides: dict[str, Any]) -> None:
    import dataclasses

    from dinojax.models.config import ViTConfig

    defaults = {f.name: f.default for f in dataclasses.fields(ViTConfig)}
    for key, value in overrides.items():
        if key not in defaults:
            raise ValueError(f"--override {key}: unknown ViTConfig field")
        d = defaults[key]
        ok = (
            d is None
            or value is None
            or (isinstance(d, bool) and isinstance(value, bool))
            or (type(d) is int and type(value) is int)
            or (isinstance(d, float) and type(value) in (int, float))
            or (isinstance(d, str) and isinstance(value, str))
        )
        if not ok:
            raise ValueError(f"--override {key}={value!r}: expected {type(d).__name__}")


def load_model(args: argparse.Namespace):
    """The backbone named by --checkpoint, or --arch --random."""
    overrides = parse_overrides(args.override)
    _check_override_types(overrides)
    if args.random:
        if not args.arch:
            raise ValueError("--random needs --arch NAME (e.g. dinov2_vits14)")
        if args.checkpoint:
            raise ValueError("give either --checkpoint or --arch NAME --random, not both")
        from dinojax.models import create_model

        return create_model(args.arch, seed=args.seed_model, **overrides)
    if not args.checkpoint:
        raise ValueError("give --checkpoint DIR (or --arch NAME --random)")
    return load_checkpoint(args.checkpoint, arch=args.arch, **overrides)


def load_checkpoint(path: str | os.PathLike, *, arch: str | None = None, **overrides):
    from dinojax import hub

    if hub.is_name(str(path)):
        if arch:
            raise ValueError(f"--arch does not apply to the model name {path} (its own arch)")
        return hub.load(str(path), expect="backbone", **overrides)
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        import dinojax

        return dinojax.load(path, **overrides)
    # An official file: convert in memory with the converter's strict checks.
    import jax.numpy as jnp

    from dinojax.convert.backbone import detect_config, from_official
    from dinojax.convert.checkpoint import split_checkpoint
    from dinojax.convert.io import read_file
    from dinojax.eval.features import model_from_params

    _, backbone, _, _ = split_checkpoint(read_file(path))
    cfg = detect_config(backbone, arch)
    if overrides:
        cfg = cfg.replace(**overrides)
    params = from_official(backbone, cfg)
    import jax

    return model_from_params(cfg, jax.tree.map(jnp.asarray, params))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def run_main(fn: Callable[[], int]) -> int:
    """Run a command: bad input (ValueError, including converter errors) and OS errors become one
    `error:` line on stderr and exit code 2, never a traceback."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return fn()
    except (ValueError, OSError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
