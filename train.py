"""Train DINOv2 / DINO with JAX: from a laptop CPU to a TPU pod or GPU cluster.

    python train.py                                   # demo: tiny ViT on the embedded digits
    python train.py --config configs/dinov2_vitl14.py --workdir /ckpt/vitl14 \
        --config.data.data_dir=/data/tfds --config.batch_size=1024
    python train.py --config configs/dinov2.py:smoke --workdir /tmp/smoke   # any recipe, CPU size
    python train.py --config configs/dinov2.py --workdir /ckpt/short \
        --config.optim.total_steps=20000 --config.optim.warmup_steps=2000 \
        --config.loss.warmup_teacher_temp_steps=6000                         # durations in steps

Restarting the same command resumes from the latest checkpoint in WORKDIR. Multi-host: start one
process per host; TPU pods, SLURM and Open MPI are detected, otherwise pass --coordinator_address,
--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID). Export a trained teacher with `python -m dinojax.train.export WORKDIR DST`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # recipes import configs.common

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(ROOT / "configs" / "demo.py"), "Recipe file[:args], e.g. configs/dinov2.py:smoke"
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Checkpoints, metrics.jsonl, TensorBoard events (default for the demo: a new "
    "temporary directory)."
)  # fmt: skip
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host)")
_NPROC = flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)")
_PID = flags.DEFINE_integer("process_id", None, "index of this process (multi-host)")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from absl import logging as absl_logging

    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    from dinojax.train.distributed import maybe_initialize

    maybe_initialize(_COORD.value, _NPROC.value, _PID.value)

    import jax

    from dinojax.train.trainer import TrainingDiverged, train

    config = _CONFIG.value
    workdir = _WORKDIR.value
    if workdir is None:
        if not config.get("is_demo", False):
            raise app.UsageError("--workdir is required (only the demo picks a temporary one)")
        workdir = tempfile.mkdtemp(prefix="dinojax_demo_")
    main_process = jax.process_index() == 0
    if main_process:
        devices = f"{jax.device_count()} {jax.devices()[0].platform} device(s)"
        print(f"workdir: {workdir}  ({jax.process_count()} process(es), {devices})", flush=True)
    try:
        result = train(config, workdir)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    if main_process:
        m = result.last_metrics
        print(f"{result.status} at step {result.step}: loss {m.get('loss', float('nan')):.4f}; "
              f"compile {result.compile_time_s:.1f} s; metrics in {workdir}/metrics.jsonl",
              flush=True)  # fmt: skip
        if result.knn:
            first, last = min(result.knn), max(result.knn)
            for n in sorted({first, last}):
                accs = ", ".join(f"{k}={v:.1f}%" for k, v in result.knn[n].items() if "top1" in k)
                print(f"teacher kNN at step {n}: {accs}", flush=True)
    if result.status == "preempted":
        return 128 + 15  # like a process killed by SIGTERM, after the checkpoint is safe
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    app.run(main)
