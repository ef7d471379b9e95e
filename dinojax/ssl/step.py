"""The DINOv2 / DINO self-supervised training step: one jit over a plain state pytree.

    state, state_shardings = create_train_state(config, mesh)    # created sharded
    train_step = make_train_step(config, mesh, state_shardings)   # jitted, state donated
    state, metrics = train_step(state, batch)                     # batch: global jax.Arrays

Each of these parses the config into a `StepSetup` (validated static facts, with the module graphs
and the optimizer built from them on first use); a caller that needs several of them builds it once,
`setup = StepSetup.from_config(config)`, and passes `setup=setup` to each (the trainer does).

State (plain dicts of arrays; parameter trees are `nnx.to_pure_dict` of the modules):

    {"student": {"backbone", "dino_head", ["ibot_head"]},   # ibot_head iff heads.separate_ibot_head
     "teacher": same structure (a copy with its own buffers: donating a state whose teacher
                shares the student's buffers fails with "donate the same buffer twice"),
     "opt_state": the optax state of `optimizer(config)` over the student (a pytree of optax
                  namedtuples: per partition an Adam count and mu / nu trees; MaskedNode where
                  optax.partition masks a leaf out),
     "dino_center": (1, K) f32, ["ibot_center": (1, 1, K') f32 when iBOT is on],
     "step": int32 (0-based official iteration), "rng": uint32 key data (fixed; the per-step key
     is fold_in(rng, step), so a resumed run draws the same drop-path masks)}

One step (facebookresearch/dinov2 `dinov2/train/ssl_meta_arch.py` `SSLMetaArch.forward_backward`
and `dinov2/train/train.py` `do_train`):
  schedules(step) -> lr, last-layer lr, wd, teacher momentum, teacher temperature;
  teacher backbone on the 2 global crops (no masks, no drop path, no gradient) -> CLS swapped
  crop-wise -> DINO head; masked patch tokens gathered into the static padded buffer -> DINO head
  (shared) or iBOT head -> centering (lazy EMA center, new center stored) or Sinkhorn-Knopp;
  student backbone on the masked global crops and, separately, on the local crops (two static
  shapes) -> heads -> loss = w_dino (dino_local + dino_global) + w_koleo koleo + w_ibot ibot;
  value_and_grad w.r.t. the student; clipping (per submodule, or per tensor for v1); AdamW with the
  official parameter groups; teacher EMA with the traced momentum.

DINO v1 (config.loss.family == "dino"): DINO loss only, no masks, v1 parameter groups, per-tensor
clipping and the skip-freeze of the last layer, all chosen by the config (see configs/).

Shards. KoLeo and the iBOT center are per-GPU quantities in the official code
(facebookresearch/dinov2 `dinov2/loss/koleo_loss.py` `KoLeoLoss` runs on each GPU's batch;
`dinov2/loss/ibot_patch_loss.py` `iBOTPatchLoss.update_center` averages per-GPU means).
`config.loss.n_shards` (optional; default: the number of devices the batch is split over) says
how many official "GPUs" the global batch stands for; fix it to make a run independent of the mesh.

Batch: `global_crops` (2B, S, S, 3) and `local_crops` (n_local B, s, s, 3), uint8 (normalised
on device) or float32; `masks` (2B, N) bool; `mask_indices` only fixes the static size U of the
masked-token buffer, which is rebuilt from `masks`. Layout: G = `n_batch_shards` blocks, block g
the official per-GPU collate of "GPU" g (crop-major over its own B / G images; G = 1 is the
official crop-major batch), as the input pipeline builds it (`mask_groups`, any process count).
With G the batch devices (the default), each device holds every crop of its own images: the crop
pairings of the losses, KoLeo, the drop-path subsets and the iBOT buffer stay on the device, and
only gradient and statistics reductions cross devices (and the slices of a multi-slice pod).
The iBOT buffer is G blocks of U / G tokens (each group's masked tokens; the pipeline's
per-group bound fits); `n_masked_dropped` counts tokens beyond a block (0 with pipeline batches).

Metrics (replicated scalars): `loss` and its terms as they enter it (`dino_local_loss`,
`dino_global_loss`, `koleo_loss` (x weight), `ibot_loss` (x weight); the official logs show the
last two halved), `grad_norm_<submodule>` (before clipping), `lr`, `last_layer_lr`, `wd`,
`momentum`, `teacher_temp`, `n_masked` and `n_masked_dropped` (iBOT), and `finite`.

NaN / Inf. `metrics["finite"]` is False when a loss term or a gradient norm is not finite. With
`config.train.nan_policy == "skip"` such a step leaves every state entry unchanged EXCEPT `step`,
which still advances: the batch was consumed, and the schedules stay aligned with the data stream
(resuming at step k reads batch k). Selected with jnp.where inside the same program.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from dinojax import sharding as shd
from dinojax.models.config import ViTConfig, get_config
from dinojax.models.heads import DINOHead
from dinojax.models.vit import DinoVisionTransformer
from dinojax.ssl import centering, losses, optim

Array = jax.Array

__all__ = [
    "StepSetup",
    "create_train_state",
    "flops_per_step",
    "make_train_step",
    "optimizer",
    "student_backbone",
    "teacher_backbone",
    "vit_config",
]


# ---------------------------------------------------------------------------------------------
# Static description of a recipe
# ---------------------------------------------------------------------------------------------


def vit_config(config) -> ViTConfig:
    """The backbone architecture: `model.arch` with `model.overrides` applied."""
    overrides = dict(config.model.get("overrides", None) or {})
    return get_config(config.model.arch, **overrides)


@dataclasses.dataclass(frozen=True)
class StepSetup:
    """Everything static the step needs, validated once from the config (`from_config`).

    The module graphs, the abstract student parameters and the optimizer are derived from it on
    first use and kept, so state creation, shardings, the step and the FLOP count share one copy.
    Pass it with the config it was built from (`setup=` of the functions below)."""

    config: Any = dataclasses.field(repr=False, compare=False)  # the config it was parsed from
    vit: ViTConfig
    family: str  # "dinov2" or "dino"
    centering: str  # "centering" or "sinkhorn_knopp"
    separate_ibot_head: bool
    do_ibot: bool
    do_koleo: bool
    dino_w: float
    koleo_w: float
    ibot_w: float
    student_temp: float
    center_momentum: float
    clip_grad: float
    clip_mode: str
    nan_skip: bool

    @classmethod
    def from_config(cls, config) -> StepSetup:
        vit = vit_config(config)
        lo, o, h = config.loss, config.optim, config.heads
        family = lo.family
        if family not in ("dinov2", "dino"):
            raise ValueError(f"loss.family must be 'dinov2' or 'dino', got {family!r}")
        if lo.centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(
                f"loss.centering must be 'centering' or 'sinkhorn_knopp', got {lo.centering!r}"
            )
        if family == "dino" and lo.centering != "centering":
            raise ValueError("DINO v1 uses EMA centering only (loss.centering='centering')")
        if o.clip_mode not in ("per_submodule", "per_tensor"):
            raise ValueError(
                f"optim.clip_mode must be 'per_submodule' or 'per_tensor', got {o.clip_mode!r}"
            )
        policy = config.train.get("nan_policy", "stop")
        if policy not in ("stop", "skip"):
            raise ValueError(f"train.nan_policy must be 'stop' or 'skip', got {policy!r}")
        v2 = family == "dinov2"
        do_ibot = v2 and float(lo.ibot_loss_weight) > 0
        if do_ibot and not vit.has_mask_token:
            raise ValueError(f"iBOT needs a backbone with a mask token; {vit.name} has none")
        return cls(
            config=config,
            vit=vit,
            family=family,
            centering=lo.centering,
            separate_ibot_head=bool(h.separate_ibot_head) and do_ibot,
            do_ibot=do_ibot,
            do_koleo=v2 and float(lo.koleo_loss_weight) > 0,
            dino_w=float(lo.dino_loss_weight),
            koleo_w=float(lo.koleo_loss_weight),
            ibot_w=float(lo.ibot_loss_weight),
            student_temp=float(lo.student_temp),
            center_momentum=float(lo.center_momentum),
            clip_grad=float(o.clip_grad or 0.0),
            clip_mode=o.clip_mode,
            nan_skip=policy == "skip",
        )

    @functools.cached_property
    def graphs(self) -> _Graphs:
        return _Graphs(self.config, self)

    @functools.cached_property
    def abstract_student(self) -> dict:
        """The student's parameters {backbone, dino_head, [ibot_head]} as abstract arrays."""
        return {k: nnx.to_pure_dict(nnx.state(m, nnx.Param))
                for k, m in self.graphs.abstract.items()}  # fmt: skip

    @functools.cached_property
    def groups(self) -> dict:
        """The official parameter groups of the student (dinojax.ssl.optim.param_groups)."""
        return optim.param_groups(self.abstract_student, self.config)

    @functools.cached_property
    def tx(self):
        """The recipe's optimizer (`optimizer`): it depends on the parameters' shapes only."""
        return optimizer(self.config, self.abstract_student)


