"""Stochastic depth against the official modules, given the same random draw.

dinojax draws its drop-path randomness from a JAX key; the official code from torch's global
generator. To compare the two, every draw dinojax makes in a forward pass is recorded (by
wrapping `dinojax.models.vit._drop_add_residual`, the one function that draws, and asking it for
the draw with a probe residual under the same key), then fed to the official call in the same
order by patching the torch sampler it uses:

- DINOv2, rate > 0.1: facebookresearch/dinov2 `dinov2/layers/block.py`
  `drop_add_residual_stochastic_depth` (called by `Block.forward` in training): the residual of a
  random subset of max(int(B (1 - rate)), 1) samples, added back scaled by B / subset, the subset
  being the head of `torch.randperm(B)` -> patched to return dinojax's subset first.
- DINOv2, 0 < rate <= 0.1: `Block.forward`'s per-sample branch, `dinov2/layers/drop_path.py`
  `drop_path` (a `bernoulli_(keep_prob)` mask over the batch, divided by keep_prob) -> the tensor's
  `bernoulli_` patched to write dinojax's keep mask.
- DINO v1, every rate, per-sample, rates linspace(0, rate, depth): facebookresearch/dino
  `vision_transformer.py` `Block.forward` / `drop_path` (a `floor(keep_prob + torch.rand)` mask,
  `x.div(keep_prob) * mask`). That repository is not a package: the v1 block is written here
  after those two functions, over the official dinov2 submodules with v1 settings (norms,
  attention, MLP; the modules tests/reference.py builds the v1 backbone reference from), with
  `torch.rand` patched to give dinojax's mask.

Whole small models (3 blocks) in training mode with random weights, float32, matmuls at
"highest": the features (max abs, FEAT_TOL) and every parameter's gradient of a random linear
function of them (max abs over the tensor's largest |g|, GRAD_TOL) must agree; measured figures
beside the tolerances (float32 rounding). A wrong subset, mask, scale or rate moves the features
by far more: the eval forward is checked to differ by > 0.1.
"""

from __future__ import annotations

import logging
import warnings
from functools import partial
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dinojax.convert.backbone import from_official, to_official
from dinojax.models import vit as vit_module
from dinojax.models.config import ViTConfig
from dinojax.models.vit import DinoVisionTransformer

logging.getLogger("dinov2").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="xFormers not available")

from dinov2.layers import MemEffAttention, NestedTensorBlock  # noqa: E402
from dinov2.models.vision_transformer import DinoVisionTransformer as OfficialViT  # noqa: E402

# measured (batch subset / v2 per-sample / v1 per-sample): features 1.8e-6 / 1.5e-6 / 1.9e-6 max
# abs; gradients 9.6e-7 / 7.1e-7 / 9.3e-7 of their tensor's largest |g| (up to 56)
FEAT_TOL = 1e-5
GRAD_TOL = 5e-6
B, DEPTH = 8, 3

CASES = {
    # name: (family, rate, drop_path_uniform, what each draw is)
    "v2_batch_subset": ("dinov2", 0.4, True, "subset"),
    "v2_per_sample": ("dinov2", 0.1, True, "mask"),  # the boundary: 0.1 is still per-sample
    "v1_per_sample": ("dino", 0.5, False, "mask"),  # rates 0, 0.25, 0.5: per-sample above 0.1
}


def _configs(family: str, rate: float, uniform: bool) -> ViTConfig:
    v1 = family == "dino"
    return ViTConfig(
        family=family, patch_size=8, embed_dim=64, depth=DEPTH, num_heads=2, img_size=32,
        layerscale_init=None if v1 else 1.0, drop_path_rate=rate, drop_path_uniform=uniform,
    )  # fmt: skip


def _official(cfg: ViTConfig, seed: int) -> torch.nn.Module:
    """The official v2 ViT (v1 settings for family "dino"), random weights, training mode."""
    with mock.patch.object(OfficialViT, "init_weights", lambda self: None):
        m = OfficialViT(
            img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
            depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
            init_values=cfg.layerscale_init, drop_path_rate=cfg.drop_path_rate,
            drop_path_uniform=cfg.drop_path_uniform, block_chunks=0,  # hub key names
            block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention),
        )  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(0.2 + 0.8 * torch.rand(p.shape, generator=g))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * r)
            elif name.endswith("bias"):
                p.copy_(0.05 * r)
            elif name.endswith(("cls_token", "pos_embed", "mask_token")):
                p.copy_(0.5 * r)
            else:
                p.copy_(r / np.sqrt(np.prod(p.shape[1:])))
    return m.train()


