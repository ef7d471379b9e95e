"""The config schema every recipe fills (ml_collections), with the official DINOv2 defaults.

`base_config()` is the official `dinov2/configs/ssl_default_config.yaml` (facebookresearch/dinov2;
= `train/vitl16_short.yaml` except block chunks). Recipes in this folder copy it and change what
their official yaml changes; `smoke(config)` shrinks any recipe to a CPU-sized run without changing
its code path.

Sections (consumed by `dinojax.ssl` for the step and by `dinojax.train` for the loop):
  model  : `arch` (official name) + `overrides` (ViTConfig fields) for the student and teacher
  heads  : DINO head (and the separate iBOT head when `separate_ibot_head`)
  loss   : family ("dinov2" = DINO + iBOT + KoLeo, "dino" = DINO v1), centering, temperatures
  optim  : AdamW, schedules, param groups, clipping. Durations are in epochs of `epoch_length`
           iterations (official), or in steps: set `optim.total_steps` and the run and every
           schedule end there; warm-ups are then `optim.warmup_steps`,
           `optim.freeze_last_layer_steps`, `loss.warmup_teacher_temp_steps` (each defaults to
           its epochs x epoch_length). `train.max_steps` only stops early, schedules unchanged.
  data   : the input pipeline (dinojax.data.DataConfig fields)
  mesh   : device mesh and logical axis rules
  train  : workdir-side behaviour: logging, checkpoints, evaluation, fault handling
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Global batch (all processes). Official: batch_size_per_gpu x world.
    c.batch_size = 2048

    c.model = ml_collections.ConfigDict()
    c.model.arch = "dinov2_vitl14"
    # ViTConfig field overrides. Training builds the model at the global crop size
    # (`dinov2/models/__init__.py` `build_model_from_cfg` passes `crops.global_crops_size`).
    c.model.overrides = ml_collections.ConfigDict(
        dict(
            patch_size=16,
            img_size=224,
            drop_path_rate=0.3,
            drop_path_uniform=True,
            layerscale_init=1e-5,
            ffn_layer="mlp",
            num_register_tokens=0,
            dtype="float32",  # compute dtype; "bfloat16" on accelerators
            # the device's own kernel: splash on TPU, cudnn on GPU (bf16), xla on CPU
            # (dinojax/models/attention.py); "xla" pins the parity path everywhere
            attention="auto",
            remat_policy="none",
            scan_layers=True,
        )
    )

    c.heads = ml_collections.ConfigDict()
    c.heads.out_dim = 65536
    c.heads.bottleneck_dim = 256
    c.heads.hidden_dim = 2048
    c.heads.nlayers = 3
    c.heads.separate_ibot_head = False
    c.heads.ibot_out_dim = 65536
    c.heads.ibot_bottleneck_dim = 256
    c.heads.ibot_hidden_dim = 2048
    c.heads.norm_last_layer = False  # DINO v1 option: weight_g frozen at 1

    c.loss = ml_collections.ConfigDict()
    c.loss.family = "dinov2"  # "dino" = DINO v1: DINO loss only
    c.loss.centering = "centering"  # or "sinkhorn_knopp"
    c.loss.student_temp = 0.1
    c.loss.teacher_temp = 0.07
    c.loss.warmup_teacher_temp = 0.04
    c.loss.warmup_teacher_temp_epochs = 30
    c.loss.warmup_teacher_temp_steps = ml_collections.config_dict.placeholder(int)  # see optim
    c.loss.teacher_temp_per = "step"  # v2 warms up per iteration, v1 per epoch
    c.loss.center_momentum = 0.9
    c.loss.dino_loss_weight = 1.0
    c.loss.koleo_loss_weight = 0.1
    c.loss.ibot_loss_weight = 1.0

    c.optim = ml_collections.ConfigDict()
    c.optim.epochs = 100
    c.optim.epoch_length = 1250  # OFFICIAL_EPOCH_LENGTH: iterations per "epoch"
    # Step-based durations (dinojax.train.trainer.resolve_durations): when total_steps is set it
    # replaces epochs x epoch_length, and the *_steps keys below replace their *_epochs keys
    # (None: epochs x epoch_length).
    c.optim.total_steps = ml_collections.config_dict.placeholder(int)
    c.optim.warmup_steps = ml_collections.config_dict.placeholder(int)
    c.optim.freeze_last_layer_steps = ml_collections.config_dict.placeholder(int)
    c.optim.base_lr = 4e-3
    c.optim.lr_scaling = "sqrt_wrt_1024"  # or "linear_wrt_256" (v1), "none"
    c.optim.min_lr = 1e-6
    c.optim.warmup_epochs = 10
    c.optim.weight_decay = 0.04
    c.optim.weight_decay_end = 0.4
    c.optim.layerwise_decay = 0.9
    c.optim.patch_embed_lr_mult = 0.2
    c.optim.clip_grad = 3.0
    c.optim.clip_mode = "per_submodule"  # v1: "per_tensor"
    c.optim.freeze_last_layer_epochs = 1
    c.optim.freeze_mode = "lr_zero"  # v1: "skip" (grads dropped, optimizer state unchanged)
    c.optim.param_groups = "dinov2"  # v1: "dino" (decay iff ndim >= 2 and not a bias)
    c.optim.momentum_teacher = 0.992
    c.optim.final_momentum_teacher = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8

    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds:imagenet2012:train"
    c.data.data_dir = ml_collections.config_dict.placeholder(str)
    c.data.eval_source = ml_collections.config_dict.placeholder(str)  # kNN: labelled split
    c.data.eval_train_source = ml_collections.config_dict.placeholder(str)
    c.data.augment = "dinov2"  # dinojax.data.augment.PRESETS
    c.data.global_crops_size = 224
    c.data.local_crops_size = 96
    c.data.local_crops_number = 8
    c.data.mask_probability = 0.5
    c.data.mask_ratio = (0.1, 0.5)
    c.data.num_workers = 8
    c.data.read_threads = 2
    c.data.prefetch = 2

    c.mesh = ml_collections.ConfigDict()
    # FSDP over every device (-1 fills the mesh), like the official run: its FSDP shards the
    # student, teacher and optimizer state across the whole world (`dinov2/fsdp/__init__.py`,
    # `compute_precision.*.sharding_strategy` in `ssl_default_config.yaml`). On TPU slices ICI links
    # every chip; on GPU clusters with slow links between hosts, `(num_hosts, -1)` keeps the FSDP
    # all-gathers inside a host (hybrid sharding). The batch is split over both axes either way, so
    # the losses do not depend on the shape.
    c.mesh.shape = (1, -1)
    c.mesh.axes = ("data", "fsdp")
    # Multi-slice TPU pods (devices with several `slice_index` values): `shape` is the mesh inside
    # each slice (ICI) and `dcn_shape` the mesh across slices (data-centre network), multiplied
    # axis by axis (`dinojax.sharding.hybrid_device_array`, as MaxText's `dcn_*` axes). Unset:
    # the slices go on the first axis, i.e. data parallelism across slices and FSDP inside each,
    # so only gradient and statistics reductions cross the slow network. A tuple such as (2, 1).
    c.mesh.dcn_shape = ml_collections.config_dict.placeholder(tuple)
    # Logical parameter/activation axis -> mesh axes (`dinojax.sharding`).
    c.mesh.rules = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("mlp", None),
        ("qkv", None),
        ("heads", None),
        ("norm", None),
        ("layers", None),
        ("hidden", "fsdp"),
        ("bottleneck", None),
        ("prototypes", "fsdp"),  # head last layers (bottleneck x K): sharded like FSDP
    )

    c.train = ml_collections.ConfigDict()
    c.train.log_every = 10
    c.train.checkpoint_every = 1250
    c.train.keep_checkpoints = 3
    c.train.knn_every = 12500  # 0: off
    c.train.knn_max_train = 50000
    c.train.nan_policy = "stop"  # or "skip"
    # Stop after this many steps although the schedules run to epochs x epoch_length (None: all).
    c.train.max_steps = ml_collections.config_dict.placeholder(int)
    c.train.max_consecutive_skips = 100  # nan_policy="skip": give up after this many in a row
    c.train.async_checkpoints = True
    # On an fsdp > 1 mesh, a state array with at least this many elements left replicated (a
    # missing or non-divisible sharding rule) stops the run before compiling.
    c.train.assert_sharded_min_size = 2**20
    c.train.knn_batch_size = 256
    c.train.knn_image_size = 224  # eval transform: resize 256/224 * size, center crop `size`
    # Peak FLOP/s per device for the logged MFU; None: looked up from the device kind (TPUs,
    # H100/H200/A100/L4; unknown kinds such as CPUs log no MFU).
    c.train.peak_flops = ml_collections.config_dict.placeholder(float)
    # JAX persistent compilation cache: a restarted run loads its compiled step from here.
    c.train.compilation_cache_dir = ml_collections.config_dict.placeholder(str)
    c.train.knn_at_start = False  # teacher kNN before the first step too
    c.train.knn_at_end = False  # and after the last
    c.train.progress = True  # tqdm bar on process 0
    return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """`get_config` argument -> ConfigDict: "smoke,variant=vitb16" gives smoke=True,
    variant="vitb16". Keys not in `defaults` are an error; values take the defaults' types."""
    out = ml_collections.ConfigDict(dict(defaults, smoke=defaults.get("smoke", False)))
    for token in filter(None, (t.strip() for t in (arg or "").split(","))):
        key, eq, value = token.partition("=")
        if key not in out:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(out.keys())}")
        default = out[key]
        if not eq:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(f"config argument {key}={value!r} is not a boolean")
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = type(default)(value) if default is not None else value
    return out


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same recipe at CPU size: tiny width/depth, few prototypes, small crops and batch."""
    c.batch_size = 16
    c.model.overrides.update(dict(dtype="float32", attention="xla", remat_policy="none"))
    c.model.arch = c.model.arch  # same family and FFN type; width/depth shrink below
    c.model.overrides.embed_dim = 64
    c.model.overrides.depth = 2
    c.model.overrides.num_heads = 2
    c.heads.out_dim = c.heads.ibot_out_dim = 256
    c.heads.hidden_dim = c.heads.ibot_hidden_dim = 64
    c.heads.bottleneck_dim = c.heads.ibot_bottleneck_dim = 32
    p = c.model.overrides.patch_size
    c.data.global_crops_size = 4 * p
    c.data.local_crops_size = 2 * p
    c.data.local_crops_number = 2
    c.data.source = "digits:train"
    c.data.eval_source = "digits:test"
    c.data.eval_train_source = "digits:train"
    c.data.num_workers = 0
    c.data.read_threads = 1
    c.optim.epochs = 2
    c.optim.epoch_length = 4
    c.optim.warmup_epochs = 1
    c.optim.freeze_last_layer_epochs = 1
    c.loss.warmup_teacher_temp_epochs = 1
    c.train.log_every = 1
    c.train.checkpoint_every = 4
    c.train.knn_every = 0
    c.train.knn_max_train = 1000
    c.train.knn_batch_size = 64
    c.train.knn_image_size = c.data.global_crops_size
    return c
