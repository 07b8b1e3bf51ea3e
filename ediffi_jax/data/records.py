"""Real image–text records → training examples: decode, resize, crop, caption cleanup, bad-record reasons.

A record (folder / WebDataset / COCO / any TFDS builder read with ``as_data_source``) is a dict with ``"image"``
(encoded JPEG/PNG bytes, a uint8 [H, W, 3|1|4] array or a PIL image), ``"caption"`` (``str`` or UTF-8 ``bytes``)
and optionally ``"key"`` (``str``; joins precomputed embeddings, see `keyed_embeddings`). `Preprocess` turns one
into ``{"image": uint8 [R, R, 3], "caption": str, "key": str}`` or raises `BadRecord` with one of
`BAD_REASONS`; the pipeline skips and counts those (pipeline.make_image_text_iterator).

Image: decoded with PIL (EXIF orientation applied, converted to RGB: grey is replicated, alpha dropped), the short
side resized to the resolution R, then an R×R crop (``crop="random"``: uniform offset along the long side from
the example's rng; ``"center"``). Upscaling happens only for images whose short side is below R.

Resize filter: ``"bicubic"`` (PIL BICUBIC) by default. PIL widens its kernels by the scale factor when it
downscales, so every filter but nearest is antialiased; bicubic keeps more detail than ``"area"`` (PIL BOX, the
exact block mean for integer factors) with less ringing than ``"lanczos"``, and is what the LDM / Stable
Diffusion data loaders use, so pretrained-comparable statistics come out. The SR low-res partner is *not* made
here: `sr.pair_transform` area-downsamples the R×R image afterwards, so both images of a pair show the same
pixels exactly. With ``jpeg_draft`` (default on), JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8)
whose short side is still ≥ 2R, then resized: a 512² JPEG for 64² training decodes at 128² (≈6× faster) and the
DCT downscale is itself a block average, so the result is visually the same as a full decode.

Caption cleanup (`clean_caption`): every run of whitespace (any Unicode whitespace, newlines, tabs) becomes one
space, the ends are stripped; a caption longer than ``max_chars`` characters is cut to its first ``max_chars``
characters and, if that cut splits a word and a space lies in the kept part, back to the last space, then
stripped. ``max_chars`` defaults to 1024: ~4 characters per token puts that at ≥ 2× the 128 T5 / 77 CLIP tokens
the tokenizers keep, so the tokenizers' own truncation decides what the model sees for any normal caption, while a
pathological megabyte "caption" costs nothing. An empty caption (after cleanup) is a bad record.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np

# Why a record is skipped, in the order the counters are reported.
BAD_REASONS = (
    "missing_field",       # no "image" or no "caption" (or the record is not a mapping)
    "unreadable_record",   # reading source[i] itself raised (e.g. a TFDS feature that fails to decode)
    "empty_image",         # zero-byte image
    "undecodable_image",   # unreadable, truncated or not an image
    "caption_not_text",    # caption neither str nor UTF-8 bytes (or invalid UTF-8)
    "empty_caption",       # nothing left after whitespace cleanup
    "missing_embedding",   # data.embeddings given but no entry for the record's key
)
RESIZE_FILTERS = ("bicubic", "area", "bilinear", "lanczos")
CROPS = ("random", "center")
DEFAULT_MAX_CAPTION_CHARS = 1024


class BadRecord(Exception):
    """A record that is skipped: ``reason`` is one of the class's ``REASONS`` (here `BAD_REASONS`, the read-time
    reasons; `image_text.Dropped` has the build-time ones), ``detail`` says what was wrong."""

    REASONS: tuple[str, ...] = BAD_REASONS

    def __init__(self, reason: str, detail: str = ""):
        if reason not in self.REASONS:
            raise ValueError(f"unknown {type(self).__name__} reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def clean_caption(caption: Any, max_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> str:
    """The cleaned caption (module docstring; ``max_chars`` 0 = no limit); `BadRecord` for a non-text or empty
    caption. UTF-8 bytes may start with a byte-order mark (dropped)."""
    if isinstance(caption, np.ndarray) and caption.ndim == 0:
        caption = caption.item()
    if isinstance(caption, (bytes, bytearray, np.bytes_, memoryview)):
        try:
            caption = bytes(caption).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise BadRecord("caption_not_text", f"not UTF-8 ({e.reason} at byte {e.start})") from None
    if not isinstance(caption, str):
        raise BadRecord("caption_not_text", f"caption is a {type(caption).__name__}, not text: {str(caption)[:40]!r}")
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 (decoded with surrogateescape)
        raise BadRecord("caption_not_text", "not UTF-8") from None
    text = " ".join(caption.split())
    if max_chars and len(text) > max_chars:
        cut = text[:max_chars]
        if text[max_chars] != " " and " " in cut:
            cut = cut[: cut.rindex(" ")]
        text = cut.strip()
    if not text:
        raise BadRecord("empty_caption")
    return text


def _pil_filter(name: str) -> int:
    from PIL import Image

    return {"bicubic": Image.Resampling.BICUBIC, "area": Image.Resampling.BOX,
            "bilinear": Image.Resampling.BILINEAR, "lanczos": Image.Resampling.LANCZOS}[name]


def decode_pil(image: Any, min_short_side: int = 0) -> Any:
    """An RGB PIL image from encoded bytes, a uint8 array or a PIL image; `BadRecord` when it cannot be read.
    ``min_short_side`` > 0: JPEGs decode at the smallest DCT scale that keeps the short side ≥ it."""
    from PIL import Image, ImageOps

    if isinstance(image, np.ndarray) and image.dtype == object and image.ndim == 0:
        image = image.item()
    if isinstance(image, (bytes, bytearray, memoryview, np.bytes_)):
        data = bytes(image)
        if not data:
            raise BadRecord("empty_image")
        try:
            im = Image.open(io.BytesIO(data))
            if min_short_side and im.format == "JPEG":
                w, h = im.size
                s = min_short_side / min(w, h)
                if s < 1:
                    im.draft("RGB", (max(1, int(np.ceil(w * s))), max(1, int(np.ceil(h * s)))))
            im.load()
            im = ImageOps.exif_transpose(im)
            return im.convert("RGB")
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
            raise BadRecord("undecodable_image", f"{type(e).__name__}: {e}") from None
    if hasattr(image, "convert") and hasattr(image, "size"):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.size == 0:
        raise BadRecord("empty_image")
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
        raise BadRecord("undecodable_image", f"array of {arr.dtype} {arr.shape}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr).convert("RGB")


def resize_short_side(im: Any, size: int, resize_filter: str = "bicubic") -> Any:
    """`im` (PIL) scaled so that its short side is `size` (the long side rounded to the nearest pixel, ≥ size)."""
    w, h = im.size
    s = size / min(w, h)
    new = (size, max(size, round(h * s))) if w <= h else (max(size, round(w * s)), size)
    return im if new == (w, h) else im.resize(new, _pil_filter(resize_filter))


def crop_square(arr: np.ndarray, size: int, crop: str, rng: np.random.Generator | None) -> np.ndarray:
    """A size×size crop of [H, W, C] (one side equals size): "center" or "random" (offset drawn from `rng`)."""
    h, w = arr.shape[:2]
    if crop == "center":
        y, x = (h - size) // 2, (w - size) // 2
    elif crop == "random":
        if rng is None:
            raise ValueError("a random crop needs an rng")
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    else:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    return arr[y:y + size, x:x + size]


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """One record → ``{"image": uint8 [R, R, 3], "caption": str, "key": str}`` (module docstring); raises
    `BadRecord`. Picklable (runs in grain worker processes). The pipeline turns images to float32 in [-1, 1]
    (`to_float`) after they cross from the workers (4x less to move), or before an SR ``transform``."""

    resolution: int
    crop: str = "random"
    resize_filter: str = "bicubic"
    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS
    jpeg_draft: bool = True

    def __post_init__(self) -> None:
        if self.resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {self.resolution}")
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if self.resize_filter not in RESIZE_FILTERS:
            raise ValueError(f"resize_filter must be one of {RESIZE_FILTERS}, got {self.resize_filter!r}")
        if self.max_caption_chars < 1:
            raise ValueError(f"max_caption_chars must be >= 1, got {self.max_caption_chars}")

    def __call__(self, record: Any, rng: np.random.Generator | None) -> dict[str, Any]:
        if not hasattr(record, "keys") or "image" not in record or "caption" not in record:
            have = sorted(record.keys()) if hasattr(record, "keys") else type(record).__name__
            raise BadRecord("missing_field", f"need 'image' and 'caption', have {have}")
        caption = clean_caption(record["caption"], self.max_caption_chars)
        im = decode_pil(record["image"], 2 * self.resolution if self.jpeg_draft else 0)
        arr = np.asarray(resize_short_side(im, self.resolution, self.resize_filter), dtype=np.uint8)
        arr = crop_square(arr, self.resolution, self.crop, rng)
        return {"image": np.ascontiguousarray(arr), "caption": caption, "key": record_key(record)}


def record_key(record: Any) -> str:
    """A record's ``"key"`` as str ("" when it has none): what joins it to its keyed embeddings."""
    key = record.get("key", "")
    if isinstance(key, np.ndarray) and key.ndim == 0:
        key = key.item()
    return bytes(key).decode("utf-8", "replace") if isinstance(key, (bytes, np.bytes_)) else str(key)


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 image(s) → float32 in [-1, 1] (what the model trains on)."""
    return image.astype(np.float32) * np.float32(1.0 / 127.5) - np.float32(1.0)
