"""TFDS builder for a folder of captioned images (array_record, no TensorFlow, no download step).

Caption layouts (``captions="auto"`` picks jsonl if ``captions.jsonl`` is at the top, else csv if ``captions.csv``
is, else sidecar):

* ``sidecar``: every image (``.jpg .jpeg .png .webp .bmp .gif .tif .tiff``, any depth) has a caption file with the
  same stem beside it: ``cat.jpg`` + ``cat.txt`` (UTF-8 text) or ``cat.json`` (a JSON string, or an object with a
  "caption" / "text" field); ``.txt`` wins when both exist. A caption file without an image is ``missing_image``.
* ``jsonl``: ``captions.jsonl``, one object per line with the image's path relative to the folder in
  "file_name" / "file" / "image" and its caption in "caption" / "text". Records follow the line order; images no
  line names are ``missing_caption``, lines naming no existing image ``missing_image``, a second line naming the
  same image ``duplicate_key``, a line that is not a JSON object or lacks the file field ``malformed_entry``.
* ``csv``: ``captions.csv`` with a header row naming the same columns; otherwise as jsonl.

The key of a record is its image's path relative to the folder (POSIX separators). One split, ``train``. Paths
may be local or ``gs://...`` (all file access goes through `etils.epath`). See `ediffi_jax.data.image_text` for
the record format, the checks and the drop reasons.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import posixpath
from collections.abc import Iterator
from typing import Any

import tensorflow_datasets as tfds

from ediffi_jax.data import image_text as it

CAPTION_LAYOUTS = ("auto", "sidecar", "jsonl", "csv")
FILE_FIELDS = ("file_name", "file", "image")
LISTINGS = {"jsonl": "captions.jsonl", "csv": "captions.csv"}


@dataclasses.dataclass(eq=False)
class FolderConfig(it.ImageTextConfig):
    """A folder of images with captions: its path, caption layout and filters."""

    captions: str = "sidecar"


def resolve_captions(path: str, captions: str = "auto") -> str:
    """The caption layout of the folder at `path` ("auto": by which listing file exists)."""
    if captions not in CAPTION_LAYOUTS:
        raise ValueError(f"unknown caption layout {captions!r} (one of {', '.join(CAPTION_LAYOUTS)})")
    if captions != "auto":
        return captions
    root = it.to_path(path)
    for name, listing in LISTINGS.items():
        if (root / listing).exists():
            return name
    return "sidecar"


def make_config(path: str, *, captions: str = "auto", min_size: int = 0, max_aspect: float = 0.0) -> FolderConfig:
    """Validated `FolderConfig`; its name hashes the resolved path, layout and filters."""
    it.Filters(min_size, max_aspect)  # validates
    root = it.to_path(path)
    if not root.is_dir():
        raise ValueError(f"image folder {path!r} does not exist or is not a directory")
    captions = resolve_captions(path, captions)
    if captions in LISTINGS and not (root / LISTINGS[captions]).exists():
        raise ValueError(f"captions={captions!r} needs {LISTINGS[captions]} in {path!r}; it is not there")
    options = {"path": it.resolved(path), "captions": captions, "min_size": min_size, "max_aspect": float(max_aspect)}
    return FolderConfig(name=it.config_name("folder", options), description=f"{options['path']} ({captions})",
                        path=options["path"], captions=captions, min_size=min_size, max_aspect=float(max_aspect))


class ImageFolder(it.ImageTextBuilder):
    """Captioned images in a folder; pass ``config=make_config(path, ...)``."""

    name = "ediffi_image_folder"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    DESCRIPTION = "Images with captions from a local or gs:// folder (sidecar .txt/.json, captions.jsonl or .csv)."

    def _splits(self) -> dict[str, Any]:
        return {"train": self._records}

    def _records(self, checker: it.RecordChecker) -> Iterator[dict]:
        cfg = self.builder_config
        root = it.to_path(cfg.path)
        files = {_relative(p, root): p for p in it.walk_files(root)}
        if cfg.captions == "sidecar":
            yield from _sidecar_records(files, checker)
        else:
            yield from _listing_records(files, cfg.captions, checker)


def _relative(p: Any, root: Any) -> str:
    return posixpath.relpath(str(p), str(root)) if "://" in str(root) else p.relative_to(root).as_posix()


def _split_name(rel: str) -> tuple[str, str]:
    """("dir/cat", ".jpg") for "dir/cat.JPG": the stem path and the lower-case last suffix."""
    stem, ext = posixpath.splitext(rel)
    return stem, ext.lower()


def _sidecar_records(files: dict[str, Any], checker: it.RecordChecker) -> Iterator[dict]:
    groups: dict[str, dict[str, list[str]]] = {}
    for rel in files:
        stem, ext = _split_name(rel)
        kind = "image" if ext in it.IMAGE_SUFFIXES else {".txt": "txt", ".json": "json"}.get(ext)
        if kind is not None:
            groups.setdefault(stem, {}).setdefault(kind, []).append(rel)
    for stem in sorted(groups):
        group = groups[stem]
        images = sorted(group.get("image", []))
        if not images:
            checker.record((group.get("txt") or group["json"])[0], None, "")
            continue
        side = group.get("txt") or group.get("json")
        kind = "text" if "txt" in group else "json"
        try:
            caption = it.read_bytes(files[side[0]], "bad_caption") if side else None
        except it.Dropped as e:
            for rel in images:
                if checker.claim(rel):
                    checker.drop(e.reason, rel, e.detail)
            continue
        for rel in images:
            record = _checked(checker, rel, files[rel], caption, kind)
            if record is not None:
                yield record


def _checked(checker: it.RecordChecker, key: str, path: Any, caption: Any, kind: str) -> dict | None:
    """Checks the caption before reading the image (a record dropped for its caption costs no image read)."""
    if not checker.claim(key):
        return None
    if caption is not None:
        try:
            caption = it.caption_from_json(caption) if kind == "json" else it.caption_text(caption)
        except it.Dropped as e:
            checker.drop(e.reason, key, e.detail)
            return None
    try:
        image = it.read_bytes(path, "unreadable_image") if caption is not None else b""  # no caption: not read
    except it.Dropped as e:
        checker.drop(e.reason, key, e.detail)
        return None
    return checker.record(key, image, caption, claimed=True)


def _listing_records(files: dict[str, Any], layout: str, checker: it.RecordChecker) -> Iterator[dict]:
    listing = LISTINGS[layout]
    images = {rel for rel in files if _split_name(rel)[1] in it.IMAGE_SUFFIXES}
    # surrogateescape: a line with non-UTF-8 bytes still parses; its caption then fails as bad_caption
    text = files[listing].read_bytes().decode("utf-8", errors="surrogateescape")
    named: set[str] = set()
    for line_no, entry in _entries(text, layout):
        where = f"{listing}:{line_no}"
        if not isinstance(entry, dict):
            checker.drop("malformed_entry", where, f"not a JSON object: {str(entry)[:60]!r}")
            continue
        name = next((entry[f] for f in FILE_FIELDS if entry.get(f) not in (None, "")), None)
        if not isinstance(name, str):
            checker.drop("malformed_entry", where, f"no {'/'.join(FILE_FIELDS)} field")
            continue
        key = posixpath.normpath(name.replace("\\", "/")).lstrip("/")
        named.add(key)
        caption = next((entry[f] for f in it.CAPTION_FIELDS if f in entry), None)
        if key not in images:
            checker.record(key, None, caption)
            continue
        record = _checked(checker, key, files[key], caption, "text")
        if record is not None:
            yield record
    for key in sorted(images - named):
        checker.record(key, b"", None)


def _entries(text: str, layout: str) -> Iterator[tuple[int, Any]]:
    if layout == "jsonl":
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                yield line_no, f"invalid JSON ({e.msg})"
    else:
        reader = csv.DictReader(io.StringIO(text))
        for entry in reader:
            yield reader.line_num, {k: v for k, v in entry.items() if k is not None}


def build_folder(path: str, data_dir: str, *, captions: str = "auto", min_size: int = 0,
                 max_aspect: float = 0.0) -> it.BuildResult:
    """Prepares the folder dataset under `data_dir` unless already there; returns the builder and its counts."""
    config = make_config(path, captions=captions, min_size=min_size, max_aspect=max_aspect)
    return it.prepare(ImageFolder(config=config, data_dir=str(data_dir), file_format="array_record"), data_dir)
