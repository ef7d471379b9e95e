"""The README's "Compiled for TPU" table, printed from `bench/compile_tpu.py`'s JSON lines.

    python bench/tpu_table.py --label table-final [--utilisation 0.4] [--jsonl FILE]

One markdown row per record with one of those labels: label by label in the order of the flags,
each label's records in the file's order. The projected step time is a
separately labelled column: XLA's FLOPs per chip (what the program executes, recompute included)
divided by the chip's dense bf16 peak times the stated utilisation. It is arithmetic on a
compiled program, not a measurement: nothing here ran on a TPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30

# Dense bf16 peak FLOP/s per chip, the public Cloud TPU spec sheets (as dinojax.train.metrics).
PEAK_FLOPS = {"v4": 275e12, "v5p": 459e12, "v5e": 197e12, "v6e": 918e12}

HEADER = (
    "| recipe | slice (chips) | batch (per chip) | remat | attention | state / chip "
    "| arguments / chip | temporaries / chip | XLA peak / HBM | fits "
    "| XLA (its matmuls) / analytic executed TFLOP per chip | compile "
    "| projected step at {u:.0%} of peak (not measured) |"
)


_SIZE = {"s": "S", "b": "B", "l": "L", "g": "g", "h": "H"}  # as the papers write them


def arch_name(arch: str) -> str:
    """`dinov2_vitg14` -> `ViT-g/14`."""
    tail = arch.split("_")[-1]  # vitg14
    if tail.startswith("vit"):
        size = tail[3:].rstrip("0123456789")
        patch = tail[3 + len(size) :]
        return f"ViT-{_SIZE.get(size, size)}/{patch}"
    return arch


def _recount(rec: Mapping[str, Any]) -> float:
    sys.path.insert(0, str(REPO / "bench"))
    from compile_tpu import analytic_counts

    return float(analytic_counts(rec)["analytic_executed_flops_per_chip"])


def _gib(x: float | None) -> str:
    return "—" if x is None else f"{x / GIB:.2f} GiB"


def row(rec: Mapping[str, Any], utilisation: float) -> str:
    n = rec.get("num_slices", 1)
    where = rec["topology"] if n == 1 else f"{n} x {rec['topology']}"
    per_chip = rec["per_chip_batch"]
    per_chip = f"{per_chip:g}"
    hbm = rec["hbm_bytes_per_chip"] / GIB
    gen = rec["topology"].split("-")[0]
    execd = rec.get("analytic_executed_flops_per_chip")
    if execd is None:  # recorded before the executed count existed: recomputed from the record
        execd = _recount(rec)
    if rec.get("xla_flops_per_chip") is None:
        need = rec["temp_bytes"] / GIB
        peak = f"needs {need:.2f} GiB temporaries / {hbm:.0f} GiB"
        flops = f"— / {execd / 1e12:.1f}"
        step = "—"
        fits = "**no**"
    else:
        peak = f"{rec['peak_bytes_per_chip'] / GIB:.2f} / {hbm:.0f} GiB"
        xla = rec["xla_flops_per_chip"]
        mm = rec.get("xla_matmul_flops_per_chip")
        mm_text = f" ({mm / 1e12:.2f})" if mm else ""
        ratio = f"x{xla / execd:.3f}" + (f" (x{mm / execd:.3f})" if mm else "")
        flops = f"{xla / 1e12:.2f}{mm_text} / {execd / 1e12:.2f}: {ratio}"
        step = f"{xla / (PEAK_FLOPS[gen] * utilisation):.2f} s"
        fits = "yes" if rec["fits"] else "**no**"
        if rec["fits"] and rec["peak_bytes_per_chip"] > 0.85 * rec["hbm_bytes_per_chip"]:
            fits = "yes (edge)"
    return (
        f"| {arch_name(rec['arch'])} | {where} ({rec['chips']}) | {rec['global_batch']:,} "
        f"({per_chip}) | {rec['remat_policy']} | {rec['attention']} "
        f"| {_gib(rec['state_bytes_per_chip'])} | {_gib(rec.get('argument_bytes'))} "
        f"| {_gib(rec['temp_bytes'])} | {peak} | {fits} | {flops} | {rec['compile_s']:.0f} s "
        f"| {step} |"
    )


def table(records: Iterable[Mapping[str, Any]], utilisation: float) -> str:
    lines = [HEADER.format(u=utilisation), "|" + " --- |" * 13]
    lines += [row(r, utilisation) for r in records]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jsonl", default=str(REPO / "bench" / "results" / "compile_tpu.jsonl"))
    ap.add_argument("--label", action="append", required=True, help="records to show (repeat)")
    ap.add_argument("--utilisation", type=float, default=0.4, help="for the projected step time")
    args = ap.parse_args(argv)
    if not 0 < args.utilisation <= 1:
        ap.error(f"--utilisation must be in (0, 1], got {args.utilisation}")
    recs = [json.loads(line) for line in Path(args.jsonl).read_text().splitlines() if line.strip()]
    # label by label, as the flags name them: a later round of one group appends to the file
    # after other groups, yet belongs beside its own
    recs = [r for label in dict.fromkeys(args.label) for r in recs if r.get("label") == label]
    if not recs:
        print(f"error: no record in {args.jsonl} has label {args.label}", file=sys.stderr)
        sys.exit(1)
    print(table(recs, args.utilisation))


if __name__ == "__main__":
    main()
