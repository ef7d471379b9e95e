"""Train a linear depth head (the released `linear` / `linear4` kind: `BNHead`, 256 bins over
the depth range) on frozen DINOv2 features, in JAX.

Data contract: a source is any object with `__len__` and `__getitem__(i) -> (image uint8 (H, W, 3),
depth float32 (H, W) in metres, 0 = no measurement)`.

Recipe (the DINOv2 depth protocol's pieces, sizes and lengths configurable):
- optional NYU crop of every sample, rows 45:472, columns 43:608 (the toolbox's `NYUCrop`);
- images resized to `image_size` (bicubic), depth maps nearest-neighbour (invalid stays 0);
- the frozen backbone runs once per image and per horizontal flip (`flip=True`): the features
  (`get_intermediate_layers(out_index, reshape=True, return_class_token=True, norm=False)` after
  CenterPadding, as at inference) are kept in host memory and the head trains on them;
- loss: `SigLoss` (facebookresearch/dinov2 `dinov2/eval/depth/models/losses/sigloss.py`): over the
  valid pixels (gt > 0) of the whole batch, g = log(pred + 1e-3) - log(gt + 1e-3),
  sqrt(var(g) + 0.15 * mean(g) ** 2) with torch's unbiased variance; during the first
  `warm_up_iters` iterations (the recipe's `warm_up=True`, `warm_iter=100`) sqrt(0.15 * mean ** 2);
  the prediction is the head's map (before clamping) resized bilinearly to the label, as
  `DepthBaseDecodeHead.losses` does;
- AdamW, linear warm-up then polynomial (power 1) decay.

Outputs: a head directory (`dinojax.convert.dense` format "dinojax-head", loadable by
`load_depther`, exportable to the released `.pth` by `convert_weights.py`), `log.jsonl`
(loss / lr every `log_every` iterations, validation metrics at the end).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from dinojax.convert.dense_depth import OUT_INDEX_4, WIDTH_DEPTH
from dinojax.dense.common import center_pad, load_backbone, resize_bilinear
from dinojax.dense.depth import head_forward, init_head_params, linear_head_config

__all__ = ["DepthTrainConfig", "DepthTrainResult", "sig_loss", "train_depth_head"]

NYU_TRAIN_CROP = (45, 472, 43, 608)  # Monocular-Depth-Estimation-Toolbox `NYUCrop`


@dataclasses.dataclass(frozen=True)
class DepthTrainConfig:
    layers: int = 4  # 1: "linear" (last block), 4: "linear4" (the released block indices)
    image_size: tuple[int, int] = (224, 294)  # (H, W) every sample is resized to
    min_depth: float = 1e-3
    max_depth: float = 10.0
    iters: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_iters: int = 50  # learning-rate warm-up
    warm_up_iters: int = 100  # SigLoss warm-up (mean term only)
    nyu_crop: bool = False
    flip: bool = True
    log_every: int = 10
    seed: int = 0
    dataset: str | None = None  # recorded in the head config ("nyu", "kitti", ...)

    def __post_init__(self):
        if self.layers not in (1, 4):
            raise ValueError(f"layers must be 1 or 4, got {self.layers}")
        if min(self.image_size) < 14 or len(self.image_size) != 2:
            raise ValueError(f"image_size must be (H, W) of at least 14, got {self.image_size}")
        if not 0 <= self.min_depth < self.max_depth:
            raise ValueError(
                f"need 0 <= min_depth < max_depth, got {self.min_depth}, {self.max_depth}"
            )
        for name in ("iters", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclasses.dataclass
class DepthTrainResult:
    params: dict
    head_cfg: dict
    history: list[dict]
    metrics: dict | None
    out_dir: Path | None


def sig_loss(
    pred: jax.Array, gt: jax.Array, *, warm_up: bool | jax.Array = False, eps: float = 1e-3
) -> jax.Array:
    """`SigLoss` with `valid_mask=True` over every pixel of the batch (docstring above)."""
    mask = (gt > 0).astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask), 2.0)
    g = (jnp.log(pred + eps) - jnp.log(jnp.where(gt > 0, gt, 1.0) + eps)) * mask
    mean = jnp.sum(g) / n
    var = jnp.sum(jnp.square(g - mean) * mask) / (n - 1.0)  # torch.var: unbiased
    dg = 0.15 * jnp.square(mean) + jnp.where(warm_up, 0.0, var)
    return jnp.sqrt(dg)


def out_index_for(model, layers: int) -> list[int]:
    d, depth = model.cfg.embed_dim, model.cfg.depth
    if layers == 1:
        return [depth - 1]
    if WIDTH_DEPTH.get(d) == depth:
        return list(OUT_INDEX_4[d])
    if depth < 4:
        raise ValueError(f"a linear4 depth head needs a backbone of at least 4 blocks, this one "
                         f"has {depth}; use layers=1")  # fmt: skip
    return [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1]


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _sample(source, i: int, cfg: DepthTrainConfig) -> tuple[np.ndarray, np.ndarray]:
    try:
        img, depth = source[int(i)]
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"record {i}: expected (image uint8 (H, W, 3), depth float32 (H, W)), {e}"
        ) from None
    img, depth = np.asarray(img), np.asarray(depth, np.float32)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"record {i}: image must be uint8 (H, W, 3), got {img.dtype} {img.shape}")
    if depth.shape != img.shape[:2]:
        raise ValueError(f"record {i}: depth shape {depth.shape} != image shape {img.shape[:2]}")
    if cfg.nyu_crop:
        if img.shape[:2] != (480, 640):
            raise ValueError(
                f"record {i}: the NYU crop needs 480x640 samples, got {img.shape[0]}x{img.shape[1]}"
            )
        t, b, left, r = NYU_TRAIN_CROP
        img, depth = img[t:b, left:r], depth[t:b, left:r]
    h, w = cfg.image_size
    if img.shape[:2] != (h, w):
        img = np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC))
        depth = np.asarray(Image.fromarray(depth, mode="F").resize((w, h), Image.NEAREST))
    return img, depth


def _load(source, cfg: DepthTrainConfig, what: str):
    if not hasattr(source, "__len__") or not hasattr(source, "__getitem__"):
        raise ValueError(
            f"{what}: a depth source needs __len__ and __getitem__, got {type(source).__name__}"
        )
    if len(source) == 0:
        raise ValueError(f"{what}: the source is empty")
    pairs = [_sample(source, i, cfg) for i in range(len(source))]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


@dataclasses.dataclass(frozen=True)
class _LayerFeats:
    out_index: tuple[int, ...]

    def __call__(self, model, x):
        xp = center_pad(x, model.cfg.patch_size)
        res = model.get_intermediate_layers(
            xp, self.out_index, reshape=True, return_class_token=True, norm=False
        )
        return {
            "patch": jnp.stack([p for p, _ in res], 1).astype(jnp.float32),
            "cls": jnp.stack([c for _, c in res], 1).astype(jnp.float32),
        }


def extract_layer_features(
    model, images: np.ndarray, out_index, *, mesh=None, batch_size: int = 16, progress: bool = True
) -> dict[str, np.ndarray]:
    """uint8 (N, H, W, 3) -> {"patch": (N, L, h, w, D), "cls": (N, L, D)} float32 (host)."""
    from tqdm.auto import tqdm

    from dinojax.eval.features import _forward, _place_state, batch_sharding, default_mesh
    from dinojax.eval.transforms import normalize

    mesh = mesh or default_mesh()
    shards = math.prod(mesh.shape[a] for a in mesh.axis_names)
    step = -(-batch_size // shards) * shards
    graphdef, state = nnx.split(model)
    state = _place_state(state, mesh)
    fn = _LayerFeats(tuple(out_index))
    parts: dict[str, list] = {"patch": [], "cls": []}
    for s in tqdm(range(0, len(images), step), desc="features", disable=not progress):
        x = normalize(images[s : s + step])
        n = len(x)
        if n % shards:
            x = np.concatenate([x, np.zeros((shards - n % shards, *x.shape[1:]), np.float32)])
        out = _forward(graphdef, fn, state, jax.device_put(x, batch_sharding(mesh)))
        for k in parts:
            parts[k].append(np.asarray(out[k])[:n])
    return {k: np.concatenate(v) for k, v in parts.items()}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _schedule(cfg: DepthTrainConfig):
    import optax

    warm = min(cfg.warmup_iters, cfg.iters - 1)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, cfg.lr, max(warm, 1)),
            optax.polynomial_schedule(cfg.lr, 0.0, 1.0, max(cfg.iters - warm, 1)),
        ],
        [warm],
    )


def _predict_batch(params, head_cfg, patch, cls, cfg: DepthTrainConfig):
    feats = [(patch[:, i], cls[:, i]) for i in range(patch.shape[1])]
    out = head_forward(params, head_cfg, feats, cfg.min_depth, cfg.max_depth)
    return resize_bilinear(out, cfg.image_size, align_corners=False)[..., 0]


def train_depth_head(
    backbone,
    train_source,
    *,
    config: DepthTrainConfig = DepthTrainConfig(),
    val_source=None,
    out_dir: str | None = None,
    overwrite: bool = False,
    mesh=None,
    progress: bool = True,
) -> DepthTrainResult:
    """Train a linear depth head on frozen features of `backbone` (checkpoint dir, hub name,
    official file or a `DinoVisionTransformer`); returns the params, config, loss history and,
    with `val_source`, the validation metrics. `out_dir` gets the head directory and log.jsonl."""
    import optax
    from tqdm.auto import tqdm

    from dinojax.convert.dense import FORMAT, VERSION, save_head
    from dinojax.eval.features import batch_sharding, default_mesh

    cfg = config
    out = Path(out_dir) if out_dir else None
    if out is not None and out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
    model = load_backbone(backbone)
    mesh = mesh or default_mesh()
    shards = math.prod(mesh.shape[a] for a in mesh.axis_names)
    images, depths = _load(train_source, cfg, "train")
    out_index = out_index_for(model, cfg.layers)
    head_cfg = linear_head_config(
        model.cfg.embed_dim,
        out_index,
        min_depth=cfg.min_depth,
        max_depth=cfg.max_depth,
        dataset=cfg.dataset,
        num_register_tokens=model.cfg.num_register_tokens,
    )
    feats = [extract_layer_features(model, images, out_index, mesh=mesh, progress=progress)]
    if cfg.flip:
        feats.append(
            extract_layer_features(
                model, images[:, :, ::-1].copy(), out_index, mesh=mesh, progress=progress
            )
        )
    params = jax.tree.map(jnp.asarray, init_head_params(head_cfg, cfg.seed))
    opt = optax.adamw(_schedule(cfg), weight_decay=cfg.weight_decay)
    opt_state = opt.init(params)
    sharding = batch_sharding(mesh)
    bsz = -(-cfg.batch_size // shards) * shards

    @jax.jit
    def step(params, opt_state, patch, cls, gt, warm):
        def loss_fn(p):
            return sig_loss(_predict_batch(p, head_cfg, patch, cls, cfg), gt, warm_up=warm)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(cfg.seed)
    schedule = _schedule(cfg)
    history: list[dict] = []
    log = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / "log.jsonl", "w")
    try:
        bar = tqdm(range(cfg.iters), desc="train depth head", disable=not progress)
        for it in bar:
            idx = rng.integers(0, len(images), bsz)
            flip = rng.integers(0, len(feats), bsz)
            patch = np.stack([feats[f]["patch"][i] for i, f in zip(idx, flip)])
            cls = np.stack([feats[f]["cls"][i] for i, f in zip(idx, flip)])
            gt = np.stack([depths[i][:, ::-1] if f else depths[i] for i, f in zip(idx, flip)])
            put = lambda a: jax.device_put(a, sharding)  # noqa: E731
            params, opt_state, loss = step(
                params, opt_state, put(patch), put(cls), put(gt), it < cfg.warm_up_iters
            )
            if it % cfg.log_every == 0 or it == cfg.iters - 1:
                rec = {
                    "iter": it,
                    "loss": float(loss),
                    "lr": float(schedule(it)),
                    "sigloss_warm_up": bool(it < cfg.warm_up_iters),
                }
                history.append(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                if log:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
        metrics = None
        if val_source is not None:
            metrics = evaluate_head(
                model, params, head_cfg, val_source, cfg, mesh=mesh, progress=progress
            )
            if log:
                log.write(json.dumps({"iter": cfg.iters, "val": metrics}) + "\n")
    finally:
        if log:
            log.close()
    params = jax.tree.map(np.asarray, params)
    if out is not None:
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "task": "depth",
            "head": head_cfg,
            "backbone_arch": model.cfg.name,
            "source": {"format": "dinojax-train", "config": dataclasses.asdict(cfg)},
        }
        save_head(out / "head", params, meta, overwrite=overwrite)
    return DepthTrainResult(params, head_cfg, history, metrics, out)


def evaluate_head(
    model,
    params,
    head_cfg,
    source,
    cfg: DepthTrainConfig,
    *,
    mesh=None,
    eigen_crop: bool = False,
    progress: bool = True,
) -> dict:
    """Metrics of a head on a source, the samples prepared as in training (crop, resize)."""
    from dinojax.dense.depth import Depther, DepthHead
    from dinojax.dense.depth_metrics import DepthMetrics

    images, depths = _load(source, cfg, "val")
    depther = Depther(
        model,
        DepthHead(head_cfg, params),
        min_depth=cfg.min_depth,
        max_depth=cfg.max_depth,
        mesh=mesh,
    )
    acc = DepthMetrics(min_depth=cfg.min_depth, max_depth=cfg.max_depth, eigen_crop=eigen_crop)
    for s in range(0, len(images), 16):
        acc.update(depther.predict(images[s : s + 16]), depths[s : s + 16])
    return acc.result()
