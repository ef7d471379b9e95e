"""iBOT block masking and collate bookkeeping vs the official code (`dinov2/data/masking.py`,
`dinov2/data/collate.py`).

The official generator draws from Python's global `random`, ours from an explicit numpy
generator, so single masks cannot match; their laws must. Over many draws we compare the mean
count, how often the target is reached exactly, the block geometry (rows and columns touched,
number of 4-connected blocks) and where masks fall. The collate bookkeeping (indices, weights,
count, upper bound) is deterministic given the masks and must match exactly.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import dinov2
import numpy as np
import pytest
import torch
from scipy import ndimage, stats

from dinojax.data.masking import (
    MaskingConfig,
    collate_masks,
    mask_upper_bound,
    official_max_num_patches,
    sample_masks,
    torch_linspace_f32,
)

_DINOV2_DATA = Path(dinov2.__file__).parent / "data"


def _load_official(name: str):
    # dinov2.data's __init__ imports torchvision, which cannot be imported here: load the file.
    spec = importlib.util.spec_from_file_location(f"_official_{name}", _DINOV2_DATA / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


official_masking = _load_official("masking")
official_collate = _load_official("collate")


def _official_generator(img: int = 224, patch: int = 14):
    n = img // patch
    # exactly the train script's construction (`dinov2/train/train.py` `do_train`)
    return official_masking.MaskingGenerator(
        input_size=(n, n), max_num_patches=0.5 * img // patch * img // patch
    )


def _stats(masks: np.ndarray) -> dict[str, np.ndarray]:
    counts = masks.reshape(len(masks), -1).sum(1)
    rows = masks.any(axis=2).sum(1)
    cols = masks.any(axis=1).sum(1)
    blocks = np.array([ndimage.label(m)[1] for m in masks])
    return {"count": counts, "rows": rows, "cols": cols, "blocks": blocks}


def _assert_same_mean(a: np.ndarray, b: np.ndarray, what: str, z_max: float = 4.0) -> None:
    a, b = a.astype(float), b.astype(float)
    se = np.sqrt(a.var() / len(a) + b.var() / len(b)) + 1e-12
    z = abs(a.mean() - b.mean()) / se
    assert z < z_max, f"{what}: ours {a.mean():.4f} vs official {b.mean():.4f} (z={z:.1f})"


def test_max_num_patches_expression():
    assert official_max_num_patches(224, 14) == 128.0
    assert official_max_num_patches(224, 16) == 98.0
    assert MaskingConfig(patch_size=16).generator(224).max_num_patches == 98.0
    with pytest.raises(ValueError, match="multiple of patch size"):
        MaskingConfig(patch_size=14).grid(100)


@pytest.mark.parametrize("target", [4, 13, 38, 77, 102, 128])
def test_generator_law_matches_official(target):
    n_draws = 600
    rng = np.random.default_rng(target)
    ours_gen = MaskingConfig().generator(224)
    ours = np.stack([ours_gen(target, rng) for _ in range(n_draws)])
    random.seed(target)
    off_gen = _official_generator()
    official = np.stack([off_gen(target) for _ in range(n_draws)])

    assert ours.shape == official.shape == (n_draws, 16, 16)
    so, sf = _stats(ours), _stats(official)
    assert so["count"].max() <= target and sf["count"].max() <= target  # never overshoots
    for key in ("count", "rows", "cols", "blocks"):
        _assert_same_mean(so[key], sf[key], f"target {target}: {key}")
    # how often the target is hit exactly (the generator may stop short)
    _assert_same_mean(so["count"] == target, sf["count"] == target, f"target {target}: exact hit")
    # where the masks fall: per-cell frequency maps agree
    freq_o, freq_f = ours.mean(0), official.mean(0)
    se = np.sqrt((freq_o * (1 - freq_o) + freq_f * (1 - freq_f)) / n_draws) + 1e-3
    assert np.max(np.abs(freq_o - freq_f) / se) < 5.0


@pytest.mark.parametrize("max_patches", [6, 40, 128.0])
def test_single_block_shapes_match_official(max_patches):
    """One `_mask` call on an empty grid places one rectangle: its (h, w) law must match."""
    n = 1500
    ours_gen, off_gen = MaskingConfig().generator(224), _official_generator()
    rng = np.random.default_rng(int(max_patches))
    random.seed(int(max_patches))
    shapes = {"ours": [], "official": []}
    for name in shapes:
        for _ in range(n):
            m = np.zeros((16, 16), dtype=bool)
            if name == "ours":
                delta = ours_gen._mask(m, max_patches, rng)
            else:
                delta = off_gen._mask(m, max_patches)
            assert delta == m.sum() <= max_patches
            ys, xs = np.nonzero(m)
            if delta:
                h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
                assert h * w == delta  # one solid rectangle
                shapes[name].append((h, w))
    ours, official = np.array(shapes["ours"]), np.array(shapes["official"])
    assert abs(len(ours) - len(official)) < 5 * np.sqrt(n)  # how often a block is placed
    for col, what in ((0, "height"), (1, "width")):
        _assert_same_mean(ours[:, col], official[:, col], f"max {max_patches}: block {what}")
    _assert_same_mean(ours.prod(1), official.prod(1), f"max {max_patches}: block area")
    ks = stats.ks_2samp(np.log(ours[:, 0] / ours[:, 1]), np.log(official[:, 0] / official[:, 1]))
    assert ks.pvalue > 1e-3, f"block aspect ratios differ: {ks}"


def test_generator_deterministic_from_seed():
    gen = MaskingConfig().generator(224)
    a = [gen(77, np.random.default_rng(5)) for _ in range(3)]
    b = [gen(77, np.random.default_rng(5)) for _ in range(3)]
    c = gen(77, np.random.default_rng(6))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c)


def test_torch_linspace_bit_exact():
    for lo, hi in [(0.1, 0.5), (0.05, 0.6), (0.2, 0.3)]:
        for steps in range(1, 600):
            expected = torch.linspace(lo, hi, steps).numpy()
            np.testing.assert_array_equal(torch_linspace_f32(lo, hi, steps), expected)


def _official_collate(bs: int, seed: int, n_tokens: int = 256):
    gen = _official_generator()
    random.seed(seed)
    samples = [
        ({"global_crops": [torch.zeros(1), torch.zeros(1)], "local_crops": [torch.zeros(1)]}, 0)
        for _ in range(bs)
    ]
    return official_collate.collate_data_and_cast(
        samples, mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5, dtype=torch.float32,
        n_tokens=n_tokens, mask_generator=gen,
    )  # fmt: skip


@pytest.mark.parametrize("bs", [1, 2, 3, 5, 8, 13, 32, 64])
def test_collate_bookkeeping_exact(bs):
    out = _official_collate(bs, seed=bs)
    masks = out["collated_masks"].numpy()
    ub = mask_upper_bound(2 * bs, 256, 0.5, (0.1, 0.5))
    assert ub == out["upperbound"]
    ours = collate_masks(masks, ub)
    n = int(out["n_masked_patches"][0])
    assert ours["n_masked"].tolist() == [n]
    assert ours["mask_indices"].shape == (ub,)
    np.testing.assert_array_equal(ours["mask_indices"][:n], out["mask_indices_list"].numpy())
    np.testing.assert_array_equal(ours["masks_weight"][:n], out["masks_weight"].numpy())
    assert ours["masks_weight"].dtype == np.float32
    assert np.all(ours["masks_weight"][n:] == 0) and np.all(ours["mask_indices"][n:] == 0)
    np.testing.assert_array_equal(ours["masks"], masks)


def test_collate_padding_and_offset():
    rng = np.random.default_rng(0)
    gen = MaskingConfig().generator(224)
    masks = sample_masks(8, gen, rng)
    ub = mask_upper_bound(8, 256, 0.5, (0.1, 0.5))
    out = collate_masks(masks, ub, index_offset=1000, pad_to_multiple=8)
    n = int(out["n_masked"][0])
    assert out["mask_indices"].shape[0] % 8 == 0 and out["mask_indices"].shape[0] >= ub
    np.testing.assert_array_equal(out["mask_indices"][:n] - 1000, np.flatnonzero(masks))
    assert np.all(out["mask_indices"][n:] == 1000)
    with pytest.raises(ValueError, match="exceed the upper bound"):
        collate_masks(np.ones((2, 4), bool), 3)


def test_sample_masks_stratification():
    gen = MaskingConfig().generator(224)
    bs = 16
    probs = torch.linspace(0.1, 0.5, bs + 1).numpy()
    lows = sorted(int(np.float32(256) * p) for p in probs[:-1])
    highs = sorted(int(np.float32(256) * p) for p in probs[1:])
    for seed in range(20):
        masks, targets = sample_masks(2 * bs, gen, np.random.default_rng(seed), return_targets=True)
        assert masks.shape == (2 * bs, 256) and masks.dtype == bool
        counts = masks.sum(1)
        assert np.all(counts <= targets)
        nz = np.sort(targets[targets > 0])
        assert (targets > 0).sum() == bs  # n = int(2bs * 0.5) masked crops, the rest empty
        assert np.all(nz >= lows) and np.all(nz <= highs)  # one target per stratum
        assert counts.sum() <= mask_upper_bound(2 * bs, 256, 0.5, (0.1, 0.5))


def test_sample_masks_law_matches_official_collate():
    bs, n_batches = 8, 150
    gen = MaskingConfig().generator(224)
    ours = np.stack(
        [sample_masks(2 * bs, gen, np.random.default_rng(s)).sum(1) for s in range(n_batches)]
    )
    official = np.stack(
        [_official_collate(bs, seed=10_000 + s)["collated_masks"].numpy().sum(1)
         for s in range(n_batches)]
    )  # fmt: skip
    _assert_same_mean(ours.sum(1), official.sum(1), "masked patches per batch")
    _assert_same_mean((ours > 0).sum(1), (official > 0).sum(1), "masked crops per batch")
    # the shuffle spreads masks uniformly over the 2B rows
    assert np.all(np.abs((ours > 0).mean(0) - 0.5) < 0.2)
