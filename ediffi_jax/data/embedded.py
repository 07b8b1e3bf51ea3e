"""Precomputed-embedding datasets (written by `ediffi-embed`, read by training with `data.precomputed`).

An output directory holds

    <out>/embedded.json   the manifest: format, embedding names and widths, field shapes, storage dtype,
                          the source config (data, encoders, conditioning) and record counts; "complete"
                          turns true only once every split is written
    <out>/encoders/       the frozen encoders the records were embedded with (`setup_encoders` layout; empty
                          for pretrained encoders, which stay where `encoders.*.pretrained_dir` points)
    <out>/tfds/           a TFDS array_record dataset (dataset_info.json, features.json, shards per split)

Records keep the source order: ``image`` (PNG), ``caption`` and, per embedding of `conditioning.order`,
``<name>_tokens`` [L, D], ``<name>_mask`` [L] bool and ``<name>_pooled`` [P] where the encoder gives one;
"clip_image" is stored only as ``clip_image_pooled`` (its single context token is that vector). These are the
fields `encoders.embeddings_from_batch` reads. Embeddings are stored as float32 or float16 (training casts them
to float32).

Everything is TensorFlow-free: records are serialized with the TFDS feature connectors (tensors as raw bytes,
`Encoding.BYTES`) and streamed straight into `ArrayRecordWriter`s, then the TFDS metadata is written, so the
dataset reads back with ``tfds.builder_from_directory(...).as_data_source(split)``. (A `GeneratorBasedBuilder`
would buffer a split in memory and spill past 1 GiB to temporary files through `tf.io.gfile`, i.e. TF.)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.core import dataset_info, file_adapters, naming
from tensorflow_datasets.core import splits as splits_lib
from tensorflow_datasets.core import utils as tfds_utils

MANIFEST = "embedded.json"
FORMAT = "ediffi-embedded/1"
TFDS_DIR = "tfds"
ENCODERS_DIR = "encoders"
DATASET_NAME = "ediffi_embedded"
STORAGE_DTYPES = ("float32", "float16")
KEYED_LAYOUT = "keyed"  # manifest "layout" of a real-data output: one keyed store per split (keyed_embeddings.py)
# The data fields that decide a real-data record's key and cleaned caption (what a keyed output depends on).
KEYED_DATA_FIELDS = ("name", "path", "tfds_name", "caption_key", "captions", "coco_year", "min_size", "max_aspect",
                     "max_caption_chars")
SHARD_BYTES = 512 << 20  # target size of one array_record shard


# ---------------------------------------------------------------- record fields


def flatten_embeddings(embeddings: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """`FrozenEncoders.encode` output → record fields (the inverse of `encoders.embeddings_from_batch`)."""
    out = {}
    for name, e in embeddings.items():
        if name == "clip_image":  # its one context token is the pooled vector
            out["clip_image_pooled"] = e["pooled"]
            continue
        out[f"{name}_tokens"], out[f"{name}_mask"] = e["tokens"], e["mask"]
        if "pooled" in e:
            out[f"{name}_pooled"] = e["pooled"]
    return out


def field_specs(fields: Mapping[str, Any], dtype: str) -> dict[str, dict]:
    """{field: {"shape": per-record shape, "dtype": stored dtype}} of batched fields (arrays or shape structs)."""
    return {k: {"shape": list(v.shape[1:]), "dtype": "bool" if k.endswith("_mask") else dtype}
            for k, v in fields.items()}


def embedding_widths(specs: Mapping[str, Mapping]) -> dict[str, dict[str, int]]:
    """Per embedding name: token width `dim`, token count `length`, pooled width `pooled_dim` (0: none)."""
    out = {}
    for k, s in specs.items():
        if k == "clip_image_pooled":
            out["clip_image"] = {"dim": s["shape"][-1], "length": 1, "pooled_dim": s["shape"][-1]}
        elif k.endswith("_tokens"):
            name = k[: -len("_tokens")]
            pooled = specs.get(f"{name}_pooled")
            out[name] = {"dim": s["shape"][-1], "length": s["shape"][0],
                         "pooled_dim": pooled["shape"][-1] if pooled else 0}
    return out


def features(resolution: int, specs: Mapping[str, Mapping]) -> tfds.features.FeaturesDict:
    """TFDS features of a record; tensors as raw bytes (fast, TF-free, and float16 really takes 2 bytes)."""
    d = {"image": tfds.features.Image(shape=(resolution, resolution, 3), encoding_format="png"),
         "caption": tfds.features.Text()}
    for k, s in specs.items():
        d[k] = tfds.features.Tensor(shape=tuple(s["shape"]), dtype=np.dtype(s["dtype"]),
                                    encoding=tfds.features.Encoding.BYTES)
    return tfds.features.FeaturesDict(d)


# ---------------------------------------------------------------- writing


class SplitWriter:
    """Streams the records of one split, in order, into array_record shards of about `SHARD_BYTES`."""

    def __init__(self, data_dir: str, split: str, feats: tfds.features.FeaturesDict, num_records: int,
                 bytes_per_record: int):
        self.features = feats
        self.template = naming.ShardedFileTemplate(
            data_dir=data_dir, template=naming.DEFAULT_FILENAME_TEMPLATE, dataset_name=DATASET_NAME,
            split=split, filetype_suffix=file_adapters.FileFormat.ARRAY_RECORD.file_suffix)
        if num_records < 1:
            raise ValueError(f"split {split!r} has no records")
        self.num_records = num_records
        shards = max(1, min(num_records, math.ceil(num_records * bytes_per_record / SHARD_BYTES)))
        self.per_shard = math.ceil(num_records / shards)
        self.num_shards = math.ceil(num_records / self.per_shard)
        self.lengths: list[int] = []
        self.num_bytes = 0
        self._writer = None

    def write(self, record: Mapping[str, Any]) -> None:
        if sum(self.lengths) >= self.num_records:
            raise ValueError(f"split {self.template.split!r} expects {self.num_records} records, got more")
        if self._writer is None or self.lengths[-1] == self.per_shard:
            self._close_shard()
            path = self.template.sharded_filepath(shard_index=len(self.lengths), num_shards=self.num_shards)
            self._writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1")
            self.lengths.append(0)
        data = self.features.serialize_example(record)
        self._writer.write(data)
        self.lengths[-1] += 1
        self.num_bytes += len(data)

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> splits_lib.SplitInfo:
        self._close_shard()
        if sum(self.lengths) != self.num_records or len(self.lengths) != self.num_shards:
            raise ValueError(f"split {self.template.split!r}: wrote {sum(self.lengths)} of {self.num_records} "
                             "records")
        return splits_lib.SplitInfo(name=self.template.split, shard_lengths=list(self.lengths),
                                    num_bytes=self.num_bytes, filename_template=self.template)


def write_dataset_info(data_dir: str, feats: tfds.features.FeaturesDict,
                       split_infos: Sequence[splits_lib.SplitInfo]) -> None:
    """TFDS metadata (dataset_info.json, features.json) of the shards written by `SplitWriter`s."""
    identity = dataset_info.DatasetIdentity(name=DATASET_NAME, version=tfds_utils.Version("1.0.0"),
                                            data_dir=data_dir, module_name="")
    info = dataset_info.DatasetInfo(
        builder=identity, features=feats, disable_shuffling=True,
        description="Images and captions with precomputed frozen-encoder embeddings (ediffi-embed).")
    info.set_file_format(file_adapters.FileFormat.ARRAY_RECORD)
    info.set_splits(splits_lib.SplitDict(list(split_infos)))
    info.write_to_directory(data_dir)


# ---------------------------------------------------------------- manifest


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))


def source_key(config: ml_collections.ConfigDict, dtype: str) -> dict:
    """What determines an output's contents: the source data, the encoders, the embeddings and their dtype."""
    data = {k: v for k, v in config.data.to_dict().items() if k not in ("precomputed", "data_dir", "val_examples")}
    emb = {n: {k: config.conditioning.embeddings[n][k] for k in ("dim", "pooled", "pooled_dim")}
           for n in config.conditioning.order}
    return _jsonable({"data": data, "encoders": config.encoders.to_dict(),
                      "conditioning": {"order": list(config.conditioning.order), "embeddings": emb},
                      "dtype": dtype})


