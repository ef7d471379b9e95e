"""The dense heads of dinojax and a PyTorch reference, timed side by side in one process on one
device: semantic segmentation (released linear / ms `BNHead`) and depth (released linear /
linear4 `BNHead`), images/s and the ratio.

   python bench/dense.py                                   # CPU, ViT-S/14, 224 px, batch 4
   python bench/dense.py --size 480x640 --heads seg_linear depth_linear --batch 2
   python bench/dense.py --device cuda --dtype bfloat16 --arch vitl14 --size 512 --batch 16

Both sides start from the same random weights: the backbone from the official constructor of
the PyPI `dinov2` package (hub keyword arguments, as `side_by_side.py --mode infer`), the heads as
torch modules with the official parameter names, saved as a released head file (`.pth`,
`{"state_dict": {"decode_head.*": ...}}`) that dinojax loads through its documented entry points
`dinojax.dense.load_segmenter(model, head.pth)` / `load_depther(model, head.pth)` (converted in
memory). The torch side is the official semantics written out below (mmseg / mmcv cannot be
installed on current Python / torch):
  seg    facebookresearch/dinov2 `notebooks/semantic_segmentation.ipynb` (`CenterPadding` as a
         pre-hook, `get_intermediate_layers(n=layers, reshape=True)`, final norm, no CLS),
         `dinov2/eval/segmentation/models/decode_heads/linear_head.py` `BNHead`
         (resize_concat, BatchNorm eval, `conv_seg`), mmseg 0.27 `EncoderDecoder.encode_decode`
         (bilinear resize of the logits to the input), mode "whole";
  depth  `dinov2/hub/depth/decode_heads.py` `BNHead` (concat(patch map, CLS), x4 bilinear, concat,
         `conv_depth` to 256 bins, relu + 0.1, normalised, sum over `linspace(min, max, 256)`),
         `dinov2/hub/depth/encoder_decoder.py` (`get_intermediate_layers(n=out_index,
         reshape=True, return_class_token=True, norm=False)`, clamp, bilinear resize).
Each call takes the uint8 NHWC batch and returns numpy on the host (ImageNet normalisation and
the transfer included on both sides). The largest difference of the two outputs is recorded.

Timing as `bench/side_by_side.py`: dinojax's first call (compilation) and the warm-up calls are
reported apart, then the sides alternate and the median of `--steps` calls is kept. Appends one
JSON line per case to bench/results/dense.jsonl and prints one line per case.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "bench" / "results" / "dense.jsonl"
HEADS = ("seg_linear", "seg_ms", "depth_linear", "depth_linear4")
# dinov2/hub/depthers.py: the 4-layer heads' blocks per backbone width (S/B, L, g)
OUT_INDEX_4 = {384: [2, 5, 8, 11], 768: [2, 5, 8, 11], 1024: [4, 11, 17, 23], 1536: [9, 19, 29, 39]}
NYU_RANGE = (0.001, 10.0)  # the NYU heads' range (`depthers.py` `_get_depth_range`)
MEAN = (123.675, 116.28, 103.53)  # ImageNet mean / std in 0-255 (both tasks' test pipelines)
STD = (58.395, 57.12, 57.375)


def _side_by_side():
    """bench/side_by_side.py as a module: its official-backbone builder and timing helpers."""
    spec = importlib.util.spec_from_file_location(
        "side_by_side", REPO / "bench" / "side_by_side.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _size(text: str) -> tuple[int, int]:
    try:
        h, _, w = text.partition("x")
        return int(h), int(w or h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not H or HxW") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dense.py",
        description="Time dinojax's dense heads and a torch reference on the same device.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--arch", choices=("vits14", "vitb14", "vitl14", "vitg14"), default="vits14")
    p.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    p.add_argument(
        "--size",
        type=_size,
        nargs="+",
        default=[(224, 224)],
        help="image sizes, H or HxW (any: both sides pad to 14; default 224)",
    )
    p.add_argument("--batch", type=int, default=4, help="images per call (default 4)")
    p.add_argument("--num-classes", type=int, default=150, help="segmentation classes (ADE20K)")
    p.add_argument("--steps", type=int, default=3, help="timed calls per side (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per side (default 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="backbone override, model.overrides.<field>=... (e.g. depth=4 for a "
        "smoke run; the depth heads need the architecture's own depth)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        default=str(DEFAULT_OUT),
        help="JSONL file to append to ('': none; default bench/results/dense.jsonl)",
    )
    p.add_argument("--label", default="", help="free-form label stored with the result")
    args = p.parse_args(argv)
    for name in ("batch", "steps", "num_classes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


# ---------------------------------------------------------------------------------------------
# The torch reference
# ---------------------------------------------------------------------------------------------


def _torch_modules():
    import torch
    import torch.nn.functional as F
    from torch import nn

    def center_padding(x, multiple=14):
        # dinov2/hub/utils.py `CenterPadding`: left / top = pad // 2
        pads = []
        for n in x.shape[:1:-1]:
            extra = -(-n // multiple) * multiple - n
            pads += [extra // 2, extra - extra // 2]
        return F.pad(x, pads)

    class SegBNHead(nn.Module):
        """linear_head.py `BNHead`: resize_concat to the first layer's grid, BN, conv_seg."""

        def __init__(self, channels, num_classes):
            super().__init__()
            self.bn = nn.BatchNorm2d(channels)
            self.conv_seg = nn.Conv2d(channels, num_classes, 1)

        def forward(self, feats):
            grid = feats[0].shape[2:]
            x = torch.cat(
                [F.interpolate(f, size=grid, mode="bilinear", align_corners=False) for f in feats],
                1,
            )
            return self.conv_seg(self.bn(x))

    class DepthBNHead(nn.Module):
        """hub/depth/decode_heads.py `BNHead` (classify, 256 bins "UD", norm "linear",
        upsample 4) and `DepthBaseDecodeHead.depth_pred`."""

        def __init__(self, channels, min_depth, max_depth, n_bins=256):
            super().__init__()
            self.conv_depth = nn.Conv2d(channels, n_bins, 1)
            self.min_depth, self.max_depth, self.n_bins = min_depth, max_depth, n_bins

        def forward(self, feats):
            xs = [torch.cat((x, cls[:, :, None, None].expand_as(x)), 1) for x, cls in feats]
            size = [4 * s for s in xs[0].shape[2:]]
            x = torch.cat(
                [F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in xs], 1
            )
            logit = torch.relu(self.conv_depth(x)) + 0.1
            logit = logit / logit.sum(dim=1, keepdim=True)
            bins = torch.linspace(self.min_depth, self.max_depth, self.n_bins, device=x.device)
            return torch.einsum("ikmn,k->imn", logit, bins).unsqueeze(1)

    class Segmentor(nn.Module):
        def __init__(self, backbone, head, layers):
            super().__init__()
            self.backbone, self.decode_head, self.layers = backbone, head, layers

        def forward(self, img):
            feats = self.backbone.get_intermediate_layers(
                center_padding(img), n=self.layers, reshape=True
            )
            out = self.decode_head(list(feats))
            return F.interpolate(out, size=img.shape[2:], mode="bilinear", align_corners=False)

    class Depther(nn.Module):
        def __init__(self, backbone, head, layers):
            super().__init__()
            self.backbone, self.decode_head, self.layers = backbone, head, layers

        def forward(self, img):
            feats = self.backbone.get_intermediate_layers(
                center_padding(img),
                n=self.layers,
                reshape=True,
                return_class_token=True,
                norm=False,
            )
            h = self.decode_head
            out = torch.clamp(h(list(feats)), min=h.min_depth, max=h.max_depth)
            return F.interpolate(out, size=img.shape[2:], mode="bilinear", align_corners=False)

    return SegBNHead, DepthBNHead, Segmentor, Depther


