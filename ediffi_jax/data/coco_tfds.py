"""TFDS builder for COCO captions (2014 by default): the official annotation JSON + the image folders; no download.

``path`` is a COCO root as unzipped from ``annotations_trainval2014.zip``, ``train2014.zip`` and ``val2014.zip``::

    <root>/annotations/captions_train2014.json   (or <root>/captions_train2014.json)
    <root>/annotations/captions_val2014.json
    <root>/train2014/COCO_train2014_000000000009.jpg ...   (or <root>/images/train2014/...)
    <root>/val2014/COCO_val2014_000000000042.jpg ...

Splits ``train`` and ``validation``, each present when its annotation JSON is (a root with only the val files
gives only ``validation``). The JSON has ``images`` ``[{id, file_name, ...}]`` and ``annotations``
``[{image_id, id, caption}]`` (the layout `ediffi_jax.eval.captions.coco_captions` reads for FID-30K prompts).

One record per caption annotation, the pair text-to-image training on COCO uses (each image has ~5 captions):
its image's bytes are stored with each of its records, so a split takes ~5x its image folder on disk (val2014:
6.2 GB of JPEGs -> ~31 GB; train2014: 13 GB -> ~65 GB). Records are ordered by (image id, annotation id) and
keyed ``"<image_id>/<annotation_id>"`` (`image_id_of` gives the image id back), so an image's captions are
consecutive records. FID-30K: draw the prompts with ``coco_captions(captions_val2014.json, 30000, seed)`` (the
image ids it returns are the key prefixes of the validation split, whose records hold the matching reference
images; one image per id, e.g. the first record of each prefix, or the ``val2014/`` folder itself).

Counting (units: annotations; the entries are parsed by `coco_annotations`, shared with the FID prompt draw): an
annotation whose image id is not in ``images`` or whose file is absent is
``missing_image``; one without ``caption`` ``missing_caption``; a non-string caption ``bad_caption``; a repeated
annotation id ``duplicate_key`` (the first in file order wins); an entry that is not an object or lacks its
``image_id`` / ``id`` ``malformed_entry``. An image without any annotation counts once as ``missing_caption``.
Image checks (unreadable, too small, bad aspect) drop every annotation of that image. See
`ediffi_jax.data.image_text` for the record format and the other reasons.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import tensorflow_datasets as tfds

from ediffi_jax.data import coco_annotations
from ediffi_jax.data import image_text as it

SPLITS = {"train": "train", "validation": "val"}


@dataclasses.dataclass(eq=False)
class CocoConfig(it.ImageTextConfig):
    """A COCO root, its year and filters."""

    year: str = "2014"


def find_split_files(path: str, year: str = "2014") -> dict[str, tuple[Any, Any]]:
    """{split: (annotation JSON, image folder)} of the splits whose annotation JSON exists under `path`."""
    root = it.to_path(path)
    if not root.is_dir():
        raise ValueError(f"COCO root {path!r} does not exist or is not a directory")
    found = {}
    for split, prefix in SPLITS.items():
        name = f"captions_{prefix}{year}.json"
        ann = next((p for p in (root / "annotations" / name, root / name) if p.exists()), None)
        if ann is None:
            continue
        images = next((p for p in (root / f"{prefix}{year}", root / "images" / f"{prefix}{year}") if p.is_dir()),
                      None)
        if images is None:
            raise ValueError(f"{ann} has no image folder: expected {root / f'{prefix}{year}'}")
        found[split] = (ann, images)
    if not found:
        raise ValueError(f"no captions_train{year}.json or captions_val{year}.json under {path!r} "
                         "(nor in its annotations/ folder)")
    return found


def make_config(path: str, *, year: str = "2014", min_size: int = 0, max_aspect: float = 0.0) -> CocoConfig:
    """Validated `CocoConfig`; its name hashes the resolved root, year and filters."""
    it.Filters(min_size, max_aspect)  # validates
    find_split_files(path, year)
    options = {"path": it.resolved(path), "year": str(year), "min_size": min_size, "max_aspect": float(max_aspect)}
    return CocoConfig(name=it.config_name(f"coco{year}", options), description=f"{options['path']} (COCO {year})",
                      path=options["path"], year=str(year), min_size=min_size, max_aspect=float(max_aspect))


def image_id_of(key: str) -> int:
    """The COCO image id of a record key "<image_id>/<annotation_id>"."""
    return int(key.split("/", 1)[0])


def read_annotations(path: Any) -> dict[str, Any]:
    """The parsed captions JSON (``images`` and ``annotations`` lists); ValueError naming the file otherwise."""
    try:
        text = it.to_path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return coco_annotations.parse_json(text, path)


class Coco(it.ImageTextBuilder):
    """COCO caption annotations with their images; pass ``config=make_config(root, ...)``."""

    name = "ediffi_coco_captions"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    DESCRIPTION = "COCO captions: one record per (image, caption) annotation, from the official JSON + images."

    def _splits(self) -> dict[str, Any]:
        cfg = self.builder_config
        files = find_split_files(cfg.path, cfg.year)
        return {split: _split_records(ann, images) for split, (ann, images) in files.items()}


def _split_records(ann_path: Any, images_dir: Any) -> Any:
    return lambda checker: _records(checker, ann_path, images_dir)


def _records(checker: it.RecordChecker, ann_path: Any, images_dir: Any) -> Iterator[dict]:
    files, by_image = coco_annotations.parse_annotations(read_annotations(ann_path), ann_path, drop=checker.drop)
    on_disk = {p.name for p in images_dir.iterdir()}
    for image_id in sorted(set(files) | set(by_image)):
        anns = sorted(by_image.get(image_id, []), key=lambda a: a[0])
        if not anns:
            checker.drop("missing_caption", f"image {image_id}", "no annotation")
            continue
        file_name = files.get(image_id)
        present = file_name is not None and (file_name in on_disk or (images_dir / file_name).exists())
        probed: tuple[bytes, int, int] | it.Dropped | None = None
        for ann_id, caption in anns:
            key = f"{image_id}/{ann_id}"
            try:
                if not present:
                    raise it.Dropped("missing_image", f"image {image_id} " + (
                        f"file {file_name} not in {images_dir}" if file_name else "not in 'images'"))
                if caption is None:
                    raise it.Dropped("missing_caption", "annotation without 'caption'")
                text = it.caption_text(caption)
                if probed is None:
                    try:
                        probed = it.probe_image(it.read_bytes(images_dir / file_name, "unreadable_image"))
                    except it.Dropped as e:
                        probed = e
                if isinstance(probed, it.Dropped):
                    raise probed
                yield checker.image_record(key, probed, text)
            except it.Dropped as e:
                checker.drop(e.reason, key, e.detail)


def build_coco(path: str, data_dir: str, *, year: str = "2014", min_size: int = 0,
               max_aspect: float = 0.0) -> it.BuildResult:
    """Prepares the COCO captions dataset under `data_dir` unless already there; returns it and its counts."""
    config = make_config(path, year=year, min_size=min_size, max_aspect=max_aspect)
    return it.prepare(Coco(config=config, data_dir=str(data_dir), file_format="array_record"), data_dir)
