"""bench/tpu_table.py: the README's compiled-for-TPU rows from compile_tpu.py's JSON lines."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30


def _module():
    spec = importlib.util.spec_from_file_location("tpu_table", REPO / "bench" / "tpu_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rec(**kw):
    rec = {
        "topology": "v5p-256", "num_slices": 1, "chips": 128, "arch": "dinov2_vitg14",
        "global_batch": 3072, "per_chip_batch": 24.0, "remat_policy": "full", "attention": "xla",
        "state_bytes_per_chip": 0.18 * GIB, "argument_bytes": 0.24 * GIB,
        "temp_bytes": 15.49 * GIB, "peak_bytes_per_chip": 10.9 * GIB,
        "hbm_bytes_per_chip": 95 * GIB,
        "fits": True, "xla_flops_per_chip": 150e12, "xla_matmul_flops_per_chip": 149e12,
        "analytic_flops_per_chip": 181e12, "analytic_executed_flops_per_chip": 149e12,
        "compile_s": 970.4, "label": "t",
    }  # fmt: skip
    rec.update(kw)
    return rec


def test_row_fields_and_projected_step():
    t = _module()
    row = t.row(_rec(), 0.4)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:5] == ["ViT-g/14", "v5p-256 (128)", "3,072 (24)", "full", "xla"]
    assert cells[8:10] == ["10.90 / 95 GiB", "yes"]
    # XLA against the executed count (not the nominal 181), matmuls in brackets
    assert cells[10] == "150.00 (149.00) / 149.00: x1.007 (x1.000)"
    # 150 TFLOP / (459 TFLOP/s x 0.4) on a v5p chip
    assert cells[12] == f"{150e12 / (459e12 * 0.4):.2f} s" == "0.82 s"
    assert t.arch_name("dinov2_vits14") == "ViT-S/14"


def test_refused_program_and_edge():
    t = _module()
    refused = t.row(_rec(xla_flops_per_chip=None, fits=False, temp_bytes=228.78 * GIB), 0.4)
    assert "needs 228.78 GiB temporaries / 95 GiB | **no**" in refused
    assert refused.endswith("| — |")  # no projection without a program
    edge = t.row(_rec(peak_bytes_per_chip=87.1 * GIB), 0.4)
    assert "87.10 / 95 GiB | yes (edge)" in edge


def test_cli_selects_labels_and_rejects_unknown(tmp_path, capsys):
    t = _module()
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps(_rec(label="a")) + "\n" + json.dumps(_rec(label="b", chips=64)) + "\n")
    t.main(["--jsonl", str(f), "--label", "b"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and "(64)" in out[2]
    # rows come label by label in the order of the flags (file order inside a label)
    with f.open("a") as fh:
        fh.write(json.dumps(_rec(label="a", chips=32)) + "\n")
    t.main(["--jsonl", str(f), "--label", "b", "--label", "a", "--label", "b"])
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [r.split("|")[2].strip() for r in rows] == [
        "v5p-256 (64)",
        "v5p-256 (128)",
        "v5p-256 (32)",
    ], rows
    with pytest.raises(SystemExit):
        t.main(["--jsonl", str(f), "--label", "zzz"])
    assert "no record" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        t.main(["--jsonl", str(f), "--label", "a", "--utilisation", "1.5"])
