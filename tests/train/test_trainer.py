"""The training loop on 8 simulated CPU devices: mesh independence, one compilation, exact resume
after SIGTERM and after a crash, a checkpoint written on (2, 4) continuing on (8, 1), NaN
handling (stop and skip)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_configs import tiny_config

from dinojax.data.pipeline import DinoDataIterator
from dinojax.ssl.optim import make_schedules
from dinojax.train.checkpoint import Checkpointer
from dinojax.train.trainer import TrainingDiverged, resolve_durations, train

LOSS_KEYS = ("loss", "dino_global_loss", "dino_local_loss", "ibot_loss", "koleo_loss")


def losses(result, keys=LOSS_KEYS) -> dict[int, tuple[float, ...]]:
    return {int(m["iteration"]): tuple(m[k] for k in keys) for m in result.history}


class _CompileCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("Compiling "):
            self.names.append(msg.split()[1])


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for this module: runs of the same program (resumes) load
    the compiled step instead of recompiling (what `train.compilation_cache_dir` does for users).
    Reset afterwards so other tests see JAX's default."""
    from jax._src import compilation_cache as cc

    saved = {
        k: getattr(jax.config, k)
        for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                  "jax_persistent_cache_min_entry_size_bytes")
    }  # fmt: skip
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()
    yield
    for k, v in saved.items():
        jax.config.update(k, v)
    cc.reset_cache()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """8 uninterrupted steps on a (2, 4) mesh, compilations counted. The progress bar is on, a
    peak FLOP/s is configured (MFU), and the kNN test split is unlabelled (kNN switched off at
    start-up with a message; training goes on); stdout and stderr are captured."""
    from PIL import Image

    workdir = tmp_path_factory.mktemp("reference")
    unlabelled = tmp_path_factory.mktemp("unlabelled")
    for i in range(4):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(unlabelled / f"{i}.png")
    config = tiny_config(progress=True, peak_flops=1e12, knn_every=4)
    config.data.eval_source = f"folder:{unlabelled}"
    counter = _CompileCounter()
    logger = logging.getLogger("jax")
    logger.addHandler(counter)
    was = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            result = train(config, workdir, record_history=True)
    finally:
        jax.config.update("jax_log_compiles", was)
        logger.removeHandler(counter)
    return result, workdir, counter.names, (out.getvalue(), err.getvalue())


def test_reference_run(reference):
    result, workdir, compiled, _ = reference
    assert result.status == "done" and result.step == 8
    assert sorted(losses(result)) == list(range(8))
    assert all(m["finite"] == 1.0 for m in result.history)
    # ONE compilation of the training step for the whole run.
    assert compiled.count("jit(step_fn)") == 1, compiled
    ckpt = Checkpointer(workdir / "checkpoints", save_every=4)
    assert ckpt.all_steps() == [4, 8]
    ckpt.close()
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert any('"kind": "compile"' in line for line in lines)
    assert sum('"kind": "train"' in line for line in lines) == 8
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))


def test_reference_run_metrics_and_progress(reference):
    """Every logged step carries the schedules, grad norms, every loss term and the throughput
    (img/s, per device, TFLOP/s per device, MFU against train.peak_flops); the compilation is a
    record of its own. The progress bar shows step, loss and img/s."""
    result, workdir, _, (out, err) = reference
    assert result.knn == {} and "has no labels: kNN evaluation is disabled" in out
    bar = err.replace("\r", "\n").splitlines()  # tqdm redraws its line with \r
    assert any("8/8" in line and "loss=" in line and "img/s=" in line for line in bar), err
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    compile_rec = [r for r in records if r["kind"] == "compile"]
    assert len(compile_rec) == 1 and compile_rec[0]["compile_time_s"] > 0
    steps = [r for r in records if r["kind"] == "train"]
    for r in steps:
        assert "compile_time_s" not in r
        assert {"lr", "last_layer_lr", "wd", "momentum", "teacher_temp"} <= set(r)
        assert {"grad_norm_backbone", "grad_norm_dino_head"} <= set(r), sorted(r)
        assert all(isinstance(r[k], float) for k in LOSS_KEYS), r
        assert r["img_per_s"] > 0
        assert r["img_per_s_per_device"] == pytest.approx(r["img_per_s"] / 8)
        assert r["tflops_per_device"] > 0
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] * 1e12 / 1e12)


def test_rerun_of_a_finished_run_does_nothing(reference):
    result, workdir, _, _ = reference
    again = train(tiny_config(), workdir)
    assert again.step == 8 and again.status == "done" and again.compile_time_s == 0.0
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert sum('"kind": "train"' in line for line in lines) == 8


