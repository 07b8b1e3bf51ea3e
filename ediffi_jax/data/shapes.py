"""Synthetic "coloured shapes" text-to-image data and a deterministic text-alignment metric.

Each scene holds one or two solid, axis-aligned shapes (circle / square / upward triangle) of distinct
saturated colours at distinct coarse positions on a flat gray background. Captions are generated from
the scene ("a red circle on the left and a blue square at the bottom") and can be parsed back, so a
generated image can be checked against its prompt by a colour segmentation (`score`, `score_batch`).

Pure NumPy + PIL (PIL only for PNG encoding); no JAX, TensorFlow or SciPy.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# ----------------------------------------------------------------------------------------------------
# Vocabulary. Palette colours are corners of the RGB cube (pairwise distance >= 255) and the background
# is mid-gray (distance ~221 from every corner; 0.0 in [-1, 1] space), so nearest-colour segmentation is
# unambiguous even for noisy or blurry images.
# ----------------------------------------------------------------------------------------------------
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")

# Caption phrase for each position, and the inverse map used by the parser.
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASES.items()}

# Sampling box (x range, y range) of an object's centre for each position; image coords in [0, 1],
# y pointing down. Boxes keep a wide margin to the classification boundaries of `classify_position`.
_POSITION_BOXES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "left": ((0.16, 0.26), (0.42, 0.58)),
    "right": ((0.74, 0.84), (0.42, 0.58)),
    "top": ((0.42, 0.58), (0.16, 0.26)),
    "bottom": ((0.42, 0.58), (0.74, 0.84)),
    "center": ((0.45, 0.55), (0.45, 0.55)),
}
SIZE_RANGE: tuple[float, float] = (0.10, 0.15)  # half-width of the object's bounding box, fraction of side
CENTER_RADIUS = 0.15  # |dx|, |dy| both below this (from the image centre) -> "center"
_MIN_GAP = 0.04  # minimal gap between two objects' bounding boxes
MIN_RESOLUTION = 8

# Segmentation / scoring tolerances.
COLOR_TOLERANCE = 110.0  # max RGB distance (0..255 scale) for a pixel to be assigned to a palette colour
MIN_AREA_FRACTION = 0.004  # an object must cover at least this fraction of the image ...
MIN_AREA_PIXELS = 3  # ... and at least this many pixels


@dataclass(frozen=True)
class SceneObject:
    """One solid shape; `center` is its bounding-box centre (x, y) in [0, 1], `size` its half-width."""

    color: str
    shape: str
    position: str
    center: tuple[float, float] = (0.5, 0.5)
    size: float = 0.125

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; expected one of {COLOR_NAMES}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; expected one of {POSITIONS}")


@dataclass(frozen=True)
class Scene:
    """An ordered list of objects; the caption mentions them in this order."""

    objects: tuple[SceneObject, ...]


# ----------------------------------------------------------------------------------------------------
# Sampling, rendering, captions.
# ----------------------------------------------------------------------------------------------------
def _bbox(obj: SceneObject) -> tuple[float, float, float, float]:
    x, y = obj.center
    hw = obj.size
    hh = obj.size * np.sqrt(3.0) / 2.0 if obj.shape == "triangle" else obj.size
    return x - hw, y - hh, x + hw, y + hh


def _overlaps(a: SceneObject, b: SceneObject, gap: float = _MIN_GAP) -> bool:
    ax0, ay0, ax1, ay1 = _bbox(a)
    bx0, by0, bx1, by1 = _bbox(b)
    return not (ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0)


def sample_scene(rng: np.random.Generator, *, max_objects: int = 2) -> Scene:
    """Samples 1..max_objects non-overlapping objects with distinct colours and distinct positions."""
    if not 1 <= max_objects <= len(POSITIONS):
        raise ValueError(f"max_objects must be in [1, {len(POSITIONS)}], got {max_objects}")
    n = int(rng.integers(1, max_objects + 1))
    colors = rng.choice(len(COLOR_NAMES), size=n, replace=False)
    positions = rng.choice(len(POSITIONS), size=n, replace=False)
    kinds = [
        (COLOR_NAMES[int(ci)], SHAPES[int(rng.integers(len(SHAPES)))], POSITIONS[int(pi)])
        for ci, pi in zip(colors, positions)
    ]
    # Rejection-sample the whole placement (a large first object can leave no room for the second).
    for _ in range(1000):
        objects = []
        for color, shape, position in kinds:
            (x0, x1), (y0, y1) = _POSITION_BOXES[position]
            center = (float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1)))
            size = float(rng.uniform(*SIZE_RANGE))
            objects.append(SceneObject(color=color, shape=shape, position=position, center=center, size=size))
        if not any(_overlaps(p, q) for i, p in enumerate(objects) for q in objects[:i]):
            break
    else:  # pragma: no cover - every pair of position boxes admits non-overlapping placements
        raise RuntimeError(f"could not place {kinds} without overlap")
    return Scene(objects=tuple(objects))


def _shape_mask(obj: SceneObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean coverage of `obj` at sample points (xs [1, W], ys [H, 1]) in [0, 1] coordinates."""
    cx, cy = obj.center
    s = obj.size
    dx, dy = xs - cx, ys - cy
    if obj.shape == "circle":
        return dx * dx + dy * dy <= s * s
    if obj.shape == "square":
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    # Upward equilateral triangle, side 2s, bounding box centred on `center`.
    h = s * np.sqrt(3.0)
    t = (dy + h / 2.0) / h  # 0 at the apex, 1 at the base
    return (t >= 0.0) & (t <= 1.0) & (np.abs(dx) <= s * t)


