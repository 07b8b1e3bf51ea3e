"""Evaluation over every device of every host: a batched map over indexed items, and the host-side collectives.

`map_indexed` runs a jitted ``step`` over items ``0 .. count-1`` in global batches of ``batch_size`` rows laid out
over a 1-D ``"data"`` mesh of all devices (`ediffi_jax.eval.fid.data_mesh`). Each process loads only the rows its
own devices hold (``load(i)``, e.g. decoding image file i), so on a pod the reading and decoding is split over the
hosts as well as the model's work; the outputs and a per-row status are then all-gathered, so every process ends
with the same result (the features of all images, in index order) and takes the same decisions (stop once
``need`` items were read, raise the same error). One process is the same code with the collectives skipped.

``load(i)`` returns a tuple of NumPy arrays (one example of each of ``step``'s inputs), `UNREADABLE` (the item is
skipped and counted, e.g. a truncated PNG), or raises. Every readable item must have the shapes of the first one
(the *template*, item 0's or the first readable); another shape is an error raised on every process naming the
item. Rows past ``count`` and unreadable rows are zeros and are dropped from the result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

__all__ = ["UNREADABLE", "MapResult", "map_indexed", "local_rows", "allgather_rows", "barrier", "is_writer",
           "process_share"]

UNREADABLE = None  # what `load` returns for an item to skip
_OK, _SKIPPED, _WRONG_SHAPE, _PAD = 0, 1, 2, 3


@dataclasses.dataclass
class MapResult:
    """``outputs``: ``step``'s rows of the kept items, in index order; ``kept`` / ``skipped``: their indices."""

    outputs: np.ndarray
    kept: list[int]
    skipped: list[int]


def local_rows(mesh: Mesh, batch_size: int) -> slice:
    """The rows of a global batch (split over every axis of ``mesh``) that this process's devices hold."""
    sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    spans = sorted({(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
                    for s in sharding.addressable_devices_indices_map((batch_size,)).values()})
    start, stop = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != stop - start:
        raise ValueError(f"this process's devices hold rows {spans} of the batch: not one block (order the mesh's "
                         "devices by process)")
    return slice(start, stop)


def _put(local: np.ndarray, sharding: NamedSharding, rows: int) -> jax.Array:
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local, (rows, *local.shape[1:]))


def _fetch(x: jax.Array) -> np.ndarray:
    if jax.process_count() == 1 or x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def allgather_rows(x: np.ndarray) -> np.ndarray:
    """The row-wise concatenation, in process order, of every process's ``x`` (rows may differ per process)."""
    if jax.process_count() == 1:
        return x
    n = np.asarray(multihost_utils.process_allgather(np.int32(len(x))))
    padded = np.zeros((int(n.max()), *x.shape[1:]), x.dtype)
    padded[: len(x)] = x
    every = np.asarray(multihost_utils.process_allgather(padded))
    return np.concatenate([every[p, : n[p]] for p in range(len(n))])


def is_writer() -> bool:
    """Whether this process writes the shared files (reports, caches, generated images' metadata): process 0."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (no-op on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def process_share(items: Sequence[Any]) -> list[Any]:
    """This process's items: every ``process_count()``-th, starting at ``process_index()``."""
    return list(items[jax.process_index():: jax.process_count()])


def _template(load: Callable[[int], Any], count: int) -> tuple[int, tuple[np.ndarray, ...]]:
    """(index, example) of the first readable item: every process reads the same ones, so all agree."""
    for i in range(count):
        item = load(i)
        if item is not UNREADABLE:
            return i, tuple(np.asarray(a) for a in item)
    raise ValueError(f"none of the {count} items is readable")


def map_indexed(step: Callable[..., jax.Array], load: Callable[[int], Any], count: int, batch_size: int, *,
                mesh: Mesh, need: int | None = None, replicated: Sequence[Any] = (), progress: bool = True,
                desc: str = "", unit: str = "img", name: Callable[[int], str] = str) -> MapResult:
    """Runs ``step(*replicated, *batch_inputs)`` (jitted by the caller) over the items (see the module docstring).

    ``replicated`` are arguments put whole on every device (e.g. parameters). ``need``: stop once that many items
    were read (the first ``need`` readable ones are kept); None reads all. ``name(i)`` names item i in errors.
    ``batch_size`` must be a multiple of the mesh's device count.
    """
    if batch_size < 1 or batch_size % mesh.size:
        raise ValueError(f"batch_size={batch_size} must be a positive multiple of the {mesh.size} devices of the mesh")
    if count < 1:
        raise ValueError("no items to evaluate")
    rows = local_rows(mesh, batch_size)
    split = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    rep = jax.device_put(tuple(replicated), NamedSharding(mesh, P()))
    t_index, template = _template(load, count)
    target = count if need is None else min(need, count)

    def dispatch(start: int):
        local = [np.zeros((rows.stop - rows.start, *a.shape), a.dtype) for a in template]
        status = np.full((rows.stop - rows.start,), _PAD, np.int32)
        for r in range(rows.start, rows.stop):
            i = start + r
            if i >= count:
                continue
            item = template if i == t_index else load(i)
            if item is UNREADABLE:
                status[r - rows.start] = _SKIPPED
                continue
            item = tuple(np.asarray(a) for a in item)
            if any(a.shape != t.shape for a, t in zip(item, template)):
                status[r - rows.start] = _WRONG_SHAPE
                continue
            for buf, a in zip(local, item):
                buf[r - rows.start] = a
            status[r - rows.start] = _OK
        status = _fetch(_put(status, split, batch_size))  # every row's status, on every process
        bad = np.flatnonzero(status == _WRONG_SHAPE)
        if len(bad):  # raised by every process alike, before anything runs
            shapes = [t.shape for t in template]
            raise ValueError(f"{name(start + int(bad[0]))} does not have the shape of {name(t_index)} {shapes}: "
                             "items of one evaluation must share a size")
        return step(*rep, *(_put(b, split, batch_size) for b in local)), status

    outputs: list[np.ndarray] = []
    kept: list[int] = []
    skipped: list[int] = []
    pending = None
    start = ready = 0  # ready: readable rows dispatched so far (statuses are known at dispatch)
    with tqdm(total=target, unit=unit, desc=desc, disable=not progress) as bar:
        while True:
            nxt = dispatch(start) if start < count and ready < target else None
            if nxt is not None:
                ready += int(np.sum(nxt[1] == _OK))
            if pending is not None:  # fetched after the next batch is dispatched: loading overlaps the compute
                (out, status), p_start = pending
                out = _fetch(out)
                for r, s in enumerate(status):
                    if len(kept) == target:  # items after the last one needed are not looked at
                        break
                    if s == _SKIPPED:
                        skipped.append(p_start + r)
                    elif s == _OK:
                        kept.append(p_start + r)
                        outputs.append(out[r])
                        bar.update(1)
            if nxt is None:
                break
            pending, start = (nxt, start), start + batch_size
    if not outputs:
        raise ValueError(f"no readable items among {count} ({len(skipped)} unreadable)")
    return MapResult(np.stack(outputs), kept, skipped)
