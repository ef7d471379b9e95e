"""Crops per second per CPU core: dinojax's multi-crop pipeline vs the official torchvision one.

Both sides run single-process, single-threaded (one core), in the same run, on the same JPEG
files: ours in this process, the official `dinov2.data.augmentations.DataAugmentationDINO`
(PyPI `dinov2`, torchvision) in a child process of this interpreter (the `test` extra installs
torch and torchvision; `--official-python` or DINOJAX_TORCHVISION_PYTHON names another
interpreter). Each side decodes the JPEG bytes with Pillow and produces normalised float32
crops. Runs alternate between the two sides and the median is reported; the machine may be shared,
so compare the ratio, not the absolute numbers.

Also measured: the full host pipeline (grain, per-record seeding, batching, iBOT masks, collate)
in one process, and mask generation per batch.

    python bench/data_pipeline.py --images 160 --repeats 3

An official side that cannot import torchvision and dinov2 is an error (exit 2, with how to
install them); `--no-official` measures dinojax alone and says so loudly. Both sides are pinned
to one core (`--cpu`).

Writes one JSON line per measurement and a summary line to bench/results/data_pipeline.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Training-step rates of one H100 in images per second (2 global 224 px + 8 local 98 px crops,
# batch 64): the official PyTorch step, eager and torch.compile, and a plain JAX step, measured
# in 2026-11 before the project had its own side-by-side script (re-measure on a GPU host).
# Used only to turn crops/s per core into cores needed per H100.
H100_STEP_RATES = {
    "ViT-S/14 torch eager": 500.5,
    "ViT-S/14 torch.compile": 731.1,
    "ViT-S/14 naive JAX (cuDNN attention)": 740.0,
    "ViT-L/14 torch eager": 160.7,
    "ViT-L/14 torch.compile": 227.9,
}

OFFICIAL_SCRIPT = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from PIL import Image
import io
import logging
logging.getLogger("dinov2").setLevel(logging.ERROR)
from dinov2.data.augmentations import DataAugmentationDINO
args = json.loads(sys.argv[1])
aug = DataAugmentationDINO(
    tuple(args["global_scale"]), tuple(args["local_scale"]), args["n_local"],
    global_crops_size=args["global_size"], local_crops_size=args["local_size"])
blobs = [open(f, "rb").read() for f in args["files"]]
torch.manual_seed(0)
def run():
    n = 0
    for b in blobs:
        # the official ImageNet decoder: Image.open(BytesIO(data)).convert("RGB")
        img = Image.open(io.BytesIO(b)).convert(mode="RGB")
        out = aug(img)
        n += len(out["global_crops"]) + len(out["local_crops"])
    return n
run()  # warm-up
times = []
for _ in range(args["inner_repeats"]):
    t = time.perf_counter(); n = run(); times.append(time.perf_counter() - t)
print(json.dumps({"crops": n, "seconds": min(times), "torch": torch.__version__,
                  "torchvision": __import__("torchvision").__version__}))
"""


