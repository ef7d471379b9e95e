"""The training loop: mesh -> sharded state -> (resume) -> data -> one compiled step -> loop with
metrics, checkpoints, kNN evaluations, preemption and divergence handling.

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
    from dinojax.sharding import assert_sharded, batch_axes, make_mesh
    from dinojax.ssl import step as ssl_step

    user_config = config
    config = resolve_durations(config)
    _validate(config)
    workdir = Path(workdir)
    t = config.train
    p_idx, p_cnt = jax.process_index(), jax.process_count()
    is_main = p_idx == 0
    total = _total_steps(config)
    end = min(total, int(t.max_steps)) if t.max_steps is not None else total

    if t.get("compilation_cache_dir", None):
        # Restarts (preemption, resume) then load the compiled step instead of recompiling.
        jax.config.update("jax_compilation_cache_dir", str(t.compilation_cache_dir))
    mesh = make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axes), devices)
    rules = tuple(tuple(r) for r in config.mesh.rules)

    def say(text: str) -> None:
        if is_main:
            print(text, flush=True)

    knn = _Knn(config, mesh, say)  # before anything is built or compiled: fail fast
    state, shardings = ssl_step.create_train_state(config, mesh)
    if mesh.devices.size > 1 and "fsdp" in mesh.shape and mesh.shape["fsdp"] > 1:
        # Large parameters (and the teacher and Adam moments) really are split over fsdp.
        assert_sharded(state, int(t.get("assert_sharded_min_size", 2**20)))

    ckpt = Checkpointer(
        workdir / "checkpoints", save_every=int(t.checkpoint_every),
        keep=int(t.keep_checkpoints), async_save=bool(t.async_checkpoints),
    )  # fmt: skip
    start = 0
    latest = ckpt.latest_step()
    if latest is not None:
        target = abstract_state(state, shardings)
        del state  # free the fresh state before the restored one lands
        state, data_state, saved = ckpt.restore(latest, target)
        start = int(data_state["step"])
        _warn_config_changes(saved, _config_json(user_config))
    pipeline = make_pipeline(config, p_idx, p_cnt, ssl_step.n_batch_shards(config, mesh))
    it = pipeline.device_iterator(mesh, data_axes=batch_axes(mesh, rules), start_step=start)
    if latest is not None:
        it.set_state(data_state)

    if start >= end:
        it.close()
        ckpt.close()
        log.warning("checkpoint %d already reaches the last step %d: nothing to train", start, end)
        return TrainResult(
            step=start, status="done" if end == total else "max_steps", compile_time_s=0.0,
            last_metrics={}, knn={}, skipped_steps=[], history=[],
        )  # fmt: skip

    writer = MetricsWriter(
        workdir, enabled=is_main, total_steps=end, start_step=start,
        progress=bool(t.get("progress", True)),
    )  # fmt: skip
    if latest is not None:
        writer.message(f"resumed from checkpoint {latest} in {ckpt.directory}")

    # One compilation, ahead of the data, timed on its own.
    step_fn = ssl_step.make_train_step(config, mesh, shardings)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        # The compiled executable is called directly: a batch or state that does not match what
        # was compiled is an error instead of a silent recompilation.
        compiled = step_fn.jitted.lower(state, it.element_spec).compile()
    compile_time = time.perf_counter() - t0
    writer.write(start, {"compile_time_s": compile_time}, kind="compile")
    writer.message(f"compiled the training step in {compile_time:.1f} s")

    flops = None
    if hasattr(ssl_step, "flops_per_step"):
        flops = float(ssl_step.flops_per_step(config))
    peak = t.peak_flops or peak_flops_per_device(jax.devices()[0].device_kind)
    meter = Throughput(config.batch_size, flops, mesh.devices.size, peak)

    knn_results: dict[int, dict[str, float]] = {}
    history: list[dict[str, float]] = []
    skipped: list[int] = []
    consecutive_skips = 0
    last_metrics: dict[str, float] = {}
    cfg_json = _config_json(user_config)

    def run_knn(n: int) -> None:
        res = knn(state)
        knn_results[n] = res
        writer.write(n, res, kind="knn")
        writer.message(
            f"step {n}: teacher kNN " + ", ".join(f"{k}={v:.2f}" for k, v in res.items())
        )
        meter.pause()

    def handle(n: int, m_dev: dict) -> None:
        """Read back the metrics of step index `n` (0-based) and act on them."""
        nonlocal consecutive_skips, last_metrics
        m = {k: _to_float(v) for k, v in jax.device_get(m_dev).items()}
        finite = bool(m.get("finite", 1.0)) and all(
            math.isfinite(v) for k, v in m.items() if k.startswith("loss")
        )
        m["finite"] = float(finite)
        meter.tick()
        m["iteration"] = float(n)  # 0-based official iteration; records carry completed steps
        if record_history:
            history.append(dict(m))
        if not finite:
            if t.nan_policy == "stop":
                ckpt.wait()  # saves in flight hold good states: let them land
                writer.write(n + 1, m)
                writer.close()
                raise TrainingDiverged(n, ckpt.latest_step(), m)
            skipped.append(n)
            consecutive_skips += 1
            writer.message(f"step {n}: non-finite loss or gradient, update skipped")
            if consecutive_skips > int(t.max_consecutive_skips):
                ckpt.wait()
                writer.close()
                raise TrainingDiverged(n, ckpt.latest_step(), m)
        else:
            consecutive_skips = 0
        last_metrics = m
        if (n + 1) % int(t.log_every) == 0 or n + 1 == end:
            m.update(meter.measure())
            stats = it.stats
            m.update(bad_records=stats["bad_records"], skipped_reads=stats["skipped_reads"])
            writer.write(n + 1, m)
        loss = m.get("loss", m.get("total_loss", float("nan")))
        writer.progress(n + 1, {"loss": loss, "img/s": m.get("img_per_s")} if "img_per_s" in m
                        else {"loss": loss})  # fmt: skip

    status = "done" if end == total else "max_steps"
    knn_start = bool(t.get("knn_at_start", False)) and knn.enabled
    if knn_start and start == 0:
        run_knn(0)
    meter.pause()
    pending: tuple[int, dict] | None = None
    n = start
    with PreemptionGuard() as guard:
        try:
            while n < end:
                batch = next(it)
                state, m_dev = compiled(state, batch)
                if pending is not None:
                    handle(*pending)
                pending = (n, m_dev)
                n += 1
                if on_step is not None:
                    on_step(n)
                preempted = guard.reached(n)
                knn_due = knn.enabled and t.knn_every and n % int(t.knn_every) == 0
                if ckpt.should_save(n) or knn_due or preempted or n == end:
                    handle(*pending)
                    pending = None
                    ckpt.save(n, state, it.get_state(), cfg_json, force=preempted or n == end)
                    if knn_due:
                        run_knn(n)
                if preempted:
                    status = "preempted"
                    writer.message(
                        f"{guard.signal_name}: checkpoint {n} written to {ckpt.directory}; "
                        "run the same command again to resume"
                    )
                    break
            if pending is not None:
                handle(*pending)
                pending = None
            if status != "preempted" and bool(t.get("knn_at_end", False)) and knn.enabled:
                if n not in knn_results:
                    run_knn(n)
        finally:
            ckpt.wait()
            it.close()
            writer.close()
    ckpt.close()
    return TrainResult(
        step=n, status=status, compile_time_s=compile_time, last_metrics=last_metrics,
        knn=knn_results, skipped_steps=skipped, history=history,
    )  # fmt: skip


def _warn_config_changes(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> None:
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            _warn_config_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            log.warning("config %s%s changed since the checkpoint: %r -> %r", prefix, k, a, b)
