"""Pictures of segmentations: class-colour overlays with a legend, palettes and class names.

Class names are the datasets' own (ADE20K SceneParsing `objectInfo150`, first synonym; PASCAL VOC
2012 with background = 0). Colours: the PASCAL VOC colour map (bit-interleaved class index) for
VOC; for ADE20K and other datasets the same construction over indices 1..K, which keeps
neighbouring classes far apart in colour.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["ADE20K_CLASSES", "VOC2012_CLASSES", "class_names_for", "overlay_picture", "palette"]

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television", "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator",
    "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt",
    "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall",
    "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock",
    "flag",
)  # fmt: skip
VOC2012_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
assert len(ADE20K_CLASSES) == 150 and len(VOC2012_CLASSES) == 21


def _bit_colour(i: int) -> tuple[int, int, int]:
    # PASCAL VOC colour map: bits of the index spread over R, G, B from the high bit down.
    r = g = b = 0
    for j in range(8):
        r |= ((i >> 0) & 1) << (7 - j)
        g |= ((i >> 1) & 1) << (7 - j)
        b |= ((i >> 2) & 1) << (7 - j)
        i >>= 3
    return r, g, b


def palette(num_classes: int, dataset: str | None = None) -> np.ndarray:
    """(K, 3) uint8 class colours: VOC's colour map for "voc2012" (class 0 black), else the same
    construction starting at index 1 (no black class)."""
    start = 0 if dataset == "voc2012" else 1
    return np.array([_bit_colour(i + start) for i in range(num_classes)], np.uint8)


def class_names_for(num_classes: int, dataset: str | None = None,
                    names: Sequence[str] | None = None) -> list[str]:  # fmt: skip
    if names:
        return list(names)
    if dataset == "ade20k" and num_classes == 150:
        return list(ADE20K_CLASSES)
    if dataset == "voc2012" and num_classes == 21:
        return list(VOC2012_CLASSES)
    return [f"class {i}" for i in range(num_classes)]


def overlay_picture(
    image: np.ndarray, classes: np.ndarray, colours: np.ndarray, names: Sequence[str], *,
    alpha: float = 0.5, max_legend: int = 24,
) -> Image.Image:  # fmt: skip
    """[image | image blended with class colours | legend of the classes present, by area]."""
    image = np.asarray(image, np.uint8)
    h, w = classes.shape
    blend = (1 - alpha) * image.astype(np.float32) + alpha * colours[classes].astype(np.float32)
    ids, counts = np.unique(classes, return_counts=True)
    order = ids[np.argsort(-counts, kind="stable")][:max_legend]
    font = ImageFont.load_default()
    row = 16
    legend_w = 12 + 16 + 6 + max([len(str(names[i])) for i in order] + [4]) * 7 + 40
    canvas = Image.new("RGB", (2 * w + legend_w, max(h, row * len(order) + 12)), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (0, 0))
    canvas.paste(Image.fromarray(np.clip(blend + 0.5, 0, 255).astype(np.uint8)), (w, 0))
    draw = ImageDraw.Draw(canvas)
    area = dict(zip(ids.tolist(), counts.tolist()))
    for j, c in enumerate(order):
        y = 6 + j * row
        x = 2 * w + 12
        draw.rectangle([x, y, x + 12, y + 12], fill=tuple(int(v) for v in colours[c]),
                       outline=(0, 0, 0))  # fmt: skip
        pct = 100 * area[int(c)] / classes.size
        draw.text((x + 18, y), f"{names[c]} ({pct:.0f}%)", fill=(0, 0, 0), font=font)
    return canvas