def _setup_for(config, setup: StepSetup | None) -> StepSetup:
    """`setup`, checked to come from `config`, or a new one parsed from it."""
    if setup is None:
        return StepSetup.from_config(config)
    if setup.config is not config:
        raise ValueError("setup was built from another config: pass the config it came from")
    return setup


def _head(config, vit: ViTConfig, *, ibot: bool, rngs: nnx.Rngs) -> DINOHead:
    h = config.heads
    p = "ibot_" if ibot else ""
    return DINOHead(
        vit.embed_dim,
        int(h[f"{p}out_dim"]),
        nlayers=int(h.nlayers),
        hidden_dim=int(h[f"{p}hidden_dim"]),
        bottleneck_dim=int(h[f"{p}bottleneck_dim"]),
        dtype=jnp.dtype(vit.dtype),
        param_dtype=jnp.dtype(vit.param_dtype),
        rngs=rngs,
    )


def _build_modules(config, setup: StepSetup, key: Array) -> dict[str, nnx.Module]:
    k_bb, k_dino, k_ibot = jax.random.split(key, 3)
    mods: dict[str, nnx.Module] = {
        "backbone": DinoVisionTransformer(setup.vit, rngs=nnx.Rngs(params=k_bb)),
        "dino_head": _head(config, setup.vit, ibot=False, rngs=nnx.Rngs(params=k_dino)),
    }
    if setup.separate_ibot_head:
        mods["ibot_head"] = _head(config, setup.vit, ibot=True, rngs=nnx.Rngs(params=k_ibot))
    if setup.family == "dino" and config.heads.norm_last_layer:
        # v1 norm_last_layer: weight_g is 1 and never trained (the optimizer skips it).
        g = mods["dino_head"].last_layer.weight_g
        g[...] = jnp.ones_like(g[...])
    return mods


