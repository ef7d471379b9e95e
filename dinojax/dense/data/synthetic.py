"""Embedded dense datasets, generated from what ships with the dependencies: no download.

- `digit_scenes`: scikit-learn's 8x8 handwritten digits, upscaled and pasted onto textured
  backgrounds, with per-pixel labels (0 = background, 1 + d = digit d: 11 classes).
- `depth_scenes`: a ray-cast scene (ground plane, slanted boards, spheres, a far wall) seen by a
  pinhole camera at a random pose; the depth of every pixel is the closed-form ray intersection.

Both are deterministic in (seed, index), generated on access (a few ms an image), and pickle as
their parameters, so any number of images costs no memory and grain workers rebuild them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DIGIT_CLASSES",
    "Camera",
    "DepthScenes",
    "DigitScenes",
    "Plane",
    "Sphere",
    "depth_scenes",
    "digit_scenes",
    "render_depth",
]

DIGIT_CLASSES = ("background",) + tuple(f"digit {d}" for d in range(10))


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    if h < 16 or w < 16:
        raise ValueError(f"scene size must be at least 16x16 pixels, got {h}x{w}")
    return int(h), int(w)


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def _resize(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of a float (h0, w0) map (PIL's 'F' mode keeps it float)."""
    from PIL import Image

    return np.asarray(Image.fromarray(a.astype(np.float32), "F").resize((w, h), Image.BILINEAR))


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    import colorsys

    return np.asarray(colorsys.hsv_to_rgb(h, s, v), np.float32)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A (h, w) texture in [0, 1]: smooth noise, a linear gradient, stripes or a checkerboard."""
    kind = rng.integers(4)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    if kind == 0:
        cells = int(rng.integers(3, 12))
        t = _resize(rng.random((cells, cells)), h, w)
    elif kind == 1:
        t = (u - u.min()) / max(float(np.ptp(u)), 1.0)
    elif kind == 2:
        t = 0.5 + 0.5 * np.sin(u * 2 * np.pi / rng.uniform(6, 40))
    else:
        period = rng.uniform(8, 48)
        v = -xx * np.sin(angle) + yy * np.cos(angle)
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    return t.astype(np.float32)


class _Cached:
    """Keeps generated items (uint8 image + target) when `cache` is on, by default when the
    whole dataset fits in ~50 M pixels (about 1,000 images of 224 x 224, 200-350 MB); pickles
    without them (grain workers regenerate)."""

    CACHE_PIXELS = 50_000_000

    def _init_cache(self, cache: bool | None) -> None:
        if cache is None:
            cache = self.n * self.size[0] * self.size[1] <= self.CACHE_PIXELS
        self.cache = bool(cache)
        self._items: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        i = int(i)
        item = self._items.get(i)
        if item is None:
            item = self._make(i)
            if self.cache:
                self._items[i] = item
        if self.cache:  # callers own what they get: the cached arrays stay as generated
            return item[0].copy(), item[1].copy()
        return item

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_items"] = {}
        return state


@dataclass(frozen=True)
class PastedDigit:
    """One digit of a scene: `index` into `sklearn.datasets.load_digits()`, its class, top-left
    corner and pasted size in pixels."""

    index: int
    digit: int
    top: int
    left: int
    height: int
    width: int


class DigitScenes(_Cached):
    """Segmentation scenes of scikit-learn digits on textured backgrounds (see `digit_scenes`)."""

    num_classes = len(DIGIT_CLASSES)
    class_names = DIGIT_CLASSES
    THRESHOLD = 0.3  # of the digit's ink in [0, 1]: above it the pixel is the digit's class

    def __init__(
        self,
        n: int,
        size: int | tuple[int, int] = 224,
        seed: int = 0,
        *,
        digits_per_image: tuple[int, int] = (1, 4),
        scale: tuple[float, float] = (0.2, 0.5),
        colour_cue: bool = True,
        cache: bool | None = None,
    ) -> None:
        if n < 1:
            raise ValueError(f"digit_scenes needs n >= 1 images, got {n}")
        lo, hi = digits_per_image
        if not 1 <= lo <= hi:
            raise ValueError(f"digits_per_image must be (lo, hi) with 1 <= lo <= hi, got {lo, hi}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi <= 1, got {scale}")
        self.n, self.size, self.seed = n, _hw(size), seed
        self.digits_per_image, self.scale, self.colour_cue = (lo, hi), scale, colour_cue
        self._init_cache(cache)

    def __len__(self) -> int:
        return self.n

    def name(self, i: int) -> str:
        return f"digit_scenes(seed={self.seed})[{i}]"

    def _rng(self, i: int) -> np.random.Generator:
        if not 0 <= i < self.n:
            raise IndexError(f"{self.name(i)}: index out of range (0..{self.n - 1})")
        return np.random.default_rng([self.seed, i, 0xD161])

    def layout(self, i: int) -> list[PastedDigit]:
        """The digits of image i, in paste order (later ones cover earlier ones)."""
        rng = self._rng(i)
        images, targets = _digits()
        h, w = self.size
        out = []
        for _ in range(rng.integers(self.digits_per_image[0], self.digits_per_image[1] + 1)):
            idx = int(rng.integers(len(targets)))
            s = rng.uniform(*self.scale) * min(h, w)
            dh, dw = max(int(s), 8), max(int(s * rng.uniform(0.75, 1.0)), 8)
            top, left = int(rng.integers(0, h - dh + 1)), int(rng.integers(0, w - dw + 1))
            out.append(PastedDigit(idx, int(targets[idx]), top, left, dh, dw))
        return out

    def _make(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        layout = self.layout(i)
        rng = np.random.default_rng([self.seed, i, 0xC010])
        images, _ = _digits()
        h, w = self.size
        # Background: a texture between two colours; with the colour cue they are near-grey so
        # the saturated class hues of the digits stay apart from them.
        c0, c1 = rng.random(3), rng.random(3)
        if self.colour_cue:
            c0 = 0.8 * c0.mean() + 0.2 * c0
            c1 = 0.8 * c1.mean() + 0.2 * c1
        t = _texture(rng, h, w)[..., None]
        img = (1 - t) * c0 + t * c1
        label = np.zeros((h, w), np.uint8)
        for d in layout:
            ink = np.clip(_resize(images[d.index], d.height, d.width), 0.0, 1.0)[..., None]
            if self.colour_cue:  # a hue per class, jittered
                hue = (d.digit / 10 + rng.normal(0, 0.015)) % 1.0
                colour = _hsv(hue, rng.uniform(0.75, 1.0), rng.uniform(0.7, 1.0))
            else:
                colour = rng.random(3)
            shade = 0.8 + 0.2 * _texture(rng, d.height, d.width)[..., None]
            sl = np.s_[d.top : d.top + d.height, d.left : d.left + d.width]
            img[sl] = img[sl] * (1 - ink) + colour * shade * ink
            label[sl][ink[..., 0] > self.THRESHOLD] = 1 + d.digit
        img = img + rng.normal(0, 0.02, img.shape)
        return np.clip(np.round(img * 255), 0, 255).astype(np.uint8), label

    def __repr__(self) -> str:
        return f"DigitScenes(n={self.n}, size={self.size}, seed={self.seed})"


def digit_scenes(n: int, size: int | tuple[int, int] = 224, seed: int = 0, **kwargs) -> DigitScenes:
    """`n` segmentation scenes of `size` (int or (H, W)): 1-4 scikit-learn digits (20-50 % of
    the short side) pasted on a textured background; labels uint8 (H, W), 0 = background,
    1 + d = digit d. `colour_cue=True` (default) paints each digit class in its own hue (so
    even a randomly initialised backbone separates the classes); False paints random colours,
    leaving only the shape."""
    return DigitScenes(n, size, seed, **kwargs)


# --- depth --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Camera:
    """A pinhole camera at `position` (world: Y up, metres), looking along yaw (about Y, 0 = +Z)
    and pitch (positive looks down); image x right, y down; focal length `focal` in pixels,
    principal point at the image centre."""

    position: tuple[float, float, float]
    yaw: float
    pitch: float
    focal: float

    def rotation(self) -> np.ndarray:
        """Camera-to-world rotation: columns are the camera's x (right), y (down), z (forward)."""
        cy, sy, cp, sp = np.cos(self.yaw), np.sin(self.yaw), np.cos(self.pitch), np.sin(self.pitch)
        forward = np.array([sy * cp, -sp, cy * cp])
        right = np.array([cy, 0.0, -sy])
        down = np.cross(right, forward)
        return np.stack([right, down, forward], axis=1)


