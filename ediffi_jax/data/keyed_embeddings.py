"""A keyed store of precomputed embeddings: record ``"key"`` → {field: array}, joined into training examples.

Layout of a store directory (plain NumPy files, memory-mapped when read; no TensorFlow, no database):

    <dir>/keyed_embeddings.json  {"format": "ediffi-keyed-embeddings/1", "count": N,
                                  "fields": {name: {"shape": [...per-record shape], "dtype": "float16"}}}
                                 written last: its presence marks a complete store
    <dir>/keys.npy               [N] fixed-width unicode keys, sorted ascending, unique
    <dir>/<name>.npy             [N, ...] one array per field, row i belonging to keys[i]

A lookup is a binary search in the memory-mapped ``keys.npy`` (O(log N), nothing loaded up front, so every grain
worker process opens the store for free) and a copy of one row per field. Field names are those the encoders'
batch fields use (e.g. ``t5_tokens``, ``t5_mask``, ``clip_text_tokens``, ``clip_text_pooled``: see
`embedded.flatten_embeddings`); the pipeline adds them to the example, and a record whose key is absent is a bad
record (``missing_embedding``), skipped and counted like the others.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ediffi_jax.data.records import BadRecord

MANIFEST = "keyed_embeddings.json"
FORMAT = "ediffi-keyed-embeddings/1"


def write_keyed_embeddings(path: str, keys: Sequence[str], fields: Mapping[str, np.ndarray]) -> None:
    """Writes a store: ``fields[name][i]`` belongs to ``keys[i]`` (any order; keys must be unique and non-empty)."""
    keys = np.asarray([str(k) for k in keys])
    n = len(keys)
    if n == 0 or any(not k for k in keys):
        raise ValueError("need at least one key, and no empty key")
    for name, arr in fields.items():
        if name in ("keys", "image", "caption", "key") or not name.isidentifier():
            raise ValueError(f"field name {name!r} is reserved or not an identifier")
        if len(arr) != n:
            raise ValueError(f"field {name!r} has {len(arr)} rows for {n} keys")
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    dup = sorted_keys[1:][sorted_keys[1:] == sorted_keys[:-1]]
    if len(dup):
        raise ValueError(f"duplicate keys, e.g. {dup[0]!r}")
    os.makedirs(path, exist_ok=True)
    np.save(os.path.join(path, "keys.npy"), sorted_keys)
    spec = {}
    for name, arr in fields.items():
        arr = np.asarray(arr)
        np.save(os.path.join(path, f"{name}.npy"), arr[order])
        spec[name] = {"shape": list(arr.shape[1:]), "dtype": str(arr.dtype)}
    tmp = os.path.join(path, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "count": n, "fields": spec}, f, indent=2)
    os.replace(tmp, os.path.join(path, MANIFEST))


class KeyedEmbeddings:
    """Read side of a store (module docstring). Picklable: pickles its path and reopens lazily."""

    def __init__(self, path: str):
        self.path = os.path.expanduser(path)
        file = os.path.join(self.path, MANIFEST)
        if not os.path.isfile(file):
            raise ValueError(f"{path!r} holds no {MANIFEST}: not a (complete) keyed embedding store")
        with open(file) as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{file}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        self.count: int = int(manifest["count"])
        self.fields: dict[str, dict] = manifest["fields"]
        self._arrays: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {n: np.load(os.path.join(self.path, f"{n}.npy"), mmap_mode="r")
                            for n in ("keys", *self.fields)}
        return self._arrays

    def __len__(self) -> int:
        return self.count

    def row(self, key: str) -> int | None:
        """Row of `key`, or None when absent."""
        keys = self._open()["keys"]
        i = int(np.searchsorted(keys, key))
        return i if i < len(keys) and keys[i] == key else None

    def __contains__(self, key: str) -> bool:
        return self.row(key) is not None

    def lookup(self, key: str) -> dict[str, np.ndarray]:
        """{field: array (a copy)} of `key`; `BadRecord("missing_embedding")` when absent."""
        i = self.row(key) if key else None
        if i is None:
            raise BadRecord("missing_embedding", f"no embeddings for key {key!r}")
        arrays = self._open()
        return {n: np.array(arrays[n][i]) for n in self.fields}