def test_one_device_equals_2x4_mesh(reference, tmp_path):
    """The same 3 steps on a single device give the (2, 4) mesh's losses. float32 reductions run
    in another order, so not bit equality: measured max relative difference 2.4e-6 (step 3,
    growing from 1e-7 at step 1 as the updates compound); tolerance 2e-5."""
    config = tiny_config(max_steps=3)
    config.mesh.shape = (1, 1)
    single = train(config, tmp_path, record_history=True, devices=jax.devices()[:1])
    ref = losses(reference[0])
    for it, vals in losses(single).items():
        np.testing.assert_allclose(vals, ref[it], rtol=2e-5, atol=2e-6, err_msg=f"step {it}")


def test_kill_sigterm_resume_exact_then_another_mesh(reference, tmp_path):
    """A crash at step 6 leaves checkpoint 4; resuming from it and stopping by SIGTERM at step 6
    writes checkpoint 6; both runs reproduce the uninterrupted losses bit for bit. Checkpoint 6,
    written on the (2, 4) mesh, then continues on (8, 1) with the reference losses (to float32
    reduction-order tolerance)."""
    ref = losses(reference[0])

    class Crash(RuntimeError):
        pass

    def crash_at_6(n):
        if n == 6:
            raise Crash

    with pytest.raises(Crash):
        train(tiny_config(), tmp_path, on_step=crash_at_6)
    ckpt = Checkpointer(tmp_path / "checkpoints", save_every=4)
    assert ckpt.all_steps() == [4]  # the periodic checkpoint; nothing of the crashed steps
    ckpt.close()

    def sigterm_at_6(n):
        if n == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    resumed = train(tiny_config(), tmp_path, record_history=True, on_step=sigterm_at_6)
    assert resumed.status == "preempted" and resumed.step == 6
    ckpt = Checkpointer(tmp_path / "checkpoints", save_every=4)
    assert ckpt.all_steps() == [4, 6]
    ckpt.close()
    got = losses(resumed)
    assert sorted(got) == [4, 5]
    for it, vals in got.items():
        assert vals == ref[it], f"step {it}: {vals} != {ref[it]}"

    config = tiny_config()
    config.mesh.shape = (8, 1)
    moved = train(config, tmp_path, record_history=True)
    assert moved.status == "done" and moved.step == 8
    got = losses(moved)
    assert sorted(got) == [6, 7]
    for it, vals in got.items():
        np.testing.assert_allclose(vals, ref[it], rtol=2e-5, atol=2e-6, err_msg=f"step {it}")


def _poison_batch(monkeypatch, bad_step: int) -> None:
    """The global crops of batch `bad_step` become NaN (a corrupt batch)."""
    original = DinoDataIterator.__next__

    def poisoned(self):
        step = self.step
        batch = original(self)
        if step == bad_step:
            batch = dict(batch, global_crops=batch["global_crops"] * jnp.nan)
        return batch

    monkeypatch.setattr(DinoDataIterator, "__next__", poisoned)


def test_nan_stop_names_step_and_last_good_checkpoint(monkeypatch, tmp_path):
    _poison_batch(monkeypatch, bad_step=2)
    with pytest.raises(TrainingDiverged, match=r"at step 2 .*last good checkpoint is step 2"):
        train(tiny_config(checkpoint_every=2, nan_policy="stop"), tmp_path)
    ckpt = Checkpointer(tmp_path / "checkpoints", save_every=2)
    assert ckpt.all_steps() == [2]  # nothing of the poisoned state was written
    ckpt.close()


def test_nan_skip_leaves_the_state_and_goes_on(monkeypatch, tmp_path):
    _poison_batch(monkeypatch, bad_step=2)
    # Durations in steps: the run, and every schedule, end at optim.total_steps.
    config = tiny_config(checkpoint_every=2, nan_policy="skip")
    config.optim.update(total_steps=4, warmup_steps=1, freeze_last_layer_steps=1)
    result = train(config, tmp_path, record_history=True)
    assert result.status == "done" and result.step == 4
    schedules = make_schedules(resolve_durations(config))
    for m in result.history:
        want = schedules(int(m["iteration"]))
        for k in ("lr", "last_layer_lr", "wd", "momentum", "teacher_temp"):
            assert m[k] == pytest.approx(float(want[k]), rel=1e-6), (k, m["iteration"])
    assert result.history[1]["lr"] > result.history[3]["lr"] > float(schedules(4)["lr"])
    assert result.skipped_steps == [2]
    finite = [m["finite"] for m in result.history]
    assert finite == [1.0, 1.0, 0.0, 1.0]
    assert np.isfinite(result.history[3]["loss"])


