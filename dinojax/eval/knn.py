"""k-NN classification of frozen features with the official DINOv2 protocol (`dinov2/eval/knn.py`).

Features: the final-norm CLS token (`model(x)`), L2-normalised, of images under the official eval
transform (resize 256 bicubic, center crop 224). Similarity: cosine (dot product of normalised
features). For every test image the 200 (= max k) most similar training images are found; their
weights are `softmax(top_sims / T)` with T = 0.07 over those 200; the score of a class for a given
k is the sum of the weights of the first k neighbours with that label; top-1 / top-5 accuracy
(micro average). `dinov2/eval/knn.py` (KnnModule) computes exactly this; the tests compare with it.

Sharding: the test rows are sharded over the devices, the training features are replicated and
scanned in chunks, keeping a running top-k, so memory is O(test rows x chunk) per device.

Command line:

    python -m dinojax.eval.knn --checkpoint CKPT --train digits:train --test digits:test
    python -m dinojax.eval.knn --arch dinov2_vits14 --random --train folder:/data/train \
        --test folder:/data/val --batch-size 256
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dinojax.eval.features import (
    Cls,
    batch_sharding,
    default_mesh,
    extract_features,
    resolve_source,
)
from dinojax.eval.transforms import EvalTransform

__all__ = ["knn_accuracy", "knn_classify", "knn_eval", "main"]

logger = logging.getLogger("dinojax.eval")

DEFAULT_KS = (10, 20, 100, 200)


def _check_ks(ks: Sequence[int], n_train: int) -> tuple[int, ...]:
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] <= 0:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if ks[-1] > n_train:
        raise ValueError(f"k={ks[-1]} needs at least {ks[-1]} training features, got {n_train}")
    return ks


@functools.partial(jax.jit, static_argnames=("max_k", "chunk", "precision"))
def _top_k_neighbours(train, test, *, max_k: int, chunk: int, precision: str):
    """(sims, indices) of the `max_k` most similar training rows for every test row, sorted."""
    n, d = train.shape
    if chunk >= n:
        sims = jnp.einsum("nd,md->nm", test, train, precision=precision)
        return jax.lax.top_k(sims, max_k)
    n_chunks = -(-n // chunk)
    train = jnp.pad(train, ((0, n_chunks * chunk - n), (0, 0))).reshape(n_chunks, chunk, d)
    offsets = jnp.arange(n_chunks, dtype=jnp.int32) * chunk
    init = (
        jnp.full((test.shape[0], max_k), -jnp.inf, jnp.float32),
        jnp.zeros((test.shape[0], max_k), jnp.int32),
    )

    def body(carry, block):
        vals, idx = carry
        rows, start = block
        sims = jnp.einsum("nd,md->nm", test, rows, precision=precision).astype(jnp.float32)
        cols = start + jnp.arange(chunk, dtype=jnp.int32)
        sims = jnp.where(cols[None] < n, sims, -jnp.inf)  # padding rows never win
        # The running best come first, so equal similarities keep the earlier training row.
        all_vals = jnp.concatenate([vals, sims], axis=1)
        all_idx = jnp.concatenate([idx, jnp.broadcast_to(cols, sims.shape)], axis=1)
        vals, pos = jax.lax.top_k(all_vals, max_k)
        return (vals, jnp.take_along_axis(all_idx, pos, axis=1)), None

    (vals, idx), _ = jax.lax.scan(body, init, (train, offsets))
    return vals, idx


@functools.partial(jax.jit, static_argnames=("num_classes", "ks", "temperature"))
def _vote(top_sims, neighbour_labels, *, num_classes: int, ks: tuple[int, ...], temperature: float):
    weights = jax.nn.softmax(top_sims.astype(jnp.float32) / temperature, axis=1)

    def add(j, acc):
        w = jax.lax.dynamic_slice_in_dim(weights, j, 1, axis=1)
        lab = jax.lax.dynamic_index_in_dim(neighbour_labels, j, axis=1, keepdims=False)
        return acc + w * jax.nn.one_hot(lab, num_classes, dtype=jnp.float32)

    scores, acc, prev = {}, jnp.zeros((top_sims.shape[0], num_classes), jnp.float32), 0
    for k in ks:  # sorted: each k continues the running sum of the previous one
        acc = jax.lax.fori_loop(prev, k, add, acc)
        scores[k], prev = acc, k
    return scores


def knn_classify(
    train_feats,
    train_labels,
    test_feats,
    num_classes: int,
    ks: Sequence[int] = DEFAULT_KS,
    T: float = 0.07,
    *,
    train_chunk: int = 8192,
    precision: str = "highest",
) -> dict[int, jax.Array]:
    """Class scores {k: (N_test, num_classes)} of the weighted k-NN vote (official protocol).

    Features must already be L2-normalised. Jittable (shapes and the static arguments decide
    everything); the test rows keep the sharding of `test_feats`, the training features are
    scanned `train_chunk` rows at a time. `precision` is the matmul precision of the
    similarities ("highest" = float32 on every backend, so the neighbour ranking is exact).
    """
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"features must be (N, D) with the same D, got train {train_feats.shape} and "
            f"test {test_feats.shape}"
        )
    if train_labels.shape != (train_feats.shape[0],):
        raise ValueError(
            f"train_labels must have shape ({train_feats.shape[0]},), got {train_labels.shape}"
        )
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    ks = _check_ks(ks, train_feats.shape[0])
    sims, idx = _top_k_neighbours(
        train_feats, test_feats, max_k=ks[-1], chunk=int(train_chunk), precision=precision
    )
    labels = jnp.asarray(train_labels, jnp.int32)[idx]
    return _vote(sims, labels, num_classes=int(num_classes), ks=ks, temperature=float(T))


@functools.partial(jax.jit, static_argnames=("top",))
def _correct(scores, labels, valid, *, top: int):
    _, pred = jax.lax.top_k(scores, top)
    hit = jnp.any(pred == labels[:, None], axis=1) & valid
    return jnp.sum(hit, dtype=jnp.int32)


def knn_accuracy(scores: dict[int, jax.Array], labels, valid=None) -> dict[str, dict[int, float]]:
    """{"top1": {k: %}, "top5": {k: %}} from `knn_classify` scores; `valid` masks padding rows.
    Top-5 becomes top-min(5, num_classes); ties go to the lower class index."""
    labels = jnp.asarray(labels, jnp.int32)
    valid = jnp.ones(labels.shape, bool) if valid is None else jnp.asarray(valid, bool)
    n = int(jnp.sum(valid))
    if n == 0:
        raise ValueError("no test rows to score")
    out: dict[str, dict[int, float]] = {"top1": {}, "top5": {}}
    for k, s in scores.items():
        for name, top in (("top1", 1), ("top5", min(5, s.shape[1]))):
            out[name][k] = 100.0 * float(_correct(s, labels, valid, top=top)) / n
    return out


def _subset(n: int, limit: int | None, seed: int) -> np.ndarray | None:
    # A seeded random subset, not the first `limit` records: folder sources are sorted by class.
    if limit is None or limit >= n:
        return None
    if limit <= 0:
        raise ValueError(f"subset size must be positive, got {limit}")
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def knn_eval(
    model,
    train_source,
    test_source,
    *,
    batch_size: int,
    image_size: int = 224,
    resize_size: int | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    mesh: Mesh | None = None,
    seed: int = 0,
    train_chunk: int = 8192,
    progress: bool = True,
    data_dir: str | None = None,
    num_workers: int | None = None,
) -> dict[str, dict[int, float]]:
    """Official k-NN evaluation of `model` (any module whose `model(x)` is the final-norm CLS,
    e.g. a `DinoVisionTransformer`; see `features.model_from_params` for a parameter dict).

    Sources are anything `make_source` accepts. The transform is the official eval transform at
    crop `image_size` (resize `resize_size`, default 256/224 x crop). `max_train` / `max_test`
    evaluate on seeded random subsets. ks larger than the training set are left out (logged).
    Returns {"top1": {k: accuracy %}, "top5": {k: accuracy %}}.
    """
    mesh = mesh or default_mesh()
    train_src = resolve_source(train_source, data_dir, "train set")
    test_src = resolve_source(test_source, data_dir, "test set")
    transform = (
        EvalTransform.for_crop(image_size)
        if resize_size is None
        else EvalTransform(resize_size=resize_size, crop_size=image_size)
    )
    common = dict(
        transform=transform, batch_size=batch_size, mesh=mesh, progress=progress,
        num_workers=num_workers,
    )  # fmt: skip
    train, train_labels = extract_features(
        model, train_src, Cls(normalize=True), indices=_subset(len(train_src), max_train, seed),
        desc="kNN train features", **common,
    )  # fmt: skip
    test, test_labels = extract_features(
        model, test_src, Cls(normalize=True), indices=_subset(len(test_src), max_test, seed + 1),
        desc="kNN test features", **common,
    )  # fmt: skip
    if (train_labels < 0).any() or (test_labels < 0).any():
        raise ValueError("k-NN evaluation needs labelled train and test sets (found label -1)")
    n_train = train["cls"].shape[0]
    usable = tuple(k for k in sorted(set(ks)) if k <= n_train)
    if len(usable) < len(set(ks)):
        logger.warning("kNN: k > %d training images left out: %s", n_train, sorted(set(ks)))
    if not usable:
        raise ValueError(f"every k in {sorted(set(ks))} exceeds the {n_train} training images")
    num_classes = int(num_classes or train_labels.max() + 1)  # official: train_labels.max() + 1
    # Test rows padded to a multiple of the device count and sharded; training rows replicated.
    sharding = batch_sharding(mesh)
    n_shards = math.prod(mesh.shape[a] for a in mesh.axis_names)
    n_test = test["cls"].shape[0]
    pad = -(-n_test // n_shards) * n_shards - n_test
    test_p = jax.device_put(np.pad(test["cls"], ((0, pad), (0, 0))), sharding)
    labels_p = jax.device_put(np.pad(test_labels, (0, pad)).astype(np.int32), sharding)
    valid = jax.device_put(np.arange(n_test + pad) < n_test, sharding)
    replicated = NamedSharding(mesh, PartitionSpec())
    scores = knn_classify(
        jax.device_put(train["cls"], replicated),
        jax.device_put(train_labels.astype(np.int32), replicated),
        test_p, num_classes, usable, temperature, train_chunk=train_chunk,
    )  # fmt: skip
    return knn_accuracy(scores, labels_p, valid)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from dinojax.eval import cli

    p = argparse.ArgumentParser(
        prog="python -m dinojax.eval.knn",
        description="k-NN classification accuracy of frozen features (official DINOv2 protocol).",
    )
    cli.add_model_args(p)
    p.add_argument(
        "--train", required=True, help="training set: digits:train, folder:DIR, tfds:NAME:SPLIT"
    )
    p.add_argument("--test", required=True, help="test set (same forms as --train)")
    p.add_argument("--data-dir", default=None, help="TFDS data_dir")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224, help="center-crop size (default 224)")
    p.add_argument(
        "--resize-size",
        type=int,
        default=None,
        help="shorter side before the crop (default 256/224 x crop)",
    )
    p.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS))
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--max-train", type=int, default=None, help="random subset of the training set")
    p.add_argument("--max-test", type=int, default=None, help="random subset of the test set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from dinojax.eval import cli

    args = _parser().parse_args(argv)

    def run():
        # Bad data fails before the model is loaded and compiled.
        train = resolve_source(args.train, args.data_dir, "train set")
        test = resolve_source(args.test, args.data_dir, "test set")
        model = cli.load_model(args)
        res = knn_eval(
            model, train, test, batch_size=args.batch_size, image_size=args.image_size,
            resize_size=args.resize_size, max_train=args.max_train, max_test=args.max_test,
            ks=args.ks, temperature=args.temperature, seed=args.seed,
            progress=not args.no_progress, data_dir=args.data_dir,
        )  # fmt: skip
        for k in sorted(res["top1"]):
            print(f"k={k:<4d} top-1 {res['top1'][k]:6.2f}   top-5 {res['top5'][k]:6.2f}")
        if args.output:
            cli.write_json(args.output, {"knn": res, "args": vars(args)})
        return 0

    return cli.run_main(run)


if __name__ == "__main__":
    raise SystemExit(main())
