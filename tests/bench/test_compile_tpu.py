"""bench/compile_tpu.py: the training step compiled deviceless by XLA's TPU compiler (libtpu, the
`test` extra) for a small slice, through the trainer's own code path.

Without libtpu the compiler tests skip on a developer's machine and fail under CI=true.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("compile_tpu", REPO / "bench" / "compile_tpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compile_tpu"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


ct = _load()


@pytest.fixture(scope="module")
def libtpu():
    """libtpu installed (the `test` extra pins it to jax's `tpu` extra): a skip on a developer's
    machine without it, a failure under CI=true."""
    if importlib.util.find_spec("libtpu") is None:
        msg = "libtpu is not installed: the TPU compiler cannot run (pip install the `test` extra)"
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):  # as conftest.in_ci
            pytest.fail(f"CI=true: {msg}", pytrace=False)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def smoke(libtpu):
    """The DINOv2 smoke recipe compiled for a v5p-8 (4 chips, FSDP over all of them)."""
    from configs.dinov2 import get_config

    return ct.compile_for_slice(get_config("smoke"), "v5p-8")


def test_slice_names():
    s = ct.parse_slice("v5p-256")
    assert (s.chips, s.topology_name, s.chip_config_name) == (128, "v5:4x4x8", "megacore")
    assert s.hbm_bytes == 95 * 2**30
    assert ct.parse_slice("v5p-128").topology_name == "v5:4x4x4"
    assert ct.parse_slice("v5p-512").topology_name == "v5:4x8x8"
    assert ct.parse_slice("v4-8").topology_name == "v4:2x2x1"
    assert ct.parse_slice("v4-32").topology_name == "v4:2x2x4"
    assert (ct.parse_slice("v5e-64").topology_name, ct.parse_slice("v5e-64").chips) == (
        "v5e:8x8",
        64,
    )
    assert ct.parse_slice("v6e-256").topology_name == "v6e:16x16"
    assert ct.parse_slice("v5e-128").topology_name == "v5e:8x16"


@pytest.mark.parametrize("name", ["v5p-7", "v5p-6", "v7-8", "tpu", "v6e-512"])
def test_unknown_slice_is_one_line_listing_the_known(name):
    with pytest.raises(ValueError) as e:
        ct.parse_slice(name)
    msg = str(e.value)
    assert "\n" not in msg and repr(name) in msg
    assert "v5p-{8," in msg and "v6e-{4," in msg and "v5e-" in msg and "v4-" in msg


def test_cli_unknown_slice(children):
    r = children.run(
        [sys.executable, str(REPO / "bench" / "compile_tpu.py"), "--topology", "v5p-300",
         "--config", str(REPO / "configs" / "dinov2.py") + ":smoke", "--out", "/dev/null"],
        timeout=120, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 1
    lines = [x for x in r.stderr.decode().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "unknown TPU slice 'v5p-300'; known:" in lines[0]


def test_mesh_the_torus_cannot_host_is_one_line(libtpu):
    from configs.dinov2 import get_config

    c = get_config("smoke")
    c.mesh.shape = (8, -1)  # 8 x 32 on a 16 x 16 torus: 32 is no product of whole axes
    s = ct.parse_slice("v6e-256")
    with pytest.raises(ValueError) as e:
        ct.make_slice_mesh(c, s, ct.topology_devices(s))
    msg = str(e.value)
    assert "\n" not in msg and "v6e-256 torus 16x16" in msg and "(8, -1)" in msg


def test_loop_bodies_counted_per_trip(libtpu):
    """`cost_analysis` counts a scan's body once; `flops_per_step` restores the trip count."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((4,), ("d",), devices=ct.topology_devices(ct.parse_slice("v5p-8")))
    rep = NamedSharding(mesh, PartitionSpec())
    m, k = 256, 512

    def f(w, x):
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0].sum()

    for n in (2, 6):
        w = jax.ShapeDtypeStruct((n, k, k), jnp.float32, sharding=rep)
        x = jax.ShapeDtypeStruct((m, k), jnp.float32, sharding=rep)
        c = jax.jit(f).lower(w, x).compile()
        once = c.cost_analysis()["flops"]
        hlo = c.as_text()
        matmuls = 2 * m * k * k * n
        # measured: 1.0021 at n = 8 (tanh, the sum and the loop counter add 0.2%)
        assert ct.flops_per_step(hlo, once) == pytest.approx(matmuls, rel=5e-3)
        assert once < 0.6 * matmuls  # the body counted once: what is being corrected