def test_export_loads_in_official_pytorch(reference, tmp_path):
    """The trained teacher exported as a DINOv2 teacher_checkpoint.pth loads strictly into the
    official PyTorch backbone and head, and computes what the JAX teacher computes."""
    import torch
    from reference import official_dino_head, official_vit

    import dinojax
    from dinojax.train.export import export_checkpoint

    _, workdir, _, _ = reference
    export_checkpoint(workdir, tmp_path / "teacher_dir")
    export_checkpoint(workdir, tmp_path / "teacher.pth", fmt="teacher")
    model, heads = dinojax.load(tmp_path / "teacher_dir", heads=True)
    ckpt = Checkpointer(workdir / "checkpoints", save_every=4)
    teacher = ckpt.restore_numpy(8, ("teacher",))
    ckpt.close()
    jax.tree.map(np.testing.assert_array_equal, model.params(), teacher["backbone"])

    sd = torch.load(tmp_path / "teacher.pth", weights_only=True)["teacher"]
    vit = official_vit(model.cfg)
    vit.load_state_dict({k[9:]: v for k, v in sd.items() if k.startswith("backbone.")})
    h = heads["dino_head"]
    head = official_dino_head(
        in_dim=model.cfg.embed_dim, out_dim=h.out_dim, hidden_dim=h.hidden_dim,
        bottleneck_dim=h.bottleneck_dim, nlayers=h.nlayers,
    )  # fmt: skip
    head.load_state_dict({k[10:]: v for k, v in sd.items() if k.startswith("dino_head.")})

    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        cls_t = vit.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))["x_norm_clstoken"]
        logits_t = head(cls_t).numpy()
    with jax.default_matmul_precision("highest"):
        cls = model(jnp.asarray(x))
        logits = np.asarray(h(cls))
    np.testing.assert_allclose(np.asarray(cls), cls_t.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, logits_t, rtol=1e-4, atol=1e-5)


def test_a_large_replicated_parameter_stops_the_run(tmp_path):
    """A missing sharding rule (the heads' prototypes dimension) leaves the 32 x 128 last layers
    of the student, teacher and Adam moments replicated on the fsdp=4 mesh: the run stops before
    compiling, naming them."""
    config = tiny_config()
    config.mesh.rules = tuple((n, None if n == "prototypes" else t) for n, t in config.mesh.rules)
    with pytest.raises(AssertionError, match=r"train.assert_sharded_min_size.*\['teacher'\]\["
                       r"'dino_head'\]\['last_layer'\]\['weight_v'\] \(32, 128\)"):  # fmt: skip
        train(config, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()  # stopped before anything ran


def test_teacher_and_adam_moments_are_sharded_like_the_student():
    """The state the trainer builds: teacher and Adam moments carry the student's shardings
    (FSDP), and the large arrays of all three are split over the fsdp axis."""
    from dinojax.sharding import assert_sharded, make_mesh
    from dinojax.ssl.step import create_train_state

    config = tiny_config()
    mesh = make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axes))
    state, _ = create_train_state(config, mesh)
    specs = lambda tree: jax.tree.map(lambda x: x.sharding.spec, tree)  # noqa: E731
    assert specs(state["teacher"]) == specs(state["student"])
    student = {jax.tree_util.keystr(p): x.sharding.spec
               for p, x in jax.tree_util.tree_leaves_with_path(state["student"])}  # fmt: skip
    moments: dict[str, list] = {}
    for path, x in jax.tree_util.tree_leaves_with_path(state["opt_state"]):
        key = jax.tree_util.keystr(path)
        owner = [k for k in student if key.endswith(k)]  # mu / nu trees mirror the student
        if owner:
            moments.setdefault(owner[0], []).append(x.sharding.spec)
    big = [k for k, x in _leaves(state["student"]).items() if x.size >= 4096]
    assert big and any(student[k] != jax.sharding.PartitionSpec() for k in big)
    for k in big:
        assert moments.get(k) == [student[k]] * 2, (k, moments.get(k))  # mu and nu
    assert_sharded(state, config.train.assert_sharded_min_size)


def _leaves(tree) -> dict:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_missing_knn_split_fails_before_compiling(tmp_path):
    config = tiny_config(knn_every=4)
    config.data.eval_source = str(tmp_path / "no_such_folder")
    with pytest.raises(ValueError, match=r"kNN evaluation cannot read its data: data.eval_source"
                       r".*does not exist.*knn_every=0"):  # fmt: skip
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_url_workdir_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """`Path("gs://bucket/run")` is the local path `gs:/bucket/run`: the run would checkpoint to
    the worker's disk. The trainer refuses the URL and names the mount route instead."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"'gs://bucket/run' is a gs:// URL.*gcsfuse"):
        train(tiny_config(), "gs://bucket/run")
    assert list(tmp_path.iterdir()) == []