class _Graphs:
    """Graph definitions of the modules, to run them on plain parameter dicts (nnx.merge)."""

    def __init__(self, config, setup: StepSetup):
        abstract = nnx.eval_shape(lambda: _build_modules(config, setup, jax.random.key(0)))
        self.abstract = abstract
        self.graphdefs = {k: nnx.split(m, nnx.Param)[0] for k, m in abstract.items()}

    def module(self, name: str, params: Mapping) -> Any:
        return nnx.merge(self.graphdefs[name], params)

    def names(self) -> dict:
        return {k: shd.logical_names(m) for k, m in self.abstract.items()}


def n_batch_shards(config, mesh: Mesh) -> int:
    """Official per-GPU groups of the batch: config.loss.n_shards, else the batch device count."""
    n = config.loss.get("n_shards", None)
    if n:
        return int(n)
    rules = tuple(config.mesh.rules)
    return int(math.prod(mesh.shape[a] for a in shd.batch_axes(mesh, rules)))


# ---------------------------------------------------------------------------------------------
# State creation
# ---------------------------------------------------------------------------------------------


def optimizer(config, params: Mapping | None = None, *, setup: StepSetup | None = None):
    """The recipe's optax optimizer (dinojax.ssl.optim.adamw) for the student `params` (arrays
    or abstract arrays; default: the config's abstract student). Its update takes the extra
    arguments lr, last_layer_lr, wd and last_layer_active."""
    if params is None:
        return _setup_for(config, setup).tx
    o = config.optim
    return optim.adamw(
        optim.param_groups(params, config), b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
        clip_mode=o.clip_mode, clip_grad=float(o.clip_grad or 0.0),
    )  # fmt: skip


def _init_state(config, setup: StepSetup, key: Array) -> dict:
    k_model, k_rng = jax.random.split(key)
    mods = _build_modules(config, setup, k_model)
    student = {k: nnx.to_pure_dict(nnx.state(m, nnx.Param)) for k, m in mods.items()}
    # The teacher is a copy with its own buffers (a teacher sharing the student's buffers cannot
    # be donated with it); official `SSLMetaArch.prepare_for_distributed_training` loads the
    # student's state dict into the teacher.
    teacher = jax.tree.map(jnp.copy, student)
    state = {
        "student": student,
        "teacher": teacher,
        "opt_state": setup.tx.init(student),
        "dino_center": centering.init_center(int(config.heads.out_dim)),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(k_rng),
    }
    if setup.do_ibot:
        k_ibot = int(
            config.heads.ibot_out_dim if setup.separate_ibot_head else config.heads.out_dim
        )
        state["ibot_center"] = centering.init_center(k_ibot, ibot=True)
    return state


