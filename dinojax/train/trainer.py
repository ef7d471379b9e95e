"""The training loop: mesh -> sharded state -> (resume) -> data -> one compiled step -> loop with
metrics, checkpoints, kNN evaluations, preemption and divergence handling.

`train` runs five phases, each a function of its own: `_set_up` (mesh, the step's static setup,
the kNN data check, the sharded initial state), `_restore` (latest checkpoint and the data
iterator after it), `_compile` (the step, once, ahead of the data), `_loop` (the steps; `_Monitor`
reads back and acts on each step's metrics) and `_finish` (the final kNN evaluation).

Step numbering: after `n` completed steps the state's `step` is `n`, the data iterator has handed
out batches 0..n-1, and a checkpoint taken then is checkpoint `n`. Resuming from checkpoint `n`
feeds batch `n` next, so an interrupted run continues with exactly the losses an uninterrupted one
would have had (the data order and every random draw are functions of the step).

Metrics of step `n` are read back while step `n+1` runs (one step of lag, so the host never waits
for the device between steps), and always before a checkpoint is written: a checkpoint is only
saved once every step it contains is known to be finite.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from dinojax.train.checkpoint import Checkpointer, abstract_state
from dinojax.train.data import make_pipeline
from dinojax.train.metrics import MetricsWriter, Throughput, peak_flops_per_device
from dinojax.train.preemption import PreemptionGuard

__all__ = ["TrainResult", "TrainingDiverged", "backbone_config", "resolve_durations", "train"]

log = logging.getLogger("dinojax.train")

NAN_POLICIES = ("stop", "skip")


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient with nan_policy="stop"."""

    def __init__(self, step: int, last_good: int | None, metrics: dict[str, Any]) -> None:
        self.step, self.last_good, self.metrics = step, last_good, metrics
        where = (
            f"the last good checkpoint is step {last_good}"
            if last_good is not None
            else "no checkpoint was written before it"
        )
        bad = sorted(k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v))
        super().__init__(
            f"non-finite loss or gradient at step {step} ({', '.join(bad) or 'finite=False'}); "
            f"training stopped, {where}"
        )


@dataclasses.dataclass
class TrainResult:
    step: int  # completed steps
    status: str  # "done" | "max_steps" | "preempted"
    compile_time_s: float
    last_metrics: dict[str, float]
    knn: dict[int, dict[str, float]]  # step -> kNN accuracies of the teacher
    skipped_steps: list[int]
    history: list[dict[str, float]]  # every step's metrics, when record_history


def _total_steps(config: ml_collections.ConfigDict) -> int:
    return int(config.optim.epochs) * int(config.optim.epoch_length)


# (key in steps, section, key in epochs): the durations `optim.total_steps` switches to steps.
_STEP_DURATIONS = (
    ("warmup_steps", "optim", "warmup_epochs"),
    ("freeze_last_layer_steps", "optim", "freeze_last_layer_epochs"),
    ("warmup_teacher_temp_steps", "loss", "warmup_teacher_temp_epochs"),
)