def _randomize_head_(head, seed: int) -> None:
    """Random head weights giving O(1) outputs (the init of a fresh module leaves BN at the
    identity and would not exercise it)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in head.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            r = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(0.5 + r.abs())
            elif t.ndim == 4:
                t.copy_(r / t.shape[1] ** 0.5)
            else:
                t.copy_(0.1 * r)


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


def build_case(kind: str, official, model, vit, args, tmp: str):
    """(torch module, dinojax predictor, description) of one head kind on shared weights."""
    import torch

    import dinojax.dense

    SegBNHead, DepthBNHead, Segmentor, Depther = _torch_modules()
    d, depth = vit.embed_dim, vit.depth
    torch.manual_seed(args.seed)
    if kind.startswith("seg"):
        layers = [depth - 1] if kind == "seg_linear" else list(range(depth - 4, depth))
        head = SegBNHead(d * len(layers), args.num_classes)
        ref = Segmentor(official, head, layers)
        name = f"dinov2_{args.arch}_ade20k_{kind.split('_')[1]}_head.pth"
    else:
        layers = [depth - 1] if kind == "depth_linear" else OUT_INDEX_4[d]
        head = DepthBNHead(2 * d * len(layers), *NYU_RANGE)
        ref = Depther(official, head, layers)
        name = f"dinov2_{args.arch}_nyu_{kind.split('_')[1]}_head.pth"
    _randomize_head_(head, args.seed + 1)
    path = os.path.join(tmp, name)
    sd = {f"decode_head.{k}": v.detach().cpu().clone() for k, v in head.state_dict().items()}
    torch.save({"state_dict": sd}, path)
    ref = ref.to(official.patch_embed.proj.weight.device).eval()
    if kind.startswith("seg"):
        seg = dinojax.dense.load_segmenter(model, path)

        def ours(x):
            return seg.predict(x, mode="whole", batch_size=len(x))
    else:
        dep = dinojax.dense.load_depther(
            model, path, min_depth=NYU_RANGE[0], max_depth=NYU_RANGE[1]
        )

        def ours(x):
            return dep.predict(x, batch_size=len(x))

    return ref, ours, {"layers": layers, "head_file": name}


def _torch_call(ref, device, dtype: str):
    import numpy as np
    import torch

    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if dtype == "bfloat16"
        else contextlib.nullcontext()
    )

    def call(x_uint8: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), autocast:
            x = torch.from_numpy(x_uint8).to(device).permute(0, 3, 1, 2).float()
            out = ref((x - mean) / std).float()
        out = out.permute(0, 2, 3, 1) if out.shape[1] > 1 else out[:, 0]
        return out.cpu().numpy()

    return call


def run_case(sbs, kind, ref, ours, images, args, device) -> dict:
    import numpy as np

    t0 = time.perf_counter()
    first = ours(images)  # compiles
    first_s = time.perf_counter() - t0
    theirs = _torch_call(ref, device, args.dtype)
    out: dict[str, Any] = {}
    sides = {
        "official": lambda: out.__setitem__("official", theirs(images)),
        "dinojax": lambda: out.__setitem__("dinojax", ours(images)),
    }
    warm = {}
    for name, fn in sides.items():
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            fn()
        warm[name] = time.perf_counter() - t0
    times = sbs._alternate(sides, args.steps)
    a, b = np.asarray(out["official"], np.float32), np.asarray(out["dinojax"], np.float32)
    if a.shape != b.shape:
        raise SystemExit(f"error: {kind}: torch output {a.shape} != dinojax output {b.shape}")
    np.testing.assert_array_equal(first, out["dinojax"])  # deterministic across calls
    fig = {}
    for side in ("official", "dinojax"):
        med = statistics.median(times[side])
        fig[side] = {
            "call_s_median": med,
            "call_s_min": min(times[side]),
            "call_s": times[side],
            "img_per_s": len(images) / med,
            "warmup_s": warm[side],
        }
    fig["dinojax"]["first_call_s"] = first_s
    return {
        **fig,
        "ratio_img_per_s": fig["dinojax"]["img_per_s"] / fig["official"]["img_per_s"],
        "output_shape": list(b.shape),
        "max_abs_diff": float(np.max(np.abs(a - b))),
        "max_abs": float(np.max(np.abs(a))),
    }


def _describe(r: dict) -> str:
    o, j = r["official"], r["dinojax"]
    return (
        f"{r['head']} {r['arch']} {r['size'][0]}x{r['size'][1]} batch {r['batch']} "
        f"{r['dtype']} on {r['machine']['device_kind']}: torch {o['img_per_s']:.2f} img/s, "
        f"dinojax {j['img_per_s']:.2f} img/s, ratio {r['ratio_img_per_s']:.2f} "
        f"(dinojax first call {j['first_call_s']:.1f} s; max |diff| "
        f"{r['max_abs_diff']:.1e} of max {r['max_abs']:.1f})"
    )


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the comparison; returns the result records (also appended to --out)."""
    args = parse_args(argv)
    sbs = _side_by_side()
    sbs._prepare_environment(args)
    sbs._quiet_official_imports()
    sbs._check_platform(args)
    import jax
    import ml_collections
    import numpy as np
    import torch

    from dinojax.eval.features import model_from_params
    from dinojax.models.config import get_config

    machine = sbs._machine(args)
    cfg = ml_collections.ConfigDict({"model": {"arch": f"dinov2_{args.arch}", "overrides": {}}})
    overrides = sbs.apply_overrides(cfg, args.set)
    if any(not k.startswith("model.overrides.") for k in overrides):
        raise SystemExit("error: dense.py takes --set model.overrides.<field>=... only")
    fields = dict(cfg.model.overrides)
    vit = get_config(f"dinov2_{args.arch}", **fields)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    hub = dict(sbs.HUB_KWARGS, ffn_layer="swiglufused" if args.arch == "vitg14" else "mlp")
    official, replaced = sbs.official_backbone(vit, args.arch, shrinkable=list(fields), **hub)
    official = official.to(device).eval()
    params = sbs.to_dinojax({"backbone": official}, vit)["backbone"]
    # bf16: the backbone's compute dtype in its config (a model object passed to the loaders
    # is used as it is)
    run_cfg = vit if args.dtype == "float32" else vit.replace(dtype="bfloat16")
    model = model_from_params(run_cfg, jax.tree.map(jax.numpy.asarray, params))
    common = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "label": args.label,
        "arch": f"dinov2_{args.arch}",
        "set": overrides,
        "official_constructor_replaced": replaced,
        "batch": args.batch,
        "dtype": args.dtype,
        "steps": args.steps,
        "warmup": args.warmup,
        "seed": args.seed,
        "num_classes": args.num_classes,
        "machine": machine,
        "versions": sbs._versions(),
    }
    records = []
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        if args.dtype == "float32":
            stack.enter_context(jax.default_matmul_precision("highest"))
        for kind in args.heads:
            ref, ours, info = build_case(kind, official, model, vit, args, tmp)
            for h, w in args.size:
                images = rng.integers(0, 256, (args.batch, h, w, 3), dtype=np.uint8)
                fig = run_case(sbs, kind, ref, ours, images, args, device)
                r = {**common, "head": kind, "size": [h, w], **info, **fig}
                r["machine"] = {**machine, "load_avg_end": list(os.getloadavg())}
                records.append(r)
                print(_describe(r), flush=True)
                if args.out:
                    out = Path(args.out)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with out.open("a") as f:
                        f.write(json.dumps(r) + "\n")
    return records


if __name__ == "__main__":
    main()
