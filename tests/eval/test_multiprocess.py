"""Two JAX processes (jax.distributed on 127.0.0.1, gloo, 4 CPU devices each): every process
loads only its devices' rows; features, kNN accuracies and the extracted .npy files (written by
process 0) equal a single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cpu_flags import CPU_COLLECTIVE_FLAGS

from dinojax.data.sources import DigitsSource

WORKER = Path(__file__).with_name("knn_worker.py")


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, tiny_checkpoint, children, reserve_port):
    import dinojax
    from dinojax.eval.features import Cls, extract_features
    from dinojax.eval.knn import knn_eval
    from dinojax.eval.transforms import EvalTransform

    port = reserve_port()  # held until the test ends; process 0's coordinator binds it too
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4", TF_CPP_MIN_LOG_LEVEL="3")
    env["XLA_FLAGS"] = CPU_COLLECTIVE_FLAGS  # not the caller's own flags
    root = Path(__file__).resolve().parents[2]
    procs = [
        children.popen(
            [sys.executable, str(WORKER), tiny_checkpoint, str(port), str(i), str(tmp_path)],
            env=env,
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    model = dinojax.load(tiny_checkpoint)
    feats, labels = extract_features(
        model, "digits:test", Cls(normalize=True), transform=EvalTransform.for_crop(28),
        batch_size=16, indices=range(37), progress=False,
    )  # fmt: skip
    res = knn_eval(
        model, "digits:train", "digits:test", batch_size=16, image_size=28, max_train=200,
        max_test=48, ks=(5, 20), progress=False,
    )  # fmt: skip
    for i in range(2):
        got = json.loads((tmp_path / f"knn{i}.json").read_text())
        assert got["devices"] == 8
        assert got["knn"] == json.loads(json.dumps(res))
        np.testing.assert_allclose(np.load(tmp_path / f"feats{i}.npy"), feats["cls"], atol=1e-6)
        np.testing.assert_array_equal(np.load(tmp_path / f"labels{i}.npy"), labels)
    np.testing.assert_array_equal(labels, DigitsSource("test").labels[:37])
    # extract_to_dir: process 0 wrote every row, keys included
    from dinojax.eval.features import Tokens
    from dinojax.eval.transforms import ResizeTransform

    ref, _ = extract_features(
        model, "digits:test", Tokens(cls=True, patch=True), transform=ResizeTransform(28, 42),
        batch_size=16, indices=range(21), progress=False,
    )  # fmt: skip
    ext = tmp_path / "extract"
    np.testing.assert_allclose(np.load(ext / "cls.npy"), ref["cls"], atol=1e-6)
    np.testing.assert_allclose(np.load(ext / "patch.npy"), ref["patch"], atol=1e-6)
    assert (ext / "keys.txt").read_text().split() == [str(i) for i in range(21)]