def state_shardings_for(
    config, mesh: Mesh, abstract_state: Mapping | None = None, *, setup: StepSetup | None = None
) -> dict:
    """NamedShardings of the state from the parameters' logical names and config.mesh.rules."""
    setup = _setup_for(config, setup)
    if abstract_state is None:
        abstract_state = jax.eval_shape(lambda k: _init_state(config, setup, k), jax.random.key(0))
    rules = tuple(config.mesh.rules)
    names = setup.graphs.names()
    params = lambda tree: shd.logical_to_mesh_sharding(tree, mesh, rules, names)  # noqa: E731
    repl = shd.replicated(mesh)
    out = {k: jax.tree.map(lambda _: repl, v) for k, v in abstract_state.items()}
    out["student"] = params(abstract_state["student"])
    out["teacher"] = params(abstract_state["teacher"])
    # moments shard like their parameters; counts (and anything else) are replicated
    out["opt_state"] = optax.tree_map_params(
        setup.tx,
        lambda leaf, sharding: leaf if isinstance(leaf, optax.MaskedNode) else sharding,
        abstract_state["opt_state"],
        out["student"],
        transform_non_params=lambda _: repl,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )
    return out


def create_train_state(
    config, mesh: Mesh, *, seed: int | None = None, setup: StepSetup | None = None
) -> tuple[dict, dict]:
    """(state, state_shardings): the initial state, created directly with its shardings
    (one jit with out_shardings: no full copy on one device)."""
    setup = _setup_for(config, setup)
    key = jax.random.key(int(config.seed if seed is None else seed))
    abstract = jax.eval_shape(lambda k: _init_state(config, setup, k), key)
    shardings = state_shardings_for(config, mesh, abstract, setup=setup)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda k: _init_state(config, setup, k), out_shardings=shardings)(key)
    return state, shardings


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------


def _images(x: Array) -> Array:
    if x.dtype == jnp.uint8:  # pipeline run with normalize=False: normalise on device
        from dinojax.data.pipeline import normalize_images

        return normalize_images(x)
    return x.astype(jnp.float32)


def _masked_tokens(patch_tokens: Array, buf: losses.MaskedTokens, n_groups: int) -> Array:
    """The masked patch tokens (U, D) of the static buffer, split over the batch mesh axes.

    Block g of the buffer (`losses.masked_token_buffer` with `n_groups`) indexes group g's rows
    only, so the gather runs per group (batched over the group axis): on a batch sharded by
    groups each device gathers from its own rows. The result is constrained to the batch axes:
    left unconstrained, XLA kept every chip's copy whole and ran the iBOT head on all U masked
    tokens of the global batch on every chip (the head's FLOPs times the chip count)."""
    d = patch_tokens.shape[-1]
    tokens = patch_tokens.reshape(n_groups, -1, d)
    local = buf.indices.reshape(n_groups, -1) - (jnp.arange(n_groups) * tokens.shape[1])[:, None]
    out = jnp.take_along_axis(tokens, local[..., None], axis=1).reshape(-1, d)
    return nn.with_logical_constraint(out, ("batch", None))


def _finite(*xs) -> Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))


