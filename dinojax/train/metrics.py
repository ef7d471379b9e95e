"""What users see while training: a tqdm progress bar, per-step metrics as JSONL and TensorBoard
event files, and throughput (img/s, img/s per device, analytic TFLOP/s per device, MFU).

Only process 0 writes (`enabled=False` elsewhere): the metrics are global values, identical on
every process.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["MetricsWriter", "Throughput", "peak_flops_per_device"]

# Dense bf16 peak FLOP/s per device from the public spec sheets; fp32 compute reaches less, so the
# MFU of an fp32 run is a lower bound of what the hardware could give. Unknown kinds (CPU): None.
_PEAK_FLOPS = (
    ("tpu v6", 918e12),
    ("tpu v5p", 459e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5", 459e12),
    ("tpu v4", 275e12),
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
    ("l4", 121e12),
)


def peak_flops_per_device(device_kind: str) -> float | None:
    kind = device_kind.lower()
    for name, peak in _PEAK_FLOPS:
        if name in kind:
            return peak
    return None


class Throughput:
    """Images/s and FLOP/s over the steps since the last `measure()` (wall time, so it includes
    any data-loading stall; compilation and evaluations are excluded by `pause()`)."""

    def __init__(
        self,
        global_batch: int,
        flops_per_step: float | None,
        num_devices: int,
        peak_flops: float | None,
    ) -> None:
        self.global_batch = global_batch
        self.flops_per_step = flops_per_step
        self.num_devices = num_devices
        self.peak = peak_flops
        self._t0 = time.perf_counter()
        self._steps = 0

    def tick(self, steps: int = 1) -> None:
        self._steps += steps

    def pause(self) -> None:
        """Restart the clock (call after something that is not training, e.g. an evaluation)."""
        self._t0 = time.perf_counter()
        self._steps = 0

    def measure(self) -> dict[str, float]:
        now = time.perf_counter()
        dt, n = now - self._t0, self._steps
        self._t0, self._steps = now, 0
        if n == 0 or dt <= 0:
            return {}
        out = {
            "step_time_s": dt / n,
            "img_per_s": self.global_batch * n / dt,
            "img_per_s_per_device": self.global_batch * n / dt / self.num_devices,
        }
        if self.flops_per_step:
            tflops = self.flops_per_step * n / dt / self.num_devices / 1e12
            out["tflops_per_device"] = tflops
            if self.peak:
                out["mfu"] = tflops * 1e12 / self.peak
        return out


def _scalar(v: Any) -> float | int | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    if isinstance(v, (bool, int)) and not isinstance(v, float):
        return int(v)
    return f


class MetricsWriter:
    """`WORKDIR/metrics.jsonl` (one JSON object per logged step, appended across restarts) and
    TensorBoard events in `WORKDIR/tensorboard`, plus the progress bar."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        enabled: bool = True,
        total_steps: int | None = None,
        start_step: int = 0,
        tensorboard: bool = True,
        progress: bool = True,
    ) -> None:
        self.enabled = enabled
        self.workdir = Path(workdir)
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.workdir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=start_step)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step",
                dynamic_ncols=True, smoothing=0.1,
            )  # fmt: skip

    def write(self, step: int, metrics: dict[str, Any], *, kind: str = "train") -> None:
        """Log scalar `metrics` of `step` (non-scalars are dropped; NaN/Inf kept as null in
        JSON so a diverging run is visible)."""
        if not self.enabled:
            return
        clean: dict[str, Any] = {}
        for k, v in metrics.items():
            s = _scalar(v)
            if s is not None:
                clean[k] = s
        record = {"step": step, "kind": kind, "time": time.time()}
        record.update({k: (v if math.isfinite(v) else None) for k, v in clean.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(f"{kind}/{k}", v, step)

    def progress(self, step: int, postfix: dict[str, Any] | None = None) -> None:
        """Move the bar to `step` (tqdm shows the ETA) with a short postfix."""
        if self._bar is None:
            return
        self._bar.update(max(0, step - self._bar.n))
        if postfix:
            self._bar.set_postfix(
                {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                refresh=False,
            )

    def message(self, text: str) -> None:
        """A line for the user that does not break the bar (process 0 only)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
