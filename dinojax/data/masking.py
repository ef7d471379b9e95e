"""iBOT block masking and the official collate bookkeeping, in numpy with explicit generators.

`MaskingGenerator` follows the BEiT-style generator of the official code (facebookresearch/dinov2
`dinov2/data/masking.py` `MaskingGenerator`)
draw for draw in distribution, but takes an explicit `np.random.Generator` instead of Python's
global `random`, so a mask depends only on the seed it was given: the input pipeline derives that
seed from (seed, step, process) and the masks do not change with the number of workers.

`sample_masks` and `collate_masks` are the masking half of `collate_data_and_cast`
(`dinov2/data/collate.py`): half of
the global crops get a mask whose target ratio is stratified over `mask_ratio`, the list is
shuffled, and the bookkeeping the iBOT loss needs (flat indices of masked patches padded to a
static upper bound, per-patch weights, the count) comes with static shapes, so the training step
compiles once.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = [
    "MaskingConfig",
    "MaskingGenerator",
    "collate_masks",
    "mask_upper_bound",
    "official_max_num_patches",
    "sample_masks",
    "torch_linspace_f32",
]


def official_max_num_patches(image_size: int, patch_size: int) -> float:
    """`max_num_patches` exactly as the official train script computes it.

    The expression `0.5 * img_size // patch_size * img_size // patch_size` is evaluated left to
    right, so it is 128.0 for 224/14 but 98.0 for 224/16 (`dinov2/train/train.py` `do_train`).
    """
    return 0.5 * image_size // patch_size * image_size // patch_size


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
    """iBOT masking settings; the defaults are the DINOv2 ones
    (`dinov2/configs/ssl_default_config.yaml` `ibot`, `dinov2/data/masking.py`)."""

    patch_size: int = 14
    mask_probability: float = 0.5  # ibot.mask_sample_probability
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # ibot.mask_ratio_min_max
    min_num_patches: int = 4
    min_aspect: float = 0.3
    max_aspect: float | None = None  # None -> 1 / min_aspect
    max_num_patches: float | None = None  # None -> official_max_num_patches(crop, patch)

    def __post_init__(self) -> None:
        if self.patch_size <= 0:
            raise ValueError(f"patch_size must be positive, got {self.patch_size}")
        if not 0.0 <= self.mask_probability <= 1.0:
            raise ValueError(f"mask_probability must be in [0, 1], got {self.mask_probability}")
        lo, hi = self.mask_ratio
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"mask_ratio must satisfy 0 <= min <= max <= 1, got {self.mask_ratio}")

    def grid(self, image_size: int) -> tuple[int, int]:
        """Patch grid of a square crop of `image_size` pixels."""
        if image_size % self.patch_size:
            raise ValueError(
                f"global crop size {image_size} is not a multiple of patch size {self.patch_size}"
            )
        n = image_size // self.patch_size
        return (n, n)

    def generator(self, image_size: int) -> MaskingGenerator:
        max_num = self.max_num_patches
        if max_num is None:
            max_num = official_max_num_patches(image_size, self.patch_size)
        return MaskingGenerator(
            self.grid(image_size),
            min_num_patches=self.min_num_patches,
            max_num_patches=max_num,
            min_aspect=self.min_aspect,
            max_aspect=self.max_aspect,
        )


class MaskingGenerator:
    """BEiT block masking: rectangles of >= `min_num_patches` patches until a target is reached.

    Semantics of `dinov2/data/masking.py` `MaskingGenerator._mask` / `__call__`: each block draws an
    area uniformly in [min_num_patches, remaining] and a log-uniform aspect ratio, is placed
    uniformly, and is accepted if it adds between 1 and `remaining` new patches (10 tries per
    block). The result never exceeds the target and may fall short of it.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: float | None = None,
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        if not isinstance(input_size, tuple):
            input_size = (input_size, input_size)
        self.height, self.width = (int(s) for s in input_size)
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"input_size must be positive, got {input_size}")
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        if self.max_num_patches is None:
            raise ValueError("MaskingGenerator needs max_num_patches (or num_masking_patches)")
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator({self.height}x{self.width}, min={self.min_num_patches}, "
            f"max={self.max_num_patches}, log_aspect={self.log_aspect_ratio})"
        )

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _mask(self, mask: np.ndarray, max_mask_patches: float, rng: np.random.Generator) -> int:
        lo_ar, hi_ar = self.log_aspect_ratio
        lo_area = self.min_num_patches
        # Four uniforms per try (area, aspect, top, left), drawn ten tries at a time: numpy's
        # per-call overhead would otherwise dominate this tiny loop.
        u = rng.random((10, 4))
        for t in range(10):
            # random.uniform(a, b) == a + (b - a) * U, also when b < a (Python `random` docs)
            target_area = lo_area + (max_mask_patches - lo_area) * u[t, 0]
            aspect_ratio = math.exp(lo_ar + (hi_ar - lo_ar) * u[t, 1])
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                # random.randint(0, H - h) is inclusive of both ends
                top = int(u[t, 2] * (self.height - h + 1))
                left = int(u[t, 3] * (self.width - w + 1))
                region = mask[top : top + h, left : left + w]
                delta = h * w - int(np.count_nonzero(region))
                if 0 < delta <= max_mask_patches:
                    region[...] = True
                    return delta
        return 0

    def __call__(self, num_masking_patches: int, rng: np.random.Generator) -> np.ndarray:
        """A (H, W) bool mask with at most `num_masking_patches` masked patches."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - mask_count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches, rng)
            if delta == 0:
                break
            mask_count += delta
        return mask


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps)` (float32, CPU) bit for bit.

    The collate's upper bound is `sum(int(N * probs[i+1]))`; one ulp in `probs` can move an
    `int()` across an integer, so the float32 values must be torch's: step in float32, then
    `start + step*i` for the first half and `end - step*(steps-1-i)` for the second, each a fused
    multiply-add (the AVX2/AVX512 kernels). Checked against torch for steps < 1200 in the tests.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    a32, b32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([a32], dtype=np.float32)
    step = np.float64(np.float32((b32 - a32) / np.float32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    # float64 holds step*i + start exactly here, so one rounding to float32 is an exact FMA
    first = step * i + np.float64(a32)
    second = -step * (steps - 1 - i) + np.float64(b32)
    return np.where(np.arange(steps) < steps // 2, first, second).astype(np.float32)


def _stratified_probs(n_crops: int, mask_probability: float, mask_ratio: tuple[float, float]):
    n_masked_crops = int(n_crops * mask_probability)
    probs = torch_linspace_f32(mask_ratio[0], mask_ratio[1], n_masked_crops + 1)
    return n_masked_crops, probs


def mask_upper_bound(
    n_crops: int, n_tokens: int, mask_probability: float, mask_ratio: tuple[float, float]
) -> int:
    """Static bound on the masked patches of `n_crops` global crops (`upperbound` in
    `dinov2/data/collate.py` `collate_data_and_cast`)."""
    n_masked_crops, probs = _stratified_probs(n_crops, mask_probability, mask_ratio)
    n32 = np.float32(n_tokens)
    return int(sum(int(n32 * probs[i + 1]) for i in range(n_masked_crops)))


def sample_masks(
    n_crops: int,
    generator: MaskingGenerator,
    rng: np.random.Generator,
    mask_probability: float = 0.5,
    mask_ratio: tuple[float, float] = (0.1, 0.5),
    return_targets: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Masks for `n_crops` global crops, (n_crops, N) bool, in the official collate's law.

    `int(n_crops * mask_probability)` crops get `generator(int(N * U(p_i, p_{i+1})))` with
    `p = linspace(*mask_ratio, n + 1)` (float32 as in torch), the rest get empty masks, and the
    list is shuffled (`dinov2/data/collate.py` `collate_data_and_cast`). With `return_targets`, also
    the requested count of every row (0 for the unmasked ones), for tests.
    """
    n_tokens = generator.num_patches
    n_masked_crops, probs = _stratified_probs(n_crops, mask_probability, mask_ratio)
    n32 = np.float32(n_tokens)
    masks = np.zeros((n_crops, n_tokens), dtype=bool)
    targets = np.zeros((n_crops,), dtype=np.int64)
    u = rng.random(n_masked_crops)
    for i in range(n_masked_crops):
        lo, hi = probs[i], probs[i + 1]
        # random.uniform(prob_min, prob_max) on float32 tensors, then int(N * value)
        ratio = np.float32(lo + np.float32(np.float32(hi - lo) * np.float32(u[i])))
        targets[i] = int(np.float32(n32 * ratio))
        masks[i] = generator(int(targets[i]), rng).reshape(-1)
    perm = rng.permutation(n_crops)  # random.shuffle over the whole list
    masks, targets = masks[perm], targets[perm]
    return (masks, targets) if return_targets else masks


