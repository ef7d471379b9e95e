"""Recipes carry the official values (facebookresearch/dinov2 `dinov2/configs/train/*.yaml` over
`dinov2/configs/ssl_default_config.yaml`), `smoke` shrinks without changing the code path, config
arguments and the data / distributed set-up fail with clear messages."""

from __future__ import annotations

import importlib
import math

import pytest
from train_configs import ROOT  # noqa: F401  (puts the repository root on sys.path)

from dinojax.ssl.optim import scaled_lr, total_steps
from dinojax.ssl.step import StepSetup
from dinojax.train.data import data_config
from dinojax.train.distributed import maybe_initialize

RECIPES = ("dinov2", "dinov2_vitl14", "dinov2_vitg14", "dinov2_vits14", "dinov2_vitb14",
           "dino_vits16", "demo")  # fmt: skip


def recipe(name, arg=None):
    return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_builds_full_and_smoke(name):
    for arg in (None, "smoke"):
        c = recipe(name, arg)
        setup = StepSetup.from_config(c)  # the step accepts it
        dc = data_config(c, process_count=1)
        assert dc.batch_size == c.batch_size
        assert (dc.masking is None) == (c.loss.family == "dino")
        if arg == "smoke":
            assert c.batch_size <= 64 and total_steps(c) <= 40 and setup.vit.embed_dim <= 96
        # smoke keeps the recipe's code path: family, centering, heads layout, FFN
        full = recipe(name)
        assert (c.loss.family, c.loss.centering, c.heads.separate_ibot_head) == (
            full.loss.family, full.loss.centering, full.heads.separate_ibot_head)  # fmt: skip
        assert c.model.overrides.ffn_layer == full.model.overrides.ffn_layer
        assert tuple(c.mesh.shape) == (1, -1)  # FSDP over every device by default


@pytest.mark.parametrize("name", ["dinov2", "dinov2_vitg14"])
def test_default_mesh_shards_every_large_array(name):
    """At full size on the default mesh (8 devices: fsdp=8) every state array of 2^20 elements
    or more (train.assert_sharded_min_size) is split, the teacher and Adam moments included:
    the trainer's start-up check would pass. Abstract shapes only: nothing is allocated."""
    import jax

    from dinojax.sharding import make_mesh
    from dinojax.ssl.step import state_shardings_for

    c = recipe(name)
    mesh = make_mesh(tuple(c.mesh.shape), tuple(c.mesh.axes))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8}
    shardings = state_shardings_for(c, mesh)
    sizes = _abstract_sizes(c)
    large = {k: v for k, v in sizes.items() if v >= c.train.assert_sharded_min_size}
    flat = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
    assert {k.split("]")[0] + "]" for k in large} >= {"['student']", "['teacher']", "['opt_state']"}
    replicated = [k for k in large if flat[k].is_fully_replicated]
    assert not replicated, replicated


def _abstract_sizes(c) -> dict[str, int]:
    import math

    import jax

    from dinojax.ssl import step

    setup = StepSetup.from_config(c)
    abstract = jax.eval_shape(lambda k: step._init_state(c, setup, k), jax.random.key(0))
    return {jax.tree_util.keystr(p): math.prod(x.shape)
            for p, x in jax.tree_util.tree_leaves_with_path(abstract)}  # fmt: skip


def test_official_values():
    d = recipe("dinov2")  # vitl16_short
    assert (d.model.overrides.patch_size, d.batch_size, total_steps(d)) == (16, 2048, 125000)
    # sqrt_wrt_1024 scaling (`dinov2/utils/config.py` `apply_scaling_rules_to_cfg`): 5.657e-3
    assert math.isclose(scaled_lr(d), 4e-3 * math.sqrt(2))
    g = recipe("dinov2_vitg14")
    s = StepSetup.from_config(g)
    assert s.vit.ffn_layer == "swiglu" and s.vit.embed_dim == 1536 and s.vit.depth == 40
    assert g.loss.centering == "sinkhorn_knopp" and s.separate_ibot_head
    assert (g.heads.out_dim, g.heads.bottleneck_dim) == (131072, 384)
    assert (g.heads.ibot_out_dim, g.heads.ibot_bottleneck_dim) == (131072, 256)
    assert (g.optim.base_lr, g.optim.warmup_epochs, g.optim.layerwise_decay) == (2e-4, 80, 1.0)
    assert (g.optim.momentum_teacher, g.optim.weight_decay_end, total_steps(g)) == (
        0.994, 0.2, 625000)  # fmt: skip
    assert (g.data.local_crops_size, s.vit.drop_path_rate) == (98, 0.4)
    assert g.batch_size == 3072  # 12 per GPU x 256 GPUs (the paper; dinov2#311)
    v1 = recipe("dino_vits16")
    assert (v1.loss.family, v1.optim.param_groups, v1.optim.clip_mode) == (
        "dino", "dino", "per_tensor")  # fmt: skip
    assert math.isclose(scaled_lr(v1), 5e-4 * 512 / 256)
    assert v1.heads.norm_last_layer and not recipe("dino_vits16", "boosted").heads.norm_last_layer


def test_config_argument_errors():
    with pytest.raises(ValueError, match="unknown config argument 'vitx'"):
        recipe("dinov2", "vitx")
    with pytest.raises(ValueError, match="boosted='maybe' is not a boolean"):
        recipe("dino_vits16", "boosted=maybe")
    assert recipe("dino_vits16", "boosted=true,smoke").loss.teacher_temp == 0.07