@dataclass(frozen=True)
class Plane:
    """Points x with normal . x = offset; optionally bounded to a rectangle of half sizes
    `extent` = (along `axis_u`, along `axis_v`) around `centre`. `pattern` picks the texture."""

    normal: tuple[float, float, float]
    offset: float
    centre: tuple[float, float, float] | None = None
    axis_u: tuple[float, float, float] | None = None
    axis_v: tuple[float, float, float] | None = None
    extent: tuple[float, float] | None = None
    colour: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pattern: float = 0.5  # texture period in metres


@dataclass(frozen=True)
class Sphere:
    centre: tuple[float, float, float]
    radius: float
    colour: tuple[float, float, float] = (0.5, 0.5, 0.5)


def _rays(camera: Camera, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel (centres at +0.5): the camera-frame direction with z = 1, and it in the world.
    With z = 1 the ray parameter t of a hit is the pixel's depth (camera z), not its range."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    d = np.stack(
        [(xs + 0.5 - w / 2) / camera.focal, (ys + 0.5 - h / 2) / camera.focal, np.ones_like(xs)],
        axis=-1,
    )
    return d, d @ camera.rotation().T


def _shade(normal: np.ndarray, colour, pattern: np.ndarray) -> np.ndarray:
    light = np.array([0.4, 0.8, -0.45])
    light = light / np.linalg.norm(light)
    lambert = 0.45 + 0.55 * np.clip(normal @ light, 0.0, 1.0)
    return np.asarray(colour)[None] * ((0.65 + 0.35 * pattern) * lambert)[:, None]