def collate_masks(
    masks: np.ndarray,
    upper_bound: int,
    *,
    index_offset: int = 0,
    pad_to_multiple: int = 1,
) -> dict[str, np.ndarray]:
    """The iBOT bookkeeping of `collate_data_and_cast` with static shapes.

    Returns `masks` (n_crops, N) bool; `mask_indices` (U,) int32, the flat indices of the masked
    patches in `masks.reshape(-1)` (plus `index_offset`) followed by padding; `masks_weight` (U,)
    float32, `1 / max(1, masked patches of the crop)` per masked patch and 0 on padding;
    `n_masked` (1,) int32. `U` is `upper_bound` rounded up to `pad_to_multiple` (so the arrays
    split evenly over devices); padding indices repeat `index_offset`, a valid row with weight 0.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 2:
        raise ValueError(f"masks must be (n_crops, n_tokens), got shape {masks.shape}")
    flat_idx = np.flatnonzero(masks)
    n_masked = flat_idx.shape[0]
    if n_masked > upper_bound:
        raise ValueError(f"{n_masked} masked patches exceed the upper bound {upper_bound}")
    size = -(-upper_bound // pad_to_multiple) * pad_to_multiple
    mask_indices = np.full((size,), index_offset, dtype=np.int32)
    mask_indices[:n_masked] = flat_idx + index_offset
    per_crop = masks.sum(axis=1, dtype=np.int64)
    weights = np.zeros((size,), dtype=np.float32)
    # official: (1 / clamp(count, min=1)) expanded over the crop's patches, then [masks]
    weights[:n_masked] = (1.0 / np.maximum(per_crop, 1).astype(np.float32))[
        flat_idx // masks.shape[1]
    ]
    return {
        "masks": masks,
        "mask_indices": mask_indices,
        "masks_weight": weights,
        "n_masked": np.array([n_masked], dtype=np.int32),
    }
