"""Metrics writer (JSONL + TensorBoard, process-0 only) and throughput / MFU arithmetic."""

from __future__ import annotations

import json
import struct
import time

import pytest

from dinojax.train.metrics import MetricsWriter, Throughput, peak_flops_per_device


def test_jsonl_and_tensorboard(tmp_path):
    w = MetricsWriter(tmp_path, total_steps=10, progress=False)
    w.write(1, {"loss": 2.5, "finite": True, "lr": 1e-3, "tag": "text", "bad": float("nan")})
    w.write(1, {"knn_top1_k20": 50.0}, kind="knn")
    w.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 1 and lines[0]["kind"] == "train"
    assert lines[0]["loss"] == 2.5 and lines[0]["finite"] == 1 and lines[0]["bad"] is None
    assert "tag" not in lines[0]
    assert lines[1] == {**lines[1], "kind": "knn", "knn_top1_k20": 50.0}
    scalars = _read_events(tmp_path / "tensorboard")
    assert {"train/loss", "train/lr", "knn/knn_top1_k20"} <= set(scalars)
    assert scalars["train/loss"] == [(1, 2.5)]


def _read_events(logdir) -> dict[str, list[tuple[int, float]]]:
    """Scalars of TensorBoard event files (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in logdir.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            n = struct.unpack("<Q", data[i : i + 8])[0]
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricsWriter(tmp_path / "w", enabled=False)
    w.write(1, {"loss": 1.0})
    w.message("hello")
    w.close()
    assert not (tmp_path / "w").exists()


def test_throughput_and_mfu():
    t = Throughput(global_batch=64, flops_per_step=2e12, num_devices=4, peak_flops=1e12)
    time.sleep(0.05)
    t.tick(5)
    m = t.measure()
    dt = m["step_time_s"]
    assert m["img_per_s"] == pytest.approx(64 / dt)
    assert m["img_per_s_per_device"] == pytest.approx(16 / dt)
    assert m["tflops_per_device"] == pytest.approx(2 / 4 / dt)
    assert m["mfu"] == pytest.approx(0.5 / dt)
    assert t.measure() == {}  # nothing since the last measure
    t = Throughput(global_batch=64, flops_per_step=2e12, num_devices=4, peak_flops=None)
    t.tick()
    assert "tflops_per_device" in t.measure() and "mfu" not in t.measure()  # no peak: no MFU
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_per_device("TPU v5p") == 459e12
    assert peak_flops_per_device("cpu") is None
