"""The training config's `data` section -> the input pipeline (`dinojax.data`)."""

from __future__ import annotations

import ml_collections

from dinojax.data import DataConfig, DinoDataPipeline, MaskingConfig
from dinojax.data.augment import PRESETS

__all__ = ["data_config", "make_pipeline", "uses_masks"]


def uses_masks(config: ml_collections.ConfigDict) -> bool:
    """iBOT masks are part of the batch for DINOv2; DINO v1 has none."""
    return config.loss.family != "dino"


def data_config(config: ml_collections.ConfigDict, process_count: int) -> DataConfig:
    """Per-process `DataConfig`: the global `config.batch_size` split evenly over processes."""
    d = config.data
    if config.batch_size % process_count:
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by the {process_count} processes"
        )
    if d.augment not in PRESETS:
        raise ValueError(f"unknown data.augment {d.augment!r}; known: {sorted(PRESETS)}")
    augment = PRESETS[d.augment](
        global_crops_size=d.global_crops_size,
        local_crops_size=d.local_crops_size,
        local_crops_number=d.local_crops_number,
    )
    masking = None
    if uses_masks(config):
        masking = MaskingConfig(
            patch_size=config.model.overrides.patch_size,
            mask_probability=d.mask_probability,
            mask_ratio=tuple(d.mask_ratio),
        )
    return DataConfig(
        source=d.source,
        data_dir=d.data_dir,
        batch_size=config.batch_size // process_count,
        seed=config.seed,
        num_workers=d.num_workers,
        read_threads=d.read_threads,
        prefetch=d.prefetch,
        mask_groups=d.get("mask_groups", 1),
        augment=augment,
        masking=masking,
    )


def make_pipeline(
    config: ml_collections.ConfigDict, process_index: int, process_count: int
) -> DinoDataPipeline:
    return DinoDataPipeline(
        config=data_config(config, process_count),
        process_index=process_index,
        process_count=process_count,
    )