def test_data_config_errors():
    c = recipe("dinov2", "smoke")
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        data_config(c, process_count=3)
    assert data_config(c, process_count=2).batch_size == c.batch_size // 2
    # iBOT mask groups: the step's official ranks, divided among the processes
    assert data_config(c, 1, n_ranks=8).mask_groups == 8
    assert data_config(c, 2, n_ranks=8).mask_groups == 4
    assert data_config(c, 2).mask_groups == 1
    with pytest.raises(ValueError, match="3 official ranks"):
        data_config(c, 2, n_ranks=3)
    c.data.mask_groups = 2  # an explicit per-process count must give the step's groups
    assert data_config(c, 2, n_ranks=4).mask_groups == 2
    assert data_config(c, 2).mask_groups == 2
    with pytest.raises(ValueError, match=r"data.mask_groups 2 x 2 processes != the step's 3"):
        data_config(c, 2, n_ranks=3)
    c.data.augment = "simclr"
    with pytest.raises(ValueError, match="unknown data.augment 'simclr'"):
        data_config(c, process_count=1)


def test_distributed_needs_full_coordinates(monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
              "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):  # fmt: skip
        monkeypatch.delenv(k, raising=False)
    assert maybe_initialize() is False  # a lone process starts nothing
    with pytest.raises(ValueError, match="needs num_processes and process_id"):
        maybe_initialize("127.0.0.1:1234")
    assert maybe_initialize("127.0.0.1:1234", num_processes=1, process_id=0) is False


@pytest.mark.parametrize(
    "env, visible",
    [
        ({"SLURM_NTASKS": "8", "SLURM_PROCID": "3"}, True),  # srun with several tasks
        ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, False),  # a one-task SLURM job
        ({"SLURM_NTASKS": "8"}, False),  # sbatch shell outside srun: not one of the tasks
        ({"OMPI_COMM_WORLD_SIZE": "4"}, True),  # mpirun
        ({"OMPI_COMM_WORLD_SIZE": "1"}, False),
        ({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1"}, True),  # a multi-host TPU slice
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),  # a single-host TPU VM
        ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080"}, True),  # multislice
        ({}, False),
    ],
)
def test_cluster_detection(monkeypatch, env, visible):
    """Which launchers make train.py call jax.distributed.initialize() with JAX's own cluster
    detection (no flags): several SLURM tasks, Open MPI, multi-host TPU slices, multislice."""
    from dinojax.train import distributed

    for k in ("SLURM_NTASKS", "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
              "MEGASCALE_COORDINATOR_ADDRESS"):  # fmt: skip
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert distributed._cluster_visible() is visible


def test_durations_in_steps():
    """`optim.total_steps` replaces epochs x epoch_length: every schedule ends at its final value
    at total_steps, warm-ups are in steps (defaulting to their epochs x epoch_length)."""
    from dinojax.ssl.optim import make_schedules
    from dinojax.train.trainer import resolve_durations

    c = recipe("dinov2", "smoke")  # 2 epochs x 4 steps, warm-ups of 1 epoch
    assert resolve_durations(c) is c  # epochs unless total_steps is set
    c.optim.total_steps = 10
    c.optim.warmup_steps = 3
    r = resolve_durations(c)
    assert total_steps(r) == 10 and r.optim.warmup_epochs * r.optim.epoch_length == 3
    # not given in steps: the recipe's 1 epoch x 4 steps
    assert r.optim.freeze_last_layer_epochs * r.optim.epoch_length == 4
    assert r.loss.warmup_teacher_temp_epochs * r.optim.epoch_length == 4
    s = make_schedules(r)
    at = {i: {k: float(v) for k, v in s(i).items()} for i in (0, 1, 2, 3, 9, 10)}
    peak = scaled_lr(c)  # official warm-up: linspace(0, peak, 3) over steps 0, 1, 2
    assert (at[0]["lr"], at[1]["lr"], at[2]["lr"]) == pytest.approx((0.0, peak / 2, peak))
    assert at[3]["last_layer_lr"] == 0.0 and at[9]["last_layer_lr"] > 0.0
    assert at[2]["teacher_temp"] < c.loss.teacher_temp == pytest.approx(at[3]["teacher_temp"])
    assert at[9]["lr"] > c.optim.min_lr and at[9]["momentum"] < 1.0  # still on the cosine
    assert at[10]["lr"] == pytest.approx(c.optim.min_lr)
    assert at[10]["wd"] == pytest.approx(c.optim.weight_decay_end)
    assert at[10]["momentum"] == pytest.approx(c.optim.final_momentum_teacher)
    c.optim.warmup_steps = 11
    with pytest.raises(ValueError, match=r"optim.warmup_steps = 11 must lie in \[0, optim.total"):
        resolve_durations(c)
    c.optim.update(warmup_steps=None, total_steps=3)
    with pytest.raises(ValueError, match=r"warmup_steps = 4 \(optim.warmup_epochs x optim.epoch"):
        resolve_durations(c)
    c.optim.update(warmup_steps=1, freeze_last_layer_steps=1)
    c.loss.warmup_teacher_temp_steps = 5  # its own schedule (official): may outlast the run
    assert resolve_durations(c).loss.warmup_teacher_temp_epochs == 5
    c.loss.warmup_teacher_temp_steps = -1
    with pytest.raises(ValueError, match="warmup_teacher_temp_steps = -1 must be >= 0"):
        resolve_durations(c)
    v1 = recipe("dino_vits16", "boosted,smoke")  # teacher temperature warmed up per epoch
    v1.optim.total_steps = 10
    with pytest.raises(ValueError, match="teacher_temp_per='epoch' warms"):
        resolve_durations(v1)
    v1.loss.teacher_temp_per = "step"
    assert resolve_durations(v1).loss.warmup_teacher_temp_epochs == v1.optim.epoch_length
