"""Linear evaluation vs the official `dinov2/eval/linear.py` (create_linear_input, LinearClassifier,
SGD + CosineAnnealingLR loop) and released-head application on converted weights."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import official_state_dict, official_vit

from dinojax.convert.backbone import from_official
from dinojax.eval import linear, probe
from dinojax.eval.features import model_from_params
from dinojax.models.config import get_config

CFG = get_config("dinov2_vits14", depth=4, embed_dim=64, num_heads=2, img_size=56)


@pytest.fixture(scope="module")
def models():
    ref = official_vit(CFG, seed=3)
    params = from_official({k: v.numpy() for k, v in official_state_dict(ref, CFG).items()}, CFG)
    return ref, model_from_params(CFG, jax.tree.map(jnp.asarray, params))


@pytest.mark.parametrize("n_blocks", [1, 4], ids=["linear", "linear4"])
def test_released_head_matches_official(models, official_linear, tmp_path, n_blocks):
    ref, ours = models
    d = CFG.embed_dim
    torch.manual_seed(n_blocks)
    head = torch.nn.Linear((n_blocks + 1) * d, 1000)
    path = tmp_path / f"head{n_blocks}.pth"
    torch.save(head.state_dict(), path)
    x = np.random.default_rng(0).normal(size=(3, 56, 70, 3)).astype(np.float32)  # non-square
    with torch.no_grad():
        tokens = ref.get_intermediate_layers(
            torch.from_numpy(x).permute(0, 3, 1, 2), n_blocks, return_class_token=True
        )
        expect = head(official_linear.create_linear_input(tokens, n_blocks, True)).numpy()
    loaded = linear.load_linear_head(path)
    assert linear.head_layout(loaded, CFG) == linear.HeadLayout(n_blocks)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(linear.apply_linear_head(ours, jnp.asarray(x), loaded))
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=2e-5)
    np.testing.assert_array_equal(got.argmax(1), expect.argmax(1))


@pytest.mark.parametrize("n_blocks", [4, 1], ids=["vits-4-blocks", "vitb-1-block-avgpool"])
def test_dino_v1_head_layouts(tmp_path, n_blocks):
    """DINO v1 released linear weights ({"state_dict": {"module.linear.*"}}): ViT-S reads the
    last 4 CLS, ViT-B the last CLS and the mean patch token interleaved. The torch side follows
    dino's eval_linear.py (not installable here) on the official blocks with v1 settings."""
    cfg = get_config("dino_vits16", depth=4, embed_dim=64, num_heads=1, img_size=64)
    ref = official_vit(cfg, seed=4)
    params = from_official({k: v.numpy() for k, v in official_state_dict(ref, cfg).items()}, cfg)
    ours = model_from_params(cfg, jax.tree.map(jnp.asarray, params))
    avgpool = n_blocks == 1
    torch.manual_seed(0)
    head = torch.nn.Linear(64 * (n_blocks + int(avgpool)), 10)
    path = tmp_path / "v1_linear.pth"
    sd = {f"module.linear.{k}": v for k, v in head.state_dict().items()}
    torch.save({"epoch": 100, "state_dict": sd, "best_acc": 77.0}, path)
    x = np.random.default_rng(5).normal(size=(2, 48, 64, 3)).astype(np.float32)
    with torch.no_grad():
        tokens = ref.get_intermediate_layers(
            torch.from_numpy(x).permute(0, 3, 1, 2), n_blocks, return_class_token=True
        )
        out = torch.cat([c for _, c in tokens], dim=-1)
        if avgpool:  # cat on a new last axis, then flatten: [cls_0, avg_0, cls_1, avg_1, ...]
            avg = torch.mean(tokens[-1][0], dim=1)
            out = torch.cat((out.unsqueeze(-1), avg.unsqueeze(-1)), dim=-1).reshape(2, -1)
        expect = head(out).numpy()
    loaded = linear.load_linear_head(path)
    layout = linear.head_layout(loaded, cfg)
    assert layout == linear.HeadLayout(n_blocks, avgpool=avgpool, interleaved=avgpool)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(linear.apply_linear_head(ours, jnp.asarray(x), loaded))
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=2e-5)


def test_linear_input_matches_create_linear_input(official_linear):
    rng = np.random.default_rng(1)
    cls = rng.normal(size=(5, 4, 6)).astype(np.float32)
    patches = rng.normal(size=(5, 9, 6)).astype(np.float32)
    tokens = [(torch.from_numpy(patches), torch.from_numpy(cls[:, j])) for j in range(4)]
    avg = torch.mean(torch.from_numpy(patches), dim=1).numpy()
    for n in (1, 2, 4):
        for pool in (False, True):
            expect = official_linear.create_linear_input(tokens, n, pool).numpy()
            got = np.asarray(linear.linear_input(jnp.asarray(cls), jnp.asarray(avg), n, pool))
            np.testing.assert_array_equal(got, expect)


