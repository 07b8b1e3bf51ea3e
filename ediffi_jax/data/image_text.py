"""Shared parts of the image–text TFDS builders (folder, WebDataset tars, COCO captions): records, checks, counts.

Every builder writes records ``{"image": bytes, "caption": str, "key": str, "width": int, "height": int}`` to
array_record files, TensorFlow-free (read them back with ``builder.as_data_source(split)``: ``image`` comes back
as encoded bytes, ``caption`` / ``key`` as UTF-8 bytes). ``image`` holds the source file's bytes when PIL decodes
them and they are a JPEG or PNG in mode RGB or L; anything else that decodes (WebP, GIF, BMP, CMYK JPEG,
palette / alpha / 16-bit PNG, ...) is turned upright by its EXIF orientation, converted to RGB (alpha over white)
and re-encoded as PNG. ``width`` / ``height`` are the displayed size (EXIF orientation applied).

A candidate record passes these checks in this order; the first that fails drops it under that reason:

=================  ==========================================================================================
duplicate_key      its key was already seen in this split (the first occurrence wins, even if it was dropped)
missing_image      a caption whose image is absent (no image file / tar member / COCO image entry or file)
missing_caption    an image without a caption (no sidecar / tar member / listing line / annotation; or a JSON
                   object without a "caption" field)
bad_caption        a caption that is not text: not UTF-8, not valid JSON, a JSON number / list / null, ...
empty_caption      a caption that is empty once whitespace is stripped and collapsed
empty_file         a zero-byte image file
unreadable_image   bytes PIL cannot decode completely (corrupt, truncated, not an image, decompression bomb)
too_small          shorter side below ``min_size``
bad_aspect         long side / short side above ``max_aspect``
=================  ==========================================================================================

Layout-specific reasons: ``malformed_entry`` (a captions.jsonl / CSV line that is not a JSON object or lacks the
file column, a COCO entry without its ids, a file or tar member name that is not UTF-8) and ``unreadable_shard`` (a
tar shard that is not a tar or is cut short; counted once per shard and not in ``seen``; its records read before
the damage are kept). A file that cannot be read (permissions, I/O error) counts as unreadable_image (an image) or
bad_caption (a caption file). Drops are logged (the first `LOG_FIRST` of each reason per split at WARNING, the
rest at DEBUG) and never stop a build; the counts per split, ``{"seen", "kept", "dropped": {reason: n}}`` (seen =
kept + records dropped), are stored in the dataset's DatasetInfo metadata (``metadata.json`` beside
``dataset_info.json``) and returned by `build_dataset`. A build in which a split keeps nothing fails with one line
("0 of 37 records kept: ...").
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from ediffi_jax.data.records import BadRecord, clean_caption

log = logging.getLogger(__name__)

REASONS = ("duplicate_key", "missing_image", "missing_caption", "bad_caption", "empty_caption", "empty_file",
           "unreadable_image", "too_small", "bad_aspect", "malformed_entry", "unreadable_shard")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_FIELDS = ("caption", "text")  # the caption's field in JSON sidecars, tar .json members, captions.jsonl
LOG_FIRST = 20
_KEEP_MODES = {"JPEG": ("RGB", "L"), "PNG": ("RGB", "L")}


class Dropped(BadRecord):
    """A record the builders drop: ``reason`` is one of `REASONS`, ``detail`` says what was wrong."""

    REASONS = REASONS


# ---------------------------------------------------------------------------------------------- captions, images


def caption_text(value: Any) -> str:
    """Cleaned caption (`records.clean_caption`, no length limit) from a str or UTF-8 bytes; Dropped("bad_caption"
    / "empty_caption") otherwise."""
    try:
        return clean_caption(value, max_chars=0)
    except BadRecord as e:
        raise Dropped("bad_caption" if e.reason == "caption_not_text" else e.reason, e.detail) from None


def caption_from_json(data: bytes | str | Any, *, parsed: bool = False) -> str:
    """Caption of a JSON sidecar: a JSON string, or an object's "caption" field. ``parsed``: `data` is already
    the decoded JSON value."""
    if not parsed:
        if isinstance(data, (bytes, bytearray)):
            try:
                data = bytes(data).decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise Dropped("bad_caption", f"JSON not UTF-8 ({e.reason})") from None
        try:
            data = json.loads(data)
        except json.JSONDecodeError as e:
            raise Dropped("bad_caption", f"invalid JSON ({e.msg})") from None
    if isinstance(data, dict):
        for field in CAPTION_FIELDS:
            if field in data:
                return caption_text(data[field])
        raise Dropped("missing_caption", f"JSON object without {'/'.join(CAPTION_FIELDS)!r}")
    return caption_text(data)


def probe_image(data: bytes) -> tuple[bytes, int, int]:
    """(stored bytes, width, height) of encoded image bytes. Decodes them completely, so truncation is caught
    (JPEGs at 1/8 scale: every byte is still read, at ~half the cost). Width and height are as displayed: EXIF
    orientations 5-8 swap them (re-encoded images are rotated upright)."""
    if len(data) == 0:
        raise Dropped("empty_file")
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode, (width, height) = im.format, im.mode, im.size
            keep = mode in _KEEP_MODES.get(fmt, ())
            if keep and fmt == "JPEG":
                im.draft(mode, (max(1, width // 8), max(1, height // 8)))
            im.load()
            if keep:
                if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                    width, height = height, width
                return bytes(data), width, height
            rgb = _to_rgb(ImageOps.exif_transpose(im))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, struct.error...
        raise Dropped("unreadable_image", f"{type(e).__name__}: {e}") from None
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue(), rgb.width, rgb.height


def _to_rgb(im: Any) -> Any:
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


# ---------------------------------------------------------------------------------------------- filters, counting


@dataclasses.dataclass(frozen=True)
class Filters:
    """Size filters: shorter side >= ``min_size``; long / short side <= ``max_aspect`` (0: no limit)."""

    min_size: int = 0
    max_aspect: float = 0.0

    def __post_init__(self):
        if self.min_size < 0:
            raise ValueError(f"min_size must be >= 0, got {self.min_size}")
        if self.max_aspect != 0 and self.max_aspect < 1:
            raise ValueError(f"max_aspect must be 0 (no limit) or >= 1, got {self.max_aspect}")

    def check(self, width: int, height: int) -> None:
        short, long = min(width, height), max(width, height)
        if short < self.min_size:
            raise Dropped("too_small", f"{width}x{height}, shorter side < {self.min_size}")
        if self.max_aspect and long > self.max_aspect * short:
            raise Dropped("bad_aspect", f"{width}x{height}, aspect {long / max(short, 1):.2f} > {self.max_aspect}")


class RecordChecker:
    """Validates candidate records of one split, counts kept / dropped per reason, logs drops."""

    def __init__(self, split: str, filters: Filters):
        self.split = split
        self.filters = filters
        self.seen = 0
        self.kept = 0
        self.dropped: collections.Counter[str] = collections.Counter()
        self._keys: set[str] = set()

    def drop(self, reason: str, key: str, detail: str = "") -> None:
        """Counts one record dropped for `reason` (for unreadable_shard: one shard, not in ``seen``); logs it."""
        if reason != "unreadable_shard":
            self.seen += 1
        self.dropped[reason] += 1
        level = logging.WARNING if self.dropped[reason] <= LOG_FIRST else logging.DEBUG
        log.log(level, "%s: dropped %s (%s)%s", self.split, key, reason, f": {detail}" if detail else "")

    def claim(self, key: str) -> bool:
        """Registers `key`; False (and counted as duplicate_key) when the split already had it."""
        if key in self._keys:
            self.drop("duplicate_key", key)
            return False
        self._keys.add(key)
        return True

    def record(self, key: str, image: bytes | None, caption: Any, *, caption_kind: str = "text",
               claimed: bool = False) -> dict[str, Any] | None:
        """The record, or None after counting why it was dropped. ``image`` None: no image; ``caption`` None: no
        caption; ``caption_kind`` "text" (str / bytes) or "json" (bytes of a JSON sidecar)."""
        if not claimed and not self.claim(key):
            return None
        try:
            if image is None:
                raise Dropped("missing_image", "no image for this caption")
            if caption is None:
                raise Dropped("missing_caption", "no caption for this image")
            text = caption_from_json(caption) if caption_kind == "json" else caption_text(caption)
            return self.image_record(key, image, text)
        except Dropped as e:
            self.drop(e.reason, key, e.detail)
            return None

    def image_record(self, key: str, image: bytes | tuple[bytes, int, int], text: str) -> dict[str, Any]:
        """Record of a checked caption and image bytes (or an earlier `probe_image` result); raises Dropped."""
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:  # a file / member name that is not UTF-8 (decoded with surrogateescape)
            raise Dropped("malformed_entry", "key (file or member name) is not UTF-8") from None
        data, width, height = probe_image(image) if isinstance(image, (bytes, bytearray)) else image
        self.filters.check(width, height)
        self.seen += 1
        self.kept += 1
        return {"image": data, "caption": text, "key": key, "width": width, "height": height}

    def counts(self) -> dict[str, Any]:
        return {"seen": self.seen, "kept": self.kept, "dropped": dict(sorted(self.dropped.items()))}


def summary(counts: dict[str, Any]) -> str:
    """One line, e.g. "30 of 37 records kept: dropped 4 missing_caption, 3 unreadable_image" (most first)."""
    dropped = ", ".join(f"{n} {r}" for r, n in sorted(counts["dropped"].items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{counts['kept']} of {counts['seen']} records kept" + (f": dropped {dropped}" if dropped else "")


# ---------------------------------------------------------------------------------------------- paths, configs


def to_path(path: str | os.PathLike) -> epath.Path:
    """`epath.Path` of a local path or a URI: gs://... goes through etils' fsspec backend (needs gcsfs) or
    tf.io.gfile when TensorFlow is installed. Every file access of the builders starts here."""
    return epath.Path(path)


def resolved(path: str | os.PathLike) -> str:
    """A stable string for a source path: absolute for local paths, unchanged for URIs (gs://...)."""
    text = os.fspath(path)
    return text.rstrip("/") if "://" in text else os.path.realpath(os.path.expanduser(text))


def config_name(prefix: str, options: dict[str, Any]) -> str:
    """Builder-config name: ``<prefix>_<last path part>_<12 hex of the hash of the options>``."""
    blob = json.dumps(options, sort_keys=True, default=str).encode()
    digest = hashlib.sha256(blob).hexdigest()[:12]
    stem = re.sub(r"[^a-z0-9]+", "_", os.path.basename(str(options.get("path", "")).rstrip("/")).lower()).strip("_")
    return f"{prefix}_{stem[:32]}_{digest}" if stem else f"{prefix}_{digest}"


def read_bytes(path: epath.Path, reason: str) -> bytes:
    """The file's bytes; Dropped(`reason`) when it cannot be read (permissions, an I/O or network error)."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise Dropped(reason, f"cannot read {path}: {type(e).__name__}: {e}") from None


def walk_files(root: epath.Path) -> Iterator[epath.Path]:
    """Files under `root`, depth first, in sorted order (hidden names skipped)."""
    dirs = []
    for child in sorted(root.iterdir(), key=lambda p: p.name):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            dirs.append(child)
        else:
            yield child
    for d in dirs:
        yield from walk_files(d)


# ---------------------------------------------------------------------------------------------- builder base


@dataclasses.dataclass(eq=False)
class ImageTextConfig(tfds.core.BuilderConfig):
    """Source path and filters of one image–text dataset (one builder config per distinct combination)."""

    path: str = ""
    min_size: int = 0
    max_aspect: float = 0.0

    @property
    def filters(self) -> Filters:
        return Filters(self.min_size, self.max_aspect)


FEATURES = {
    "image": lambda: tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded bytes, read back as bytes
    "caption": lambda: tfds.features.Text(),
    "key": lambda: tfds.features.Text(),
    "width": lambda: tfds.features.Scalar(dtype=np.int32),
    "height": lambda: tfds.features.Scalar(dtype=np.int32),
}


class ImageTextBuilder(tfds.core.GeneratorBasedBuilder):
    """Base of the image–text builders: features, TF-free code path, per-split counting into the metadata.

    Subclasses set ``name``, ``VERSION``, ``DESCRIPTION`` and implement `_splits` (split name -> iterator of
    records, counted by the `RecordChecker` it receives)."""

    DESCRIPTION = ""

    # tfds 4.9.10's default `code_path` touches the `importlib_resources` backport; see shapes_tfds.py.
    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return self.dataset_info_from_configs(
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict({k: make() for k, make in FEATURES.items()}),
            supervised_keys=None,
            homepage=None,
            disable_shuffling=True,  # records in source order (sorted files / shards / COCO ids); shuffle at read
            metadata=tfds.core.MetadataDict(source=cfg.path if cfg else "", counts={}),
        )

    def _splits(self) -> dict[str, Any]:
        raise NotImplementedError

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        splits = self._splits()
        if not splits:
            raise ValueError(f"no data found under {self.builder_config.path}")
        return {name: self._generate_examples(name, make) for name, make in splits.items()}

    def _generate_examples(self, split: str, make: Any) -> Iterator[tuple[int, dict]]:
        checker = RecordChecker(split, self.builder_config.filters)
        index = 0
        for record in make(checker):
            yield index, record
            index += 1
        counts = checker.counts()
        log.info("%s/%s: %s", self.builder_config.name, split, summary(counts))
        if counts["kept"] == 0:
            raise ValueError(f"{split} of {self.builder_config.path}: {summary(counts)}")
        self.info.metadata["counts"][split] = counts


@dataclasses.dataclass
class BuildResult:
    """A prepared builder and its counts per split (``{"seen", "kept", "dropped": {reason: n}}``)."""

    builder: tfds.core.DatasetBuilder
    counts: dict[str, dict[str, Any]]

    @property
    def dataset_dir(self) -> str:
        """The directory to read it back from (``tfds.builder_from_directory``)."""
        return os.fspath(self.builder.data_dir)


def prepare(builder: tfds.core.DatasetBuilder, data_dir: str) -> BuildResult:
    """Prepares `builder` unless already prepared (no download step), and returns it with its counts."""
    if not builder.is_prepared():
        builder.download_and_prepare(
            download_dir=os.path.join(os.fspath(data_dir), "downloads"),
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    return BuildResult(builder, read_counts(builder))


def read_counts(builder: tfds.core.DatasetBuilder) -> dict[str, dict[str, Any]]:
    """Counts per split stored in a prepared dataset's metadata ({} when it has none)."""
    metadata = builder.info.metadata or {}
    return {split: dict(c) for split, c in dict(metadata.get("counts", {})).items()}


LAYOUTS = ("folder", "webdataset", "coco")


def build_dataset(layout: str, path: str, data_dir: str, *, min_size: int = 0, max_aspect: float = 0.0,
                  **options: Any) -> BuildResult:
    """Builds an image–text dataset of `layout` ("folder", "webdataset" or "coco") from `path` into `data_dir`."""
    if layout == "folder":
        from ediffi_jax.data.folder_tfds import build_folder as build
    elif layout == "webdataset":
        from ediffi_jax.data.webdataset_tfds import build_webdataset as build
    elif layout == "coco":
        from ediffi_jax.data.coco_tfds import build_coco as build
    else:
        raise ValueError(f"unknown layout {layout!r} (one of {', '.join(LAYOUTS)})")
    return build(path, data_dir, min_size=min_size, max_aspect=max_aspect, **options)
