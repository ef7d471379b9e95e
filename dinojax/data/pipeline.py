"""The DINO / DINOv2 input pipeline: grain -> per-process shard -> seeded multi-crop -> collate
with iBOT masks -> global `jax.Array`s, prefetched.

Order of the data. The records form one endless stream: epoch `e` is a permutation of the dataset
(grain's `index_shuffle`, seeded by (seed, e)), epochs follow each other, and global batch `k`
is stream positions [k*B, (k+1)*B). Process `p` of `P` reads positions k*B + p*b + j, j < b, with
b = B / P: the processes' reads are disjoint and together cover the stream, and nothing depends
on the number of workers or threads.

Determinism. A record's crops come from a generator seeded by (seed, epoch, position in epoch);
the masks of a rank's images from one seeded by (seed, step, global rank). So batch `k` is a
pure function of (seed, k, process index, process count): resuming at step `k` reproduces the
exact batches, and the checkpointed data state is just the step.

Layout. Per process, the batch is `mask_groups` = g blocks, each one official per-GPU collate
(`dinov2/data/collate.py` `collate_data_and_cast`, facebookresearch/dinov2) of b / g of the
process's b images: block r holds images [r*b/g, (r+1)*b/g) as `global_crops` (2b/g, S, S, 3)
crop-major ([crop 0 of its images; crop 1]), and so do `local_crops` (n_local*b/g rows per block)
and `masks` (2b/g rows, aligned with `global_crops`); then the collate's `mask_indices` /
`masks_weight` padded to a static length, `n_masked`, and `labels` (b,) in image order. The
global arrays concatenate the processes' batches along axis 0 (what
`jax.make_array_from_process_local_data` builds from per-process data), so P processes of g
blocks give the same global batch as one process of P*g blocks: the P*g official ranks' batches
side by side. The training step reads that layout (`dinojax.ssl.losses`), and with one block per
device (the trainer: g = the step's per-GPU groups, `dinojax.train.data.mask_groups`) every crop
of an image lies on the image's device, whatever the process count: nothing is reordered. The
masks follow official per-rank semantics: rank p*g + r seeds block r of process p, so the global
masks depend on the number of ranks, not of processes. `mask_indices` index the *global*
flattened `masks`.

Bad data. A record that cannot be read or decoded is skipped, and a record of the same
process's shard takes its place: a seeded draw (seed, step, process, slot, attempt) among the
positions this process reads in the same epoch, outside the current global batch. So shapes stay
static, resumption stays exact, nothing depends on the number of workers, the processes' reads
stay disjoint and no record appears twice in a global batch because of a skip (only when the
whole epoch fits in one global batch is the stand-in taken from the process's own slots of that
batch). The skip is logged with the record's key, counted in the batch's `n_bad` and in
`DinoDataIterator.stats`, and only a long run of consecutive failures (a dataset that is broken,
not a few bad files) stops training.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import sys
import threading
import time
from typing import Any

import grain
import numpy as np

from dinojax.data.augment import AugmentConfig, MultiCropAugmentation, decode_image
from dinojax.data.masking import MaskingConfig, collate_masks, mask_upper_bound, sample_masks
from dinojax.data.sources import RecordSource, make_source

__all__ = [
    "DEVICE_KEYS",
    "DataConfig",
    "DinoDataIterator",
    "DinoDataPipeline",
    "normalize_images",
]

log = logging.getLogger("dinojax.data")

# Keys that become global jax.Arrays; the rest of a host batch is bookkeeping for the host.
DEVICE_KEYS = (
    "global_crops",
    "local_crops",
    "masks",
    "mask_indices",
    "masks_weight",
    "n_masked",
    "labels",
)

# Domain tags keep the seed streams of crops, masks and shuffling apart.
_TAG_CROPS, _TAG_MASKS, _TAG_SHUFFLE, _TAG_REPLACE = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Input pipeline settings. `batch_size` is per process (global = batch_size x processes).

    `num_workers` grain worker processes each build whole batches; `read_threads` threads per
    process (or per worker) do the same inside it. Neither changes the batches, only the speed.
    Workers are spawned (not forked): a script that uses them needs the usual
    `if __name__ == "__main__":` guard, or each worker re-runs it and grain waits forever.
    """

    source: str = "digits"
    data_dir: str | None = None
    batch_size: int = 64
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: endless stream
    num_workers: int = 0
    read_threads: int = 1
    worker_buffer_size: int = 2
    prefetch: int = 2  # device batches kept ready by the prefetch thread
    max_consecutive_bad: int = 64
    # Official DINOv2 collates per GPU: with mask_groups = g, each process's batch is g blocks, one
    # per rank of batch_size / g images, each collated (crop-major) and masked as that rank would
    # be (stratification, shuffle and upper bound per group; module docstring). 1: the process
    # is the rank.
    mask_groups: int = 1
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    masking: MaskingConfig | None = dataclasses.field(default_factory=MaskingConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0 or self.read_threads < 0:
            raise ValueError("num_workers and read_threads must be >= 0")
        if self.prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {self.prefetch}")
        if self.mask_groups < 1 or self.batch_size % self.mask_groups:
            raise ValueError(
                f"mask_groups ({self.mask_groups}) must divide batch_size ({self.batch_size})"
            )
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed}")

    @classmethod
    def dinov2(cls, **overrides: Any) -> DataConfig:
        """DINOv2 as released: 2x224 + 8x96 crops, blur (0, 0.9, 0.5), patch-14 iBOT masks."""
        return cls(**overrides)

    @classmethod
    def dino_v1(cls, **overrides: Any) -> DataConfig:
        """DINO v1: its crop scales and PIL blur, no iBOT masks."""
        return cls(**{"augment": AugmentConfig.dino_v1(), "masking": None, **overrides})


