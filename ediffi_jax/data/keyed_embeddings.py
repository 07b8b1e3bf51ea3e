"""A keyed store of precomputed embeddings: record ``"key"`` → {field: array}, joined into training examples.

Layout of a store directory (plain NumPy files, memory-mapped when read; no TensorFlow, no database):

    <dir>/keyed_embeddings.json  {"format": "ediffi-keyed-embeddings/1", "count": N,
                                  "fields": {name: {"shape": [...per-record shape], "dtype": "float16"}},
                                  "meta": {...}}  (what made it: `ediffi-embed` puts its manifest's facts here)
                                 written last: its presence marks a complete store
    <dir>/keys.npy               [N] fixed-width unicode keys, sorted ascending, unique
    <dir>/<name>.npy             [N, ...] one array per field, row i belonging to keys[i]

A lookup is a binary search in the memory-mapped ``keys.npy`` (O(log N), nothing loaded up front, so every grain
worker process opens the store for free) and a copy of one row per field. Field names are those the encoders'
batch fields use (e.g. ``t5_tokens``, ``t5_mask``, ``clip_text_tokens``, ``clip_text_pooled``: see
`embedded.flatten_embeddings`); the pipeline adds them to the example, and a record whose key is absent is a bad
record (``missing_embedding``), skipped and counted like the others.

`ediffi-embed` on real data writes one store per split (`KeyedEmbeddingsWriter`: rows streamed into memory-mapped
files, never the whole store in memory) beside its manifest and the encoders (`embedded.load_keyed` opens them for
training and checks them against the run's config).
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


def _field_names(names: Any) -> None:
    for name in names:
        if name in ("keys", "image", "caption", "key") or not name.isidentifier():
            raise ValueError(f"field name {name!r} is reserved or not an identifier")


def write_keyed_embeddings(path: str, keys: Sequence[str], fields: Mapping[str, np.ndarray],
                           meta: Mapping[str, Any] | None = None) -> None:
    """Writes a store: ``fields[name][i]`` belongs to ``keys[i]`` (any order; keys must be unique and non-empty).
    ``meta``: JSON-able facts about the store's making (e.g. the encoders), kept in the manifest."""
    keys = np.asarray([str(k) for k in keys])
    n = len(keys)
    _field_names(fields)
    for name, arr in fields.items():
        if len(arr) != n:
            raise ValueError(f"field {name!r} has {len(arr)} rows for {n} keys")
    order = np.argsort(keys, kind="stable")
    specs = {name: {"shape": list(np.shape(arr)[1:]), "dtype": str(np.asarray(arr).dtype)}
             for name, arr in fields.items()}
    writer = KeyedEmbeddingsWriter(path, keys[order], specs, meta)
    writer.write({name: np.asarray(arr)[order] for name, arr in fields.items()})
    writer.close()


class KeyedEmbeddingsWriter:
    """Writes a store row by row without holding it in memory: ``keys`` (all of them, up front, in ascending order,
    unique, non-empty), ``specs`` ``{field: {"shape": per-record shape, "dtype": ...}}``; `write` appends the next
    rows (in key order) straight into memory-mapped ``.npy`` files; `close` checks every row was written and writes
    the manifest last (until then the directory is not a store)."""

    def __init__(self, path: str, keys: Sequence[str], specs: Mapping[str, Mapping[str, Any]],
                 meta: Mapping[str, Any] | None = None):
        keys = np.asarray([str(k) for k in keys])
        if len(keys) == 0 or any(not k for k in keys):
            raise ValueError("need at least one key, and no empty key")
        _field_names(specs)
        if np.any(keys[1:] < keys[:-1]):
            raise ValueError("keys must be given in ascending order")
        dup = keys[1:][keys[1:] == keys[:-1]]
        if len(dup):
            raise ValueError(f"duplicate keys, e.g. {dup[0]!r}")
        self.path, self.count, self.meta = path, len(keys), dict(meta or {})
        self.specs = {n: {"shape": [int(x) for x in s["shape"]], "dtype": str(np.dtype(s["dtype"]))}
                      for n, s in specs.items()}
        os.makedirs(path, exist_ok=True)
        np.save(os.path.join(path, "keys.npy"), keys)
        self._arrays = {n: np.lib.format.open_memmap(os.path.join(path, f"{n}.npy"), mode="w+", dtype=s["dtype"],
                                                     shape=(self.count, *s["shape"]))
                        for n, s in self.specs.items()}
        self.written = 0

    def write(self, fields: Mapping[str, np.ndarray]) -> None:
        """The next rows: ``fields[name]`` [rows, *shape] for every field of ``specs``."""
        if set(fields) != set(self.specs):
            raise ValueError(f"write() needs the fields {sorted(self.specs)}, got {sorted(fields)}")
        rows = {len(v) for v in fields.values()}
        if len(rows) != 1:
            raise ValueError(f"fields of different row counts {sorted(rows)}")
        n = rows.pop()
        if self.written + n > self.count:
            raise ValueError(f"{self.written + n} rows for a store of {self.count} keys")
        for name, v in fields.items():
            if list(np.shape(v)[1:]) != self.specs[name]["shape"]:
                raise ValueError(f"field {name!r} rows of shape {list(np.shape(v)[1:])}, expected "
                                 f"{self.specs[name]['shape']}")
            self._arrays[name][self.written:self.written + n] = v
        self.written += n

    def close(self) -> None:
        if self.written != self.count:
            raise ValueError(f"wrote {self.written} rows of a store of {self.count} keys")
        for arr in self._arrays.values():
            arr.flush()
        self._arrays = {}
        tmp = os.path.join(self.path, MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"format": FORMAT, "count": self.count, "fields": self.specs, "meta": self.meta}, f, indent=2)
        os.replace(tmp, os.path.join(self.path, MANIFEST))


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
        self.meta: dict[str, Any] = manifest.get("meta", {})
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