def keyed_source_key(config: ml_collections.ConfigDict, dtype: str) -> dict:
    """`source_key` of a keyed output (real data): only what decides the captions and their keys counts, so the
    image pipeline's settings (resolution, crop, workers, ...) may change without re-embedding."""
    key = source_key(config, dtype)
    d = config.data
    key["data"] = _jsonable({**{k: d[k] for k in KEYED_DATA_FIELDS},
                             "splits": [d.split] + ([d.val_split] if d.val_split else [])})
    return key


def first_difference(a: Any, b: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """(dotted key, a's value, b's value) of the first place two JSON trees differ, else None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            d = first_difference(a.get(k, "<unset>"), b.get(k, "<unset>"), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else (prefix.rstrip("."), a, b)


def write_manifest(out: str, manifest: Mapping[str, Any]) -> None:
    path = os.path.join(out, MANIFEST)
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(path + ".tmp", path)


def read_manifest(path: str, what: str) -> dict | None:
    """The manifest of an embed output at `path`, or None when `path` holds none (`what` names it in errors)."""
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        return None
    try:
        with open(file) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{what}: unreadable {MANIFEST}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{what}: {MANIFEST} is not an ediffi-embed manifest of format {FORMAT!r}")
    return manifest


# ---------------------------------------------------------------- reading


def check_matches(manifest: Mapping[str, Any], config: ml_collections.ConfigDict, what: str) -> None:
    """One-line ValueError when the run's conditioning, resolution or encoders differ from the output's."""
    widths = manifest["embeddings"]
    computed = ("clip_image",) if manifest.get("layout") == KEYED_LAYOUT else ()  # from the image, in the step
    for n in config.conditioning.order:
        if n in computed:
            continue
        if n not in widths:
            raise ValueError(f"conditioning.order names {n!r} but {what} holds only the embeddings "
                             f"{tuple(manifest['names'])}")
        e, w = config.conditioning.embeddings[n], widths[n]
        if e.dim != w["dim"]:
            raise ValueError(f"conditioning.embeddings.{n}.dim={e.dim} but {what} holds {n} embeddings of "
                             f"width {w['dim']}")
        if e.pooled == "given" and e.pooled_dim != w["pooled_dim"]:
            raise ValueError(f"conditioning.embeddings.{n}.pooled_dim={e.pooled_dim} but {what} holds {n} "
                             f"pooled embeddings of width {w['pooled_dim']}")
    if "resolution" in manifest and config.data.resolution != manifest["resolution"]:
        r = manifest["resolution"]
        raise ValueError(f"data.resolution={config.data.resolution} but {what} holds {r}x{r} images")
    # The run samples (evaluates) with these encoders: they must be the ones the data was embedded with.
    used = {"t5"} if "t5" in config.conditioning.order else set()
    used |= {"clip"} if {"clip_text", "clip_image"} & set(config.conditioning.order) else set()
    here, there = _jsonable(config.encoders.to_dict()), manifest["source"]["encoders"]
    for tower in sorted(used):
        d = first_difference(there.get(tower, {}), here.get(tower, {}), f"encoders.{tower}.")
        if d:
            raise ValueError(f"{d[0]}={d[2]!r} but {what} was embedded with {d[0]}={d[1]!r}")


def _open_output(path: str, field: str) -> tuple[str, str, dict]:
    """(directory, "field='path'" for messages, manifest) of a complete `ediffi-embed` output; one-line errors."""
    root = os.path.expanduser(path)
    what = f"{field}={path!r}"
    if not os.path.isdir(root):
        raise ValueError(f"{what} is not a directory")
    manifest = read_manifest(root, what)
    if manifest is None:
        raise ValueError(f"{what} has no {MANIFEST}: not an ediffi-embed output")
    if not manifest.get("complete"):
        raise ValueError(f"{what} is an incomplete ediffi-embed output (interrupted?); run ediffi-embed on it again")
    return root, what, manifest


def load_embedded(path: str, config: ml_collections.ConfigDict) -> tuple[Any, Any]:
    """(train source, validation source or None) of an `ediffi-embed` output, after checking it fits `config`.

    Records: {"image": uint8 [R, R, 3], "caption": bytes, <name>_tokens / _mask / _pooled: arrays}.
    """
    root, what, manifest = _open_output(path, "data.precomputed")
    check_matches(manifest, config, what)
    builder = tfds.builder_from_directory(os.path.join(root, manifest["tfds_dir"]))
    train = builder.as_data_source("train")
    val = builder.as_data_source("validation") if "validation" in builder.info.splits else None
    return train, val


def load_keyed(path: str, config: ml_collections.ConfigDict) -> tuple[Any, Any]:
    """(train store, validation store or None) of a real-data `ediffi-embed` output (`KeyedEmbeddings` of
    ``data.split`` and ``data.val_split``), after checking that it was made from this data with these encoders."""
    from ediffi_jax.data.keyed_embeddings import KeyedEmbeddings

    root, what, manifest = _open_output(path, "data.embeddings")
    if manifest.get("layout") != KEYED_LAYOUT:
        raise ValueError(f"{what} is an ediffi-embed output of shapes-like data: train on it with data.precomputed")
    check_matches(manifest, config, what)
    there = manifest["source"]["data"]
    for k in KEYED_DATA_FIELDS:
        if _jsonable(config.data[k]) != there.get(k):
            raise ValueError(f"data.{k}={config.data[k]!r} but {what} was embedded from data.{k}={there.get(k)!r}")
    stores = []
    for split in (config.data.split, config.data.val_split):
        if not split:
            stores.append(None)
        elif split not in manifest["splits"]:
            raise ValueError(f"{what} holds no split {split!r} (has {', '.join(manifest['splits'])}); embed it with "
                             f"ediffi-embed --config.data.split / --config.data.val_split")
        else:
            stores.append(KeyedEmbeddings(os.path.join(root, manifest["splits"][split]["dir"])))
    return stores[0], stores[1]