def _epoch_shuffle_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, _TAG_SHUFFLE, epoch]).generate_state(1)[0])


class _LoadAndAugment:
    """Process-local element index -> one augmented record (runs in grain threads / workers)."""

    def __init__(self, source, augment: AugmentConfig, n_records: int, seed: int, shuffle: bool,
                 local_batch: int, global_batch: int, process_index: int,
                 max_consecutive_bad: int) -> None:  # fmt: skip
        self.source = source
        self.augment = MultiCropAugmentation(augment)
        self.n = n_records
        self.seed, self.shuffle = seed, shuffle
        self.b, self.B, self.p = local_batch, global_batch, process_index
        self.max_bad = max_consecutive_bad

    def record_at(self, epoch: int, pos: int) -> int:
        if not self.shuffle or self.n == 1:
            return pos
        s = _epoch_shuffle_seed(self.seed, epoch)  # ~10 us: not worth a cache shared by threads
        return int(grain.experimental.index_shuffle(pos, max_index=self.n - 1, seed=s, rounds=4))

    def replacement_position(self, step: int, j: int, epoch: int, attempt: int) -> int:
        """Epoch position standing in for slot `j` of this process's batch `step` after `attempt`
        (>= 1) failed reads: one of this process's own positions in the same epoch, in another
        global batch, drawn from (seed, step, process, slot, attempt) alone."""
        n, B, b, p = self.n, self.B, self.b, self.p
        lo, hi = epoch * n, (epoch + 1) * n  # the epoch's stream positions
        s_lo, s_hi = lo // B, (hi - 1) // B  # global batches that overlap the epoch
        if s_hi > s_lo:
            rng = np.random.default_rng([self.seed, _TAG_REPLACE, step, p, j, attempt])
            for _ in range(64):  # rejects only slots of edge batches that fall outside the epoch
                s2 = int(rng.integers(s_lo, s_hi))
                s2 += s2 >= step  # uniform over the other batches
                g2 = s2 * B + p * b + int(rng.integers(b))
                if lo <= g2 < hi:
                    return g2 - lo
            for s2 in [*range(step + 1, s_hi + 1), *range(s_lo, step)]:  # tiny epochs: scan
                for j2 in range(b):
                    g2 = s2 * B + p * b + (j + attempt + j2) % b
                    if lo <= g2 < hi:
                        return g2 - lo
        # the process has no slot of the epoch outside this batch: its own slots of the batch
        # (slot j itself is in the epoch, so this returns)
        for k in range(b):
            g2 = step * B + p * b + (j + attempt + k) % b
            if lo <= g2 < hi:
                return g2 - lo
        raise AssertionError("unreachable: slot j lies in the epoch")

    def __call__(self, i: int) -> dict[str, Any]:
        step, j = divmod(int(i), self.b)
        g = step * self.B + self.p * self.b + j  # position in the global stream
        epoch, pos = divmod(g, self.n)
        bad: list[tuple[str, str]] = []
        for attempt in range(self.max_bad + 1):
            read_pos = pos if attempt == 0 else self.replacement_position(step, j, epoch, attempt)
            rec_idx = self.record_at(epoch, read_pos)
            key = self.source.key(rec_idx) if hasattr(self.source, "key") else str(rec_idx)
            try:
                rec = self.source[rec_idx]
                img = decode_image(rec["image"])
                label = int(rec.get("label", -1))
                break
            except Exception as e:  # noqa: BLE001 - any unreadable record is skipped, not fatal
                msg = f"{type(e).__name__}: {e}"
                log.warning("skipping unreadable record %s (%s)", key, msg)
                bad.append((key, msg))
        else:
            raise RuntimeError(
                f"{self.max_bad + 1} consecutive records could not be read or decoded (last: "
                f"{bad[-1][0]}: {bad[-1][1]}); the dataset looks broken"
            )
        rng = np.random.default_rng([self.seed, _TAG_CROPS, epoch, pos])
        crops = self.augment(img, rng)
        return {**crops, "label": label, "record_index": rec_idx, "step": step, "bad": bad}


