"""TFDS builder for WebDataset-style tar shards (the form LAION-like sets come in); array_record, no TensorFlow.

``path`` is one shard or a folder of shards (``*.tar``, ``*.tar.gz``, ``*.tgz``, any depth, read in sorted
order; local or ``gs://...`` through `etils.epath`, streamed, never unpacked to disk). As in WebDataset, a sample
is a run of consecutive members sharing a key, the member path up to the first "." of its base name:
``000123.jpg`` + ``000123.txt`` (UTF-8 caption) or ``000123.json`` (a JSON string, or an object with a "caption" /
"text" field, as img2dataset writes it; ``.txt`` wins when both exist). Other members (``.cls``, ``.npy``, ...)
are ignored. The record key is the member key (img2dataset keys embed the shard number, so they are unique across
shards); a key seen before, in this shard or an earlier one, is ``duplicate_key``; a sample with only an image is
``missing_caption``, only a caption ``missing_image``. A shard that is not a tar or is cut short counts once as
``unreadable_shard``; the samples read before the damage are kept. One split, ``train``. See
`ediffi_jax.data.image_text` for the record format, the checks and the drop reasons.
"""

from __future__ import annotations

import dataclasses
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from typing import Any

import tensorflow_datasets as tfds

from ediffi_jax.data import image_text as it

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_IMAGE_EXTS = tuple(s[1:] for s in it.IMAGE_SUFFIXES)
SHARD_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError, zlib.error)  # a shard that is damaged


@dataclasses.dataclass(eq=False)
class WebDatasetConfig(it.ImageTextConfig):
    """Tar shards (a file or a folder) and filters."""


def list_shards(path: str) -> list[Any]:
    """The shard files at `path` (one shard, or every shard under a folder), sorted by relative path."""
    root = it.to_path(path)
    if root.is_dir():
        return [p for p in it.walk_files(root) if p.name.lower().endswith(SHARD_SUFFIXES)]
    if root.exists():
        return [root]
    raise ValueError(f"tar shard path {path!r} does not exist")


def make_config(path: str, *, min_size: int = 0, max_aspect: float = 0.0) -> WebDatasetConfig:
    """Validated `WebDatasetConfig`; its name hashes the resolved path and the filters."""
    it.Filters(min_size, max_aspect)  # validates
    shards = list_shards(path)
    if not shards:
        raise ValueError(f"no tar shards ({', '.join(SHARD_SUFFIXES)}) under {path!r}")
    options = {"path": it.resolved(path), "min_size": min_size, "max_aspect": float(max_aspect)}
    return WebDatasetConfig(name=it.config_name("wds", options), description=f"{options['path']} (tar shards)",
                            path=options["path"], min_size=min_size, max_aspect=float(max_aspect))


def split_member(name: str) -> tuple[str, str]:
    """WebDataset (key, extension) of a member name: "a/b/000123.seg.png" -> ("a/b/000123", "seg.png")."""
    name = name[2:] if name.startswith("./") else name
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem), ext.lower()


def iter_samples(shard: Any) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each run of consecutive members of one shard, streamed. An error reading the
    shard is raised after the samples read so far (including the one in progress) were yielded."""
    key, members, error = None, {}, None
    try:
        with shard.open("rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                member_key, ext = split_member(info.name)
                if member_key != key and key is not None:
                    yield key, members
                    members = {}
                key = member_key
                handle = tar.extractfile(info)
                members[ext] = handle.read() if handle is not None else b""
    except SHARD_ERRORS as e:
        error = e
    if key is not None and members:
        yield key, members
    if error is not None:
        raise error


class WebDatasetShards(it.ImageTextBuilder):
    """Image–caption samples from WebDataset tar shards; pass ``config=make_config(path, ...)``."""

    name = "ediffi_webdataset"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    DESCRIPTION = "Image-caption pairs from WebDataset tar shards (key.jpg + key.txt / key.json)."

    def _splits(self) -> dict[str, Any]:
        return {"train": self._records}

    def _records(self, checker: it.RecordChecker) -> Iterator[dict]:
        for shard in list_shards(self.builder_config.path):
            samples = iter_samples(shard)
            while True:
                try:
                    key, members = next(samples)
                except StopIteration:
                    break
                except SHARD_ERRORS as e:
                    checker.drop("unreadable_shard", shard.name, f"{type(e).__name__}: {e}")
                    break
                record = _sample_record(checker, key, members)
                if record is not None:
                    yield record


def _sample_record(checker: it.RecordChecker, key: str, members: dict[str, bytes]) -> dict | None:
    image = next((members[e] for e in _IMAGE_EXTS if e in members), None)
    if "txt" in members:
        caption, kind = members["txt"], "text"
    elif "json" in members:
        caption, kind = members["json"], "json"
    else:
        caption, kind = None, "text"
    if image is None and caption is None:
        return None  # no image and no caption: not an image-text sample (e.g. only a .cls member)
    return checker.record(key, image, caption, caption_kind=kind)


def build_webdataset(path: str, data_dir: str, *, min_size: int = 0, max_aspect: float = 0.0) -> it.BuildResult:
    """Prepares the tar-shard dataset under `data_dir` unless already there; returns the builder and its counts."""
    config = make_config(path, min_size=min_size, max_aspect=max_aspect)
    builder = WebDatasetShards(config=config, data_dir=str(data_dir), file_format="array_record")
    return it.prepare(builder, data_dir)
