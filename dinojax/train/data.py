"""The training config's `data` section -> the input pipeline (`dinojax.data`)."""

from __future__ import annotations

import ml_collections

from dinojax.data import DataConfig, DinoDataPipeline, MaskingConfig
from dinojax.data.augment import PRESETS

__all__ = ["data_config", "make_pipeline", "mask_groups", "uses_masks"]


def uses_masks(config: ml_collections.ConfigDict) -> bool:
    """iBOT masks are part of the batch for DINOv2; DINO v1 has none."""
    return config.loss.family != "dino"


def mask_groups(config: ml_collections.ConfigDict, process_count: int, n_ranks: int | None) -> int:
    """Per-GPU groups per process: the official ranks of the run, divided among the processes.

    Each group is one block of the process's batch (the official per-GPU collate, crop-major
    over its own images; `dinojax.data.pipeline`), the layout the step reads, and official
    DINOv2 masks per GPU. The step reproduces per-GPU KoLeo and iBOT
    centering over `n_ranks` groups of the global batch (`dinojax.ssl.step.n_batch_shards`:
    `loss.n_shards`, else the batch devices), so the masks use the same groups: rank `p * g + r`
    is group `r` of process `p`. Masks - and losses - then depend on the number of ranks, never
    on how many processes hold them. `data.mask_groups` may set the per-process count, but the
    step reads the batch as `n_ranks` blocks: with `n_ranks` given it must agree.
    """
    explicit = config.data.get("mask_groups", None)
    if explicit is not None:
        if n_ranks is not None and int(explicit) * process_count != n_ranks:
            raise ValueError(
                f"data.mask_groups {explicit} x {process_count} processes != the step's "
                f"{n_ranks} per-GPU groups (loss.n_shards, else the batch devices): the batch "
                "is one block per group; leave data.mask_groups unset"
            )
        return int(explicit)
    if n_ranks is None:
        return 1
    if n_ranks % process_count:
        raise ValueError(
            f"the batch is split into {n_ranks} official ranks (loss.n_shards, else the batch "
            f"devices), which {process_count} processes cannot share evenly; set loss.n_shards "
            "to a multiple of the process count or data.mask_groups explicitly"
        )
    return n_ranks // process_count


def data_config(
    config: ml_collections.ConfigDict, process_count: int, n_ranks: int | None = None
) -> DataConfig:
    """Per-process `DataConfig`: the global `config.batch_size` split evenly over processes.

    `n_ranks`: the official ranks the step's per-GPU losses use (see `mask_groups`); None masks
    each process's batch as one rank.
    """
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
        # the per-GPU blocks of the batch layout (and the iBOT mask ranks), DINO v1 included
        mask_groups=mask_groups(config, process_count, n_ranks),
        augment=augment,
        masking=masking,
    )


def make_pipeline(
    config: ml_collections.ConfigDict,
    process_index: int,
    process_count: int,
    n_ranks: int | None = None,
) -> DinoDataPipeline:
    return DinoDataPipeline(
        config=data_config(config, process_count, n_ranks),
        process_index=process_index,
        process_count=process_count,
    )
