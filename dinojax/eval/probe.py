"""Linear probes on frozen features: a grid of heads trained jointly in ONE jitted loop.

Every combination of last-blocks in `n_blocks` x avgpool in `avgpool` x learning rate is one
linear head (facebookresearch/dinov2 `dinov2/eval/linear.py`: `setup_linear_classifiers`
builds the grid, `eval_linear` trains it); all of them are trained at once
(lax.scan over epochs and steps) with the official optimiser: SGD momentum 0.9, no weight decay,
learning rate `lr * batch / 256` with cosine annealing to 0 over all steps, cross-entropy summed
over heads, weights N(0, 0.01), bias 0. The best head on the test set is reported, as the
official code reports the best on its validation set. Inputs are the features `LinearInputs`
extracts (`dinojax.eval.linear_features.linear_input` builds each head's input); see
`dinojax.eval.linear` for the documented difference from the official recipe (features of center
crops, extracted once).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dinojax.eval.features import default_mesh
from dinojax.eval.linear_features import linear_input, pad_rows

__all__ = [
    "OFFICIAL_LEARNING_RATES",
    "batch_indices",
    "head_name",
    "init_probe_params",
    "train_linear_probe",
]

logger = logging.getLogger("dinojax.eval")

OFFICIAL_LEARNING_RATES = (
    1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1,
)  # fmt: skip
_HIGHEST = jax.lax.Precision.HIGHEST


def head_name(n_blocks: int, avgpool: bool, lr: float) -> str:
    """The official classifier name (with the batch-scaled lr)."""
    return f"classifier_{n_blocks}_blocks_avgpool_{avgpool}_lr_{lr:.5f}".replace(".", "_")


def _spec_key(n: int, avg: bool) -> str:
    return f"{n}_blocks_avgpool_{avg}"


def init_probe_params(
    key: jax.Array, specs: Sequence[tuple[int, bool]], n_lrs: int, dim: int, num_classes: int
) -> dict[str, dict[str, jax.Array]]:
    """{spec: {"w": (n_lrs, in, C) ~ N(0, 0.01), "b": zeros (n_lrs, C)}} (official init)."""
    specs = tuple((int(n), bool(a)) for n, a in specs)
    return _init_probe_params(key, specs, int(n_lrs), int(dim), int(num_classes))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _init_probe_params(key, specs, n_lrs, dim, num_classes):
    params = {}
    for i, (n, avg) in enumerate(specs):
        d_in = dim * (n + int(avg))
        w = 0.01 * jax.random.normal(jax.random.fold_in(key, i), (n_lrs, d_in, num_classes))
        params[_spec_key(n, avg)] = {"w": w, "b": jnp.zeros((n_lrs, num_classes), jnp.float32)}
    return params


def batch_indices(key: jax.Array, n: int, epoch: jax.Array, steps: int, batch: int) -> jax.Array:
    """(steps, batch) training rows of one epoch: a fresh permutation of the n rows, drop last."""
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), n)
    return perm[: steps * batch].reshape(steps, batch)


def _probe_loss(params, cls, avg, labels, specs):
    total = 0.0
    for n, avg_on in specs:
        p = params[_spec_key(n, avg_on)]
        x = linear_input(cls, avg, n, avg_on)
        logits = jnp.einsum("bi,lic->lbc", x, p["w"], precision=_HIGHEST) + p["b"][:, None]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels[None])
        total = total + jnp.sum(jnp.mean(ce, axis=1))  # sum over heads of each head's mean CE
    return total


@functools.partial(jax.jit, static_argnames=("specs", "n_train", "epochs", "steps", "batch"))
def _train(params, lrs, cls, avg, labels, key, *, specs, n_train, epochs, steps, batch):
    # torch SGD(momentum=0.9, dampening=0) + CosineAnnealingLR(eta_min=0): buf = 0.9 buf + g,
    # p -= lr_t buf with lr_t = lr (1 + cos(pi t / T)) / 2. optax.trace is that buffer; the
    # per-head lr multiplies the update (SGD is linear in lr).
    tx = optax.chain(
        optax.trace(decay=0.9),
        optax.scale_by_schedule(optax.cosine_decay_schedule(-1.0, epochs * steps)),
    )
    opt_state = tx.init(params)
    grad_fn = jax.value_and_grad(_probe_loss)

    def step(carry, idx):
        params, opt_state = carry
        loss, g = grad_fn(params, cls[idx], avg[idx], labels[idx], specs)
        updates, opt_state = tx.update(g, opt_state)
        updates = jax.tree.map(lambda u: u * lrs.reshape(-1, *([1] * (u.ndim - 1))), updates)
        return (optax.apply_updates(params, updates), opt_state), loss

    def epoch(carry, e):
        return jax.lax.scan(step, carry, batch_indices(key, n_train, e, steps, batch))

    (params, _), losses = jax.lax.scan(epoch, (params, opt_state), jnp.arange(epochs))
    return params, losses.reshape(-1)


@functools.partial(jax.jit, static_argnames=("specs",))
def _probe_correct(params, cls, avg, labels, valid, *, specs):
    out = {}
    for n, avg_on in specs:
        p = params[_spec_key(n, avg_on)]
        x = linear_input(cls, avg, n, avg_on)
        logits = jnp.einsum("bi,lic->lbc", x, p["w"], precision=_HIGHEST) + p["b"][:, None]
        top = min(5, logits.shape[-1])
        _, pred = jax.lax.top_k(logits, top)
        hit1 = (pred[..., 0] == labels[None]) & valid[None]
        hit5 = jnp.any(pred == labels[None, :, None], axis=-1) & valid[None]
        out[_spec_key(n, avg_on)] = (jnp.sum(hit1, axis=1), jnp.sum(hit5, axis=1))
    return out


def train_linear_probe(
    train: dict[str, np.ndarray],
    train_labels: np.ndarray,
    test: dict[str, np.ndarray],
    test_labels: np.ndarray,
    *,
    num_classes: int | None = None,
    n_blocks: Sequence[int] = (1, 4),
    avgpool: Sequence[bool] = (False, True),
    learning_rates: Sequence[float] = OFFICIAL_LEARNING_RATES,
    epochs: int = 10,
    batch_size: int = 128,
    scale_lr: bool = True,
    seed: int = 0,
    mesh: Mesh | None = None,
    init: dict | None = None,
) -> dict[str, Any]:
    """Train the grid of probes on features `{"cls": (N, n_max, D), "avgpool": (N, D)}` (as
    `LinearInputs` extracts them) and score them on the test features.

    Returns {"heads": {name: {"top1", "top5", "lr", "n_blocks", "avgpool"}}, "best": name,
    "top1", "top5", "weights": {name: {"weight": (C, in), "bias": (C,)}} (torch layout),
    "losses": (steps,) summed training loss}.
    """
    mesh = mesh or default_mesh()
    if (train_labels < 0).any() or (test_labels < 0).any():
        raise ValueError("linear probing needs labelled train and test sets (found label -1)")
    n_train, n_max, dim = train["cls"].shape
    specs = tuple((int(n), bool(a)) for n in sorted(set(n_blocks)) for a in sorted(set(avgpool)))
    if not specs or max(n for n, _ in specs) > n_max or min(n for n, _ in specs) < 1:
        raise ValueError(f"n_blocks {sorted(set(n_blocks))} must be in [1, {n_max}]")
    if not learning_rates or min(learning_rates) <= 0 or epochs <= 0 or batch_size <= 0:
        raise ValueError("learning rates, epochs and batch_size must be positive")
    batch = min(batch_size, n_train)
    if batch < batch_size:
        logger.warning(
            "linear: batch %d > %d training images, using %d", batch_size, n_train, batch
        )
    steps = n_train // batch
    # Official scale_lr: lr * (batch per GPU * GPUs) / 256 = lr * global batch / 256.
    lrs = np.asarray(learning_rates, np.float32) * (batch / 256.0 if scale_lr else 1.0)
    num_classes = int(num_classes or max(train_labels.max(), test_labels.max()) + 1)
    key = jax.random.key(seed)
    params = init or init_probe_params(
        jax.random.fold_in(key, 1), specs, len(lrs), dim, num_classes
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.device_put(params, replicated)
    (cls, avg, labels), _ = pad_rows(
        mesh, train["cls"], train["avgpool"], train_labels.astype(np.int32)
    )
    params, losses = _train(
        params, jax.device_put(lrs, replicated), cls, avg, labels, key, specs=specs,
        n_train=n_train, epochs=int(epochs), steps=steps, batch=batch,
    )  # fmt: skip
    (tcls, tavg, tlab), valid = pad_rows(
        mesh, test["cls"], test["avgpool"], test_labels.astype(np.int32)
    )
    correct = _probe_correct(params, tcls, tavg, tlab, valid, specs=specs)
    n_test = test["cls"].shape[0]
    heads, weights = {}, {}
    for n, avg_on in specs:
        key_ = _spec_key(n, avg_on)
        c1, c5 = (np.asarray(c) for c in correct[key_])
        p = jax.device_get(params[key_])
        for i, lr in enumerate(lrs):
            name = head_name(n, avg_on, float(lr))
            heads[name] = {
                "top1": 100.0 * float(c1[i]) / n_test, "top5": 100.0 * float(c5[i]) / n_test,
                "lr": float(lr), "n_blocks": n, "avgpool": avg_on,
            }  # fmt: skip
            weights[name] = {
                "weight": np.asarray(p["w"][i]).T.copy(),
                "bias": np.asarray(p["b"][i]),
            }
    best = max(heads, key=lambda k: (heads[k]["top1"], heads[k]["top5"]))
    return {
        "heads": heads, "best": best, "top1": heads[best]["top1"], "top5": heads[best]["top5"],
        "weights": weights, "losses": np.asarray(losses),
    }  # fmt: skip