def make_jpegs(directory: Path, n: int, seed: int = 0) -> list[str]:
    """ImageNet-like JPEGs (about 500x375, quality 90) cut from scikit-learn's two sample photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        src = photos[i % len(photos)]
        long_side, short_side = 500, int(rng.choice([333, 375, 375, 400]))
        w, h = (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)
        cw = int(rng.integers(int(0.6 * src.width), src.width + 1))
        ch = min(src.height, int(cw * h / w))
        x0 = int(rng.integers(0, src.width - cw + 1))
        y0 = int(rng.integers(0, src.height - ch + 1))
        img = src.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)
        path = directory / f"img_{i:05d}.jpg"
        img.save(path, "JPEG", quality=90)
        files.append(str(path))
    return files


def run_ours(files: list[str], cfg, inner_repeats: int) -> dict:
    import cv2

    from dinojax.data.augment import MultiCropAugmentation, decode_image

    cv2.setNumThreads(1)
    aug = MultiCropAugmentation(cfg)
    blobs = [open(f, "rb").read() for f in files]
    g = np.empty((2, cfg.global_crops_size, cfg.global_crops_size, 3), np.float32)
    loc = np.empty(
        (cfg.local_crops_number, cfg.local_crops_size, cfg.local_crops_size, 3), np.float32
    )
    rng = np.random.default_rng(0)

    def run() -> int:
        n = 0
        for b in blobs:
            crops = aug(decode_image(b), rng)
            for k in range(2):
                aug.normalize_into(crops["global_crops"][k], g[k])
            for k in range(cfg.local_crops_number):
                aug.normalize_into(crops["local_crops"][k], loc[k])
            n += 2 + cfg.local_crops_number
        return n

    run()
    times = []
    for _ in range(inner_repeats):
        t = time.perf_counter()
        n = run()
        times.append(time.perf_counter() - t)
    return {"crops": n, "seconds": min(times)}


def run_official(python: str, files: list[str], cfg, inner_repeats: int) -> dict:
    args = {
        "files": files,
        "global_scale": list(cfg.global_crops_scale),
        "local_scale": list(cfg.local_crops_scale),
        "n_local": cfg.local_crops_number,
        "global_size": cfg.global_crops_size,
        "local_size": cfg.local_crops_size,
        "inner_repeats": inner_repeats,
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [python, "-c", OFFICIAL_SCRIPT, json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=3600,  # a stuck official side must not hang the benchmark
    )
    if proc.returncode != 0:
        raise RuntimeError(f"official side failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_host_pipeline(files: list[str], cfg, batch_size: int) -> dict:
    """Full host pipeline (grain, seeding, batching, masks, collate), one process, one thread."""
    import cv2

    from dinojax.data.pipeline import DataConfig, DinoDataPipeline
    from dinojax.data.sources import ImageFolderSource

    cv2.setNumThreads(1)
    source = ImageFolderSource(str(Path(files[0]).parent))
    pipe = DinoDataPipeline(
        source,
        DataConfig(batch_size=batch_size, augment=cfg, num_workers=0, read_threads=1),
        process_index=0,
        process_count=1,
    )
    n_batches = max(1, len(files) // batch_size)
    # the grain MapDataset's batches computed in this thread: the per-core cost of the whole
    # host pipeline (the iterator adds threads / worker processes around the same calls)
    ds = pipe.dataset()
    ds[0]  # warm-up
    t = time.perf_counter()
    for i in range(1, n_batches + 1):
        ds[i]
    seconds = time.perf_counter() - t
    crops = n_batches * batch_size * (2 + cfg.local_crops_number)
    return {"crops": crops, "seconds": seconds}


def time_masks(batch_size: int, repeats: int = 20) -> float:
    from dinojax.data.masking import MaskingConfig, collate_masks, mask_upper_bound, sample_masks

    mc = MaskingConfig()
    gen = mc.generator(224)
    rng = np.random.default_rng(0)
    ub = mask_upper_bound(2 * batch_size, gen.num_patches, mc.mask_probability, mc.mask_ratio)
    t = time.perf_counter()
    for _ in range(repeats):
        m = sample_masks(2 * batch_size, gen, rng, mc.mask_probability, mc.mask_ratio)
        collate_masks(m, ub)
    return (time.perf_counter() - t) / repeats


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=160)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each side")
    p.add_argument("--inner-repeats", type=int, default=2, help="passes per run (min is kept)")
    p.add_argument("--local-size", type=int, default=98, help="98 matches the H100 anchor")
    p.add_argument("--preset", default="dinov2", choices=["dinov2", "dinov2_documented", "dino_v1"])
    p.add_argument("--batch-size", type=int, default=32, help="for the full host pipeline")
    p.add_argument(
        "--official-python",
        default=os.environ.get("DINOJAX_TORCHVISION_PYTHON", sys.executable),
        help="interpreter with torchvision and the dinov2 package (default: this one)",
    )
    p.add_argument(
        "--no-official",
        action="store_true",
        help="measure dinojax only (no comparison; the output says so loudly)",
    )
    p.add_argument(
        "--cpu",
        type=int,
        default=None,
        help="core both sides are pinned to (default: the last core this process may use)",
    )
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "data_pipeline.jsonl"))
    args = p.parse_args()

    from dinojax.data.augment import PRESETS

    cfg = PRESETS[args.preset](local_crops_size=args.local_size)
    has_official = not args.no_official
    if has_official and not _official_side_imports(args.official_python):
        print(
            f"error: {args.official_python} cannot import torchvision and "
            "dinov2.data.augmentations. The benchmark compares with the official torchvision "
            "pipeline in the same run; install them with\n"
            "  pip install -e '.[test]' && pip install --no-deps dinov2==0.0.1.dev2\n"
            "or pass --official-python PATH (or set DINOJAX_TORCHVISION_PYTHON), or --no-official "
            "to measure dinojax alone.",
            file=sys.stderr,
        )
        sys.exit(2)
    if args.no_official:
        _shout("--no-official: the official torchvision pipeline is NOT measured in this run")
    # both sides on one core: they alternate, and a pinned process cannot borrow a second core
    # (the official subprocess inherits the affinity)
    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    common = {
        "bench": "data_pipeline",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "preset": args.preset,
        "crops": f"2x{cfg.global_crops_size}+{cfg.local_crops_number}x{cfg.local_crops_size}",
        "images": args.images,
        "pinned_cpu": cpu,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = []

    def emit(rec: dict) -> None:
        rec = {**common, **rec}
        records.append(rec)
        print(json.dumps(rec), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        files = make_jpegs(Path(tmp), args.images)
        ours, official = [], []
        for r in range(args.repeats):
            res = run_ours(files, cfg, args.inner_repeats)
            ours.append(res["crops"] / res["seconds"])
            emit({"impl": "dinojax", "repeat": r, "crops_per_s_per_core": round(ours[-1], 1)})
            if has_official:
                res = run_official(args.official_python, files, cfg, args.inner_repeats)
                official.append(res["crops"] / res["seconds"])
                emit(
                    {
                        "impl": "official",
                        "repeat": r,
                        "crops_per_s_per_core": round(official[-1], 1),
                        "torch": res["torch"],
                        "torchvision": res["torchvision"],
                    }
                )
        host = run_host_pipeline(files, cfg, args.batch_size)
        host_rate = host["crops"] / host["seconds"]
        emit({"impl": "dinojax-host-pipeline", "crops_per_s_per_core": round(host_rate, 1)})
    mask_s = time_masks(64)
    emit({"impl": "masks", "batch_size": 64, "ms_per_batch": round(mask_s * 1e3, 3)})

    ours_med = statistics.median(ours)
    summary = {"impl": "summary", "dinojax_crops_per_s_per_core": round(ours_med, 1)}
    if official:
        off_med = statistics.median(official)
        summary["official_crops_per_s_per_core"] = round(off_med, 1)
        summary["ratio"] = round(ours_med / off_med, 2)
    else:
        summary["official"] = "not measured (--no-official)"
    summary["host_pipeline_crops_per_s_per_core"] = round(host_rate, 1)
    # cores for the whole host pipeline (grain, masks, collate included), at the step's rate
    crops_per_image = 2 + cfg.local_crops_number
    summary["cores_to_feed_one_h100"] = {
        name: round(rate * crops_per_image / host_rate, 1) for name, rate in H100_STEP_RATES.items()
    }
    if official:
        summary["official_cores_to_feed_one_h100"] = {
            name: round(rate * crops_per_image / off_med, 1)
            for name, rate in H100_STEP_RATES.items()
        }
    emit(summary)
    if args.no_official:
        _shout("--no-official: no comparison with the official pipeline was made")


def _official_side_imports(python: str) -> bool:
    code = "import torchvision, dinov2.data.augmentations"
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def _shout(msg: str) -> None:
    bar = "!" * (len(msg) + 4)
    print(f"{bar}\n! {msg} !\n{bar}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
