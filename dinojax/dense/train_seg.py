"""Training a linear segmentation head on frozen DINOv2 features in JAX, the official protocol
(the hosted `{m}_ade20k_linear_config.py` / `_voc2012_` configs, mmseg 0.27 with mmcv 1.5):

- data: `seg_augment.SegTrainTransform` (random resize ratio 0.5-2.0 of (2048, 512), random crop
  512 with cat_max_ratio 0.75, flip, `PhotoMetricDistortion`, pad with label 255), batches drawn
  at random (mmseg's infinite sampler);
- model: frozen backbone -> `seg_features` (final norm, `layers`) -> `BNHead` in training mode
  (SyncBatchNorm: batch statistics over the global batch, running statistics with momentum 0.1
  and the unbiased variance) -> logits resized to the crop (`BaseDecodeHead.losses`);
- loss: cross-entropy with ignore index 255, averaged over ALL pixels of the batch (mmseg 0.27
  `CrossEntropyLoss(avg_non_ignore=False)`, the default the notebook warns about;
  `avg_non_ignore=True` averages over labelled pixels);
- optimiser: AdamW lr 1e-3, betas (0.9, 0.999), weight decay 1e-4 on every head parameter;
  schedule mmcv `PolyLrUpdaterHook(power=1, min_lr=0, warmup="linear", warmup_iters=1500,
  warmup_ratio=1e-6)`; 40000 iterations of batch 16 (8 GPUs x 2);
- evaluation: slide inference (crop 512, stride 341) after the test pipeline's keep-ratio resize
  to (2048, 512), scores resized back to the label, mIoU / aAcc (`seg_metrics`).

Sources: any object with `__len__` and `__getitem__(i) -> (image uint8 (H, W, 3), label uint8
(H, W))`, 255 = ignore; `.name(i)` (if present) names a sample in errors. The trained head is a
head directory (`dinojax.convert.dense`) that `load_segmenter` loads and `convert_weights.py`
exports to the official `.pth`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from dinojax.dense.common import center_pad, load_backbone, resize_bilinear
from dinojax.dense.seg_augment import SegTrainTransform
from dinojax.dense.seg_metrics import SegMetrics
from dinojax.dense.segment import BNHead, Segmenter, global_array, seg_features

__all__ = [
    "SegTrainConfig",
    "check_sample",
    "evaluate_segmentation",
    "poly_warmup_lr",
    "seg_loss",
    "train_seg_head",
]

BN_MOMENTUM = 0.1


@dataclasses.dataclass(frozen=True)
class SegTrainConfig:
    """Every knob of the protocol; the defaults are the official linear-head values."""

    iters: int = 40000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 1.0
    min_lr: float = 0.0
    crop_size: int = 512
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    layers: tuple[int, ...] | None = None  # None: the last block (a "linear" head)
    ignore_index: int = 255
    avg_non_ignore: bool = False
    eval_every: int = 0  # 0: evaluate at the end only
    eval_mode: str = "slide"
    eval_crop_size: int = 512
    eval_stride: int = 341
    eval_resize: tuple[int, int] | None = (2048, 512)
    checkpoint_every: int = 0  # 0: write the head at the end only
    log_every: int = 50
    seed: int = 0

    def __post_init__(self):
        # Lists (JSON, argparse) become tuples: the config is a static argument of the jitted step.
        for name in ("betas", "scale", "ratio_range", "layers", "eval_resize"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        for name in ("iters", "batch_size", "crop_size", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.warmup_iters:
            raise ValueError(f"warmup_iters must be >= 0, got {self.warmup_iters}")
        if self.eval_mode not in ("whole", "slide"):
            raise ValueError(f"eval_mode must be 'whole' or 'slide', got {self.eval_mode!r}")


def poly_warmup_lr(step, cfg: SegTrainConfig):
    """mmcv `PolyLrUpdaterHook` with linear warm-up, at 0-based iteration `step` (jittable)."""
    step = jnp.asarray(step, jnp.float32)
    regular = (cfg.lr - cfg.min_lr) * (1 - step / cfg.iters) ** cfg.power + cfg.min_lr
    if cfg.warmup_iters == 0:
        return regular
    # mmcv: regular * (1 - k), k = (1 - step / warmup) (1 - ratio); 1 - k written as
    # ratio + (step / warmup)(1 - ratio), the same number without float32 cancellation near 0.
    one_minus_k = cfg.warmup_ratio + (step / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
    return jnp.where(step < cfg.warmup_iters, regular * one_minus_k, regular)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _name(source, i: int) -> str:
    name = getattr(source, "name", None)
    return f"sample {i} ({name(i)})" if callable(name) else f"sample {i}"


def check_sample(source, i: int, num_classes: int, ignore_index: int = 255):
    """`source[i]` checked against the data contract -> (image, label)."""
    item = source[i]
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ValueError(f"{_name(source, i)}: a segmentation source returns (image, label), got "
                         f"{type(item).__name__}")  # fmt: skip
    image, label = np.asarray(item[0]), np.asarray(item[1])
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{_name(source, i)}: image must be uint8 (H, W, 3), got {image.dtype} "
                         f"{image.shape}")  # fmt: skip
    if label.shape != image.shape[:2] or label.dtype != np.uint8:
        raise ValueError(f"{_name(source, i)}: label must be uint8 {image.shape[:2]}, got "
                         f"{label.dtype} {label.shape}")  # fmt: skip
    bad = np.unique(label[(label >= num_classes) & (label != ignore_index)])
    if bad.size:
        raise ValueError(
            f"{_name(source, i)}: label values {bad[:5].tolist()} are >= the "
            f"{num_classes} classes (and not the ignore index {ignore_index})"
        )
    return image, label


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------


def batch_norm_train(bn: dict, x: jax.Array, eps: float):
    """SyncBatchNorm in training mode over (B, h, w): normalised output and the new running
    statistics (momentum 0.1, unbiased variance, as torch)."""
    n = x.shape[0] * x.shape[1] * x.shape[2]
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
    y = (x - mean) * jax.lax.rsqrt(var + eps) * bn["weight"] + bn["bias"]
    m = BN_MOMENTUM
    stats = {
        "running_mean": (1 - m) * bn["running_mean"] + m * jax.lax.stop_gradient(mean),
        "running_var": (1 - m) * bn["running_var"]
        + m * jax.lax.stop_gradient(var) * (n / max(n - 1, 1)),
    }
    return y, stats


def seg_loss(logits: jax.Array, labels: jax.Array, ignore_index: int = 255,
             avg_non_ignore: bool = False) -> jax.Array:  # fmt: skip
    """mmseg 0.27 `cross_entropy` (reduction "mean"): per-pixel CE, 0 at ignored pixels, averaged
    over all pixels (or over the labelled ones with `avg_non_ignore`)."""
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    ce = jnp.where(valid, ce, 0.0)
    denom = jnp.maximum(jnp.sum(valid), 1) if avg_non_ignore else ce.size
    return jnp.sum(ce) / denom


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(5, 6))
def _train_step(graphdef, layers, cfg: SegTrainConfig, tx, state, params, opt_state, stats, x,
                labels, eps):  # fmt: skip
    model = nnx.merge(graphdef, state)
    feats = jax.lax.stop_gradient(seg_features(model, center_pad(x, model.cfg.patch_size), layers))

    def loss_fn(p):
        bn = {**p["bn"], **stats}
        y, new_stats = batch_norm_train(bn, feats, eps)
        k = p["conv_seg"]
        logits = jnp.einsum("bhwc,ck->bhwk", y, k["kernel"]) + k["bias"]
        logits = resize_bilinear(logits, labels.shape[1:3])
        return seg_loss(logits, labels, cfg.ignore_index, cfg.avg_non_ignore), new_stats

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, new_stats, loss


def _split_head(tree: dict) -> tuple[dict, dict]:
    params = {"bn": {k: tree["bn"][k] for k in ("weight", "bias")}, "conv_seg": tree["conv_seg"]}
    stats = {k: tree["bn"][k] for k in ("running_mean", "running_var")}
    return params, stats


def _join_head(params: dict, stats: dict) -> dict:
    return {"bn": {**params["bn"], **stats}, "conv_seg": params["conv_seg"]}


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def evaluate_segmentation(
    segmenter: Segmenter,
    source,
    *,
    mode: str = "slide",
    crop_size: int | None = None,
    stride: int | None = None,
    resize: tuple[int, int] | None = (2048, 512),
    batch_size: int = 8,
    max_items: int | None = None,
    ignore_index: int = 255,
    progress: bool = True,
    **predict_kw: Any,
) -> dict:
    """mIoU / aAcc / per-class IoU of a segmenter over a labelled source (consecutive images of
    the same size run as one batch). `mode` "ms" runs the test-time augmentation; crop_size /
    stride default to `Segmenter.predict`'s (512 / 341; ms 640 / 426)."""
    from tqdm.auto import tqdm

    n = len(source) if max_items is None else min(max_items, len(source))
    if n == 0:
        raise ValueError("evaluation source is empty")
    k = segmenter.num_classes
    metrics = SegMetrics(k, ignore_index, segmenter.class_names)
    kw = dict(mode=mode, crop_size=crop_size, stride=stride, batch_size=batch_size, **predict_kw)
    if mode != "ms":
        kw["resize"] = resize
    pending: list[tuple[np.ndarray, np.ndarray]] = []

    def flush():
        if pending:
            pred = segmenter.segment(np.stack([im for im, _ in pending]), **kw)
            for p, (_, lab) in zip(pred, pending):
                metrics.update(p, lab)
            pending.clear()

    with tqdm(total=n, desc="seg eval", unit="img", disable=not progress) as bar:
        for i in range(n):
            image, label = check_sample(source, i, k, ignore_index)
            if pending and (image.shape != pending[0][0].shape or len(pending) >= batch_size):
                flush()
            pending.append((image, label))
            bar.update(1)
        flush()
    return metrics.compute()


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _jsonable(cfg: SegTrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists, as read back


def _log(path: Path | None, record: dict) -> None:
    if path is not None:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def train_seg_head(
    backbone,
    train_source,
    num_classes: int,
    *,
    val_source=None,
    output_dir: str | os.PathLike | None = None,
    class_names: Sequence[str] | None = None,
    mesh: Mesh | None = None,
    progress: bool = True,
    num_workers: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    **config: Any,
) -> dict:
    """Train a linear segmentation head on the frozen `backbone` (a model, checkpoint
    directory, hub name or official file) over `train_source`; `config` overrides any
    `SegTrainConfig` field (defaults = the official protocol).

    Writes to `output_dir` (if given): `head/` (head directory, loadable by `load_segmenter`,
    exportable with `convert_weights.py`) and `train_state/` (optimiser state, for `resume`)
    every `checkpoint_every` steps and at the end, `metrics.jsonl` (loss / lr every `log_every`
    steps, evaluations), `results.json`. `resume=True` continues from `train_state/` with the
    same configuration; batches depend on (seed, step) only, so a resumed run equals an
    uninterrupted one. Returns {"head", "head_cfg", "losses", "eval", "output_dir"}.
    """
    from tqdm.auto import tqdm

    from dinojax.convert import dense, dense_seg
    from dinojax.eval.features import _place_state, batch_sharding, default_mesh

    cfg = SegTrainConfig(**config)
    if num_classes <= 0 or num_classes > 255:
        raise ValueError(f"num_classes must be in [1, 255] (uint8 labels), got {num_classes}")
    if len(train_source) == 0:
        raise ValueError("the training source is empty")
    out = Path(output_dir) if output_dir is not None else None
    if resume and (out is None or not (out / "train_state").is_dir()):
        raise ValueError(f"nothing to resume: no {out}/train_state (written every "
                         "checkpoint_every steps)")  # fmt: skip
    if out is not None and not resume:
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise ValueError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("")
    log_path = out / "metrics.jsonl" if out is not None else None
    # Fail on bad data before compiling anything.
    check_sample(train_source, 0, num_classes, cfg.ignore_index)

    model = load_backbone(backbone)
    mcfg = model.cfg
    layers = tuple(cfg.layers) if cfg.layers is not None else (mcfg.depth - 1,)
    if min(layers) < 0 or max(layers) >= mcfg.depth:
        raise ValueError(f"layers {list(layers)} out of range for a backbone of depth {mcfg.depth}")
    kind = "linear" if len(layers) == 1 else "ms"
    c = mcfg.embed_dim * len(layers)
    head_cfg = dense_seg.head_config(
        kind, c, num_classes, list(layers), embed_dim=mcfg.embed_dim,
        backbone=mcfg.name if mcfg.name != "custom" else None,
        class_names=list(class_names) if class_names else None,
    )  # fmt: skip

    mesh = mesh or default_mesh()
    sharding = batch_sharding(mesh)
    n_dev = math.prod(mesh.shape.values())
    gb = -(-cfg.batch_size // n_dev) * n_dev  # whole batches only: padding would bias BN stats
    graphdef, state = nnx.split(model)
    state = _place_state(state, mesh)
    head = BNHead(c, num_classes, rngs=nnx.Rngs(params=cfg.seed))
    params, stats = _split_head(_place_state(head.tree(), mesh))
    tx = optax.adamw(functools.partial(poly_warmup_lr, cfg=cfg), b1=cfg.betas[0],
                     b2=cfg.betas[1], eps=1e-8, weight_decay=cfg.weight_decay)  # fmt: skip
    opt_state = tx.init(params)
    transform = SegTrainTransform(
        crop_size=cfg.crop_size, scale=tuple(cfg.scale), ratio_range=tuple(cfg.ratio_range),
        cat_max_ratio=cfg.cat_max_ratio, flip_prob=cfg.flip_prob, photometric=cfg.photometric,
        ignore_index=cfg.ignore_index,
    )  # fmt: skip
    n_src = len(train_source)

    def sample(args):
        idx, seed = args
        image, label = check_sample(train_source, int(idx), num_classes, cfg.ignore_index)
        return transform(image, label, np.random.default_rng(seed))

    def load_batch(pool, step):
        # Everything random in a batch comes from (seed, step): a resumed run draws the same.
        idx = np.random.default_rng([cfg.seed, step, 1]).integers(0, n_src, gb)
        rngs = [s.generate_state(2) for s in np.random.SeedSequence([cfg.seed, step]).spawn(gb)]
        return pool.map(sample, list(zip(idx, rngs)))

    def to_device(items):
        items = list(items)
        x = np.stack([a for a, _ in items])
        y = np.stack([b for _, b in items])
        return global_array(x, sharding), global_array(y, sharding)

    def current_head():
        tree = jax.tree.map(np.asarray, _join_head(params, stats))
        return tree, {**head_cfg, "num_batches_tracked": int(step_done)}

    def evaluate(step):
        tree, hc = current_head()
        seg = Segmenter(model, tree, hc, mesh=mesh)
        res = evaluate_segmentation(
            seg, val_source, mode=cfg.eval_mode, crop_size=cfg.eval_crop_size,
            stride=cfg.eval_stride, resize=cfg.eval_resize, ignore_index=cfg.ignore_index,
            progress=progress,
        )  # fmt: skip
        _log(log_path, {"step": step, "eval": res})
        return res

    def save_state(step):
        # Optimiser state and statistics for `resume`, as numbered leaves (their tree structure
        # is rebuilt from a fresh optimiser), replaced atomically.
        import orbax.checkpoint as ocp

        leaves = jax.tree.leaves((params, opt_state, stats))
        tmp, dst = out / ".train_state.tmp", out / "train_state"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp.absolute() / "state", {str(i): np.asarray(v) for i, v in enumerate(leaves)})
        ckptr.wait_until_finished()
        (tmp / "step.json").write_text(json.dumps({"step": step, "config": _jsonable(cfg)}))
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)

    def save(step):
        if out is None:
            return
        save_state(step)
        tree, hc = current_head()
        meta = {"format": dense.FORMAT, "version": dense.VERSION, "task": "segmentation",
                "head": hc, "backbone_arch": head_cfg["backbone"],
                "source": {"format": "dinojax-train", "step": step,
                           "config": dataclasses.asdict(cfg)}}  # fmt: skip
        dense.save_head(out / "head", tree, meta, overwrite=True)

    losses: list[float] = []
    evals: dict[int, dict] = {}
    step_done = 0
    if resume:
        import orbax.checkpoint as ocp

        info = json.loads((out / "train_state" / "step.json").read_text())
        changed = sorted(k for k, v in _jsonable(cfg).items() if info["config"].get(k) != v)
        if changed:
            raise ValueError(f"cannot resume {out}: the configuration differs in {changed}")
        leaves, treedef = jax.tree.flatten((params, opt_state, stats))
        target = {str(i): jax.ShapeDtypeStruct(v.shape, v.dtype) for i, v in enumerate(leaves)}
        restored = ocp.StandardCheckpointer().restore(
            (out / "train_state" / "state").absolute(), target)  # fmt: skip
        params, opt_state, stats = _place_state(
            jax.tree.unflatten(treedef, [restored[str(i)] for i in range(len(leaves))]), mesh
        )
        step_done = int(info["step"])
        _log(log_path, {"step": step_done, "resumed": True})
    eps = float(head_cfg["bn_eps"])
    workers = num_workers or min(8, (os.cpu_count() or 2) * 2)
    t0 = time.time()
    start = step_done
    bar = tqdm(total=cfg.iters, initial=start, desc="seg head", unit="it", disable=not progress)
    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            nxt = load_batch(pool, start) if start < cfg.iters else None
            for step in range(start, cfg.iters):
                x, y = to_device(nxt)
                if step + 1 < cfg.iters:
                    nxt = load_batch(pool, step + 1)  # augment the next batch meanwhile
                params, opt_state, stats, loss = _train_step(
                    graphdef, layers, cfg, tx, state, params, opt_state, stats, x, y, eps
                )
                step_done = step + 1
                if step_done % cfg.log_every == 0 or step_done == cfg.iters:
                    lv = float(loss)
                    losses.append(lv)
                    lr = float(poly_warmup_lr(step, cfg))
                    _log(log_path, {"step": step_done, "loss": lv, "lr": lr,
                                    "time": round(time.time() - t0, 2)})  # fmt: skip
                    bar.set_postfix(loss=f"{lv:.4f}", lr=f"{lr:.2e}")
                bar.update(1)
                if cfg.checkpoint_every and step_done % cfg.checkpoint_every == 0:
                    save(step_done)
                if (val_source is not None and cfg.eval_every and step_done % cfg.eval_every == 0
                        and step_done != cfg.iters):  # fmt: skip
                    evals[step_done] = evaluate(step_done)
    finally:
        bar.close()
    if val_source is not None:
        evals[cfg.iters] = evaluate(cfg.iters)
    save(cfg.iters)
    tree, hc = current_head()
    result = {"head": tree, "head_cfg": hc, "losses": losses, "eval": evals,
              "output_dir": str(out) if out else None}  # fmt: skip
    if out is not None:
        (out / "results.json").write_text(json.dumps(
            {"head_cfg": hc, "losses": losses, "eval": {str(k): v for k, v in evals.items()},
             "config": dataclasses.asdict(cfg)}, indent=2, default=str) + "\n")  # fmt: skip
    return result
