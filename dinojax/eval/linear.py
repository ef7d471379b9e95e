"""Linear evaluation: official feature recipe, a jointly trained grid of linear probes, and the
official released linear heads (facebookresearch/dinov2 `dinov2/eval/linear.py`,
`dinov2/hub/classifiers.py`; DINO v1: facebookresearch/dino `eval_linear.py`).

Feature recipe (`dinov2/eval/linear.py create_linear_input`, `linear_input` here, defined in
`dinojax.eval.linear_features`): the CLS tokens of the last `n` blocks, oldest first, optionally
followed by the mean patch token of the last block:
`[CLS_{L-n}, ..., CLS_{L-1} (, mean(patch_{L-1}))]`.

Released heads (`dinov2/hub/classifiers.py`): `linear` = Linear(2D, 1000) on
`[CLS, mean(patch)]`, `linear4` = Linear(5D, 1000) on `[CLS_{L-4}, ..., CLS_{L-1},
mean(patch_{L-1})]`, state dict keys `weight` (1000, in) and `bias` (1000,).

Probe training (`dinojax.eval.probe.train_linear_probe`, run by `linear_eval`): every
combination of last-blocks x avgpool x learning rate is one linear head, all trained at once in
ONE jitted loop with the official optimiser (SGD momentum 0.9, cosine, lr x batch / 256); the best
head on the test set is reported, as the official code reports the best on its validation set.

Difference from the official recipe, on purpose: features are extracted once from center crops
(the official eval transform) instead of recomputing the frozen backbone on randomly resized,
flipped crops at every step, and one epoch is one pass over the training set (the official
"epoch" is 1250 iterations of an infinite sampler). This makes the probe minutes instead of hours;
its accuracies are therefore not the official protocol's numbers (the gap was not measured here:
that needs ImageNet and pretrained weights).

Command line:

    python -m dinojax.eval.linear --checkpoint CKPT --train digits:train --test digits:test
    python -m dinojax.eval.linear --checkpoint CKPT --head dinov2_vits14_linear4_head.pth \
        --test folder:/data/imagenet/val
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dinojax.eval.features import LinearInputs, default_mesh, extract_features, resolve_source
from dinojax.eval.linear_features import linear_input, pad_rows
from dinojax.eval.probe import OFFICIAL_LEARNING_RATES, train_linear_probe
from dinojax.eval.transforms import EvalTransform

__all__ = [
    "apply_linear_head",
    "evaluate_linear_head",
    "HeadLayout",
    "head_input",
    "head_layout",
    "linear_eval",
    "linear_input",
    "load_linear_head",
    "save_linear_head",
]

_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------
# Feature recipe and released heads
# ---------------------------------------------------------------------------------------------


def load_linear_head(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A linear head file -> {"weight": (C, in), "bias": (C,)}, read safely (weights_only).

    Accepts the DINOv2 hub heads (`dinov2_*_linear[4]_head.pth`: keys weight, bias), heads
    written by `save_linear_head`, and DINO v1 linear-eval checkpoints
    (`{"state_dict": {"module.linear.weight", "module.linear.bias"}, ...}`).
    """
    from dinojax import hub
    from dinojax.convert.io import read_file

    if hub.is_name(path):  # a released head by name, e.g. dinov2_vits14_linear4_head
        return hub.load(path, expect="linear_head")
    sd = read_file(path)
    if isinstance(sd.get("state_dict"), Mapping):  # DINO v1 eval_linear.py checkpoint
        sd = sd["state_dict"]
    sd = {k.removeprefix("module.").removeprefix("linear."): v for k, v in sd.items()}
    if set(sd) != {"weight", "bias"}:
        raise ValueError(
            f"{path}: a linear head has exactly the keys weight and bias, got {sorted(sd)}"
        )
    w, b = np.asarray(sd["weight"], np.float32), np.asarray(sd["bias"], np.float32)
    if w.ndim != 2 or b.shape != (w.shape[0],):
        raise ValueError(f"{path}: weight {w.shape} and bias {b.shape} are not a Linear layer")
    return {"weight": w, "bias": b}