def test_probe_training_matches_official_loop(official_linear):
    """Two epochs of the jointly trained grid == the official LinearClassifier heads trained with
    torch SGD(momentum 0.9) + CosineAnnealingLR on the same batches, same init."""
    n, d, c, batch, epochs, seed = 96, 8, 5, 16, 2, 0
    rng = np.random.default_rng(2)
    cls = rng.normal(size=(n, 4, d)).astype(np.float32)
    patches = torch.from_numpy(rng.normal(size=(n, 7, d)).astype(np.float32))
    avg = torch.mean(patches, dim=1).numpy()
    labels = rng.integers(0, c, n)
    lrs = (0.5, 2.0, 8.0)
    specs = ((1, False), (1, True), (4, False), (4, True))
    key = jax.random.key(seed)
    init = probe.init_probe_params(jax.random.key(7), specs, len(lrs), d, c)
    res = probe.train_linear_probe(
        {"cls": cls, "avgpool": avg}, labels, {"cls": cls[:20], "avgpool": avg[:20]}, labels[:20],
        num_classes=c, learning_rates=lrs, epochs=epochs, batch_size=batch, seed=seed,
        init=jax.tree.map(jnp.copy, init),
    )  # fmt: skip

    # The official loop.
    scaled = [lr * batch / 256.0 for lr in lrs]  # scale_lr with one process
    clfs, groups = {}, []
    for nb, pool in specs:
        p = init[f"{nb}_blocks_avgpool_{pool}"]
        for i, lr in enumerate(scaled):
            clf = official_linear.LinearClassifier(p["w"].shape[1], nb, pool, num_classes=c)
            with torch.no_grad():
                clf.linear.weight.copy_(torch.from_numpy(np.asarray(p["w"][i]).T.copy()))
                clf.linear.bias.copy_(torch.from_numpy(np.array(p["b"][i])))
            clfs[probe.head_name(nb, pool, lr)] = clf
            groups.append({"params": clf.parameters(), "lr": lr})
    steps = n // batch
    opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps, eta_min=0)
    losses = []
    for e in range(epochs):
        for idx in np.asarray(probe.batch_indices(key, n, e, steps, batch)):
            tokens = [(patches[idx], torch.from_numpy(cls[idx, j])) for j in range(4)]
            y = torch.from_numpy(labels[idx]).long()
            loss = sum(torch.nn.CrossEntropyLoss()(m(tokens), y) for m in clfs.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    np.testing.assert_allclose(res["losses"], losses, rtol=1e-5)
    assert sorted(res["weights"]) == sorted(clfs)
    for name, clf in clfs.items():
        w = res["weights"][name]
        np.testing.assert_allclose(w["weight"], clf.linear.weight.detach().numpy(), atol=2e-6)
        np.testing.assert_allclose(w["bias"], clf.linear.bias.detach().numpy(), atol=2e-6)
        # and the reported accuracy is the head's accuracy on the test rows
        x = [(patches[:20], torch.from_numpy(cls[:20, j])) for j in range(4)]
        pred = clf(x).argmax(1).numpy()
        assert res["heads"][name]["top1"] == pytest.approx(100 * np.mean(pred == labels[:20]))


def test_linear_eval_digits_and_saved_head(tiny_model, tmp_path):
    res = linear.linear_eval(
        tiny_model, "digits:train", "digits:test", batch_size=64, image_size=56, max_train=512,
        max_test=128, progress=False, n_blocks=(1, 2), learning_rates=(1.0, 10.0, 100.0),
        epochs=30, train_batch_size=64,
    )  # fmt: skip
    assert len(res["heads"]) == 2 * 2 * 3
    assert res["top1"] == max(h["top1"] for h in res["heads"].values())
    # Random-ViT features are weak, but a probe still learns digits: measured 51.6% (chance 10%).
    assert res["top1"] > 40.0
    # The best head with avgpool saved in the official format applies like a released head.
    name = max(
        (k for k, h in res["heads"].items() if h["avgpool"]), key=lambda k: res["heads"][k]["top1"]
    )
    path = tmp_path / "best.pth"
    linear.save_linear_head(path, **res["weights"][name])
    head = linear.load_linear_head(path)
    assert torch.load(path, weights_only=True).keys() == {"weight", "bias"}
    acc = linear.evaluate_linear_head(
        tiny_model, head, "digits:test", layout=linear.HeadLayout(res["heads"][name]["n_blocks"]),
        batch_size=64,
        image_size=56, max_items=128, progress=False,
    )  # fmt: skip
    assert acc["top1"] == pytest.approx(res["heads"][name]["top1"])


def test_cli_and_errors(tmp_path, capsys, tiny_checkpoint):
    common = ["--checkpoint", tiny_checkpoint, "--image-size", "28", "--no-progress"]
    out = tmp_path / "r.json"
    rc = linear.main([
        *common, "--train", "digits:train", "--test", "digits:test", "--max-train", "128",
        "--max-test", "32", "--n-blocks", "1", "--lrs", "0.1", "1", "--epochs", "2",
        "--save-head", str(tmp_path / "h.pth"), "--output", str(out),
    ])  # fmt: skip
    assert rc == 0 and "best:" in capsys.readouterr().out
    assert json.loads(out.read_text())["linear"]["best"].startswith("classifier_1_blocks")
    rc = linear.main([*common, "--head", str(tmp_path / "h.pth"), "--test", "digits:test",
                      "--max-test", "16"])  # fmt: skip
    assert rc == 0 and "top-1" in capsys.readouterr().out
    # A head that does not fit the backbone, a file that is no head, missing --train.
    torch.save({"weight": torch.zeros(10, 50), "bias": torch.zeros(10)}, tmp_path / "bad.pth")
    torch.save({"w": torch.zeros(10, 64)}, tmp_path / "keys.pth")
    for extra, msg in (
        (["--head", str(tmp_path / "bad.pth")], "does not fit this backbone"),
        (["--head", str(tmp_path / "keys.pth")], "exactly the keys weight and bias"),
        (["--head", str(tmp_path / "missing.pth")], "no such file"),
        ([], "give --train"),
    ):
        rc = linear.main([*common, *extra, "--test", "digits:test"])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err