def test_windowed_einsum_loops_counted_per_trip(libtpu):
    """XLA's TPU compiler splits a matmul whose operands are split over different dimensions into
    a windowed einsum loop (`windowed_dot_general_body_ag`), here on 16 chips: the condition
    reads `counter < 8` but the counter steps by 2 from 0 (two windows per iteration), so the
    body runs 4 times. Taking the condition's constant as the trip count counted the loop twice:
    the head matmul split over the prototypes like the trainer splits the heads' last layer
    (tokens split over the batch), at twice its FLOPs."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(ct.topology_devices(ct.parse_slice("v5p-32"))), ("fsdp",))
    m, k, n = 336, 32, 16384  # tokens, bottleneck, prototypes
    x = jax.ShapeDtypeStruct(
        (m, k), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("fsdp"))
    )
    w = jax.ShapeDtypeStruct(
        (k, n), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec(None, "fsdp"))
    )

    def logits(x, w):
        y = jnp.einsum("ik,kn->in", x, w, preferred_element_type=jnp.float32)
        return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, PartitionSpec(None, "fsdp")))

    c = jax.jit(logits).lower(x, w).compile()
    hlo = c.as_text()
    entry, comps, _ = ct._parse_hlo(hlo)
    _, trips = ct._multiplicities(entry, comps)
    windowed = {b: t for b, t in trips.items() if "windowed_dot_general" in b}
    assert list(windowed.values()) == [4], trips
    cond = comps[next(b for b in comps if "windowed_dot_general_cond" in b)]
    limits = [i.rest.split(")")[0] for i in cond if i.op == "constant"]
    assert limits == ["8"], limits  # what the old count read as the trip count
    matmul = 2 * m * k * n / 16
    # measured: 1.0035 (the loop's index arithmetic and the output's dynamic-update-slices);
    # with 8 trips it was 2.0
    assert ct.flops_per_step(hlo, c.cost_analysis()["flops"]) == pytest.approx(matmul, rel=0.01)
    assert ct.matmul_flops_per_step(hlo) == pytest.approx(matmul, rel=1e-6)


def test_smoke_compiles_through_the_trainer_path(smoke):
    assert smoke["chips"] == 4 and smoke["devices"] == 4 and smoke["mesh"] == {"data": 1, "fsdp": 4}
    assert smoke["fits"] and smoke["peak_bytes_per_chip"] < smoke["hbm_bytes_per_chip"]
    assert smoke["compile_s"] > 0 and smoke["global_batch"] == 16 and smoke["per_chip_batch"] == 4
    # The iBOT masked-token buffer is part of the batch, at the pipeline's static bound.
    assert smoke["mask_buffer"] > 0
    line = ct.summary(smoke)
    assert "\n" not in line and "v5p-8" in line and "fits" in line


def test_smoke_argument_bytes_are_the_sharded_state(smoke):
    """The compiler's arguments per chip are exactly the sharded state and batch per chip (in
    TPU tile layout, which pads every tiny smoke array to a (8, 128) tile): nothing replicated
    that the shardings split."""
    # measured: 3546112 argument bytes vs 3546300 tiled (0.005%; the 1-D batch arrays XLA
    # lays out untiled are counted unpadded)
    assert smoke["argument_bytes"] == pytest.approx(smoke["args_bytes_tiled"], rel=0.01)
    assert smoke["argument_bytes"] >= smoke["state_bytes_per_chip"] + smoke["batch_bytes_per_chip"]
    # The state is donated: its buffers are reused for the new state.
    assert smoke["alias_bytes"] > 0


def test_smoke_nothing_large_is_replicated(smoke):
    import jax

    state = smoke["_state"]
    # The sharding rules split every parameter, teacher copy and Adam moment of 4096 or more
    # elements. Smaller ones may stay whole: the head's bottleneck kernel (64 x 32 here; 2048 x
    # 256 = 0.5M in the recipes, under the trainer's `train.assert_sharded_min_size` of 2**20),
    # the centering statistics, the counters and the key.
    bad = ct.replicated_leaves(state, 4096)
    assert bad == [], bad
    n = sum(x.size for x in jax.tree.leaves(state))
    assert ct.bytes_per_chip(state) < 0.3 * 4 * n  # fp32: about a quarter on each of 4 chips


@pytest.fixture(scope="module")
def smoke_no_drop_path(libtpu):
    """The same recipe and slice without stochastic depth."""
    from configs.dinov2 import get_config

    c = get_config("smoke")
    c.model.overrides.drop_path_rate = 0.0
    return ct.compile_for_slice(c, "v5p-8")


def test_smoke_flops_match_the_analytic_count(smoke_no_drop_path):
    """XLA's matmuls match the analytic count of what the step executes; all its FLOPs exceed it
    by the elementwise work (softmax, norms, activations, losses, optimizer), which the analytic
    count (matmuls only) leaves out. A replicated or repeated computation would be >= 2x."""
    r = smoke_no_drop_path
    # measured: matmuls / executed 1.0033, all / executed 1.1165, all / nominal 1.0288 (the
    # nominal count has the patch embedding's input gradient, 8% of this tiny model's matmuls,
    # which the step does not compute: the images need none)
    matmuls = r["xla_matmul_flops_per_chip"] / r["analytic_executed_flops_per_chip"]
    assert 0.995 < matmuls < 1.01, matmuls
    assert r["xla_loops_uncounted"] == []  # every loop's trip count read
    ratio = r["xla_flops_per_chip"] / r["analytic_executed_flops_per_chip"]
    assert 1.0 < ratio < 1.15, ratio


def test_smoke_flops_match_what_batch_subset_drop_path_executes(smoke):
    """Drop path 0.3 runs the student's residual branches on int(0.7 * 8) = 5 of each chip's 8
    global crops (and 5 of 8 local crops), which the nominal count (the MFU numerator) does not
    discount and the count of what the step executes does."""
    r = smoke
    assert r["drop_groups"] == 4
    # measured: XLA's matmuls / executed 1.0041; / nominal 0.723
    matmuls = r["xla_matmul_flops_per_chip"] / r["analytic_executed_flops_per_chip"]
    assert 0.995 < matmuls < 1.01, matmuls
    assert r["xla_matmul_flops_per_chip"] / r["analytic_flops_per_chip"] < 0.8


def test_recount_from_the_record(smoke):
    """`--recount`: the analytic counts of a recorded compile, recomputed from its config, mesh
    and buffer, are the ones the compile recorded."""
    rec = dict(ct.public(smoke), config="configs/dinov2.py:smoke", config_overrides=None)
    counts = ct.analytic_counts(rec)
    for key, value in counts.items():
        assert value == pytest.approx(smoke[key], rel=1e-12), key


def test_batch_subset_drop_path_stays_inside_the_batch_shards(smoke, smoke_no_drop_path):
    """The smoke recipe's drop path 0.3 takes the batch-subset path (v2, rate > 0.1). Drawn in
    each per-device batch (as each official GPU draws from its own), it adds no collective: the
    program's collectives are those of the same step without drop path. Drawn from the global
    batch, as before, it all-reduced the subset's activations in every block (measured here:
    all-reduce 84 ops / 4.3 MB per step against 40 / 1.2 MB, peak 20.9 MB against 12.0 MB)."""
    with_dp, without = smoke["collectives"], smoke_no_drop_path["collectives"]
    for name in ct.COLLECTIVES:
        assert (with_dp[name]["count"], with_dp[name]["bytes"]) == (
            without[name]["count"],
            without[name]["bytes"],
        ), name
    # the residual branches run on 70% of each per-device batch: fewer FLOPs, no more memory
    assert smoke["xla_flops_per_chip"] < smoke_no_drop_path["xla_flops_per_chip"]
    assert smoke["peak_bytes_per_chip"] <= smoke_no_drop_path["peak_bytes_per_chip"]


def test_smoke_collectives(smoke):
    coll = smoke["collectives"]
    assert set(coll) == set(ct.COLLECTIVES)
    # FSDP: parameters are gathered for compute, gradients reduced.
    assert coll["all-gather"]["count"] > 0 and coll["all-gather"]["bytes"] > 0
    assert coll["all-reduce"]["count"] + coll["reduce-scatter"]["count"] > 0
    for c in coll.values():
        assert c["count"] >= c["static"]


def test_jax_platforms_is_cpu_for_tests():
    """libtpu installed beside jax must not change where the CPU tests run."""
    import jax

    assert os.environ.get("JAX_PLATFORMS") == "cpu"
    assert {d.platform for d in jax.devices()} == {"cpu"}
    r = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ.get('JAX_PLATFORMS'))"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.stdout.strip() == "cpu"


def test_sweep_bisects_powers_of_two(monkeypatch):
    """`--sweep`: per policy, the largest power-of-two per-chip batch that fits, every compile
    recorded (the compiler replaced by a rule: up to 12 per chip fit with full remat, 3 without)."""
    from configs.dinov2 import get_config

    limit = {"full": 12, "none": 3}
    tried = []

    def fake(config, slice_name, num_slices=1):
        per_chip = config.batch_size // 4
        policy = config.model.overrides.remat_policy
        tried.append((policy, per_chip))
        return {"fits": per_chip <= limit[policy], "_tried": (policy, per_chip)}

    monkeypatch.setattr(ct, "compile_for_slice", fake)
    monkeypatch.setattr(ct, "summary", lambda rec: str(rec["_tried"]))
    written = []
    best = ct.sweep(
        get_config("smoke"), "v5p-8", ["full", "none"], 64, lambda r, **k: written.append(k)
    )
    assert best == {"full": 8, "none": 2}
    assert len(written) == len(tried) and all(k == {"sweep": True} for k in written)
    assert all(p & (p - 1) == 0 for _, p in tried)  # powers of two only
    assert len([t for t in tried if t[0] == "full"]) <= 3  # 7 candidates (1..64): 3 compiles


def _dims(shape) -> tuple[int, ...]:
    """An array's dimensions other than 1, sorted: `bf16[1,64,256]` and (256, 64) compare equal
    (XLA may gather a layout-transposed or unit-padded copy)."""
    if isinstance(shape, str):
        shape = [int(d) for d in shape.split("[", 1)[1].rstrip("]").split(",") if d]
    return tuple(sorted(d for d in shape if d != 1))


def _sharded_leaves(tree) -> list:
    import jax

    return [
        (jax.tree_util.keystr(p), x)
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
        if tuple(x.sharding.shard_shape(x.shape)) != tuple(x.shape)
    ]


def test_smoke_gathers_follow_the_fsdp_pattern(smoke):
    """What FSDP should gather, and nothing more, in the compiled smoke step on 4 chips.

    - No all-gather yields a whole head last layer (bottleneck x prototypes, the largest matrix
      of the real recipes: 384 x 131072 for ViT-g), nor any whole stacked block parameter (all
      layers at once): the last layer stays split over the prototypes.
    - The teacher (the gathers outside the student's gradient: no `jvp(` / `transpose(` in
      their source) gathers each FSDP-split block weight exactly once per layer per step, inside
      the block loop: one forward pass, like the student's forward, and nothing else.
    - The student gathers each at most twice per layer forward (global and local crops) and
      twice backward."""
    from collections import Counter

    import jax

    gathers = ct.all_gathers(smoke["_compiled"].as_text())
    student = smoke["_state"]["student"]
    last = student["dino_head"]["last_layer"]["weight_v"]
    assert last.sharding.shard_shape(last.shape) != last.shape  # split over the prototypes
    # the FSDP-split weight matrices of the blocks (the split biases are used split)
    blocks = [x for _, x in _sharded_leaves(student["backbone"]["blocks"]) if x.ndim == 3]
    depth = blocks[0].shape[0]
    layer = Counter(_dims(x.shape[1:]) for x in blocks)
    assert depth == 2 and sum(layer.values()) == 4, layer  # qkv, proj, fc1, fc2 kernels
    whole = {_dims(last.shape)} | {
        _dims(x.shape) for _, x in _sharded_leaves(student["backbone"]["blocks"])
    }
    # (a (64, 64) block weight and a (64, 64) head weight look alike in the program)
    heads = {
        _dims(x.shape)
        for k in ("dino_head", "ibot_head")
        for x in jax.tree.leaves(student.get(k, {}))
    }
    per_phase = {"teacher": Counter(), "forward": Counter(), "backward": Counter()}
    for g in gathers:
        d = _dims(g["shape"])
        assert d not in whole, g
        src = g["op_name"]
        phase = "backward" if "transpose(" in src else "forward" if "jvp(" in src else "teacher"
        if d in layer:
            in_loop = "/while/body/" in src
            if phase == "teacher" and d not in heads:
                assert in_loop, g  # a block weight of the teacher gathered outside its blocks
            if in_loop:
                per_phase[phase][d] += g["count"]
    # measured: 2 gathers per step (depth 2) of each of qkv, proj, fc1, fc2 in the teacher;
    # 4 of each in the student's forward (proj: 2), 4 backward (proj: 0, kept from the forward)
    assert per_phase["teacher"] == {d: depth * n for d, n in layer.items()}
    for phase in ("forward", "backward"):
        assert all(per_phase[phase][d] <= 2 * depth * n for d, n in layer.items()), per_phase


@pytest.fixture(scope="module")
def two_slices(libtpu):
    """The smoke recipe compiled for two v5p-8 slices (multi-slice over DCN)."""
    from configs.dinov2 import get_config

    return ct.compile_for_slice(get_config("smoke"), "v5p-8", num_slices=2)


def test_two_slices_hybrid_mesh(two_slices):
    r = two_slices
    assert (r["num_slices"], r["chips"], r["devices"]) == (2, 8, 8) and r["fits"]
    # config.mesh.shape (1, -1) inside each slice, the slices on the data axis
    assert r["mesh"] == {"data": 2, "fsdp": 4}
    devices = r["_mesh"].devices
    assert [len({d.slice_index for d in row}) for row in devices] == [1, 1]  # fsdp: one slice
    assert [{d.slice_index for d in col} for col in devices.T] == [{0, 1}] * 4
    line = ct.summary(r)
    assert "\n" not in line and "2 x v5p-8" in line and "across slices per step: " in line


def test_two_slices_only_reductions_cross(two_slices):
    """Across slices (the compiler's DCN sends) only reductions: the gradient all-reduce and the
    statistics (centers, Sinkhorn sums, norms). No parameter is gathered (FSDP stays inside each
    slice) and no activation moves: the batch is one crop-major block per device (the official
    per-GPU collate), so every crop of an image lies on its device and the losses pair crops in
    place. (With the global crop-major order, slice 0 held crop 0 of every image and slice 1
    crop 1: measured here then, all-gather 9.7 kB, all-to-all 5.6 kB and collective-permute
    63 kB of token blocks, CLS tokens and head gradients crossed besides 721 kB of all-reduce.)"""
    import jax

    r = two_slices
    coll = r["collectives"]
    for kind in ("all-gather", "all-to-all", "collective-permute"):
        assert coll[kind]["cross_slice_count"] == 0, (kind, coll[kind])
    # each chip sends at least its shard of the student's float32 gradient to the other slice
    grads = ct.bytes_per_chip(r["_state"]["student"])
    reduced = coll["all-reduce"]["cross_slice_bytes"] + coll["reduce-scatter"]["cross_slice_bytes"]
    assert reduced >= grads, (coll["all-reduce"], grads)
    # Every state array is split only inside a slice (fsdp) and whole on each: nothing of the
    # parameters needs to cross.
    mesh_axes_used = {
        a
        for x in jax.tree.leaves(r["_state"])
        for entry in x.sharding.spec
        for a in (entry if isinstance(entry, tuple) else (entry,))
        if a is not None
    }
    assert mesh_axes_used == {"fsdp"}, mesh_axes_used


def test_not_fit_hint_names_a_smaller_batch_and_the_remat_policy():
    """The hint for a refused program: a per-chip batch below the refused one (the ViT-L/14 recipe
    on v5e-64 was refused at 48 per chip with 15.79 GiB of temporaries, and the old estimate
    said 'about 48'), and full remat first when another policy was used."""
    gib = 2**30
    rec = {
        "hbm_bytes_per_chip": 16 * gib, "peak_bytes_per_chip": 16.0 * gib,
        "temp_bytes": 15.79 * gib, "per_chip_batch": 48.0, "chips": 64, "remat_policy": "full",
        "topology": "v5e-64", "num_slices": 1,
    }  # fmt: skip
    hint = ct.not_fit_hint(rec)
    assert "peak 16.00 GiB per chip > HBM 16 GiB on v5e-64 with remat full and 48 images" in hint
    assert "about 45 or less (--config.batch_size=2880" in hint
    none = ct.not_fit_hint({**rec, "remat_policy": "none"})
    assert "try --config.model.overrides.remat_policy=full, or a per-chip batch" in none
    tiny = ct.not_fit_hint({**rec, "per_chip_batch": 1.0, "temp_bytes": 40.0 * gib})
    assert tiny.endswith("try a larger slice (not even one image per chip fits)")
