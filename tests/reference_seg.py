"""The torch reference of the segmentation heads, written from the upstream code (mmseg / mmcv
cannot be installed on current Python / torch); used by tests/dense/test_segment_parity.py and
importable by benchmarks (tests/ on sys.path).

- `center_padding`: facebookresearch/dinov2 `notebooks/semantic_segmentation.ipynb`
  `CenterPadding`, a forward pre-hook of the backbone (so the decoder sees the unpadded size);
- `RefBNHead`: `dinov2/eval/segmentation/models/decode_heads/linear_head.py` `BNHead`
  (`_transform_inputs` "resize_concat" with mmseg's `resize` = F.interpolate, `bn`, then mmseg 0.27
  `BaseDecodeHead.cls_seg` = `conv_seg`, dropout_ratio 0);
- `RefSegmentor.encode_decode` / `slide_inference` / `inference` / `aug_test`: mmseg 0.27
  `mmseg/models/segmentors/encoder_decoder.py` `EncoderDecoder` (the ms views' image resize is
  mmcv's cv2 resize of the uint8 image in the real pipeline; here F.interpolate on the float
  image, as dinojax does: docs/parity.md "Segmentation heads").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def center_padding(x: torch.Tensor, multiple: int = 14) -> torch.Tensor:
    def pad(n):
        total = -(-n // multiple) * multiple - n
        return total // 2, total - total // 2

    (top, bottom), (left, right) = pad(x.shape[2]), pad(x.shape[3])
    return F.pad(x, (left, right, top, bottom))


class RefBNHead(torch.nn.Module):
    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(in_channels)  # SyncBatchNorm in eval = BatchNorm2d
        self.conv_seg = torch.nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, inputs):
        grid = inputs[0].shape[2:]
        x = torch.cat([F.interpolate(t, size=grid, mode="bilinear", align_corners=False)
                       for t in inputs], dim=1)  # fmt: skip
        return self.conv_seg(self.bn(x))


class RefSegmentor(torch.nn.Module):
    def __init__(self, backbone, head, layers):
        super().__init__()
        self.backbone, self.decode_head, self.layers = backbone, head, layers

    def encode_decode(self, img):
        feats = self.backbone.get_intermediate_layers(center_padding(img), n=self.layers,
                                                      reshape=True)  # fmt: skip
        out = self.decode_head(list(feats))
        return F.interpolate(out, size=img.shape[2:], mode="bilinear", align_corners=False)

    def slide_inference(self, img, crop, stride):
        b, _, h_img, w_img = img.shape
        k = self.decode_head.conv_seg.out_channels
        h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
        w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
        preds = img.new_zeros((b, k, h_img, w_img))
        count = img.new_zeros((b, 1, h_img, w_img))
        for h_idx in range(h_grids):
            for w_idx in range(w_grids):
                y1, x1 = h_idx * stride, w_idx * stride
                y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
                y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                logit = self.encode_decode(img[:, :, y1:y2, x1:x2])
                preds += F.pad(logit, (x1, w_img - x2, y1, h_img - y2))
                count[:, :, y1:y2, x1:x2] += 1
        assert (count == 0).sum() == 0
        return preds / count

    def inference(self, img, mode, crop, stride, ori_shape, flip):
        logit = self.slide_inference(img, crop, stride) if mode == "slide" else (
            self.encode_decode(img))  # fmt: skip
        logit = F.interpolate(logit, size=ori_shape, mode="bilinear", align_corners=False)
        out = F.softmax(logit, dim=1)
        return out.flip(dims=(3,)) if flip else out

    def aug_test(self, img, sizes, mode, crop, stride):
        total, n = 0, 0
        for size in sizes:
            for flip in (False, True):
                view = F.interpolate(img, size=size, mode="bilinear", align_corners=False)
                view = view.flip(dims=(3,)) if flip else view
                total = total + self.inference(view, mode, crop, stride, img.shape[2:], flip)
                n += 1
        return total / n


def random_head(kind: str, k: int, seed: int, embed_dim: int) -> RefBNHead:
    """A head with random weights and non-trivial BN statistics (eval mode)."""
    c = embed_dim if kind == "linear" else 4 * embed_dim
    g = torch.Generator().manual_seed(seed)
    head = RefBNHead(c, k)
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        head.bn.weight.copy_(1 + 0.3 * torch.randn(c, generator=g))
        head.bn.bias.copy_(0.2 * torch.randn(c, generator=g))
        head.bn.running_mean.copy_(0.5 * torch.randn(c, generator=g))
        head.bn.running_var.copy_(0.2 + torch.rand(c, generator=g) * 2)
        head.bn.num_batches_tracked.fill_(40000)
        head.conv_seg.weight.copy_(torch.randn(k, c, 1, 1, generator=g) / c**0.5)
        head.conv_seg.bias.copy_(0.1 * torch.randn(k, generator=g))
    return head.eval()


def head_file(head: torch.nn.Module, path) -> str:
    sd = {f"decode_head.{k}": v for k, v in head.state_dict().items()}
    torch.save({"meta": {}, "state_dict": sd}, path)
    return str(path)
