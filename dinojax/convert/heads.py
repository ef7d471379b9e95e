"""Official `DINOHead` state dicts <-> `dinojax.models.heads.DINOHead` parameter trees.

Mapping (`dinov2/layers/dino_head.py` `DINOHead`, facebookresearch/dinov2; `use_bn=False`, the only
setting of the official configs):

    torch key                      shape             ours (nnx.to_pure_dict of the Params)
    mlp.{2i}.weight / .bias        (out, in) / (out)  mlp[i].kernel (in, out) / mlp[i].bias
    mlp.weight / mlp.bias          (nlayers == 1)     mlp[0].kernel / mlp[0].bias
    last_layer.weight_v            (K, bottleneck)    last_layer.weight_v (bottleneck, K)
    last_layer.weight_g            (K, 1)             last_layer.weight_g (K,)

`mlp` indices are ints, like `nnx.to_pure_dict` produces (string digits are accepted on the way
back). Newer `torch.nn.utils.parametrizations.weight_norm` names
(`last_layer.parametrizations.weight.original0/1` = g/v) are accepted as aliases on the way in.
Conversion is strict: every missing, unexpected or mis-shaped key is named in one error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from dinojax.convert.backbone import ConversionError, check_keys

_ALIASES = {
    "last_layer.parametrizations.weight.original0": "last_layer.weight_g",
    "last_layer.parametrizations.weight.original1": "last_layer.weight_v",
}
_LINEAR_WEIGHT = re.compile(r"^mlp\.(?:(\d+)\.)?weight$")


def _numpy(sd: Mapping) -> dict[str, np.ndarray]:
    out = {}
    for k, v in sd.items():
        if hasattr(v, "detach"):  # torch tensor
            v = v.detach().cpu().numpy()
        out[_ALIASES.get(k, k)] = np.asarray(v)
    return out


def _torch_linear_keys(nlayers: int) -> list[str]:
    # nn.Sequential(Linear, GELU, Linear, GELU, Linear): Linears at even indices.
    return ["mlp"] if nlayers == 1 else [f"mlp.{2 * i}" for i in range(nlayers)]


def head_config_from_torch(sd: Mapping) -> dict:
    """Infer the `DINOHead` constructor arguments from an official head state dict.

    Returns {in_dim, out_dim, nlayers, hidden_dim, bottleneck_dim, mlp_bias} (plain ints/bool;
    hidden_dim is None for nlayers == 1, where it does not exist).
    """
    sd = _numpy(sd)
    linears = sorted(
        (int(m.group(1)) if m.group(1) is not None else -1, k)
        for k in sd
        if (m := _LINEAR_WEIGHT.match(k)) and sd[k].ndim == 2
    )
    missing = [k for k in ("last_layer.weight_v",) if k not in sd]
    if not linears:
        missing.insert(0, "mlp.0.weight (or mlp.weight)")
    if missing:
        raise ConversionError(
            f"not a DINOHead state dict: missing keys {missing} (got {sorted(sd)[:8]}...)"
        )
    nlayers = 1 if linears[0][0] == -1 else len(linears)
    first = sd[linears[0][1]]
    v = sd["last_layer.weight_v"]
    if v.ndim != 2:
        raise ConversionError(
            f"last_layer.weight_v: got shape {v.shape}, expected (out_dim, bottleneck_dim)"
        )
    return {
        "in_dim": int(first.shape[1]),
        "out_dim": int(v.shape[0]),
        "nlayers": int(nlayers),
        "hidden_dim": None if nlayers == 1 else int(first.shape[0]),
        "bottleneck_dim": int(v.shape[1]),
        "mlp_bias": any(k.startswith("mlp") and k.endswith(".bias") for k in sd),
    }


def expected_torch_shapes(cfg: Mapping) -> dict[str, tuple[int, ...]]:
    """Official key -> shape for a head config (as returned by `head_config_from_torch`)."""
    n = max(int(cfg["nlayers"]), 1)
    hidden = cfg.get("hidden_dim")
    if n == 1:
        dims = [(cfg["in_dim"], cfg["bottleneck_dim"])]
    else:
        dims = [(cfg["in_dim"], hidden)] + [(hidden, hidden)] * (n - 2)
        dims += [(hidden, cfg["bottleneck_dim"])]
    shapes: dict[str, tuple[int, ...]] = {}
    for key, (d_in, d_out) in zip(_torch_linear_keys(n), dims):
        shapes[f"{key}.weight"] = (d_out, d_in)
        if cfg.get("mlp_bias", True):
            shapes[f"{key}.bias"] = (d_out,)
    shapes["last_layer.weight_g"] = (cfg["out_dim"], 1)
    shapes["last_layer.weight_v"] = (cfg["out_dim"], cfg["bottleneck_dim"])
    return shapes


def dino_head_from_torch(sd: Mapping) -> dict:
    """Official `DINOHead.state_dict()` -> pure dict for `nnx.replace_by_pure_dict` / `nnx.update`.

    Strict (the official eval loader, `dinov2/utils/utils.py` `load_pretrained_weights`, is
    strict=False and silently ignores mismatches; this converter is not): raises ValueError
    (`ConversionError`) naming every missing, unexpected or wrongly shaped key. Arrays come back as
    float32.
    """
    sd = _numpy(sd)
    cfg = head_config_from_torch(sd)
    check_keys(sd, expected_torch_shapes(cfg), "DINOHead state dict")
    mlp = {}
    for i, key in enumerate(_torch_linear_keys(cfg["nlayers"])):
        layer = {"kernel": np.ascontiguousarray(sd[f"{key}.weight"].T, dtype=np.float32)}
        if cfg["mlp_bias"]:
            layer["bias"] = np.ascontiguousarray(sd[f"{key}.bias"], dtype=np.float32)
        mlp[i] = layer
    last = {
        "weight_g": np.ascontiguousarray(sd["last_layer.weight_g"].reshape(-1), dtype=np.float32),
        "weight_v": np.ascontiguousarray(sd["last_layer.weight_v"].T, dtype=np.float32),
    }
    return {"last_layer": last, "mlp": mlp}


def dino_head_to_torch(tree: Mapping) -> dict[str, np.ndarray]:
    """dinojax head parameters (pure dict or `nnx.State`) -> official `DINOHead` state dict."""
    if hasattr(tree, "to_pure_dict"):  # nnx.State
        tree = tree.to_pure_dict()
    problems = sorted(set(tree) - {"mlp", "last_layer"}) + [
        k for k in ("mlp", "last_layer") if k not in tree
    ]
    if problems:
        raise ConversionError(f"head tree: expected keys ['last_layer', 'mlp'], got {sorted(tree)}")
    try:
        layers = sorted((int(k), k) for k in tree["mlp"])
    except (TypeError, ValueError) as e:
        raise ConversionError(
            f"head tree: mlp keys must be layer indices, got {list(tree['mlp'])}"
        ) from e
    if [i for i, _ in layers] != list(range(len(layers))) or not layers:
        raise ConversionError(f"head tree: mlp layers must be 0..n-1, got {[i for i, _ in layers]}")
    names = _torch_linear_keys(len(layers))
    out: dict[str, np.ndarray] = {}
    bad = []
    for (i, k), key in zip(layers, names):
        layer = tree["mlp"][k]
        extra = sorted(set(layer) - {"kernel", "bias"})
        if extra or "kernel" not in layer:
            bad.append(f"mlp.{i}: keys {sorted(layer)}, expected kernel[, bias]")
            continue
        out[f"{key}.weight"] = np.ascontiguousarray(np.asarray(layer["kernel"]).T)
        if "bias" in layer:
            out[f"{key}.bias"] = np.asarray(layer["bias"])
    last = tree["last_layer"]
    if set(last) != {"weight_g", "weight_v"}:
        bad.append(f"last_layer: keys {sorted(last)}, expected ['weight_g', 'weight_v']")
    if bad:
        raise ConversionError("head tree: " + "; ".join(bad))
    out["last_layer.weight_g"] = np.asarray(last["weight_g"]).reshape(-1, 1)
    out["last_layer.weight_v"] = np.ascontiguousarray(np.asarray(last["weight_v"]).T)
    check_keys(out, expected_torch_shapes(head_config_from_torch(out)), "head tree")
    return out