def build_step_fn(config, mesh: Mesh, *, setup: StepSetup | None = None):
    """The un-jitted step(state, batch) -> (state, metrics) (make_train_step jits it)."""
    setup = _setup_for(config, setup)
    graphs, groups, tx = setup.graphs, setup.groups, setup.tx
    scheds = optim.make_schedules(config)
    n_shards = n_batch_shards(config, mesh)
    n_local = int(config.data.local_crops_number)
    drop_path = setup.vit.drop_path_rate > 0

    def heads_of(params):
        dino = graphs.module("dino_head", params["dino_head"])
        ibot = graphs.module("ibot_head", params["ibot_head"]) if setup.separate_ibot_head else dino
        return dino, ibot

    def step_fn(state: dict, batch: Mapping[str, Array]) -> tuple[dict, dict]:
        step = state["step"]
        s = scheds(step)
        temp = s["teacher_temp"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        k_global, k_local = jax.random.split(key)

        # the batch is n_shards blocks, one per official GPU (module docstring)
        g_img = _images(batch["global_crops"])
        n_img = g_img.shape[0]  # 2B global-crop images
        l_img = None
        if n_local:
            l_img = _images(batch["local_crops"])
        masks = buf = None
        if setup.family == "dinov2" and "masks" in batch:
            masks = batch["masks"]
        if setup.do_ibot:
            if masks is None:
                raise ValueError("the iBOT loss needs batch['masks'] (pipeline with masking)")
            upper = int(batch["mask_indices"].shape[0])
            if upper % n_shards:
                raise ValueError(
                    f"the masked-token buffer ({upper}, batch['mask_indices']) must split into "
                    f"the {n_shards} per-GPU groups (the input pipeline pads it so)"
                )
            buf = losses.masked_token_buffer(masks, upper, n_shards=n_shards, n_groups=n_shards)

        # ---- teacher: eval mode, no masks, no drop path, no gradient -----------------------
        # (official `SSLMetaArch.forward_backward` `get_teacher_output`, under torch.no_grad)
        teacher = jax.lax.stop_gradient(state["teacher"])
        t_out = graphs.module("backbone", teacher["backbone"]).forward_features(g_img)
        t_dino, t_ibot = heads_of(teacher)
        # chunked and swapped BEFORE the head: student crop i meets teacher crop 1 - i (official
        # `get_teacher_output`: `torch.cat((cls_1, cls_0))`)
        t_cls = t_dino(losses.swap_global_crops(t_out["x_norm_clstoken"], n_groups=n_shards))
        new_centers = {}
        if setup.centering == "centering":
            p_cls, new_centers["dino_center"] = centering.center_and_update(
                t_cls, state["dino_center"], temp, setup.center_momentum
            )
        else:
            p_cls = centering.sinkhorn_knopp_teacher(t_cls, temp)
        if setup.do_ibot:
            t_patch = t_ibot(_masked_tokens(t_out["x_norm_patchtokens"], buf, n_shards))
            if setup.centering == "centering":
                p_patch, new_centers["ibot_center"] = centering.ibot_center_and_update(
                    t_patch, state["ibot_center"], temp, buf.valid, setup.center_momentum,
                    shard_ids=buf.shard_ids, n_shards=n_shards, blocks=True,
                )  # fmt: skip
            else:
                p_patch = centering.ibot_sinkhorn_knopp_teacher(t_patch, temp, buf.valid)

        # ---- student --------------------------------------------------------------------
        def loss_fn(params):
            bb = graphs.module("backbone", params["backbone"])
            s_dino, s_ibot = heads_of(params)
            # the per-GPU groups of the official batch: the batch-subset drop path draws in each
            # (and so stays inside its batch shard)
            s_g = bb.forward_features(
                g_img, masks, key=k_global if drop_path else None, drop_groups=n_shards
            )
            s_g_cls = s_g["x_norm_clstoken"]
            s_local = None
            if n_local:
                s_l = bb.forward_features(
                    l_img, key=k_local if drop_path else None, drop_groups=n_shards
                )
                s_local = s_dino(s_l["x_norm_clstoken"])
            dino_local, dino_global = losses.dino_loss(
                s_dino(s_g_cls), s_local, p_cls, student_temp=setup.student_temp,
                n_groups=n_shards,
            )  # fmt: skip
            terms = {"dino_local_loss": dino_local, "dino_global_loss": dino_global}
            total = setup.dino_w * (dino_local + dino_global)
            if setup.do_koleo:
                # on the student's backbone CLS of the (masked) global crops, per shard (official
                # `forward_backward` applies `KoLeoLoss` to each global crop's per-GPU batch)
                koleo = setup.koleo_w * losses.koleo_loss(
                    s_g_cls, n_shards=n_shards, n_groups=n_shards
                )
                terms["koleo_loss"] = koleo
                total = total + koleo
            if setup.do_ibot:
                s_patch = s_ibot(_masked_tokens(s_g["x_norm_patchtokens"], buf, n_shards))
                ibot = losses.ibot_patch_loss(
                    s_patch, p_patch, buf.weights, buf.valid, n_img,
                    student_temp=setup.student_temp,
                )  # fmt: skip
                terms["ibot_loss"] = setup.ibot_w * ibot
                total = total + setup.ibot_w * ibot
            return total, terms

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["student"])

        # ---- optimizer --------------------------------------------------------------------
        # untrainable leaves (v1 norm_last_layer weight_g) have no gradient in torch: keep them
        # out of the norms and the clipping
        grads = jax.tree.map(
            lambda grp, g: g if grp.trainable else jnp.zeros_like(g),
            groups, grads, is_leaf=lambda x: isinstance(x, optim.LeafGroup),
        )  # fmt: skip
        norms = {sub: optim.global_norm(g) for sub, g in grads.items()}
        # clipping + AdamW (optim.adamw); the schedule values come from state["step"]
        updates, new_opt = tx.update(
            grads, state["opt_state"], state["student"],
            lr=s["lr"], last_layer_lr=s["last_layer_lr"], wd=s["wd"],
            last_layer_active=optim.last_layer_active(config, step),
        )  # fmt: skip
        new_student = optax.apply_updates(state["student"], updates)
        # ---- teacher EMA with the traced momentum -----------------------------------------
        # (a traced scalar: `nnx.EMA`'s static decay would recompile at every momentum value)
        m = s["momentum"]
        new_teacher = jax.tree.map(
            lambda t, p: (t * m + p * (1 - m)).astype(t.dtype), state["teacher"], new_student
        )

        finite = _finite(loss, *terms.values(), *norms.values())
        new_state = {
            **state,
            "student": new_student,
            "teacher": new_teacher,
            "opt_state": new_opt,
            **new_centers,
        }
        if setup.nan_skip:
            new_state = jax.tree.map(lambda n, old: jnp.where(finite, n, old), new_state, state)
        new_state["step"] = step + 1

        metrics = {"loss": loss, **terms}
        metrics.update({f"grad_norm_{k}": v for k, v in norms.items()})
        metrics.update(
            lr=s["lr"], last_layer_lr=s["last_layer_lr"], wd=s["wd"], momentum=m,
            teacher_temp=temp, finite=finite,
        )  # fmt: skip
        if setup.do_ibot:
            metrics["n_masked"] = jnp.sum(buf.valid.astype(jnp.int32))
            metrics["n_masked_dropped"] = buf.n_dropped
        return new_state, metrics

    return step_fn