def render(scene: Scene, resolution: int, *, supersample: int = 1) -> np.ndarray:
    """Renders `scene` to a uint8 [R, R, 3] image (point sampling at pixel centres; optional box AA)."""
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution must be >= {MIN_RESOLUTION}, got {resolution}")
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    n = resolution * supersample
    coords = (np.arange(n, dtype=np.float64) + 0.5) / n
    xs, ys = coords[None, :], coords[:, None]
    img = np.empty((n, n, 3), dtype=np.float64)
    img[...] = BACKGROUND
    for obj in scene.objects:
        img[_shape_mask(obj, xs, ys)] = COLORS[obj.color]
    if supersample > 1:
        img = img.reshape(resolution, supersample, resolution, supersample, 3).mean(axis=(1, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def caption(scene: Scene) -> str:
    """E.g. "a red circle on the left and a blue square at the bottom"."""
    if not scene.objects:
        raise ValueError("cannot caption an empty scene")
    return " and ".join(f"a {o.color} {o.shape} {POSITION_PHRASES[o.position]}" for o in scene.objects)


_OBJECT_RE = re.compile(
    r"an? (?P<color>{c}) (?P<shape>{s}) (?P<pos>{p})".format(
        c="|".join(COLOR_NAMES),
        s="|".join(SHAPES),
        p="|".join(re.escape(p) for p in POSITION_PHRASES.values()),
    )
)


def parse_caption(text: str) -> list[SceneObject]:
    """Inverse of `caption` (objects get default centre/size); raises ValueError if it does not parse."""
    norm = " ".join(str(text).lower().strip().rstrip(".").split())
    parts = norm.split(" and ") if norm else []
    objects = []
    for part in parts:
        m = _OBJECT_RE.fullmatch(part)
        if m is None:
            raise ValueError(f"cannot parse shapes caption {text!r} (bad phrase {part!r})")
        objects.append(
            SceneObject(color=m["color"], shape=m["shape"], position=_PHRASE_TO_POSITION[m["pos"]])
        )
    if not objects:
        raise ValueError(f"cannot parse shapes caption {text!r} (no objects)")
    return objects


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator used for example `index` of dataset `seed`."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([seed, index])


def example(seed: int, index: int, resolution: int, *, max_objects: int = 2) -> dict:
    """Deterministic example `index` of dataset `seed`: {"image": uint8 [R, R, 3], "caption": str}."""
    scene = sample_scene(scene_rng(seed, index), max_objects=max_objects)
    return {"image": render(scene, resolution), "caption": caption(scene)}


class ShapesSource(Sequence):
    """Lazy random-access source of examples ``start .. start + length - 1`` (no files; grain-compatible).

    Record i is ``example(seed, start + i, resolution)``, the same as record i of the TFDS train split
    (``start=0``) or validation split (``start=num_train``) built with the same seed.
    """

    def __init__(self, seed: int, length: int, resolution: int, *, start: int = 0, max_objects: int = 2):
        if length < 0 or start < 0:
            raise ValueError(f"length and start must be >= 0, got length={length}, start={start}")
        if resolution < MIN_RESOLUTION:
            raise ValueError(f"resolution must be >= {MIN_RESOLUTION}, got {resolution}")
        self.seed, self.length, self.resolution = seed, length, resolution
        self.start, self.max_objects = start, max_objects

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:  # type: ignore[override]
        index = int(index)
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for ShapesSource of length {self.length}")
        index %= self.length
        return example(self.seed, self.start + index, self.resolution, max_objects=self.max_objects)

    def __repr__(self) -> str:
        return (
            f"ShapesSource(seed={self.seed}, length={self.length}, resolution={self.resolution}, "
            f"start={self.start})"
        )


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 [H, W, 3] image (deterministic)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """uint8 [H, W, 3] array from PNG (or any PIL-readable) bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------
# Segmentation and scoring.
# ----------------------------------------------------------------------------------------------------
_PALETTE = np.array([COLORS[c] for c in COLOR_NAMES] + [BACKGROUND], dtype=np.float32)
_BG_LABEL = len(COLOR_NAMES)
_NO_LABEL = -1


def to_uint8_scale(image: np.ndarray) -> np.ndarray:
    """float32 [H, W, 3] in 0..255 from a uint8 image or a float image in [-1, 1]."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {img.shape}")
    if img.dtype == np.uint8:
        return img.astype(np.float32)
    if not np.issubdtype(img.dtype, np.floating):
        raise ValueError(f"expected uint8 or float image, got dtype {img.dtype}")
    return ((np.clip(img.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.float32)


def segment(image: np.ndarray, tolerance: float = COLOR_TOLERANCE) -> np.ndarray:
    """int [H, W] labels: index into COLOR_NAMES, len(COLOR_NAMES) = background, -1 = unassigned."""
    img = to_uint8_scale(image)
    d2 = ((img[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    labels = d2.argmin(-1)
    ok = np.take_along_axis(d2, labels[..., None], -1)[..., 0] <= tolerance * tolerance
    return np.where(ok, labels, _NO_LABEL)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean [H, W] mask (min-label propagation, pure NumPy)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    h, w = mask.shape
    big = h * w
    labels = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        p = np.pad(labels, 1, constant_values=big)
        new = np.minimum.reduce([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        new = np.where(mask, new, big)
        # Pointer jumping: follow each label to its own (already reduced) label to converge faster.
        flat = new.ravel()
        jumped = np.where(mask.ravel(), flat[np.minimum(flat, big - 1)], big).reshape(h, w)
        new = np.minimum(new, jumped)
        if np.array_equal(new, labels):
            break
        labels = new
    values, counts = np.unique(labels[mask], return_counts=True)
    return labels == values[counts.argmax()]


def classify_position(cx: float, cy: float) -> str:
    """Coarse position name of a point (x, y) in [0, 1] image coordinates (y down)."""
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < CENTER_RADIUS:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _template(shape: str, hgt: int, wid: int, pad: float) -> np.ndarray:
    """Boolean [hgt, wid] mask of `shape` whose continuous extent is the box grown by `pad` pixels per side.

    A point-sampled shape's pixel bounding box under-estimates its true extent by up to one pixel per
    side, so `classify_shape` tries a few pads.
    """
    ys = (np.arange(hgt, dtype=np.float64)[:, None] + 0.5 + pad) / (hgt + 2 * pad)
    xs = (np.arange(wid, dtype=np.float64)[None, :] + 0.5 + pad) / (wid + 2 * pad)
    dx, dy = xs - 0.5, ys - 0.5
    if shape == "square":
        return np.ones((hgt, wid), dtype=bool)
    if shape == "circle":
        return dx * dx + dy * dy <= 0.25
    return np.abs(dx) <= 0.5 * ys  # upward triangle: apex at the top, base at the bottom


_TEMPLATE_PADS = (0.0, 0.25, 0.5)


def classify_shape(blob: np.ndarray) -> str:
    """Shape name of a non-empty boolean blob: the bounding-box-fitted template of highest IoU."""
    ys, xs = np.nonzero(blob)
    if ys.size == 0:
        raise ValueError("cannot classify the shape of an empty blob")
    crop = blob[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    hgt, wid = crop.shape
    best, best_iou = SHAPES[0], -1.0
    for name in ("square", "circle", "triangle"):  # ties go to the simpler shape
        for pad in _TEMPLATE_PADS if name != "square" else (0.0,):
            tpl = _template(name, hgt, wid, pad)
            iou = (crop & tpl).sum() / float((crop | tpl).sum())
            if iou > best_iou:
                best, best_iou = name, iou
    return best


def detect(image: np.ndarray, color: str, labels: np.ndarray | None = None) -> dict | None:
    """Finds the largest blob of `color`; returns {"area", "shape", "position", "center"} or None."""
    if color not in COLORS:
        raise ValueError(f"unknown colour {color!r}; expected one of {COLOR_NAMES}")
    if labels is None:
        labels = segment(image)
    h, w = labels.shape
    blob = largest_component(labels == COLOR_NAMES.index(color))
    area = int(blob.sum())
    if area < max(MIN_AREA_PIXELS, MIN_AREA_FRACTION * h * w):
        return None
    ys, xs = np.nonzero(blob)
    cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
    return {
        "area": area / float(h * w),
        "shape": classify_shape(blob),
        "position": classify_position(cx, cy),
        "center": (float(cx), float(cy)),
    }


def score(image: np.ndarray, caption_text: str) -> dict[str, float]:
    """Per-aspect accuracy of `image` (uint8, or float in [-1, 1]) against a shapes caption.

    For each captioned object: "color" = a large enough blob of that colour exists; "shape" / "position"
    = that blob's classified shape / centroid region match (False when the colour is absent);
    "overall" = fraction of objects with all three right.
    """
    objects = parse_caption(caption_text)
    labels = segment(image)
    hits = {"color": 0, "shape": 0, "position": 0, "overall": 0}
    for obj in objects:
        found = detect(image, obj.color, labels)
        if found is None:
            continue
        ok_shape = found["shape"] == obj.shape
        ok_pos = found["position"] == obj.position
        hits["color"] += 1
        hits["shape"] += int(ok_shape)
        hits["position"] += int(ok_pos)
        hits["overall"] += int(ok_shape and ok_pos)
    return {k: v / len(objects) for k, v in hits.items()}


def score_batch(images: np.ndarray | Sequence[np.ndarray], captions: Sequence[str]) -> dict[str, float]:
    """Mean of `score` over a batch ([B, H, W, 3] array or sequence of images) and its captions."""
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    if len(captions) == 0:
        raise ValueError("score_batch needs at least one image")
    scores = [score(img, str(cap)) for img, cap in zip(images, captions)]
    return {k: float(np.mean([s[k] for s in scores])) for k in ("color", "shape", "position", "overall")}
