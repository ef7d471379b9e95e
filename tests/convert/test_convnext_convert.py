"""DINOv3 ConvNeXt conversion (`dinojax.convert.convnext`): official <-> dinojax bit for bit,
Hugging Face <-> official (loaded strictly back into transformers' `DINOv3ConvNextModel`), the
architecture of each of the four hub sizes detected from abstract tensors (no weights
allocated), and one clear `ConversionError` line for each kind of bad input.

Official key names: facebookresearch/dinov3 `dinov3/models/convnext.py` `ConvNeXt`; HF names:
transformers `models/dinov3_convnext/modeling_dinov3_convnext.py`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dinojax.convert.backbone import ConversionError, expected_official_shapes
from dinojax.convert.convnext import (
    convnext_from_hf,
    convnext_from_official,
    convnext_int_keys,
    convnext_to_hf,
    convnext_to_official,
    detect_convnext_config,
    expected_convnext_shapes,
    is_convnext,
    is_hf_convnext,
)
from dinojax.models.config import get_config
from dinojax.models.convnext import (
    CONVNEXT_ARCHITECTURES,
    ConvNeXtConfig,
    DinoConvNeXt,
    abstract_convnext_params,
)

SMALL = ConvNeXtConfig(depths=(1, 2, 3, 1), dims=(8, 16, 24, 32))
# facebookresearch/dinov3 `dinov3/models/convnext.py` `convnext_sizes`
UPSTREAM = {
    "dinov3_convnext_tiny": ([3, 3, 9, 3], [96, 192, 384, 768]),
    "dinov3_convnext_small": ([3, 3, 27, 3], [96, 192, 384, 768]),
    "dinov3_convnext_base": ([3, 3, 27, 3], [128, 256, 512, 1024]),
    "dinov3_convnext_large": ([3, 3, 27, 3], [192, 384, 768, 1536]),
}


def _random_official(cfg: ConvNeXtConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32)
            for k, s in expected_convnext_shapes(cfg).items()}  # fmt: skip


def _abstract_official(shapes: dict) -> dict[str, np.ndarray]:
    # Zero-stride views: every key of a full-size model with no memory behind it.
    return {k: np.broadcast_to(np.zeros((), np.float32), s) for k, s in shapes.items()}


def _hf_model(cfg: ConvNeXtConfig, seed: int):
    from transformers import DINOv3ConvNextConfig, DINOv3ConvNextModel

    torch.manual_seed(seed)
    m = DINOv3ConvNextModel(
        DINOv3ConvNextConfig(hidden_sizes=list(cfg.dims), depths=list(cfg.depths))
    )
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape))
    return m.eval()


def _str_keys(tree: dict) -> dict:
    return {str(k): _str_keys(v) if isinstance(v, dict) else v for k, v in tree.items()}


def test_official_to_jax_to_official_is_bit_exact():
    sd = _random_official(SMALL)
    params = convnext_from_official(sd, SMALL)
    back = convnext_to_official(params, SMALL)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == np.float32 and np.array_equal(back[k], sd[k]), k
    # The tree is exactly what the model holds: nnx.update takes it, and the model gives it back.
    model = nnx.eval_shape(lambda: DinoConvNeXt(SMALL, rngs=nnx.Rngs(0)))
    nnx.update(model, jax.tree.map(jnp.asarray, params))
    again = convnext_to_official(model.params(), SMALL)
    assert all(np.array_equal(again[k], sd[k]) for k in sd)
    # A tree restored by orbax has string list indices: nnx.update needs them as ints again.
    as_restored = _str_keys(params)
    assert "0" in as_restored["stages"] and 0 not in as_restored["stages"]
    nnx.update(model, jax.tree.map(jnp.asarray, convnext_int_keys(as_restored)))
    assert np.array_equal(model.params()["stages"][1]["gamma"], params["stages"][1]["gamma"])
    assert convnext_int_keys(params).keys() == params.keys()
    # Layouts: stacked blocks and transposed kernels.
    st = params["stages"][2]
    assert st["dwconv"]["kernel"].shape == (3, 7, 7, 1, 24)
    np.testing.assert_array_equal(st["dwconv"]["kernel"][1], sd["stages.2.1.dwconv.weight"]
                                  .transpose(2, 3, 1, 0))  # fmt: skip
    np.testing.assert_array_equal(st["pwconv1"]["kernel"][2], sd["stages.2.2.pwconv1.weight"].T)
    np.testing.assert_array_equal(params["downsample_layers"][0][1]["scale"],
                                  sd["downsample_layers.0.1.weight"])  # fmt: skip


def test_hf_to_official_and_back_loads_strictly_in_transformers(tmp_path):
    """HF state dict (transformers 5 `model.stages.*` names) -> official keys -> HF hub-file
    names, written as safetensors next to the config and loaded by `from_pretrained` with no
    missing / unexpected key: the same tensors and outputs."""
    from safetensors.torch import save_file
    from transformers import DINOv3ConvNextModel

    hf = _hf_model(SMALL, seed=1)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert is_hf_convnext(sd) and not is_convnext(sd)
    official = convnext_from_hf(sd)
    assert is_convnext(official) and not is_hf_convnext(official)
    assert {k: v.shape for k, v in official.items()} == expected_convnext_shapes(SMALL)
    assert np.array_equal(official["stages.1.1.dwconv.weight"],
                          sd["model.stages.1.layers.1.depthwise_conv.weight"])  # fmt: skip
    assert np.array_equal(official["downsample_layers.2.0.weight"],
                          sd["model.stages.2.downsample_layers.0.weight"])  # fmt: skip
    assert np.array_equal(official["norm.bias"], sd["layer_norm.bias"])
    # the hub files' names (no `model.` prefix) give the same official dict
    hub = convnext_to_hf(official)
    assert set(hub) == {k.removeprefix("model.") for k in sd}
    assert all(np.array_equal(convnext_from_hf(hub)[k], official[k]) for k in official)

    hf.config.save_pretrained(tmp_path)
    save_file({k: torch.from_numpy(v) for k, v in hub.items()}, str(tmp_path / "model.safetensors"))
    fresh, info = DINOv3ConvNextModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    for k, v in hf.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        assert torch.equal(hf(x).last_hidden_state, fresh.eval()(x).last_hidden_state)


@pytest.mark.parametrize("name", sorted(CONVNEXT_ARCHITECTURES))
def test_each_official_size_is_detected_from_its_tensors(name):
    """From abstract shapes only: the official key table of the dinojax model (`nnx.eval_shape`)
    and the HF model built on the meta device (upstream sizes written above) agree, have the same
    parameter count (pinned in tests/models/test_convnext_build.py) and detect as the right
    architecture."""
    from transformers import DINOv3ConvNextConfig, DINOv3ConvNextModel

    cfg = CONVNEXT_ARCHITECTURES[name]
    abstract = jax.tree.leaves(abstract_convnext_params(cfg))
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in abstract)
    depths, dims = UPSTREAM[name]
    with torch.device("meta"):
        hf = DINOv3ConvNextModel(DINOv3ConvNextConfig(hidden_sizes=dims, depths=depths))
    assert sum(p.numel() for p in hf.parameters()) == sum(int(np.prod(a.shape)) for a in abstract)
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    official = convnext_from_hf(_abstract_official(hf_shapes))
    assert {k: v.shape for k, v in official.items()} == expected_convnext_shapes(cfg)
    assert detect_convnext_config(official) == cfg
    assert detect_convnext_config(official, arch=name) == cfg
    params = convnext_from_official(official, cfg) if name.endswith("tiny") else None
    if params is not None:  # 28M zeros: the real conversion path once, for the smallest size
        assert jax.tree.map(np.shape, params) == jax.tree.map(
            lambda a: a.shape, abstract_convnext_params(cfg)
        )


def test_a_custom_size_is_detected_without_a_name():
    cfg = detect_convnext_config(_random_official(SMALL))
    assert cfg == SMALL and cfg.name == "custom"


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_bad_inputs_are_one_line_errors():
    tiny = CONVNEXT_ARCHITECTURES["dinov3_convnext_tiny"]
    tiny_sd = _abstract_official(expected_convnext_shapes(tiny))

    # a ViT given as a ConvNeXt
    vit = _abstract_official(expected_official_shapes(get_config("dinov2_vits14")))
    with pytest.raises(ConversionError) as e:
        detect_convnext_config(vit)
    assert "found a ViT state dict" in _one_line(e) and "downsample_layers" in str(e.value)
    # HF keys given as official ones
    with pytest.raises(ConversionError, match="Hugging Face .* convnext_from_hf"):
        detect_convnext_config(convnext_to_hf(tiny_sd))
    # the wrong size
    with pytest.raises(ConversionError) as e:
        detect_convnext_config(tiny_sd, arch="dinov3_convnext_base")
    assert _one_line(e) == (
        "state dict is a ConvNeXt with depths [3, 3, 9, 3], dims [96, 192, 384, 768] "
        "(dinov3_convnext_tiny), expected dinov3_convnext_base (depths [3, 3, 27, 3], "
        "dims [128, 256, 512, 1024])"
    )
    with pytest.raises(ConversionError, match="unknown ConvNeXt architecture 'dinov3_vitb16'"):
        detect_convnext_config(tiny_sd, arch="dinov3_vitb16")
    # a stage whose conv does not take the previous width
    bad = dict(tiny_sd, **{"downsample_layers.2.1.weight": np.zeros((384, 190, 2, 2), np.float32)})
    with pytest.raises(ConversionError, match=r"got shape \(384, 190, 2, 2\), expected \(dim, 192"):
        detect_convnext_config(bad)
    # a gap in the block indices
    gap = {k: v for k, v in tiny_sd.items() if not k.startswith("stages.2.4.")}
    with pytest.raises(ConversionError, match=r"stage 2 block indices are not contiguous"):
        detect_convnext_config(gap)
    no_stage = {k: v for k, v in tiny_sd.items() if not k.startswith("stages.3.")}
    with pytest.raises(ConversionError, match=r"found in stages \[0, 1, 2\], expected"):
        detect_convnext_config(no_stage)
    # integer tensors
    ints = dict(tiny_sd, **{"norm.weight": np.zeros(768, np.int64)})
    with pytest.raises(ConversionError, match="norm.weight: dtype int64"):
        detect_convnext_config(ints)

    # strict conversion: every missing, unexpected and mis-shaped key in one line
    sd = _random_official(SMALL)
    sd.pop("stages.1.0.gamma")
    sd["stages.1.0.ls1.gamma"] = np.zeros(16, np.float32)
    sd["norm.bias"] = np.zeros(33, np.float32)
    with pytest.raises(ConversionError) as e:
        convnext_from_official(sd, SMALL)
    msg = _one_line(e)
    for part in ("missing keys [stages.1.0.gamma: expected (16,)]",
                 "unexpected keys [stages.1.0.ls1.gamma: got (16,)]",
                 "wrong shapes [norm.bias: got (33,), expected (32,)]"):  # fmt: skip
        assert part in msg, msg
    # a dinojax tree for another architecture
    with pytest.raises(ConversionError, match="parameter tree for custom does not match"):
        convnext_to_official(convnext_from_official(_random_official(SMALL), SMALL),
                             SMALL.replace(dims=(8, 16, 24, 40)))  # fmt: skip

    # Hugging Face side
    hf = convnext_to_hf(_random_official(SMALL))
    with pytest.raises(ConversionError, match=r"unknown Hugging Face DINOv3ConvNextModel keys: "
                                              r"\['pooler.weight'\]"):  # fmt: skip
        convnext_from_hf({**hf, "pooler.weight": np.zeros(3, np.float32)})
    twice = {**hf, "model.stages.0.layers.0.gamma": hf["stages.0.layers.0.gamma"]}
    with pytest.raises(ConversionError, match="given twice"):
        convnext_from_hf(twice)
    with pytest.raises(ConversionError, match=r"no Hugging Face .* \['cls_token'\]"):
        convnext_to_hf({"cls_token": np.zeros((1, 1, 8), np.float32)})


def test_convert_weights_load_and_export_a_convnext(tmp_path):
    """The whole route a user takes: official `.pth` -> `convert_weights.py` -> `dinojax.load`
    (sharded over the mesh, list indices restored) gives the model built from the same tensors;
    exporting gives the file back bit for bit, and the Hugging Face export loads into
    transformers."""
    import convert_weights
    import dinojax
    from dinojax.convert.io import read_file, write_file

    cfg = ConvNeXtConfig(name="dinov3_convnext_custom", depths=(1, 1, 2, 1), dims=(8, 16, 24, 32))
    sd = _random_official(cfg, seed=3)
    write_file(sd, tmp_path / "cnx.pth")
    assert convert_weights.main([str(tmp_path / "cnx.pth"), str(tmp_path / "ckpt")]) == 0
    model = dinojax.load(tmp_path / "ckpt")
    assert isinstance(model, DinoConvNeXt)
    ref = nnx.eval_shape(lambda: DinoConvNeXt(cfg, rngs=nnx.Rngs(0)))
    nnx.update(ref, jax.tree.map(jnp.asarray, convnext_from_official(sd, cfg)))
    x = jax.random.normal(jax.random.key(0), (2, 64, 96, 3))
    # The loaded model is sharded over the 8 devices (another summation order): measured 1.2e-6
    # on outputs of magnitude ~3; the parameters themselves are compared bit for bit below.
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(ref(x)), rtol=0, atol=3e-6)
    assert convert_weights.main([str(tmp_path / "ckpt"), str(tmp_path / "back.pth")]) == 0
    back = read_file(tmp_path / "back.pth")
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(np.asarray(back[k]), v, err_msg=k)
    out = tmp_path / "hf.safetensors"
    assert convert_weights.main([str(tmp_path / "ckpt"), str(out), "--format", "hf"]) == 0
    assert is_hf_convnext(dict(read_file(out)))
