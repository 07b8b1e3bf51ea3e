"""`config.data.name` → a prepared dataset and its random-access sources (what `train.loop.load_data` reads).

==============  =========================================================================================
name            source
==============  =========================================================================================
``shapes``      the synthetic shapes set (`shapes_tfds.build_shapes`), generated under ``data.data_dir``
``folder``      a folder of captioned images at ``data.path`` (`folder_tfds.build_folder`; caption layout
                ``data.captions``), prepared under ``data.data_dir`` on first use
``webdataset``  WebDataset tar shard(s) at ``data.path`` (`webdataset_tfds.build_webdataset`)
``coco``        a COCO captions root at ``data.path`` (`coco_tfds.build_coco`, year ``data.coco_year``)
``tfds``        any prepared TFDS dataset: ``data.path`` = its directory (``tfds.builder_from_directory``), or
                ``data.tfds_name`` ("name[/config][:version]") found under ``data.data_dir``; records are read
                as ``{"image": rec[data.image_key], "caption": rec[data.caption_key], "key": ...}``
==============  =========================================================================================

The builders' build-time filters ``data.min_size`` / ``data.max_aspect`` apply to folder, webdataset and coco.
Splits: ``data.split`` for training, ``data.val_split`` ("" = none) for evaluation. Builders are prepared once
(a second call reuses the files); under multi-host training process 0 prepares while the others wait
(`train.loop.load_data`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

NAMES = ("shapes", "folder", "webdataset", "coco", "tfds")
IMAGE_TEXT_NAMES = ("folder", "webdataset", "coco", "tfds")  # real data: read with the bad-record pipeline


def _path(d: ml_collections.ConfigDict) -> str:
    if not d.path:
        raise ValueError(f"data.name={d.name!r} needs data.path")
    return os.path.expanduser(d.path)


def build_folder(d: ml_collections.ConfigDict) -> Any:
    from ediffi_jax.data.folder_tfds import build_folder as build

    return build(_path(d), os.path.expanduser(d.data_dir), captions=d.captions, min_size=d.min_size,
                 max_aspect=d.max_aspect).builder


def build_webdataset(d: ml_collections.ConfigDict) -> Any:
    from ediffi_jax.data.webdataset_tfds import build_webdataset as build

    return build(_path(d), os.path.expanduser(d.data_dir), min_size=d.min_size, max_aspect=d.max_aspect).builder


def build_coco(d: ml_collections.ConfigDict) -> Any:
    from ediffi_jax.data.coco_tfds import build_coco as build

    return build(_path(d), os.path.expanduser(d.data_dir), year=str(d.coco_year), min_size=d.min_size,
                 max_aspect=d.max_aspect).builder


def build_tfds(d: ml_collections.ConfigDict) -> Any:
    """An already prepared TFDS dataset (never downloads or prepares anything)."""
    import tensorflow_datasets as tfds

    if d.path:
        return tfds.builder_from_directory(_path(d))
    if not d.tfds_name:
        raise ValueError("data.name='tfds' needs data.tfds_name (a prepared dataset under data.data_dir) or "
                         "data.path (its directory)")
    builder = tfds.builder(d.tfds_name, data_dir=os.path.expanduser(d.data_dir))
    if not builder.is_prepared():
        raise ValueError(f"data.tfds_name={d.tfds_name!r} is not prepared under data.data_dir={d.data_dir!r}")
    return builder


def build_shapes(d: ml_collections.ConfigDict) -> Any:
    from ediffi_jax.data.shapes_tfds import build_shapes as build

    return build(os.path.expanduser(d.data_dir), d.resolution, d.num_train, d.num_val, d.seed)


BUILDERS = {"shapes": build_shapes, "folder": build_folder, "webdataset": build_webdataset, "coco": build_coco,
            "tfds": build_tfds}


def build(d: ml_collections.ConfigDict) -> Any:
    """The prepared TFDS builder of ``config.data`` (preparing it first where its name builds one)."""
    if d.name not in BUILDERS:
        raise ValueError(f"data.name={d.name!r}: one of {', '.join(NAMES)}")
    return BUILDERS[d.name](d)


class FieldView(Sequence):
    """Random-access view of a source whose records name their fields differently: record i as ``{"image":
    rec[image_key], "caption": rec[caption_key], "key": rec[key_key] or str(i)}``. ``caption_key`` may be dotted
    (``"captions.text"``); a list / array caption gives its first entry. A record lacking a field becomes one
    without it (the pipeline counts it as ``missing_field``)."""

    def __init__(self, source: Sequence, image_key: str = "image", caption_key: str = "caption",
                 key_key: str = "key"):
        self.source, self.image_key, self.caption_key, self.key_key = source, image_key, caption_key, key_key

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        rec = self.source[i]
        out: dict[str, Any] = {"key": str(i)}
        if self.image_key in rec:
            out["image"] = rec[self.image_key]
        cap: Any = rec
        for part in self.caption_key.split("."):
            if not hasattr(cap, "keys") or part not in cap:
                cap = None
                break
            cap = cap[part]
        if isinstance(cap, (list, tuple)) or (isinstance(cap, np.ndarray) and cap.ndim == 1):
            cap = cap[0] if len(cap) else None
        if cap is not None:
            out["caption"] = cap
        if self.key_key in rec:
            out["key"] = rec[self.key_key]
        return out


def image_text_sources(d: ml_collections.ConfigDict, builder: Any) -> tuple[Sequence, Sequence | None]:
    """(train, validation or None) record sources of a real-data builder, in the pipeline's record format."""
    splits = builder.info.splits
    for s in (d.split, d.val_split):
        if s and s not in splits:
            raise ValueError(f"data.name={d.name!r}: no split {s!r} (has {', '.join(splits)})")
    train = builder.as_data_source(d.split)
    val = builder.as_data_source(d.val_split) if d.val_split else None
    if d.name == "tfds":
        train = FieldView(train, d.image_key, d.caption_key)
        val = FieldView(val, d.image_key, d.caption_key) if val is not None else None
    return train, val