def _ours(cfg: ViTConfig, official: torch.nn.Module) -> DinoVisionTransformer:
    sd = {k: v.detach().numpy() for k, v in official.state_dict().items()}
    if cfg.family == "dino":
        sd.pop("mask_token")  # v1 has none
    model = DinoVisionTransformer(cfg, rngs=nnx.Rngs(0))
    nnx.update(model, jax.tree.map(jnp.asarray, from_official(sd, cfg)))
    return model


def _probe(drop_add_residual, key, rate: float, b: int, batch_subset: bool) -> jax.Array:
    """The draw dinojax's `_drop_add_residual` makes under `key`, made visible by the function
    itself with a probe residual (traceable): row i is j + 1 (up to rounding) when sample i is
    the j-th of the batch subset, 1 / keep_prob when kept per-sample, else 0."""
    zeros = jnp.zeros((b, 1, 1), jnp.float32)
    if batch_subset:
        keep = max(int(b * (1 - rate)), 1)
        tag = lambda y: jnp.arange(1, keep + 1, dtype=y.dtype)[:, None, None] + 0 * y  # noqa: E731
        return drop_add_residual(zeros, tag, rate, key, True)[:, 0, 0] * (keep / b)
    return drop_add_residual(zeros, jnp.ones_like, rate, key, False)[:, 0, 0]


def _decode(rows: np.ndarray, batch_subset: bool) -> tuple[str, np.ndarray]:
    """Probe rows -> ("subset", sample indices in draw order) or ("mask", per-sample keep)."""
    if batch_subset:
        ranks = np.rint(np.asarray(rows)).astype(int)
        keep = int(ranks.max())
        assert sorted(ranks[ranks > 0]) == list(range(1, keep + 1)), ranks
        return "subset", np.array([int(np.flatnonzero(ranks == j + 1)[0]) for j in range(keep)])
    return "mask", np.asarray(rows) > 0


def _run_ours(model, x, w_cls, w_patch, key, monkeypatch):
    """Features and parameter gradients of a weighted sum of the features, in training mode (one
    jit, the layer scan where the rates allow it, as in training), with the list of draws
    dinojax made, in call order (sent to the host by an ordered debug callback)."""
    draws: list[tuple[str, np.ndarray]] = []
    original = vit_module._drop_add_residual

    def recording(h, residual_fn, rate, k, batch_subset, groups=1):
        assert groups == 1  # one device's batch, as each official GPU draws from its own
        rows = _probe(original, k, rate, h.shape[0], batch_subset)
        store = lambda r, bs=batch_subset: draws.append(_decode(r, bs))  # noqa: E731
        jax.debug.callback(store, rows, ordered=True)
        return original(h, residual_fn, rate, k, batch_subset, groups)

    monkeypatch.setattr(vit_module, "_drop_add_residual", recording)

    def objective(m):
        f = m.forward_features(x, key=key)
        loss = jnp.sum(f["x_norm_clstoken"] * w_cls) + jnp.sum(f["x_norm_patchtokens"] * w_patch)
        return loss, f

    with jax.default_matmul_precision("highest"):
        (_, feats), grads = nnx.jit(nnx.value_and_grad(objective, has_aux=True))(model)
        jax.effects_barrier()
    monkeypatch.setattr(vit_module, "_drop_add_residual", original)
    grads = to_official(jax.device_get(nnx.to_pure_dict(grads)))
    return (
        {k: np.asarray(feats[k]) for k in ("x_norm_clstoken", "x_norm_patchtokens")},
        grads,
        draws,
    )


def _v1_forward_features(m: torch.nn.Module, x: torch.Tensor, rates: list[float]) -> dict:
    """facebookresearch/dino `vision_transformer.py` `VisionTransformer.forward` up to the final
    norm, with its `Block.forward` and `drop_path`, over the official dinov2 submodules."""

    def drop_path(y, drop_prob):  # v1 drop_path: floor(keep_prob + U) keeps, x / keep_prob
        if drop_prob == 0.0:
            return y
        keep_prob = 1 - drop_prob
        shape = (y.shape[0],) + (1,) * (y.ndim - 1)
        random_tensor = keep_prob + torch.rand(shape, dtype=y.dtype, device=y.device)
        random_tensor.floor_()
        return y.div(keep_prob) * random_tensor

    t = m.prepare_tokens_with_masks(x)  # v1 `prepare_tokens` (no drop path before the blocks)
    for blk, rate in zip(m.blocks, rates):
        t = t + drop_path(blk.attn(blk.norm1(t)), rate)
        t = t + drop_path(blk.mlp(blk.norm2(t)), rate)
    n = m.norm(t)
    return {"x_norm_clstoken": n[:, 0], "x_norm_patchtokens": n[:, 1:]}