def resolve_durations(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config with every duration in epochs of `optim.epoch_length` iterations, which is
    what the schedules (dinojax.ssl.optim) read.

    Without `optim.total_steps` the config is returned unchanged. With it, the run is
    `total_steps` iterations and the other durations are in steps too: `optim.warmup_steps`,
    `optim.freeze_last_layer_steps`, `loss.warmup_teacher_temp_steps`, each defaulting to its
    epoch value x `epoch_length` (so a recipe's warm-ups keep their length when only the total
    changes). They become epochs of one step each, which gives the schedules exactly those
    lengths: every schedule reaches its final value at `total_steps`.
    """
    o = config.optim
    if o.get("total_steps", None) is None:
        return config
    total = int(o.total_steps)
    if total < 1:
        raise ValueError(f"optim.total_steps must be >= 1, got {total}")
    ep = int(o.epoch_length)
    steps = {}
    for key, section, epochs_key in _STEP_DURATIONS:
        given = config[section].get(key, None)
        steps[key] = int(given) if given is not None else int(config[section][epochs_key]) * ep
        # The teacher-temperature schedule has its own length (official), which may outlast the
        # run; the lr warm-up and the last-layer freeze are parts of the run's schedules.
        limit = None if key == "warmup_teacher_temp_steps" else total
        if steps[key] < 0 or (limit is not None and steps[key] > limit):
            why = "" if given is not None else f" ({section}.{epochs_key} x optim.epoch_length)"
            rule = "be >= 0" if limit is None else f"lie in [0, optim.total_steps = {total}]"
            raise ValueError(f"{section}.{key} = {steps[key]}{why} must {rule}")
    per_epoch = config.loss.get("teacher_temp_per", "step") == "epoch"
    if per_epoch and steps["warmup_teacher_temp_steps"] > 0:
        # DINO v1 raises the temperature once per epoch; in steps there is no epoch to step at.
        raise ValueError(
            "loss.teacher_temp_per='epoch' warms the teacher temperature up per epoch: with "
            "optim.total_steps set, use loss.teacher_temp_per='step' or no temperature warm-up"
        )
    out = config.copy_and_resolve_references()
    out.optim.update(epochs=total, epoch_length=1)
    for key, section, epochs_key in _STEP_DURATIONS:
        out[section][epochs_key] = steps[key]
    return out


def backbone_config(config: ml_collections.ConfigDict, backbone_params: Any | None = None):
    """The `ViTConfig` of the trained backbone (grid size taken from the pos-embed when given)."""
    from dinojax.models.config import get_config

    overrides = dict(config.model.overrides.to_dict())
    cfg = get_config(config.model.arch, **overrides)
    if backbone_params is not None:
        m = int(np.shape(backbone_params["pos_embed"])[1]) - 1
        side = math.isqrt(m)
        if side * side != m:
            raise ValueError(f"pos_embed has {m} patch positions: not a square grid")
        cfg = cfg.replace(img_size=side * cfg.patch_size)
    return cfg


def _config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


def _validate(config: ml_collections.ConfigDict) -> None:
    if config.train.nan_policy not in NAN_POLICIES:
        raise ValueError(
            f"train.nan_policy must be one of {NAN_POLICIES}, got {config.train.nan_policy!r}"
        )
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
    if _total_steps(config) < 1:
        raise ValueError("optim.epochs x optim.epoch_length must be >= 1")


def _local_workdir(workdir: str | Path) -> Path:
    """The workdir as a local path. A URL (`gs://bucket/run`) is refused before anything is
    written: `Path` would turn it into a local directory named `gs:` and the checkpoints would
    silently stay on the worker's disk."""
    text = str(workdir)
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if scheme:
        raise ValueError(
            f"workdir {text!r} is a {scheme.group(1)}:// URL; the trainer writes to a file-system "
            "path: mount the bucket (e.g. Cloud Storage FUSE: gcsfuse BUCKET /mnt/BUCKET, as in "
            "README 'Launching on a Cloud TPU pod') and pass the mounted path"
        )
    return Path(workdir)


def _labelled(source: Any) -> bool:
    """Whether a record source carries labels (sources give label -1 when unlabelled)."""
    labels = getattr(source, "labels", None)
    if labels is not None:
        return bool(np.all(np.asarray(labels) >= 0))
    if hasattr(source, "label_key") and source.label_key is None:  # TFDS without a label feature
        return False
    return int(source[0].get("label", -1)) >= 0


def _to_float(v: Any) -> float:
    a = np.asarray(v)
    return float(a) if a.size == 1 else float(a.reshape(-1)[0])


class _Knn:
    """Teacher kNN on the config's held-out labelled split (dinojax.eval.knn)."""

    def __init__(self, config: ml_collections.ConfigDict, mesh, say: Callable[[str], None]):
        d, t = config.data, config.train
        self.config, self.mesh = config, mesh
        wanted = bool(t.knn_every) or t.get("knn_at_start", False) or t.get("knn_at_end", False)
        self.enabled = bool(wanted and d.eval_source and d.eval_train_source)
        if self.enabled:
            self.enabled = self._check_data(say)

    def _check_data(self, say: Callable[[str], None]) -> bool:
        """Open both kNN splits now, before the step compiles: a wrong path fails in seconds
        instead of at the first periodic evaluation hours later. An unlabelled split cannot be
        scored: kNN is switched off (with a message), training goes on."""
        from dinojax.eval.features import resolve_source

        d = self.config.data
        for key in ("eval_train_source", "eval_source"):
            try:
                src = resolve_source(d[key], d.data_dir, f"data.{key}")
            except (ValueError, OSError) as e:
                raise ValueError(
                    f"kNN evaluation cannot read its data: {e} (set train.knn_every=0, "
                    "train.knn_at_start=False and train.knn_at_end=False to train without it)"
                ) from None
            if not _labelled(src):
                say(f"data.{key} {d[key]!r} has no labels: kNN evaluation is disabled")
                return False
        return True

    def __call__(self, state: dict) -> dict[str, float]:
        from dinojax.eval.features import model_from_params
        from dinojax.eval.knn import knn_eval

        c, t = self.config, self.config.train
        params = state["teacher"]["backbone"]
        cfg = backbone_config(c, params).replace(drop_path_rate=0.0)
        model = model_from_params(cfg, params)
        res = knn_eval(
            model, c.data.eval_train_source, c.data.eval_source,
            batch_size=t.knn_batch_size, image_size=t.knn_image_size,
            max_train=t.knn_max_train, ks=tuple(t.get("knn_ks", (10, 20))), mesh=self.mesh,
            seed=c.seed, progress=False, data_dir=c.data.data_dir,
        )  # fmt: skip
        out = {}
        for top, by_k in res.items():
            for k, acc in by_k.items():
                out[f"knn_{top}_k{k}"] = float(acc)
        return out


def train(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    record_history: bool = False,
    on_step: Callable[[int], None] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> TrainResult:
    """Train (or resume training) `config` in `workdir`. See the module docstring.

    `on_step(n)` is called after step `n` is dispatched (tests use it to interrupt a run);
    `devices` restricts the mesh to those devices (default: all).
    Raises `TrainingDiverged` on a non-finite step with nan_policy="stop".
    """
    user_config, workdir = config, _local_workdir(workdir)
    config = resolve_durations(config)
    _validate(config)
    run, state = _set_up(config, devices)
    ckpt = Checkpointer(
        workdir / "checkpoints", save_every=int(config.train.checkpoint_every),
        keep=int(config.train.keep_checkpoints), async_save=bool(config.train.async_checkpoints),
    )  # fmt: skip
    state, it, start, resumed = _restore(run, ckpt, state, user_config)
    if start >= run.end:
        it.close()
        ckpt.close()
        log.warning(
            "checkpoint %d already reaches the last step %d: nothing to train", start, run.end
        )
        return TrainResult(
            step=start, status=run.status, compile_time_s=0.0, last_metrics={}, knn={},
            skipped_steps=[], history=[],
        )  # fmt: skip

    writer = MetricsWriter(
        workdir, enabled=run.is_main, total_steps=run.end, start_step=start,
        progress=bool(config.train.get("progress", True)),
    )  # fmt: skip
    if resumed is not None:
        writer.message(f"resumed from checkpoint {resumed} in {ckpt.directory}")
    compiled, compile_time = _compile(run, state, it, writer, start)
    monitor = _Monitor(run, writer, ckpt, it, record_history)
    if config.train.get("knn_at_start", False) and run.knn.enabled and start == 0:
        monitor.run_knn(0, state)
    monitor.meter.pause()
    with PreemptionGuard() as guard:
        try:
            state, n, status = _loop(run, state, compiled, it, ckpt, monitor, guard, start,
                                     _config_json(user_config), on_step)  # fmt: skip
            _finish(run, state, n, status, monitor)
        finally:
            ckpt.wait()
            it.close()
            writer.close()
    ckpt.close()
    return TrainResult(
        step=n, status=status, compile_time_s=compile_time, last_metrics=monitor.last_metrics,
        knn=monitor.knn_results, skipped_steps=monitor.skipped, history=monitor.history,
    )  # fmt: skip


@dataclasses.dataclass
class _Run:
    """What `_set_up` builds for the other phases: the mesh and everything static."""

    config: ml_collections.ConfigDict  # durations resolved (resolve_durations)
    mesh: Any  # jax.sharding.Mesh
    rules: tuple
    setup: Any  # dinojax.ssl.step.StepSetup, parsed once for the state, step and FLOP count
    shardings: dict  # of the state
    knn: _Knn
    total: int  # steps of the whole schedule
    end: int  # the step this run stops at (train.max_steps may stop it early)

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    @property
    def status(self) -> str:
        """The status of a run that reaches `end`."""
        return "done" if self.end == self.total else "max_steps"


def _set_up(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None):
    """Phase 1: mesh, static step setup, kNN data check, sharded initial state -> (run, state)."""
    from dinojax.sharding import assert_sharded, make_mesh
    from dinojax.ssl import step as ssl_step

    t = config.train
    total = _total_steps(config)
    end = min(total, int(t.max_steps)) if t.max_steps is not None else total
    if t.get("compilation_cache_dir", None):
        # Restarts (preemption, resume) then load the compiled step instead of recompiling.
        jax.config.update("jax_compilation_cache_dir", str(t.compilation_cache_dir))
    mesh = make_mesh(
        tuple(config.mesh.shape), tuple(config.mesh.axes), devices,
        dcn_shape=config.mesh.get("dcn_shape", None),
    )  # fmt: skip
    rules = tuple(tuple(r) for r in config.mesh.rules)

    def say(text: str) -> None:
        if jax.process_index() == 0:
            print(text, flush=True)

    knn = _Knn(config, mesh, say)  # before anything is built or compiled: fail fast
    setup = ssl_step.StepSetup.from_config(config)
    state, shardings = ssl_step.create_train_state(config, mesh, setup=setup)
    if mesh.devices.size > 1 and "fsdp" in mesh.shape and mesh.shape["fsdp"] > 1:
        # Large parameters (and the teacher and Adam moments) really are split over fsdp.
        assert_sharded(state, int(t.get("assert_sharded_min_size", 2**20)))
    return _Run(config, mesh, rules, setup, shardings, knn, total, end), state


def _restore(run: _Run, ckpt: Checkpointer, state: dict, user_config: ml_collections.ConfigDict):
    """Phase 2: the latest checkpoint, if any, and the data iterator positioned after it
    -> (state, iterator, first step, restored checkpoint step or None)."""
    from dinojax.sharding import batch_axes
    from dinojax.ssl import step as ssl_step

    start, data_state = 0, None
    latest = ckpt.latest_step()
    if latest is not None:
        target = abstract_state(state, run.shardings)
        del state  # free the fresh state before the restored one lands
        state, data_state, saved = ckpt.restore(latest, target)
        start = int(data_state["step"])
        _warn_config_changes(saved, _config_json(user_config))
    n_shards = ssl_step.n_batch_shards(run.config, run.mesh)
    pipeline = make_pipeline(run.config, jax.process_index(), jax.process_count(), n_shards)
    it = pipeline.device_iterator(
        run.mesh, data_axes=batch_axes(run.mesh, run.rules), start_step=start
    )
    if data_state is not None:
        it.set_state(data_state)
    return state, it, start, latest


def _compile(run: _Run, state: dict, it: Any, writer: MetricsWriter, start: int):
    """Phase 3: one compilation of the step, ahead of the data, timed on its own
    -> (compiled step, seconds)."""
    from dinojax.ssl import step as ssl_step

    step_fn = ssl_step.make_train_step(run.config, run.mesh, run.shardings, setup=run.setup)
    t0 = time.perf_counter()
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
        # The compiled executable is called directly: a batch or state that does not match what
        # was compiled is an error instead of a silent recompilation.
        compiled = step_fn.jitted.lower(state, it.element_spec).compile()
    compile_time = time.perf_counter() - t0
    writer.write(start, {"compile_time_s": compile_time}, kind="compile")
    writer.message(f"compiled the training step in {compile_time:.1f} s")
    return compiled, compile_time


def _loop(
    run: _Run, state: dict, compiled: Any, it: Any, ckpt: Checkpointer, monitor: _Monitor,
    guard: PreemptionGuard, start: int, cfg_json: dict, on_step: Callable[[int], None] | None,
) -> tuple[dict, int, str]:  # fmt: skip
    """Phase 4: steps `start` .. `run.end` - 1 -> (state, completed steps, status)."""
    pending: tuple[int, Any] | None = None  # step n's metrics are read while step n + 1 runs
    n = start
    while n < run.end:
        state, m_dev = compiled(state, next(it))
        if pending is not None:
            monitor.handle(*pending)
        pending = (n, m_dev)
        n += 1
        if on_step is not None:
            on_step(n)
        preempted = guard.reached(n)
        knn_due = monitor.knn_due(n)
        if ckpt.should_save(n) or knn_due or preempted or n == run.end:
            monitor.handle(*pending)  # a checkpoint only holds steps known to be finite
            pending = None
            ckpt.save(n, state, it.get_state(), cfg_json, force=preempted or n == run.end)
            if knn_due:
                monitor.run_knn(n, state)
        if preempted:
            monitor.writer.message(
                f"{guard.signal_name}: checkpoint {n} written to {ckpt.directory}; "
                "run the same command again to resume"
            )
            return state, n, "preempted"
    if pending is not None:
        monitor.handle(*pending)
    return state, n, run.status


def _finish(run: _Run, state: dict, n: int, status: str, monitor: _Monitor) -> None:
    """Phase 5: the final kNN evaluation (train.knn_at_end), unless preempted or just done."""
    at_end = bool(run.config.train.get("knn_at_end", False)) and run.knn.enabled
    if status != "preempted" and at_end and n not in monitor.knn_results:
        monitor.run_knn(n, state)


class _Monitor:
    """Reads back each step's metrics and acts on them (NaN policy, records, progress bar), runs
    the kNN evaluations, and keeps what `TrainResult` reports."""

    def __init__(
        self, run: _Run, writer: MetricsWriter, ckpt: Checkpointer, it: Any, record_history: bool
    ) -> None:
        from dinojax.ssl import step as ssl_step

        self.t, self.end, self.knn = run.config.train, run.end, run.knn
        self.writer, self.ckpt, self.it = writer, ckpt, it
        self.record_history = record_history
        flops = float(ssl_step.flops_per_step(run.config, setup=run.setup))
        peak = self.t.peak_flops or peak_flops_per_device(jax.devices()[0].device_kind)
        self.meter = Throughput(run.config.batch_size, flops, run.mesh.devices.size, peak)
        self.knn_results: dict[int, dict[str, float]] = {}
        self.history: list[dict[str, float]] = []
        self.skipped: list[int] = []
        self.consecutive_skips = 0
        self.last_metrics: dict[str, float] = {}

    def knn_due(self, n: int) -> bool:
        every = self.t.knn_every
        return bool(self.knn.enabled and every and n % int(every) == 0)

    def run_knn(self, n: int, state: dict) -> None:
        res = self.knn(state)
        self.knn_results[n] = res
        self.writer.write(n, res, kind="knn")
        self.writer.message(
            f"step {n}: teacher kNN " + ", ".join(f"{k}={v:.2f}" for k, v in res.items())
        )
        self.meter.pause()

    def handle(self, n: int, m_dev: dict) -> None:
        """Read back the metrics of step index `n` (0-based) and act on them."""
        t, writer = self.t, self.writer
        m = {k: _to_float(v) for k, v in jax.device_get(m_dev).items()}
        finite = bool(m.get("finite", 1.0)) and all(
            math.isfinite(v) for k, v in m.items() if k.startswith("loss")
        )
        m["finite"] = float(finite)
        self.meter.tick()
        m["iteration"] = float(n)  # 0-based official iteration; records carry completed steps
        if self.record_history:
            self.history.append(dict(m))
        if not finite:
            if t.nan_policy == "stop":
                self.ckpt.wait()  # saves in flight hold good states: let them land
                writer.write(n + 1, m)
                writer.close()
                raise TrainingDiverged(n, self.ckpt.latest_step(), m)
            self.skipped.append(n)
            self.consecutive_skips += 1
            writer.message(f"step {n}: non-finite loss or gradient, update skipped")
            if self.consecutive_skips > int(t.max_consecutive_skips):
                self.ckpt.wait()
                writer.close()
                raise TrainingDiverged(n, self.ckpt.latest_step(), m)
        else:
            self.consecutive_skips = 0
        self.last_metrics = m
        if (n + 1) % int(t.log_every) == 0 or n + 1 == self.end:
            m.update(self.meter.measure())
            stats = self.it.stats
            m.update(bad_records=stats["bad_records"], skipped_reads=stats["skipped_reads"])
            writer.write(n + 1, m)
        loss = m.get("loss", m.get("total_loss", float("nan")))
        writer.progress(n + 1, {"loss": loss, "img/s": m.get("img_per_s")} if "img_per_s" in m
                        else {"loss": loss})  # fmt: skip


def _warn_config_changes(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> None:
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            _warn_config_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            log.warning("config %s%s changed since the checkpoint: %r -> %r", prefix, k, a, b)