def make_train_step(
    config, mesh: Mesh, state_shardings: Mapping, *, setup: StepSetup | None = None
):
    """ONE jax.jit of the step: state donated, outputs pinned to the input shardings (XLA may
    otherwise return equivalent but differently spelled shardings, and the next call would
    compile again), metrics replicated. Call it as `state, metrics = train_step(state, batch)`."""
    step_fn = build_step_fn(config, mesh, setup=setup)
    rules = tuple(config.mesh.rules)
    jitted = jax.jit(
        step_fn,
        donate_argnums=0,
        out_shardings=(dict(state_shardings), shd.replicated(mesh)),
    )

    def train_step(state, batch):
        # The model's activation constraints use logical names: resolve them with the mesh rules.
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(state, batch)

    def lower(state, batch):
        """AOT lowering in the same mesh / rules context (`.compile()` it to time compiling)."""
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted.lower(state, batch)

    train_step.jitted = jitted  # cache inspection (`_cache_size()`)
    train_step.lower = lower
    return train_step


# ---------------------------------------------------------------------------------------------
# Helpers for evaluation and accounting
# ---------------------------------------------------------------------------------------------


def _backbone(state: Mapping, config, which: str) -> DinoVisionTransformer:
    vit = vit_config(config).replace(drop_path_rate=0.0)
    abstract = nnx.eval_shape(lambda: DinoVisionTransformer(vit, rngs=nnx.Rngs(0)))
    graphdef = nnx.split(abstract, nnx.Param)[0]
    return nnx.merge(graphdef, state[which]["backbone"])


def teacher_backbone(state: Mapping, config) -> DinoVisionTransformer:
    """The teacher backbone as a module (shares the state's arrays; for evals / export)."""
    return _backbone(state, config, "teacher")


def student_backbone(state: Mapping, config) -> DinoVisionTransformer:
    return _backbone(state, config, "student")


