"""The grain input pipeline: layout, determinism, sharding over processes, resume, bad data.

Small crops (56/28 px) keep most tests fast; one test runs the DINOv2 default sizes.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dinojax.data.augment import AugmentConfig, MultiCropAugmentation, decode_image
from dinojax.data.masking import MaskingConfig
from dinojax.data.pipeline import (
    DEVICE_KEYS,
    DataConfig,
    DinoDataPipeline,
    normalize_images,
)
from dinojax.data.sources import DigitsSource

SMALL = AugmentConfig(global_crops_size=56, local_crops_size=28, local_crops_number=3)


def _cfg(**kw) -> DataConfig:
    return DataConfig(**{"batch_size": 4, "augment": SMALL, **kw})


def _pipe(source="digits", p=0, n=1, **kw) -> DinoDataPipeline:
    return DinoDataPipeline(source, _cfg(**kw), process_index=p, process_count=n)


def _take(pipe: DinoDataPipeline, n: int, start: int = 0) -> list[dict]:
    it = pipe.host_iterator(start)
    out = [next(it) for _ in range(n)]
    if hasattr(it, "close"):
        it.close()
    return out


def _assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in (*DEVICE_KEYS, "record_index"):
            if k in x:
                np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=k)


class _Records:
    """A tiny in-memory source of distinct uint8 images (record i is identifiable)."""

    def __init__(self, n: int) -> None:
        rng = np.random.default_rng(0)
        self.images = [rng.integers(0, 256, (30 + i % 4, 34, 3), dtype=np.uint8) for i in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": i, "key": f"rec{i}"}


def test_default_sizes_layout_and_seeding():
    """DINOv2 default crops; the batch is crop-major and each record's crops are a pure function
    of (seed, epoch, position), recomputed here from the record itself."""
    cfg = DataConfig(batch_size=2, seed=7)
    pipe = DinoDataPipeline("digits", cfg, process_index=0, process_count=1)
    (batch,) = _take(pipe, 1, start=5)
    b, n_local, n_tok = 2, 8, 256
    assert batch["global_crops"].shape == (2 * b, 224, 224, 3)
    assert batch["local_crops"].shape == (n_local * b, 96, 96, 3)
    assert batch["global_crops"].dtype == np.float32
    assert batch["masks"].shape == (2 * b, n_tok) and batch["masks"].dtype == bool
    assert batch["mask_indices"].shape == (pipe.mask_upper_bound,)
    assert batch["masks_weight"].shape == (pipe.mask_upper_bound,)
    assert batch["labels"].shape == (b,) and batch["labels"].dtype == np.int32
    assert int(batch["n_masked"].sum()) == int(batch["masks"].sum())
    # recompute every crop of image j from its record: rows j (crop 0) and b + j (crop 1)
    digits = DigitsSource()
    aug = MultiCropAugmentation(cfg.augment)
    for j in range(b):
        g = 5 * b + j
        epoch, pos = divmod(g, len(digits))
        rec = int(batch["record_index"][j])
        assert rec == pipe.record_indices(5)[j]
        assert batch["labels"][j] == digits.labels[rec]
        crops = aug(decode_image(digits[rec]["image"]), np.random.default_rng([7, 0, epoch, pos]))
        for k in range(2):
            ref = np.empty((224, 224, 3), np.float32)
            aug.normalize_into(crops["global_crops"][k], ref)
            np.testing.assert_array_equal(batch["global_crops"][k * b + j], ref)
        for k in range(n_local):
            ref = np.empty((96, 96, 3), np.float32)
            aug.normalize_into(crops["local_crops"][k], ref)
            np.testing.assert_array_equal(batch["local_crops"][k * b + j], ref)


def test_deterministic_for_a_seed():
    a, b = _take(_pipe(seed=3), 3), _take(_pipe(seed=3), 3)
    _assert_batches_equal(a, b)
    c = _take(_pipe(seed=4), 1)[0]
    assert not np.array_equal(a[0]["record_index"], c["record_index"])
    assert not np.array_equal(a[0]["global_crops"], c["global_crops"])


def test_independent_of_workers_and_threads():
    ref = _take(_pipe(seed=11), 3, start=2)
    threaded = _take(_pipe(seed=11, read_threads=3), 3, start=2)
    workers = _take(_pipe(seed=11, num_workers=2, read_threads=1), 3, start=2)
    _assert_batches_equal(ref, threaded)
    _assert_batches_equal(ref, workers)


def test_two_simulated_processes_disjoint_and_complete():
    n_records, b = 24, 3  # global batch 6, 4 steps per epoch
    src = _Records(n_records)
    procs = [_pipe(src, p=p, n=2, batch_size=b, seed=5) for p in range(2)]
    assert procs[0].global_batch == 6 and procs[0].steps_per_epoch == 4
    for epoch in range(2):
        seen = [
            np.concatenate([pp.record_indices(s) for s in range(4 * epoch, 4 * epoch + 4)])
            for pp in procs
        ]
        assert not set(seen[0]) & set(seen[1])  # disjoint
        assert sorted(np.concatenate(seen)) == list(range(n_records))  # complete
    assert not np.array_equal(procs[0].record_indices(0), procs[0].record_indices(4))  # reshuffled
    # the data a process reads is its shard only, and equals the matching rows of a single
    # process reading the global batch (the crops depend on stream position, not on topology)
    single = _pipe(src, batch_size=2 * b, seed=5)
    for step in (0, 5):
        parts = [_take(pp, 1, start=step)[0] for pp in procs]
        whole = _take(single, 1, start=step)[0]
        np.testing.assert_array_equal(
            np.concatenate([x["record_index"] for x in parts]), whole["record_index"]
        )
        np.testing.assert_array_equal(np.concatenate([x["labels"] for x in parts]), whole["labels"])
        for p, part in enumerate(parts):
            for k in range(2):  # each process one crop-major block of its own images
                np.testing.assert_array_equal(
                    part["global_crops"][k * b : (k + 1) * b],
                    whole["global_crops"][k * 2 * b + p * b : k * 2 * b + (p + 1) * b],
                )
            n_tok = part["masks"].shape[1]
            assert part["masks"].shape[0] == 2 * b
            n = int(part["n_masked"].sum())
            idx = part["mask_indices"][:n] - p * 2 * b * n_tok  # global flat index -> local
            np.testing.assert_array_equal(idx, np.flatnonzero(part["masks"]))


def test_processes_of_groups_equal_one_process_of_all_groups():
    """The batch is one crop-major block per official rank (`mask_groups` per process): two
    processes of one block each hold, side by side, exactly the global batch of one process of
    two blocks (crops, masks, labels), so the step needs no reordering on a multi-host pod."""
    src = _Records(24)
    b = 3
    parts = [_take(_pipe(src, p=p, n=2, batch_size=b, seed=5), 1, start=1)[0] for p in range(2)]
    whole = _take(_pipe(src, batch_size=2 * b, seed=5, mask_groups=2), 1, start=1)[0]
    for key in ("global_crops", "local_crops", "masks", "labels", "record_index"):
        np.testing.assert_array_equal(np.concatenate([x[key] for x in parts]), whole[key], key)
    # block r of the single process: crop c of its image j at row r*2b + c*b + j
    ref = _take(_pipe(src, batch_size=2 * b, seed=5), 1, start=1)[0]  # one block: crop-major
    for r in range(2):
        for c in range(2):
            np.testing.assert_array_equal(
                whole["global_crops"][r * 2 * b + c * b : r * 2 * b + (c + 1) * b],
                ref["global_crops"][c * 2 * b + r * b : c * 2 * b + (r + 1) * b],
            )
        n_local = SMALL.local_crops_number
        for c in range(n_local):
            np.testing.assert_array_equal(
                whole["local_crops"][(r * n_local + c) * b : (r * n_local + c + 1) * b],
                ref["local_crops"][c * 2 * b + r * b : c * 2 * b + (r + 1) * b],
            )


def test_device_arrays_and_resume():
    assert jax.device_count() == 8
    pipe = _pipe(batch_size=8, seed=2)
    with pipe.device_iterator() as it:
        first = next(it)
        for k in DEVICE_KEYS:
            assert isinstance(first[k], jax.Array)
            assert first[k].sharding.spec == jax.sharding.PartitionSpec(("data",)), k
        assert first["global_crops"].shape == (16, 56, 56, 3)
        assert first["masks"].shape == (16, 16)
        u = first["mask_indices"].shape[0]
        assert u % 8 == 0 and u >= pipe.global_mask_upper_bound
        assert first["n_masked"].shape == (8,)
        spec = it.element_spec
        assert set(spec) == set(first)
        for k, v in first.items():
            assert (spec[k].shape, spec[k].dtype, spec[k].sharding) == (
                v.shape,
                v.dtype,
                v.sharding,
            )
        masks = np.asarray(first["masks"]).reshape(-1)
        n = int(np.asarray(first["n_masked"]).sum())
        idx = np.asarray(first["mask_indices"])
        assert masks[idx[:n]].all() and n == masks.sum()
        w = np.asarray(first["masks_weight"])
        assert np.all(w[n:] == 0) and np.all(w[:n] > 0)
        # inside jit the arrays behave as one global batch
        total = jax.jit(lambda m: jnp.sum(m))(first["masks"])
        assert int(total) == n
        next(it)
        state = it.get_state()
        assert state["step"] == 2
        after = [jax.device_get(next(it)) for _ in range(2)]
        it.set_state(state)
        again = [jax.device_get(next(it)) for _ in range(2)]
        _assert_batches_equal(after, again)
    # a new iterator (e.g. after a restart) restored from the saved state
    with _pipe(batch_size=8, seed=2).device_iterator() as it2:
        it2.set_state(state)
        _assert_batches_equal(after, [jax.device_get(next(it2)) for _ in range(2)])
        with pytest.raises(ValueError, match="global_batch_size"):
            it2.set_state({**state, "global_batch_size": 16})


def test_uint8_transfer_and_device_normalisation():
    host = _take(_pipe(seed=1), 1)[0]
    raw = _take(_pipe(seed=1, augment=dataclasses.replace(SMALL, normalize=False)), 1)[0]
    assert raw["global_crops"].dtype == np.uint8
    dev = jax.jit(normalize_images)(raw["global_crops"])
    np.testing.assert_array_equal(np.asarray(dev), host["global_crops"])


def test_mask_groups_follow_per_rank_collate():
    aug = AugmentConfig(global_crops_size=112, local_crops_size=28, local_crops_number=1)
    pipe = DinoDataPipeline(
        "digits",
        DataConfig(batch_size=8, augment=aug, mask_groups=2, masking=MaskingConfig()),
        process_index=0,
        process_count=1,
    )
    single_group = DinoDataPipeline(
        "digits", DataConfig(batch_size=4, augment=aug), process_index=0, process_count=1
    )
    assert pipe.mask_upper_bound == 2 * single_group.mask_upper_bound
    bg = 4
    for step in range(10):
        m = pipe.masks(step)
        assert m.shape == (16, 64) and m.sum() <= pipe.mask_upper_bound
        for r in range(2):  # group r: block r, crop-major rows r*2bg + c*bg + j
            rows = np.arange(r * 2 * bg, (r + 1) * 2 * bg)
            assert m[rows].any(axis=1).sum() <= bg  # half of the group's 2*bg crops at most
            assert m[rows].sum() <= single_group.mask_upper_bound
    with pytest.raises(ValueError, match="mask_groups"):
        DataConfig(batch_size=6, mask_groups=4)


def test_masks_depend_on_ranks_not_processes():
    """P processes of g groups mask exactly like one process of P*g groups (global rank seeds)."""
    aug = AugmentConfig(global_crops_size=112, local_crops_size=28, local_crops_number=1)

    def pipe(batch, groups, p, n):
        cfg = DataConfig(batch_size=batch, augment=aug, mask_groups=groups, masking=MaskingConfig())
        return DinoDataPipeline("digits", cfg, process_index=p, process_count=n)

    one = pipe(8, 4, 0, 1)
    two = [pipe(4, 2, p, 2) for p in range(2)]
    assert one.mask_upper_bound == sum(t.mask_upper_bound for t in two)
    for step in range(5):
        m = one.masks(step)  # (16, N): 4 blocks (ranks) of 2 images, crop-major in each
        for p, t in enumerate(two):
            mp = t.masks(step)  # (8, N): this process's 2 blocks, ranks 2p and 2p + 1
            np.testing.assert_array_equal(mp, m[p * 8 : (p + 1) * 8])
    assert not np.array_equal(one.masks(0), one.masks(1))


def test_dino_v1_preset_has_no_masks():
    cfg = DataConfig.dino_v1(batch_size=2)
    assert cfg.augment.blur_impl == "pil" and cfg.masking is None
    pipe = DinoDataPipeline("digits", cfg, process_index=0, process_count=1)
    (batch,) = _take(pipe, 1)
    assert "masks" not in batch and batch["global_crops"].shape == (4, 224, 224, 3)


def _image_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_bad_data_is_skipped_counted_and_reported(tmp_path, caplog):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    good = {
        "rgb.jpg": _image_bytes(rgb, "JPEG"),
        "gray.jpg": _image_bytes(rgb.convert("L"), "JPEG"),
        "cmyk.jpg": _image_bytes(rgb.convert("CMYK"), "JPEG"),
        "alpha.png": _image_bytes(rgb.convert("RGBA"), "PNG"),
        "palette.png": _image_bytes(rgb.convert("P"), "PNG", transparency=3),
        "gray16.png": _image_bytes(Image.fromarray(np.full((40, 50), 40000, np.uint16)), "PNG"),
        "rgb.webp": _image_bytes(rgb, "WEBP"),
    }
    jpeg = good["rgb.jpg"]
    bad = {
        "truncated.jpg": jpeg[: len(jpeg) * 2 // 3],
        "corrupt.jpg": b"\xff\xd8\xff" + bytes(rng.integers(0, 256, 300, dtype=np.uint8)),
        "empty.png": b"",
        "text.webp": b"this is not an image",
        "vanished.jpg": jpeg,  # deleted after indexing: an unreadable record
    }
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, data in {**good, **bad}.items():
        (folder / name).write_bytes(data)
    n = len(good) + len(bad)
    pipe = DinoDataPipeline(
        f"folder:{folder}", _cfg(batch_size=4, shuffle=False), process_index=0, process_count=1
    )
    os.remove(folder / "vanished.jpg")
    # a mesh of 4 of the 8 devices, batch split over its "batch" axis
    mesh = jax.make_mesh(
        (4,), ("batch",), devices=jax.devices()[:4], axis_types=(jax.sharding.AxisType.Auto,)
    )
    with (
        caplog.at_level("WARNING", logger="dinojax.data"),
        pipe.device_iterator(mesh, "batch") as it,
    ):
        batches = [next(it) for _ in range(n // 4)]  # 3 batches: one epoch of 12 records
    assert it.stats["bad_records"] == len(bad) and it.bad_keys == set(bad)
    assert it.stats["skipped_reads"] >= len(bad)
    assert all(b["global_crops"].shape == (8, 56, 56, 3) for b in batches)
    assert len(batches[0]["global_crops"].sharding.device_set) == 4
    assert all(np.isfinite(np.asarray(b["global_crops"])).all() for b in batches)
    assert sum("skipping unreadable record" in r.message for r in caplog.records) >= len(bad)
    assert any("distinct bad records so far" in r.message for r in caplog.records)


def test_broken_dataset_fails_clearly(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.jpg").write_bytes(b"garbage")
    pipe = DinoDataPipeline(
        str(folder), _cfg(batch_size=2, max_consecutive_bad=4), process_index=0, process_count=1
    )
    with pytest.raises(RuntimeError, match="consecutive records could not be read"):
        pipe.dataset()[0]  # in this thread: no prefetch thread left running after the test


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        DataConfig(batch_size=0)
    with pytest.raises(ValueError, match="process_index"):
        DinoDataPipeline("digits", _cfg(), process_index=2, process_count=2)
    with pytest.raises(ValueError, match="multiple of this process"):
        _pipe(batch_size=3).device_iterator()
    with pytest.raises(ValueError, match="start_step"):
        _pipe().dataset(start_step=-1)


class _BadRecords(_Records):
    """_Records where some records cannot be read."""

    def __init__(self, n: int, bad: set[int]) -> None:
        super().__init__(n)
        self.bad = bad

    def __getitem__(self, i: int) -> dict:
        if i in self.bad:
            raise OSError(f"record {i} is unreadable")
        return super().__getitem__(i)


def test_bad_record_stand_ins_come_from_the_process_shard():
    """A skipped record is replaced from the same process's shard, outside the global batch: the
    processes' batches stay disjoint, no record appears twice in a global batch, and the batches
    stay a pure function of (seed, step, process) (threads, resume)."""
    n_records, b, steps = 24, 3, 8  # global batch 6: 4 steps per epoch, 2 epochs
    bad = {1, 5, 8, 13, 17, 22}
    src = _BadRecords(n_records, bad)
    procs = [_pipe(src, p=p, n=2, batch_size=b, seed=9) for p in range(2)]
    runs = [_take(pp, steps) for pp in procs]
    n_bad = 0
    for step in range(steps):
        recs = np.concatenate([run[step]["record_index"] for run in runs])
        assert len(set(recs.tolist())) == 2 * b, (step, recs)  # disjoint, no duplicates
        assert not set(recs.tolist()) & bad
        n_bad += sum(run[step]["n_bad"] for run in runs)
    assert n_bad >= 2 * len(bad)  # each bad record is met at least once per epoch
    for p, (pp, run) in enumerate(zip(procs, runs)):
        for epoch in range(2):
            epoch_steps = range(4 * epoch, 4 * epoch + 4)
            shard = set(np.concatenate([pp.record_indices(s) for s in epoch_steps]).tolist())
            read = set(np.concatenate([run[s]["record_index"] for s in epoch_steps]).tolist())
            assert read <= shard - bad, (p, epoch)
    threaded = _take(_pipe(src, p=1, n=2, batch_size=b, seed=9, read_threads=3), steps)
    _assert_batches_equal(runs[1], threaded)
    _assert_batches_equal(runs[1][5:], _take(procs[1], 3, start=5))


@pytest.mark.parametrize("n_records,b,n_proc", [(24, 3, 2), (10, 2, 2), (5, 2, 2), (7, 4, 1)])
def test_replacement_positions_stay_in_own_slots(n_records, b, n_proc):
    """Over every slot of a few epochs (also epochs that do not fill whole batches, and epochs
    smaller than one global batch), stand-ins are the process's own positions of the same epoch,
    in another global batch whenever the process has a slot there."""
    B = b * n_proc
    for p in range(n_proc):
        load = _pipe(_Records(n_records), p=p, n=n_proc, batch_size=b, seed=1)._loader()
        for step in range(3 * n_records // B + 2):
            for j in range(b):
                g = step * B + p * b + j
                epoch, pos = divmod(g, n_records)
                lo, hi = epoch * n_records, (epoch + 1) * n_records
                own_elsewhere = any(
                    lo <= g2 < hi and g2 // B != step and (g2 % B) // b == p for g2 in range(lo, hi)
                )
                for attempt in (1, 2, 5):
                    pos2 = load.replacement_position(step, j, epoch, attempt)
                    assert pos2 == load.replacement_position(step, j, epoch, attempt)
                    g2 = lo + pos2
                    assert 0 <= pos2 < n_records and (g2 % B) // b == p
                    assert (g2 // B != step) == own_elsewhere


def test_prefetch_prepares_batches_ahead():
    """Without any `next`, the background thread fills the queue to `prefetch` batches (and no
    further); after one `next` it refills. Waits on the queue, asserts no timings."""
    import time

    def wait_for(it, n: int) -> None:
        deadline = time.monotonic() + 120  # only a hang fails; a slow machine just waits
        while it.ready_batches < n:
            assert time.monotonic() < deadline, f"{it.ready_batches} of {n} batches ready"
            time.sleep(0.05)

    with _pipe(batch_size=8, seed=4, prefetch=3).device_iterator() as it:
        wait_for(it, 3)
        assert it.step == 0 and it.stats["batches"] == 0  # nothing handed out yet
        time.sleep(0.3)
        assert it.ready_batches == 3  # bounded by prefetch
        first = next(it)
        wait_for(it, 3)  # refilled behind the consumer
        assert it.step == 1
    ref = _take(_pipe(batch_size=8, seed=4), 1)[0]
    np.testing.assert_array_equal(np.asarray(first["global_crops"]), ref["global_crops"])
