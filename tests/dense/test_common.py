"""dinojax.dense.common against torch: bilinear resizing and centre padding."""

import numpy as np
import pytest
import torch

from dinojax.dense.common import center_pad, resize_bilinear


def _torch_resize(x, **kw):
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    return torch.nn.functional.interpolate(t, mode="bilinear", **kw).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize(
    "shape_in,shape_out",
    [((37, 46), (480, 640)), ((25, 36), (350, 500)), ((40, 40), (20, 20)), ((37, 46), (36, 45)),
     ((1, 5), (3, 7))],
)  # fmt: skip
def test_resize_matches_torch_interpolate(shape_in, shape_out, align_corners):
    x = np.random.default_rng(0).standard_normal((2, *shape_in, 3)).astype(np.float32)
    ref = _torch_resize(x, size=shape_out, align_corners=align_corners)
    out = np.asarray(resize_bilinear(x, shape_out, align_corners=align_corners))
    # measured 7.2e-7 (float32 rounding of the two-tap blend)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("scale", [2, 4])
def test_resize_by_scale_factor_matches_torch(scale, align_corners):
    x = np.random.default_rng(1).standard_normal((2, 9, 11, 4)).astype(np.float32)
    ref = _torch_resize(x, scale_factor=scale, align_corners=align_corners)
    out = resize_bilinear(x, (9 * scale, 11 * scale), align_corners=align_corners,
                          scale_factor=scale)  # fmt: skip
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=2e-6)


def test_center_pad_splits_like_the_official_center_padding():
    x = np.ones((1, 20, 31, 3), np.float32)
    y = np.asarray(center_pad(x, 14))
    assert y.shape == (1, 28, 42, 3)
    rows, cols = np.nonzero(y[0, :, :, 0])
    # H: 8 extra -> 4 above, 4 below; W: 11 extra -> 5 left, 6 right
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (4, 23, 5, 35)
    assert center_pad(np.ones((1, 28, 42, 3)), 14).shape == (1, 28, 42, 3)