def _run_official(m, cfg, x, w_cls, w_patch, draws, monkeypatch):
    """The official forward in training mode with dinojax's draws injected, and its gradients."""
    queue = list(draws)

    def next_draw(kind):
        assert queue, "the official code drew more often than dinojax"
        got, draw = queue.pop(0)
        assert got == kind, (got, kind)
        return draw

    def randperm(n, *args, **kwargs):  # block.py drop_add_residual_stochastic_depth
        head = next_draw("subset")
        rest = [i for i in range(n) if i not in set(head.tolist())]
        return torch.tensor(list(head) + rest, dtype=torch.int64)

    def bernoulli_(self, p=0.5, *args, **kwargs):  # drop_path.py drop_path (v2 per-sample)
        keep = next_draw("mask")
        assert self.shape == (len(keep), 1, 1), self.shape
        with torch.no_grad():
            return self.copy_(torch.from_numpy(keep.astype(np.float32)).view(self.shape))

    def rand(*shape, **kwargs):  # v1 drop_path: floor(keep_prob + U) == keep
        keep = next_draw("mask")
        u = np.where(keep, 0.999999, 0.0).astype(np.float32)  # keep_prob + U >= 1 iff kept
        return torch.from_numpy(u).view(*shape[0] if len(shape) == 1 else shape)

    x_t = torch.from_numpy(np.array(x).transpose(0, 3, 1, 2).copy())
    m.zero_grad(set_to_none=True)
    with monkeypatch.context() as mp:
        mp.setattr(torch, "randperm", randperm)
        mp.setattr(torch.Tensor, "bernoulli_", bernoulli_)
        if cfg.family == "dino":
            mp.setattr(torch, "rand", rand)
            rates = [float(r) for r in np.linspace(0, cfg.drop_path_rate, cfg.depth)]
            f = _v1_forward_features(m, x_t, rates)
        else:
            out = m.forward_features(x_t)
            f = {k: out[k] for k in ("x_norm_clstoken", "x_norm_patchtokens")}
    assert not queue, f"{len(queue)} of dinojax's draws were not used by the official code"
    loss = (f["x_norm_clstoken"] * torch.from_numpy(np.array(w_cls))).sum() + (
        f["x_norm_patchtokens"] * torch.from_numpy(np.array(w_patch))
    ).sum()
    loss.backward()
    grads = {k: p.grad.numpy() for k, p in m.named_parameters() if p.grad is not None}
    return {k: v.detach().numpy() for k, v in f.items()}, grads


@pytest.mark.parametrize("case", sorted(CASES))
def test_drop_path_matches_official_given_the_same_draw(case, monkeypatch):
    family, rate, uniform, kind = CASES[case]
    cfg = _configs(family, rate, uniform)
    official = _official(cfg, seed=3)
    model = _ours(cfg, official)
    rs = np.random.RandomState(4)
    x = jnp.asarray(rs.randn(B, 32, 32, 3).astype(np.float32))
    w_cls = jnp.asarray(rs.randn(B, 64).astype(np.float32))
    w_patch = jnp.asarray(rs.randn(B, 16, 64).astype(np.float32))
    key = jax.random.key(7)

    ours, our_grads, draws = _run_ours(model, x, w_cls, w_patch, key, monkeypatch)
    # one draw per residual branch of every block with a non-zero rate, all of the expected kind
    n_branches = 2 * sum(r > 0 for r in vit_module.drop_path_rates(cfg))
    assert len(draws) == n_branches and {k for k, _ in draws} == {kind}
    if kind == "subset":
        assert all(len(d) == max(int(B * (1 - rate)), 1) for _, d in draws)
    else:
        assert not all(d.all() for _, d in draws)  # some sample is dropped somewhere
    theirs, their_grads = _run_official(official, cfg, x, w_cls, w_patch, draws, monkeypatch)

    feat_err = max(float(np.max(np.abs(ours[k] - want))) for k, want in theirs.items())
    assert set(their_grads) <= set(our_grads)
    grad_err = {
        k: float(np.max(np.abs(our_grads[k].reshape(want.shape) - want)) / np.max(np.abs(want)))
        for k, want in their_grads.items()
    }
    worst = max(grad_err, key=grad_err.get)
    assert feat_err <= FEAT_TOL, feat_err
    assert grad_err[worst] <= GRAD_TOL, (worst, grad_err[worst])

    # the draws matter: the eval forward (no drop path) is far from both
    with jax.default_matmul_precision("highest"):
        eval_cls = np.asarray(
            nnx.jit(lambda m, v: m.forward_features(v)["x_norm_clstoken"])(model, x)
        )
    assert float(np.max(np.abs(eval_cls - theirs["x_norm_clstoken"]))) > 0.1
