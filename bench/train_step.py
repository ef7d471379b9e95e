"""Time the jitted training step of any recipe: warm steps only (compilation reported apart),
on whatever devices JAX sees (CPU, GPU, TPU), FSDP/data mesh from the config.

    python bench/train_step.py --config configs/dinov2_vitl14.py --config.batch_size=256 \
        --config.model.overrides.dtype=bfloat16 --config.model.overrides.attention=cudnn
    python bench/train_step.py --config configs/dinov2.py:smoke --steps 5      # CPU smoke

One real batch is drawn from the recipe's input pipeline (so masks and shapes are genuine) and
fed to every timed step: the input pipeline is not what this measures (bench/data_pipeline.py
is). Prints step time, img/s (total and per device), analytic TFLOP/s per device
(`dinojax.ssl.step.flops_per_step`) and MFU against the device's dense bf16 peak; appends one JSON
line to bench/results/train_step.jsonl.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(REPO / "configs" / "demo.py"), "Recipe file[:args]"
)
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps after compilation")
_PEAK = flags.DEFINE_float("peak_flops", None, "peak FLOP/s per device (default: by device kind)")
_OUT = flags.DEFINE_string("out", str(REPO / "bench" / "results" / "train_step.jsonl"), "JSONL")
_LABEL = flags.DEFINE_string("label", "", "free-form label stored with the result")


def main(argv: list[str]) -> None:
    del argv
    import flax.linen as nn
    import jax

    from dinojax.sharding import batch_axes, make_mesh
    from dinojax.ssl import step as ssl_step
    from dinojax.train.data import make_pipeline
    from dinojax.train.metrics import peak_flops_per_device
    from dinojax.train.trainer import resolve_durations

    config = resolve_durations(_CONFIG.value)  # the schedules the trainer would run
    mesh = make_mesh(
        tuple(config.mesh.shape), tuple(config.mesh.axes),
        dcn_shape=config.mesh.get("dcn_shape", None),
    )  # fmt: skip
    rules = tuple(tuple(r) for r in config.mesh.rules)
    t0 = time.perf_counter()
    state, shardings = ssl_step.create_train_state(config, mesh)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0

    pipeline = make_pipeline(
        config, jax.process_index(), jax.process_count(), ssl_step.n_batch_shards(config, mesh)
    )
    with pipeline.device_iterator(mesh, data_axes=batch_axes(mesh, rules)) as it:
        batch = next(it)
        spec = it.element_spec
    step_fn = ssl_step.make_train_step(config, mesh, shardings)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = step_fn.jitted.lower(state, spec).compile()
    compile_s = time.perf_counter() - t0

    for _ in range(_WARMUP.value):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(_STEPS.value):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t0)
    loss = float(metrics["loss"])

    n_dev = mesh.devices.size
    step_s = statistics.median(times)
    flops = float(ssl_step.flops_per_step(config))
    peak = _PEAK.value or peak_flops_per_device(jax.devices()[0].device_kind)
    tflops = flops / step_s / n_dev / 1e12
    mem = {}
    try:
        stats = jax.devices()[0].memory_stats() or {}
        mem = {"peak_bytes_in_use_dev0": int(stats.get("peak_bytes_in_use", 0))}
    except Exception:  # noqa: BLE001 - CPU backends have no memory stats
        pass
    result = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "label": _LABEL.value,
        "config": config_flags.get_config_filename(flags.FLAGS["config"]),
        "config_overrides": config_flags.get_override_values(flags.FLAGS["config"]) or None,
        "arch": config.model.arch,
        "overrides": config.model.overrides.to_dict(),
        "batch_size": config.batch_size,
        "mesh": dict(mesh.shape),
        "devices": n_dev,
        "device_kind": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "host": platform.node(),
        "init_s": init_s,
        "compile_s": compile_s,
        "step_s_median": step_s,
        "step_s_min": min(times),
        "img_per_s": config.batch_size / step_s,
        "img_per_s_per_device": config.batch_size / step_s / n_dev,
        "flops_per_step": flops,
        "tflops_per_device": tflops,
        "mfu": (tflops * 1e12 / peak) if peak else None,
        "peak_flops_per_device": peak,
        "loss": loss,
        **mem,
    }
    out = Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(result) + "\n")
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a (unknown peak)"
    print(
        f"{config.model.arch} batch {config.batch_size} on {n_dev} x {result['device_kind']}: "
        f"step {1e3 * step_s:.1f} ms, {result['img_per_s']:.1f} img/s "
        f"({result['img_per_s_per_device']:.1f} per device), {tflops:.2f} TFLOP/s per device, "
        f"MFU {mfu}; compile {compile_s:.1f} s"
    )


if __name__ == "__main__":
    app.run(main)