def _vit_forward_flops(vit: ViTConfig, img: int, block_share: float = 1.0) -> float:
    # Matmul FLOPs (2 per multiply-add), as MaxText's `calculate_tflops_training_per_device`
    # counts them: per block 24 N D^2 + 4 N^2 D (qkv 6, proj 2, MLP 16 N D^2; QK^T and AV
    # 4 N^2 D); SwiGLU replaces 16 N D^2 by 6 N D h'. Plus the patch embedding 2 n 3 p^2 D.
    # `block_share`: the mean share of the images each block's residual branches run on.
    p, d = vit.patch_size, vit.embed_dim
    n_patch = (img // p) ** 2
    n = n_patch + 1 + vit.num_register_tokens
    mlp = 6 * n * d * vit.ffn_hidden_dim if vit.ffn_layer == "swiglu" else 16 * n * d * d
    block = 8 * n * d * d + mlp
    blocks = vit.depth * block + _attention_forward_flops(vit, img)
    return float(block_share * blocks + 2 * n_patch * 3 * p * p * d)


def _attention_forward_flops(vit: ViTConfig, img: int) -> float:
    # QK^T and AV of every block: 4 N^2 D per image (the attention term of `_vit_forward_flops`).
    n = (img // vit.patch_size) ** 2 + 1 + vit.num_register_tokens
    return float(vit.depth * 4 * n * n * vit.embed_dim)


def _block_share(vit: ViTConfig, batch: int, drop_groups: int) -> float:
    """Mean over the blocks of the share of a student batch of `batch` images that the
    residual branches run on. Batch-subset stochastic depth (v2, rate > 0.1) runs both branches
    of a block on `max(int(g * (1 - rate)), 1)` of each of `drop_groups` groups of g images
    (`dinojax.models.vit._drop_add_residual`, the same arithmetic); per-sample drop path runs
    them on the whole batch."""
    from dinojax.models.vit import drop_path_rates

    if batch <= 0 or vit.drop_path_rate <= 0 or vit.family != "dinov2":
        return 1.0
    g = batch // drop_groups if drop_groups > 1 else batch
    shares = [
        max(int(g * (1 - r)), 1) / g if isinstance(r, float) and r > 0.1 else 1.0
        for r in drop_path_rates(vit)
    ]
    return sum(shares) / len(shares)


# What each remat policy (`dinojax.models.vit._REMAT`) recomputes of a block's forward matmuls in
# the backward pass, on the einsum attention path: `full` all of it; `qkv_attn` keeps the qkv
# projection and the attention output, so it reruns the output projection (LayerScale and the
# second norm read its result), the MLP and QK^T (the softmax's backward reads the
# probabilities); `dots` keeps every matmul without batch dimensions (the linear layers) and
# reruns both attention einsums. `qkv_attn_mlp` is not modelled.
REMAT_RECOMPUTE = {
    "none": (),
    "full": ("qkv", "proj", "mlp", "qk", "av"),
    "qkv_attn": ("proj", "mlp", "qk"),
    "dots": ("qk", "av"),
}


def _remat_policy(remat: bool | str) -> str:
    policy = {True: "full", False: "none"}.get(remat, remat) if isinstance(remat, bool) else remat
    if policy not in REMAT_RECOMPUTE:
        raise ValueError(
            f"the recompute of remat policy {policy!r} is not modelled; "
            f"known: {sorted(REMAT_RECOMPUTE)}"
        )
    return policy


def _recompute_share(vit: ViTConfig, img: int, policy: str) -> float:
    """Share of the blocks' forward matmuls (per image at `img` pixels) that `policy` reruns."""
    d, n = vit.embed_dim, (img // vit.patch_size) ** 2 + 1 + vit.num_register_tokens
    mlp = 6 * n * d * vit.ffn_hidden_dim if vit.ffn_layer == "swiglu" else 16 * n * d * d
    parts = {"qkv": 6 * n * d * d, "proj": 2 * n * d * d, "mlp": mlp}
    parts.update(qk=2 * n * n * d, av=2 * n * n * d)
    return sum(parts[k] for k in REMAT_RECOMPUTE[policy]) / sum(parts.values())


def _executed_args(executed: bool, drop_groups: int, remat: bool | str) -> str:
    policy = _remat_policy(remat)
    if not executed and (drop_groups != 1 or policy != "none"):
        raise ValueError(
            f"drop_groups={drop_groups} / remat={remat} describe the executed count; "
            "pass executed=True (the nominal count runs every block on the whole batch)"
        )
    if drop_groups < 1:
        raise ValueError(f"drop_groups must be >= 1, got {drop_groups}")
    return policy


def _head_flops(config, d: int, ibot: bool) -> float:
    h = config.heads
    pre = "ibot_" if ibot else ""
    hid, bott, k = (
        int(h[f"{pre}hidden_dim"]),
        int(h[f"{pre}bottleneck_dim"]),
        int(h[f"{pre}out_dim"]),
    )
    nl = int(h.nlayers)
    dims = [d, bott] if nl == 1 else [d] + [hid] * (nl - 1) + [bott]
    mlp = sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))
    return float(mlp + 2 * bott * k)


def flops_per_step(
    config,
    mask_upper_bound: int | None = None,
    *,
    setup: StepSetup | None = None,
    executed: bool = False,
    drop_groups: int = 1,
    remat: bool | str = False,
) -> float:
    """Analytic training FLOPs of one step on the global batch (MaxText-style MFU accounting).

    Student = 3x forward (forward + backward) over 2B global + n_local*B local crops and their
    heads (CLS tokens, masked patch tokens at the static buffer size); teacher = 1x forward over
    the 2B global crops and its heads. Attention softmax, norms and losses are not counted.

    Nominal by default: the trainer's MFU numerator, the model as defined (every student block
    on the whole batch), independent of the mesh and the remat policy. `executed=True` counts the
    matmuls the step actually runs, to check the compiler's count against: batch-subset
    stochastic depth (v2 recipes with `drop_path_rate` > 0.1) runs the student's residual
    branches, forward and backward, on a subset of each of the step's `drop_groups` per-device
    groups (`n_batch_shards`; 60% for a rate of 0.4); the patch embedding has no input gradient
    (the images need none); `remat` (a remat policy name; True is "full") adds what the policy
    reruns of the student's blocks' forward in the backward pass (`REMAT_RECOMPUTE`: all of it
    for "full").
    """
    policy = _executed_args(executed, drop_groups, remat)
    setup = _setup_for(config, setup)
    vit = setup.vit
    b = int(config.batch_size)
    nl = int(config.data.local_crops_number)
    g_size, l_size = int(config.data.global_crops_size), int(config.data.local_crops_size)
    g_share, l_share = (_block_share(vit, n * b, drop_groups) if executed else 1.0 for n in (2, nl))
    student_bb = 2 * b * _vit_forward_flops(vit, g_size, g_share) + nl * b * _vit_forward_flops(
        vit, l_size, l_share
    )
    # the patch embedding alone (blocks on no image)
    patch = 2 * b * _vit_forward_flops(vit, g_size, 0.0) + nl * b * _vit_forward_flops(
        vit, l_size, 0.0
    )
    extra = 0.0
    if executed:
        extra -= patch  # no input gradient
        # the blocks only: the patch embedding and the heads are not checkpointed
        for n, size, share in ((2, g_size, g_share), (nl, l_size, l_share)):
            blocks = _vit_forward_flops(vit, size, share) - _vit_forward_flops(vit, size, 0.0)
            extra += n * b * blocks * _recompute_share(vit, size, policy)
    teacher_bb = 2 * b * _vit_forward_flops(vit, g_size)
    dino_head = _head_flops(config, vit.embed_dim, ibot=False)
    if setup.do_ibot and mask_upper_bound is None:
        from dinojax.data.masking import mask_upper_bound as bound

        n_tok = (g_size // vit.patch_size) ** 2
        ratio = tuple(config.data.mask_ratio)
        mask_upper_bound = bound(2 * b, n_tok, float(config.data.mask_probability), ratio)
    u = int(mask_upper_bound or 0) if setup.do_ibot else 0
    ibot_head = _head_flops(config, vit.embed_dim, ibot=setup.separate_ibot_head)
    student_heads = (2 * b + nl * b) * dino_head + u * ibot_head
    teacher_heads = 2 * b * dino_head + u * ibot_head
    return float(3 * (student_bb + student_heads) + extra + teacher_bb + teacher_heads)


def attention_flops_per_step(
    config,
    *,
    setup: StepSetup | None = None,
    executed: bool = False,
    drop_groups: int = 1,
    remat: bool | str = False,
) -> float:
    """The attention matmuls (QK^T, AV) inside `flops_per_step`: the share a Pallas kernel
    (`attention="splash"`) computes out of XLA's sight, as `cost_analysis` counts a Pallas call
    only through a cost estimate splash does not give. Same accounting: student 3x forward over
    the 2B global and n_local*B local crops, teacher 1x over the 2B global crops; the kernel's own
    recomputation in its backward pass is not counted. `executed`, `drop_groups`, `remat`: as in
    `flops_per_step` (the student's attention on the batch subset only; its forward once more,
    rerun under the "full" and "dots" policies; "qkv_attn*" keep the kernel's residuals)."""
    # the kernel's reruns: the qkv_attn* policies keep its residuals (none), full / dots rerun it
    kernel = "none" if remat == "qkv_attn_mlp" else remat
    policy = _executed_args(executed, drop_groups, kernel)
    setup = _setup_for(config, setup)
    vit = setup.vit
    b, nl = int(config.batch_size), int(config.data.local_crops_number)
    g = _attention_forward_flops(vit, int(config.data.global_crops_size))
    loc = _attention_forward_flops(vit, int(config.data.local_crops_size))
    g_share, l_share = (_block_share(vit, n * b, drop_groups) if executed else 1.0 for n in (2, nl))
    student = 2 * b * g * g_share + nl * b * loc * l_share
    return float((4 if policy in ("full", "dots") else 3) * student + 2 * b * g)


def state_summary(state: Mapping) -> dict[str, int]:
    """Parameter counts of the student submodules (for logs)."""
    return {k: int(sum(np.prod(x.shape) for x in jax.tree.leaves(v)))
            for k, v in state["student"].items()}  # fmt: skip