def save_linear_head(path: str | os.PathLike, weight: np.ndarray, bias: np.ndarray) -> None:
    """Write a head as the official `nn.Linear` state dict (.pth or .safetensors)."""
    from dinojax.convert.io import write_file

    write_file(
        {"weight": np.asarray(weight, np.float32), "bias": np.asarray(bias, np.float32)}, path
    )


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """What a linear head reads: the CLS of the last `n_blocks` blocks, plus the mean patch token
    if `avgpool`; `interleaved` is DINO v1's order `[cls_0, avg_0, cls_1, avg_1, ...]`
    (facebookresearch/dino `eval_linear.py` `train` / `validate_network` stack the CLS and the
    average on a new last axis, then flatten)."""

    n_blocks: int
    avgpool: bool = True
    interleaved: bool = False

    def __post_init__(self) -> None:
        if self.n_blocks < 1:
            raise ValueError(f"n_blocks must be positive, got {self.n_blocks}")
        if self.interleaved and (self.n_blocks != 1 or not self.avgpool):
            raise ValueError("the interleaved (DINO v1) layout is one block with avgpool")

    def input_dim(self, embed_dim: int) -> int:
        return embed_dim * (self.n_blocks + int(self.avgpool))


def head_layout(head: dict, cfg) -> HeadLayout:
    """The layout of a released head from its input size: DINOv2 `linear` (2D) / `linear4` (5D)
    `[CLS x n, mean(patch)]`; DINO v1 ViT-S (4D: last 4 CLS) / ViT-B (2D: 1 block + avgpool,
    interleaved)."""
    in_dim, d = head["weight"].shape[1], cfg.embed_dim
    if cfg.family == "dino":
        if in_dim == 4 * d:
            return HeadLayout(4, avgpool=False)
        if in_dim == 2 * d:
            return HeadLayout(1, avgpool=True, interleaved=True)
    elif in_dim % d == 0 and in_dim // d >= 2:
        return HeadLayout(in_dim // d - 1)
    raise ValueError(
        f"head input size {in_dim} does not fit this backbone (embed dim {d}, {cfg.family}): "
        "give the layout explicitly"
    )


def head_input(cls: jax.Array, avgpool: jax.Array, layout: HeadLayout) -> jax.Array:
    """The head's input from `LinearInputs` features, in the layout's order."""
    if layout.interleaved:
        x = jnp.stack([cls[:, -1].astype(jnp.float32), avgpool.astype(jnp.float32)], axis=-1)
        return x.reshape(cls.shape[0], -1)
    return linear_input(cls, avgpool, layout.n_blocks, layout.avgpool)


def _logits(x: jax.Array, head: dict) -> jax.Array:
    w = jnp.asarray(head["weight"], jnp.float32)
    return jnp.einsum("bi,ci->bc", x, w, precision=_HIGHEST) + jnp.asarray(head["bias"])


def apply_linear_head(model, x: jax.Array, head: dict, layout: HeadLayout | None = None):
    """Logits of a released (or saved) head on images `x` (B, H, W, 3); the layout is inferred
    from the head size when None (`head_layout`)."""
    layout = layout or head_layout(head, model.cfg)
    if layout.input_dim(model.cfg.embed_dim) != head["weight"].shape[1]:
        raise ValueError(
            f"head expects {head['weight'].shape[1]} inputs, the layout gives "
            f"{layout.input_dim(model.cfg.embed_dim)}"
        )
    graphdef, state = nnx.split(model)
    return _apply_head(graphdef, layout, state, head, x)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply_head(graphdef, layout, state, head, x):
    feats = LinearInputs(n_blocks=layout.n_blocks)(nnx.merge(graphdef, state), x)
    return _logits(head_input(feats["cls"], feats["avgpool"], layout), head)


@functools.partial(jax.jit, static_argnames=("layout",))
def _head_correct(head, cls, avg, labels, valid, *, layout):
    logits = _logits(head_input(cls, avg, layout), head)
    top = min(5, logits.shape[1])
    _, pred = jax.lax.top_k(logits, top)
    hit1 = (pred[:, 0] == labels) & valid
    hit5 = jnp.any(pred == labels[:, None], axis=1) & valid
    return jnp.sum(hit1), jnp.sum(hit5)


# ---------------------------------------------------------------------------------------------
# Whole evaluations from a model and datasets
# ---------------------------------------------------------------------------------------------


def _transform(image_size: int, resize_size: int | None) -> EvalTransform:
    if resize_size is None:
        return EvalTransform.for_crop(image_size)
    return EvalTransform(resize_size=resize_size, crop_size=image_size)


def _subset(n: int, limit: int | None, seed: int) -> np.ndarray | None:
    from dinojax.eval.knn import _subset as subset

    return subset(n, limit, seed)


def linear_eval(
    model,
    train_source,
    test_source,
    *,
    batch_size: int = 256,
    image_size: int = 224,
    resize_size: int | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    mesh: Mesh | None = None,
    progress: bool = True,
    data_dir: str | None = None,
    num_workers: int | None = None,
    **probe_kwargs: Any,
) -> dict[str, Any]:
    """Extract the linear-eval features of both sets (official eval transform) and run
    `train_linear_probe` (its keyword arguments pass through, `batch_size` here is the
    extraction batch; use `train_batch_size` for the probe)."""
    mesh = mesh or default_mesh()
    n_blocks = tuple(probe_kwargs.get("n_blocks", (1, 4)))
    seed = probe_kwargs.get("seed", 0)
    if "train_batch_size" in probe_kwargs:
        probe_kwargs["batch_size"] = probe_kwargs.pop("train_batch_size")
    train_src = resolve_source(train_source, data_dir, "train set")
    test_src = resolve_source(test_source, data_dir, "test set")
    fn = LinearInputs(n_blocks=max(n_blocks))
    common = dict(
        transform=_transform(image_size, resize_size), batch_size=batch_size, mesh=mesh,
        progress=progress, num_workers=num_workers,
    )  # fmt: skip
    train, train_labels = extract_features(
        model, train_src, fn, indices=_subset(len(train_src), max_train, seed),
        desc="linear train features", **common,
    )  # fmt: skip
    test, test_labels = extract_features(
        model, test_src, fn, indices=_subset(len(test_src), max_test, seed + 1),
        desc="linear test features", **common,
    )  # fmt: skip
    return train_linear_probe(train, train_labels, test, test_labels, mesh=mesh, **probe_kwargs)


def evaluate_linear_head(
    model,
    head: dict,
    source,
    *,
    layout: HeadLayout | None = None,
    batch_size: int = 256,
    image_size: int = 224,
    resize_size: int | None = None,
    max_items: int | None = None,
    mesh: Mesh | None = None,
    progress: bool = True,
    data_dir: str | None = None,
    num_workers: int | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 (%) of a linear head (e.g. the released `linear4`) on a labelled dataset."""
    mesh = mesh or default_mesh()
    layout = layout or head_layout(head, model.cfg)
    if layout.input_dim(model.cfg.embed_dim) != head["weight"].shape[1]:
        raise ValueError(
            f"head expects {head['weight'].shape[1]} inputs, the layout gives "
            f"{layout.input_dim(model.cfg.embed_dim)}"
        )
    src = resolve_source(source, data_dir, "test set")
    feats, labels = extract_features(
        model, src, LinearInputs(n_blocks=layout.n_blocks),
        transform=_transform(image_size, resize_size), batch_size=batch_size,
        indices=_subset(len(src), max_items, 1), mesh=mesh,
        progress=progress, desc="linear head", num_workers=num_workers,
    )  # fmt: skip
    if (labels < 0).any():
        raise ValueError("evaluating a head needs a labelled dataset (found label -1)")
    if labels.max() >= head["weight"].shape[0]:
        raise ValueError(
            f"labels go up to {labels.max()} but the head has {head['weight'].shape[0]} classes"
        )
    (cls, avg, lab), valid = pad_rows(mesh, feats["cls"], feats["avgpool"], labels.astype(np.int32))
    c1, c5 = _head_correct(jax.device_put(head, NamedSharding(mesh, PartitionSpec())), cls, avg,
                           lab, valid, layout=layout)  # fmt: skip
    total = labels.shape[0]
    return {"top1": 100.0 * float(c1) / total, "top5": 100.0 * float(c5) / total}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from dinojax.eval import cli

    p = argparse.ArgumentParser(
        prog="python -m dinojax.eval.linear",
        description="Linear probing of frozen features (grid of learning rates trained jointly), "
        "or evaluation of a released / saved linear head (--head).",
    )
    cli.add_model_args(p)
    p.add_argument("--train", help="training set (probe mode): digits:train, folder:DIR, tfds:...")
    p.add_argument("--test", required=True, help="labelled test set")
    p.add_argument("--head", help="evaluate this linear head (.pth, or a released head name such "
                   "as dinov2_vits14_linear4_head) instead of training probes")  # fmt: skip
    p.add_argument(
        "--head-blocks", type=int, default=None,
        help="layout of a saved head: last blocks (default: inferred from a released head's size)",
    )  # fmt: skip
    p.add_argument("--head-no-avgpool", action="store_true", help="saved head without avgpool")
    p.add_argument("--data-dir", default=None, help="TFDS data_dir")
    p.add_argument("--batch-size", type=int, default=256, help="feature-extraction batch")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--resize-size", type=int, default=None)
    p.add_argument("--n-blocks", type=int, nargs="+", default=[1, 4], help="CLS of last n blocks")
    p.add_argument("--avgpool", choices=["both", "yes", "no"], default="both",
                   help="heads with / without the mean patch token")  # fmt: skip
    p.add_argument("--lrs", type=float, nargs="+", default=list(OFFICIAL_LEARNING_RATES),
                   help="learning rates (x batch/256); default: the official 13")  # fmt: skip
    p.add_argument("--epochs", type=int, default=10, help="passes over the training features")
    p.add_argument("--train-batch-size", type=int, default=128, help="probe training batch")
    p.add_argument("--max-train", type=int, default=None, help="random subset of the train set")
    p.add_argument("--max-test", type=int, default=None, help="random subset of the test set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-head", default=None, help="write the best head here (.pth)")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from dinojax.eval import cli

    args = _parser().parse_args(argv)

    def run():
        # Bad input fails before the model is loaded and compiled.
        progress = not args.no_progress
        test = resolve_source(args.test, args.data_dir, "test set")
        if args.head:
            head = load_linear_head(args.head)
            layout = None
            if args.head_blocks is not None:
                layout = HeadLayout(args.head_blocks, avgpool=not args.head_no_avgpool)
            model = cli.load_model(args)
            res = evaluate_linear_head(
                model, head, test, layout=layout, batch_size=args.batch_size,
                image_size=args.image_size, resize_size=args.resize_size,
                max_items=args.max_test, progress=progress, data_dir=args.data_dir,
            )  # fmt: skip
            print(f"head {args.head}: top-1 {res['top1']:.2f}   top-5 {res['top5']:.2f}")
            if args.output:
                cli.write_json(args.output, {"head": res, "args": vars(args)})
            return 0
        if not args.train:
            raise ValueError("give --train (probe training) or --head (evaluate a head)")
        train = resolve_source(args.train, args.data_dir, "train set")
        avgpool = {"both": (False, True), "yes": (True,), "no": (False,)}[args.avgpool]
        model = cli.load_model(args)
        res = linear_eval(
            model, train, test, batch_size=args.batch_size, image_size=args.image_size,
            resize_size=args.resize_size, max_train=args.max_train, max_test=args.max_test,
            progress=progress, data_dir=args.data_dir, n_blocks=args.n_blocks, avgpool=avgpool,
            learning_rates=args.lrs, epochs=args.epochs, train_batch_size=args.train_batch_size,
            seed=args.seed,
        )  # fmt: skip
        for name, h in sorted(res["heads"].items(), key=lambda kv: -kv[1]["top1"])[:5]:
            print(f"{name:55s} top-1 {h['top1']:6.2f}   top-5 {h['top5']:6.2f}")
        print(f"best: {res['best']}: top-1 {res['top1']:.2f}   top-5 {res['top5']:.2f}")
        if args.save_head:
            save_linear_head(args.save_head, **res["weights"][res["best"]])
            h = res["heads"][res["best"]]
            flags = f"--head-blocks {h['n_blocks']}" + (
                "" if h["avgpool"] else " --head-no-avgpool"
            )
            print(f"wrote {args.save_head} (evaluate it with --head {args.save_head} {flags})")
        if args.output:
            out = {k: v for k, v in res.items() if k not in ("weights", "losses")}
            cli.write_json(args.output, {"linear": out, "args": vars(args)})
        return 0

    return cli.run_main(run)


if __name__ == "__main__":
    raise SystemExit(main())