class _Collate:
    """grain batch_fn: b records -> `mask_groups` crop-major blocks with iBOT masks (the
    official collate of each rank; module docstring)."""

    def __init__(self, augment: AugmentConfig, masking: MaskingConfig | None, seed: int,
                 process_index: int, local_batch: int, local_shards: int,
                 mask_groups: int = 1) -> None:  # fmt: skip
        self.aug = MultiCropAugmentation(augment)
        self.cfg = augment
        self.masking = masking
        self.seed, self.p, self.b, self.k = seed, process_index, local_batch, local_shards
        self.groups = mask_groups
        if masking is not None:
            self.gen = masking.generator(augment.global_crops_size)
            self.n_tokens = self.gen.num_patches
            self.upper = _process_mask_upper_bound(masking, self.n_tokens, local_batch, mask_groups)

    def masks(self, step: int) -> np.ndarray:
        """(2b, N) masks of batch `step`: each group of b/g images masked like one official rank.

        Group r owns images [r*b/g, (r+1)*b/g); its 2b/g crops are block r, rows
        r*2b/g + c*b/g + j (crop c of its image j).
        """
        m, b, g = self.masking, self.b, self.groups
        bg = b // g
        out = np.empty((2 * b, self.n_tokens), dtype=bool)
        for r in range(g):
            # keyed by the global rank p*g + r: P processes of g groups mask exactly like one
            # process of P*g groups, so the masks do not depend on the process count
            rng = np.random.default_rng([self.seed, _TAG_MASKS, step, self.p * g + r])
            out[r * 2 * bg : (r + 1) * 2 * bg] = sample_masks(
                2 * bg, self.gen, rng, m.mask_probability, m.mask_ratio
            )
        return out

    def __call__(self, elements: list[dict[str, Any]]) -> dict[str, Any]:
        c, b, g = self.cfg, len(elements), self.groups
        dtype = np.float32 if c.normalize else np.uint8
        S, s, nl = c.global_crops_size, c.local_crops_size, c.local_crops_number
        # g blocks (one per official rank), each crop-major like collate_data_and_cast
        gc = np.empty((g, 2, b // g, S, S, 3), dtype)
        lc = np.empty((g, nl, b // g, s, s, 3), dtype)
        for j, e in enumerate(elements):
            r, i = divmod(j, b // g)
            for k in range(2):
                self.aug.normalize_into(e["global_crops"][k], gc[r, k, i])
            for k in range(nl):
                self.aug.normalize_into(e["local_crops"][k], lc[r, k, i])
        step = elements[0]["step"]
        out: dict[str, Any] = {
            "global_crops": gc.reshape(2 * b, S, S, 3),
            "local_crops": lc.reshape(nl * b, s, s, 3),
            "labels": np.array([e["label"] for e in elements], dtype=np.int32),
            # host-side bookkeeping
            "record_index": np.array([e["record_index"] for e in elements], dtype=np.int64),
            "step": step,
            "n_bad": sum(len(e["bad"]) for e in elements),
            "bad": [x for e in elements for x in e["bad"]],
        }
        if self.masking is not None:
            coll = collate_masks(
                self.masks(step),
                self.upper,
                index_offset=self.p * 2 * b * self.n_tokens,
                pad_to_multiple=_buffer_multiple(self.k, self.groups),
            )
            n_masked = np.zeros((self.k,), np.int32)  # sum() is the count; one slot per shard
            n_masked[0] = coll["n_masked"][0]
            out.update(coll, n_masked=n_masked)
        return out


def batch_spec(c, process_count: int, local_shards: int, sharding) -> dict[str, Any]:
    """`jax.ShapeDtypeStruct`s of one global batch of the pipeline config `c` (`DataConfig`) on
    `process_count` processes with `local_shards` batch shards each: what
    `DinoDataIterator.element_spec` gives, also without a data source (deviceless compiles)."""
    import jax

    a, b, P, k = c.augment, c.batch_size, process_count, local_shards
    img = np.float32 if a.normalize else np.uint8
    shapes = {
        "global_crops": ((P * 2 * b, a.global_crops_size, a.global_crops_size, 3), img),
        "local_crops": (
            (P * a.local_crops_number * b, a.local_crops_size, a.local_crops_size, 3),
            img,
        ),
        "labels": ((P * b,), np.int32),
    }
    if c.masking is not None:
        n_tokens = c.masking.generator(a.global_crops_size).num_patches
        upper = _process_mask_upper_bound(c.masking, n_tokens, b, c.mask_groups)
        mult = _buffer_multiple(k, c.mask_groups)
        u = -(-upper // mult) * mult  # the buffer splits evenly over the shards and groups
        shapes.update(
            masks=((P * 2 * b, n_tokens), np.bool_),
            mask_indices=((P * u,), np.int32),
            masks_weight=((P * u,), np.float32),
            n_masked=((P * k,), np.int32),
        )
    return {
        key: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        for key, (shape, dtype) in shapes.items()
    }


def _buffer_multiple(local_shards: int, groups: int) -> int:
    # The masked-token buffer splits evenly over the process's device shards and its groups (the
    # step gives each group an equal block of it).
    return math.lcm(local_shards, groups)


def _process_mask_upper_bound(m: MaskingConfig, n_tokens: int, b: int, groups: int) -> int:
    return groups * mask_upper_bound(2 * (b // groups), n_tokens, m.mask_probability, m.mask_ratio)


def _worker_init(worker_index: int, worker_count: int) -> None:
    del worker_index, worker_count
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from the workers


class DinoDataPipeline:
    """Builds this process's batches. See the module docstring for order, layout and seeding.

    `process_index` / `process_count` default to JAX's; pass them explicitly to build another
    process's shard (tests simulate several hosts that way).
    """

    def __init__(
        self,
        source: str | RecordSource | None = None,
        config: DataConfig | None = None,
        *,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> None:
        self.config = config or DataConfig()
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.process_index, self.process_count = process_index, process_count
        spec = self.config.source if source is None else source
        self.source = make_source(spec, data_dir=self.config.data_dir)
        self.n_records = len(self.source)
        if self.n_records == 0:
            raise ValueError(f"data source {spec!r} is empty")
        self.local_batch = self.config.batch_size
        self.global_batch = self.local_batch * process_count
        m = self.config.masking
        self.n_tokens = 0
        self.mask_upper_bound = 0
        if m is not None:
            self.n_tokens = m.generator(self.config.augment.global_crops_size).num_patches
            self.mask_upper_bound = _process_mask_upper_bound(
                m, self.n_tokens, self.local_batch, self.config.mask_groups
            )

    @property
    def global_mask_upper_bound(self) -> int:
        """Static bound on masked patches in a global batch (all processes): the `upperbound`
        the iBOT loss pads its buffer to."""
        return self.process_count * self.mask_upper_bound

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per pass over the data (the stream itself runs across epochs)."""
        return max(1, self.n_records // self.global_batch)

    @property
    def num_steps(self) -> int | None:
        if self.config.num_epochs is None:
            return None
        return self.config.num_epochs * self.n_records // self.global_batch

    def record_indices(self, step: int) -> np.ndarray:
        """Record indices of this process's batch `step` (no decoding; for tests and audits)."""
        load = self._loader()
        first = step * self.local_batch
        out = []
        for i in range(first, first + self.local_batch):
            s, j = divmod(i, self.local_batch)
            g = s * self.global_batch + self.process_index * self.local_batch + j
            out.append(load.record_at(*divmod(g, self.n_records)))
        return np.asarray(out, dtype=np.int64)

    def masks(self, step: int) -> np.ndarray:
        """(2b, N) iBOT masks of this process's batch `step`, as the batch carries them."""
        c = self.config
        if c.masking is None:
            raise ValueError("this pipeline has no masking configured")
        collate = _Collate(
            c.augment, c.masking, c.seed, self.process_index, self.local_batch, 1, c.mask_groups
        )
        return collate.masks(step)

    def _loader(self) -> _LoadAndAugment:
        c = self.config
        return _LoadAndAugment(
            self.source, c.augment, self.n_records, c.seed, c.shuffle, self.local_batch,
            self.global_batch, self.process_index, c.max_consecutive_bad,
        )  # fmt: skip

    def dataset(self, start_step: int = 0, local_shards: int = 1) -> grain.MapDataset:
        """A grain `MapDataset` whose element `i` is this process's batch `start_step + i`.

        `local_shards`: how many device shards this process's rows are split into; the padded
        mask arrays are rounded up to a multiple of it.
        """
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        c = self.config
        total = (
            self.num_steps if self.num_steps is not None else sys.maxsize // (2 * self.local_batch)
        )
        if start_step > total:
            raise ValueError(f"start_step {start_step} is past the end ({total} steps)")
        ds = grain.MapDataset.range(start_step * self.local_batch, total * self.local_batch)
        ds = ds.map(self._loader())
        collate = _Collate(
            c.augment, c.masking, c.seed, self.process_index, self.local_batch, local_shards,
            c.mask_groups,
        )  # fmt: skip
        return ds.batch(self.local_batch, drop_remainder=True, batch_fn=collate)

    def host_iterator(self, start_step: int = 0, local_shards: int = 1) -> grain.DatasetIterator:
        """Iterator of numpy batches from `start_step`, with the configured threads and workers."""
        c = self.config
        ds = self.dataset(start_step, local_shards).to_iter_dataset(
            grain.ReadOptions(
                num_threads=c.read_threads, prefetch_buffer_size=max(1, c.read_threads)
            )
        )
        if c.num_workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():
                # grain's worker start-up reads absl flags; outside an absl app nothing parsed
                # them, so take their defaults (an app that parses its flags later still can)
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=c.num_workers, per_worker_buffer_size=c.worker_buffer_size
                ),
                worker_init_fn=_worker_init,
            )
        return iter(ds)

    def device_iterator(
        self,
        mesh=None,
        data_axes: str | tuple[str, ...] | None = None,
        start_step: int = 0,
    ) -> DinoDataIterator:
        """Global `jax.Array` batches sharded over `data_axes` of `mesh`, prefetched.

        Defaults: a 1-D mesh over all devices named "data". Every array is sharded along its
        leading axis; the other mesh axes hold replicas.
        """
        return DinoDataIterator(self, mesh=mesh, data_axes=data_axes, start_step=start_step)


def normalize_images(x, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """uint8 crops (pipeline run with `normalize=False`) -> float32 as ToTensor + Normalize.

    A lookup into the same 256-entry table the host uses, so the result is bit-identical to
    host normalisation (XLA may turn `x / 255` into a multiply, one ulp off).
    """
    import jax.numpy as jnp

    from dinojax.data.augment import normalize_lut

    table = jnp.asarray(normalize_lut(mean, std).reshape(256, 3))
    return table[x.astype(jnp.int32), jnp.arange(3)]


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class DinoDataIterator:
    """Prefetching iterator of global batches; `get_state()` / `set_state()` for checkpoints.

    A background thread pulls numpy batches from grain and turns them into global arrays with
    `jax.make_array_from_process_local_data`, keeping `config.prefetch` batches ready. The state
    is the number of batches handed out, so restoring it replays exactly the batches that follow.
    """

    def __init__(self, pipeline: DinoDataPipeline, mesh=None, data_axes=None, start_step: int = 0):
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        if pipeline.process_count != jax.process_count():
            raise ValueError(
                f"the pipeline was built for {pipeline.process_count} processes but JAX runs "
                f"{jax.process_count()}; device arrays need the real process layout"
            )
        if mesh is None:
            from jax.sharding import AxisType

            mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
            data_axes = ("data",)
        if data_axes is None:
            data_axes = tuple(mesh.axis_names)
        if isinstance(data_axes, str):
            data_axes = (data_axes,)
        self.pipeline = pipeline
        self.mesh = mesh
        self.sharding = NamedSharding(mesh, PartitionSpec(data_axes))
        n_shards = int(np.prod([mesh.shape[a] for a in data_axes]))
        index_map = self.sharding.addressable_devices_indices_map((n_shards,))
        self.local_shards = len({idx[0].start for idx in index_map.values()})
        if pipeline.local_batch % self.local_shards:
            raise ValueError(
                f"per-process batch size {pipeline.local_batch} must be a multiple of this "
                f"process's {self.local_shards} data shards (mesh axes {data_axes})"
            )
        # skipped_reads counts every skip (a bad record is met again each epoch, or as the
        # stand-in of a neighbour); bad_records counts distinct records; bad_keys names them.
        self.stats = {"batches": 0, "skipped_reads": 0, "bad_records": 0}
        self.bad_keys: set[str] = set()
        self.last_bad: list[tuple[str, str]] = []
        self._step = start_step
        self._thread: threading.Thread | None = None
        self._start()

    @property
    def element_spec(self) -> dict[str, Any]:
        """`jax.ShapeDtypeStruct`s (with sharding) of every batch, to compile before data comes."""
        pipe = self.pipeline
        return batch_spec(pipe.config, pipe.process_count, self.local_shards, self.sharding)

    # -- state ----------------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: the next step, plus what must match on restore."""
        c = self.pipeline.config
        return {
            "step": self._step,
            "seed": c.seed,
            "global_batch_size": self.pipeline.global_batch,
            "num_records": self.pipeline.n_records,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        c = self.pipeline.config
        for key, mine in (
            ("seed", c.seed),
            ("global_batch_size", self.pipeline.global_batch),
            ("num_records", self.pipeline.n_records),
        ):
            if key in state and int(state[key]) != mine:
                raise ValueError(
                    f"data state has {key}={state[key]} but this pipeline has {mine}; the same "
                    "batches cannot follow"
                )
        self._stop_thread()
        self._step = int(state["step"])
        self._start()

    @property
    def step(self) -> int:
        return self._step

    @property
    def ready_batches(self) -> int:
        """Batches already on the devices, waiting for `next` (at most `config.prefetch`)."""
        return self._queue.qsize()

    # -- iteration ------------------------------------------------------------------------------
    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=self.pipeline.config.prefetch)
        self._stop = threading.Event()
        host = self.pipeline.host_iterator(self._step, self.local_shards)
        self._thread = threading.Thread(
            target=self._produce, args=(host, self._queue, self._stop), daemon=True,
            name="dinojax-data-prefetch",
        )  # fmt: skip
        self._thread.start()

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        import jax

        out = {}
        P = self.pipeline.process_count
        for k in DEVICE_KEYS:
            if k in batch:
                a = batch[k]
                global_shape = (a.shape[0] * P, *a.shape[1:])
                out[k] = jax.make_array_from_process_local_data(self.sharding, a, global_shape)
        return out

    @staticmethod
    def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, host, q: queue.Queue, stop: threading.Event) -> None:
        try:
            for batch in host:
                item = (self._to_device(batch), batch["n_bad"], batch["bad"])
                if not self._put(q, item, stop):
                    return
            self._put(q, _Failure(StopIteration()), stop)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
            self._put(q, _Failure(e), stop)
        finally:
            close = getattr(host, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> DinoDataIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if self._thread is None or not self._thread.is_alive():
                    raise RuntimeError("the data prefetch thread stopped unexpectedly") from None
        if isinstance(item, _Failure):
            raise item.exc
        batch, n_bad, bad = item
        self._step += 1
        self.stats["batches"] += 1
        if n_bad:
            self.stats["skipped_reads"] += n_bad
            if len(self.bad_keys) < 1_000_000:
                self.bad_keys.update(k for k, _ in bad)
            self.stats["bad_records"] = len(self.bad_keys)
            self.last_bad = (self.last_bad + list(bad))[-20:]
            log.warning(
                "step %d: skipped %d unreadable record(s); %d distinct bad records so far "
                "(latest %s: %s)",
                self._step - 1, n_bad, self.stats["bad_records"], bad[-1][0], bad[-1][1],
            )  # fmt: skip
        return batch

    def _stop_thread(self, timeout: float = 60.0) -> None:
        if self._thread is not None:
            self._stop.set()
            deadline = time.monotonic() + timeout
            while self._thread.is_alive() and time.monotonic() < deadline:
                try:  # unblock a producer waiting on a full queue
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.1)
            self._thread = None

    def close(self) -> None:
        self._stop_thread()

    def __enter__(self) -> DinoDataIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
