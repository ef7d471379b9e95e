"""One process of the two-process k-NN test (tests/eval/test_multiprocess.py): argv = checkpoint
dir, coordinator port, process id, output folder. Not a test module itself."""

from __future__ import annotations

import json
import sys

import jax


def main() -> None:
    ckpt, port, pid, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)

    import numpy as np

    import dinojax
    from dinojax.eval.features import Cls, extract_features
    from dinojax.eval.knn import knn_eval
    from dinojax.eval.transforms import EvalTransform

    model = dinojax.load(ckpt)
    feats, labels = extract_features(
        model, "digits:test", Cls(normalize=True), transform=EvalTransform.for_crop(28),
        batch_size=16, indices=range(37), progress=False,
    )  # fmt: skip
    res = knn_eval(
        model, "digits:train", "digits:test", batch_size=16, image_size=28, max_train=200,
        max_test=48, ks=(5, 20), progress=False,
    )  # fmt: skip
    from dinojax.eval.extract import extract_to_dir
    from dinojax.eval.transforms import ResizeTransform

    extract_to_dir(
        model, "digits:test", f"{out}/extract", patch=True, transform=ResizeTransform(28, 42),
        batch_size=16, indices=range(21), progress=False,
    )  # fmt: skip
    np.save(f"{out}/feats{pid}.npy", feats["cls"])
    np.save(f"{out}/labels{pid}.npy", labels)
    with open(f"{out}/knn{pid}.json", "w") as f:
        json.dump({"devices": jax.device_count(), "knn": res}, f)


if __name__ == "__main__":
    main()