def _plane_coords(obj: Plane, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """In-plane coordinates of the points p: along the rectangle's axes, or two fixed axes."""
    if obj.extent is not None:
        rel = p - np.asarray(obj.centre)
        return rel @ np.asarray(obj.axis_u), rel @ np.asarray(obj.axis_v)
    n = np.asarray(obj.normal, np.float64)
    u0 = np.cross(n, [0.0, 0.0, 1.0] if abs(n[2]) < 0.9 else [1.0, 0.0, 0.0])
    u0 = u0 / np.linalg.norm(u0)
    return p @ u0, p @ np.cross(n, u0)


def _hit(obj, o: np.ndarray, dw: np.ndarray) -> np.ndarray:
    """Ray parameter of each ray's first intersection with obj in front of the camera (inf if
    none); with camera-z-normalised rays it is the depth."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if isinstance(obj, Plane):
            n = np.asarray(obj.normal, np.float64)
            denom = dw @ n
            t = np.where(np.abs(denom) > 1e-12, (obj.offset - n @ o) / denom, np.inf)
            if obj.extent is not None:
                a, b = _plane_coords(obj, o + np.where(np.isfinite(t), t, 0)[:, None] * dw)
                inside = (np.abs(a) <= obj.extent[0]) & (np.abs(b) <= obj.extent[1])
                t = np.where(inside, t, np.inf)
        else:  # |o + t d - c|^2 = r^2, the nearer root
            oc = o - np.asarray(obj.centre, np.float64)
            a = np.einsum("ij,ij->i", dw, dw)
            b = 2 * dw @ oc
            disc = b * b - 4 * a * (oc @ oc - obj.radius**2)
            t = np.where(disc >= 0, (-b - np.sqrt(disc)) / (2 * a), np.inf)
    return np.where(t > 1e-9, t, np.inf)


def _colour(obj, o: np.ndarray, dw: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Shaded, textured colour of obj at the hits o + t dw."""
    p = o + t[:, None] * dw
    if isinstance(obj, Plane):
        n = np.asarray(obj.normal, np.float64)
        a, b = _plane_coords(obj, p)
        pattern = ((np.floor(a / obj.pattern) + np.floor(b / obj.pattern)) % 2) * 0.6
        pattern += 0.4 * (0.5 + 0.5 * np.sin(a * 7.1 + b * 3.3))
        normal = np.where((dw @ n)[:, None] < 0, n[None], -n[None])  # the side facing the camera
    else:
        normal = (p - np.asarray(obj.centre)) / obj.radius
        pattern = 0.5 + 0.5 * np.sin(8 * np.arctan2(normal[:, 0], normal[:, 2]))
    return _shade(normal, obj.colour, pattern)


def render_depth(
    camera: Camera, objects, size: int | tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast `objects` (Planes and Spheres) -> (image float32 (H, W, 3) in [0, 1], depth
    float64 (H, W): camera z of the nearest hit in front of the camera, inf where none)."""
    h, w = _hw(size)
    _, dw = _rays(camera, h, w)
    dw = dw.reshape(-1, 3)
    o = np.asarray(camera.position, np.float64)
    depth = np.full(h * w, np.inf)
    owner = np.full(h * w, -1)
    for k, obj in enumerate(objects):
        t = _hit(obj, o, dw)
        nearer = t < depth
        depth = np.where(nearer, t, depth)
        owner[nearer] = k
    img = np.tile(np.array([0.62, 0.75, 0.92]), (h * w, 1))  # sky
    img *= (0.8 + 0.2 * np.linspace(0, 1, h)).repeat(w)[:, None]
    for k, obj in enumerate(objects):  # shade each pixel once, by the object it sees
        sel = owner == k
        if sel.any():
            img[sel] = _colour(obj, o, dw[sel], depth[sel])
    return img.reshape(h, w, 3).astype(np.float32), depth.reshape(h, w)


class DepthScenes(_Cached):
    """Rendered scenes with closed-form depth (see `depth_scenes`)."""

    def __init__(
        self,
        n: int,
        size: int | tuple[int, int] = 224,
        seed: int = 0,
        *,
        depth_range: tuple[float, float] = (0.5, 10.0),
        fov: float = 65.0,
        cache: bool | None = None,
    ) -> None:
        if n < 1:
            raise ValueError(f"depth_scenes needs n >= 1 images, got {n}")
        if not 0 < depth_range[0] < depth_range[1]:
            raise ValueError(
                f"depth_range must be (min, max) with 0 < min < max, got {depth_range}"
            )
        self.n, self.size, self.seed = n, _hw(size), seed
        self.depth_range = (float(depth_range[0]), float(depth_range[1]))
        self.fov = fov
        # horizontal field of view in degrees -> focal length in pixels
        self.focal = self.size[1] / 2 / np.tan(np.radians(fov) / 2)
        self._init_cache(cache)

    def __len__(self) -> int:
        return self.n

    def name(self, i: int) -> str:
        return f"depth_scenes(seed={self.seed})[{i}]"

    def scene(self, i: int) -> tuple[Camera, list]:
        """The camera and the objects of image i."""
        if not 0 <= i < self.n:
            raise IndexError(f"{self.name(i)}: index out of range (0..{self.n - 1})")
        rng = np.random.default_rng([self.seed, i, 0xDE97])
        lo, hi = self.depth_range
        cam = Camera(
            position=(0.0, float(rng.uniform(1.0, 1.8)), 0.0),
            yaw=float(rng.uniform(-np.pi, np.pi)),
            pitch=float(np.radians(rng.uniform(5, 25))),
            focal=float(self.focal),
        )
        fwd = np.array([np.sin(cam.yaw), 0.0, np.cos(cam.yaw)])
        side = np.array([np.cos(cam.yaw), 0.0, -np.sin(cam.yaw)])
        objs: list = [
            Plane(
                (0.0, 1.0, 0.0),
                0.0,
                colour=tuple(0.4 + 0.4 * rng.random(3)),
                pattern=float(rng.uniform(0.3, 0.8)),
            ),  # ground
            # the far wall, facing the camera, inside the range
            Plane(
                tuple(fwd),
                float(rng.uniform(0.75, 0.95) * hi),
                colour=tuple(0.3 + 0.5 * rng.random(3)),
                pattern=float(rng.uniform(0.5, 1.5)),
            ),
        ]
        tan_half = np.tan(np.radians(self.fov) / 2)
        for _ in range(rng.integers(1, 4)):  # spheres on the ground
            r = float(rng.uniform(0.25, 0.9))
            dist = rng.uniform(max(lo + 1.5, 2.0), 0.7 * hi)
            lateral = rng.uniform(-0.8, 0.8) * dist * tan_half
            c = fwd * dist + side * lateral
            objs.append(Sphere((float(c[0]), r, float(c[2])), r, tuple(0.2 + 0.8 * rng.random(3))))
        for _ in range(rng.integers(1, 3)):  # upright boards, slanted about the vertical
            dist = rng.uniform(max(lo + 2.0, 2.5), 0.75 * hi)
            lateral = rng.uniform(-0.8, 0.8) * dist * tan_half
            half_w, half_h = float(rng.uniform(0.4, 1.5)), float(rng.uniform(0.5, 1.3))
            c = fwd * dist + side * lateral + np.array([0.0, half_h, 0.0])
            turn = cam.yaw + rng.uniform(-np.radians(50), np.radians(50))
            n = np.array([np.sin(turn), 0.0, np.cos(turn)])
            u = np.array([np.cos(turn), 0.0, -np.sin(turn)])
            objs.append(
                Plane(
                    tuple(n),
                    float(n @ c),
                    tuple(c),
                    tuple(u),
                    (0.0, 1.0, 0.0),
                    (half_w, half_h),
                    tuple(0.2 + 0.8 * rng.random(3)),
                    float(rng.uniform(0.1, 0.5)),
                )
            )
        return cam, objs

    def _make(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        cam, objs = self.scene(i)
        img, depth = render_depth(cam, objs, self.size)
        rng = np.random.default_rng([self.seed, i, 0x1A6E])
        img = img + rng.normal(0, 0.015, img.shape)
        lo, hi = self.depth_range
        valid = (depth >= lo) & (depth <= hi)
        depth = np.where(valid, depth, 0.0).astype(np.float32)
        return np.clip(np.round(img * 255), 0, 255).astype(np.uint8), depth

    def __repr__(self) -> str:
        return f"DepthScenes(n={self.n}, size={self.size}, seed={self.seed})"


def depth_scenes(n: int, size: int | tuple[int, int] = 224, seed: int = 0, **kwargs) -> DepthScenes:
    """`n` rendered scenes of `size` (int or (H, W)): a textured ground plane, 1-3 spheres on it,
    1-2 slanted upright boards and a far wall, from a camera 1-1.8 m high, pitched 5-25 degrees
    down, at a random heading. Depth float32 (H, W) in metres (camera z, as NYU and KITTI
    store it), exact from the ray intersections; 0 (invalid) outside `depth_range`
    (default 0.5-10 m), e.g. the sky."""
    return DepthScenes(n, size, seed, **kwargs)
