"""Grain input pipeline for (image, caption) sources: sharded, shuffled, batched, tokenized, checkpointable.

A *source* is any random-access sequence of records ``{"image": ..., "caption": ...}`` where ``image``
is a uint8 [H, W, 3] array (what ``tfds`` ``as_data_source`` returns), encoded PNG/JPEG bytes, or a PIL
image, and ``caption`` is ``str`` or UTF-8 ``bytes``. Examples: a TFDS ``ArrayRecordDataSource``, a
`ediffi_jax.data.shapes.ShapesSource`, or a plain list of dicts.

Batches are dicts with ``image`` float32 [B, H, W, 3] in [-1, 1], ``caption`` an object array of B
Python ``str``, plus whatever ``tokenize(list_of_captions)`` returns.

Two pipelines share the sharding / shuffling / seeding scheme:
- `make_train_iterator` (shapes, precomputed embeddings): records already at the training size and clean.
- `make_image_text_iterator` (real data: folder, WebDataset, COCO, any TFDS set): `records.Preprocess` decodes,
  resizes and crops each record and cleans its caption; bad records are skipped and counted per reason (the
  counts live in the iterator state); optional grain worker processes (`num_workers`) and keyed embeddings.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from ediffi_jax.data.keyed_embeddings import KeyedEmbeddings
from ediffi_jax.data.records import BAD_REASONS, BadRecord, Preprocess, to_float

log = logging.getLogger(__name__)

Tokenizer = Callable[[list[str]], dict[str, np.ndarray]]
# A per-example transform after decoding (e.g. `sr.pair_transform`: low-res pair, aligned random crops); its rng
# depends only on (seed, the example's position in the stream), so it is reproducible and resumes exactly.
Transform = Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]
_RESERVED_KEYS = ("image", "caption")


def decode_image(image: Any) -> np.ndarray:
    """uint8 [H, W, 3] array from a uint8 array, encoded image bytes, or a PIL image."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        from PIL import Image

        with Image.open(io.BytesIO(bytes(image))) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    elif hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image.Image
        arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    else:
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image array, got dtype {arr.dtype}")
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {arr.shape}")
    return arr


def decode_caption(caption: Any) -> str:
    """Python str from a str, UTF-8 bytes, or a 0-d NumPy bytes/str array."""
    if isinstance(caption, np.ndarray):
        caption = caption.item()
    if isinstance(caption, (bytes, bytearray, np.bytes_)):
        return bytes(caption).decode("utf-8")
    if isinstance(caption, str):
        return str(caption)
    raise ValueError(f"expected a str or bytes caption, got {type(caption).__name__}")


def decode_record(record: dict) -> dict[str, Any]:
    """One source record -> {"image": float32 [H, W, 3] in [-1, 1], "caption": str, **other fields}.

    Other fields (e.g. precomputed embeddings, see `cli/embed.py`) pass through as NumPy arrays."""
    missing = [k for k in _RESERVED_KEYS if k not in record]
    if missing:
        raise ValueError(f"record is missing keys {missing}; has {sorted(record)}")
    img = decode_image(record["image"]).astype(np.float32) * np.float32(1.0 / 127.5) - np.float32(1.0)
    out = {k: np.asarray(v) for k, v in record.items() if k not in _RESERVED_KEYS}
    out.update(image=img, caption=decode_caption(record["caption"]))
    return out


def stack_examples(examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Batch decoded examples: arrays stacked, captions as an object array of Python str."""
    captions = np.empty(len(examples), dtype=object)
    captions[:] = [ex["caption"] for ex in examples]
    out = {k: np.stack([ex[k] for ex in examples]) for k in examples[0] if k != "caption"}
    out["caption"] = captions
    return out


def _tokenize_batch(tokenize: Tokenizer) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    def fn(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        extra = tokenize(list(batch["caption"]))
        clash = [k for k in extra if k in _RESERVED_KEYS]
        if clash:
            raise ValueError(f"tokenize() must not return the reserved keys {clash}")
        out = dict(batch)
        out.update({k: np.asarray(v) for k, v in extra.items()})
        return out

    return fn


def record_order(
    n: int,
    *,
    batch_size: int,
    seed: int | None,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    split_batches: bool = False,
) -> grain.MapDataset:
    """The record indices (of a source of ``n`` records) this shard reads, in order: shard -> shuffle (reseeded
    every epoch; ``seed=None`` keeps the order) -> repeat (``num_epochs=None``: forever). With ``split_batches``
    the items are this shard's blocks (index arrays of ``batch_size``) of every global batch of ``batch_size *
    shard_count`` indices (see `make_dataset`); otherwise single indices."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index=} {shard_count=}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    if seed is not None and not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    ds = grain.MapDataset.range(n)
    if split_batches:
        if n < batch_size * shard_count:
            raise ValueError(f"a source of {n} records holds no global batch of {batch_size} x {shard_count} shards")
    elif shard_count > 1:
        ds = ds[shard_index::shard_count]
    if len(ds) == 0:
        raise ValueError(f"shard {shard_index}/{shard_count} of a source of {n} records is empty")
    if seed is not None:
        ds = ds.shuffle(seed=seed)  # ShuffleMapDataset reshuffles each epoch (epoch-dependent seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    if split_batches:
        global_batch = batch_size * shard_count
        if num_epochs is not None:
            ds = ds[: len(ds) // global_batch * global_batch]  # whole global batches only
        ds = ds.batch(batch_size, drop_remainder=True)[shard_index::shard_count]
    return ds


def make_dataset(
    source: Sequence,
    *,
    batch_size: int,
    seed: int | None,
    tokenize: Tokenizer | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    split_batches: bool = False,
    transform: Transform | None = None,
) -> grain.MapDataset:
    """The batched grain ``MapDataset``: shard -> shuffle (reseeded every epoch) -> repeat -> decode -> batch.

    ``seed=None`` disables shuffling. ``num_epochs=None`` repeats forever.

    Sharding: by default shard ``i`` owns the records ``i::shard_count`` and shuffles them on its own. With
    ``split_batches=True`` every shard walks the same shuffled order in global batches of
    ``batch_size * shard_count`` records and reads (and decodes) only its own block ``i`` of ``batch_size`` of
    each, so the sequence of global batches is the same for any ``shard_count`` (1 host or 64 see the same
    examples at each step) and with ``shard_count=1`` it equals the default, iterator state included.

    ``transform(example, rng)`` runs on each decoded example with ``rng`` seeded by (``seed``, the example's
    position in this shard's stream; in ``split_batches`` mode its position in the global stream).
    """
    if split_batches and not drop_remainder:
        raise ValueError("split_batches needs drop_remainder=True (every shard reads a full block)")
    ds = record_order(len(source), batch_size=batch_size, seed=seed, shard_index=shard_index,
                      shard_count=shard_count, num_epochs=num_epochs, split_batches=split_batches)
    if split_batches:
        def read_block(k: int, idx: np.ndarray) -> dict[str, np.ndarray]:
            first = (k * shard_count + shard_index) * batch_size  # global stream position of the block's first
            return stack_examples([_apply(transform, decode_record(source[int(i)]), seed, first + j)
                                   for j, i in enumerate(idx)])

        ds = ds.map_with_index(read_block)
    else:
        ds = ds.map(lambda i: decode_record(source[int(i)]))
        if transform is not None:
            ds = ds.map_with_index(lambda pos, ex: _apply(transform, ex, seed, pos))
        ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=stack_examples)
    if tokenize is not None:
        ds = ds.map(_tokenize_batch(tokenize))
    return ds


def _apply(transform: Transform | None, example: dict[str, Any], seed: int | None, pos: int) -> dict[str, Any]:
    if transform is None:
        return example
    return transform(example, np.random.default_rng([seed or 0, pos]))


def make_train_iterator(
    source: Sequence,
    *,
    batch_size: int,
    seed: int,
    tokenize: Tokenizer | None,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    num_threads: int = 4,
    prefetch_batches: int = 8,
    split_batches: bool = False,
    transform: Transform | None = None,
) -> grain.DatasetIterator:
    """Checkpointable training iterator over this process's shard (every shard_count-th record, or with
    ``split_batches`` its block of every global batch: see `make_dataset`).

    ``it.get_state()`` is a JSON-serialisable dict; ``it.set_state(state)`` on a fresh iterator built
    with the same arguments resumes exactly. Batches: see the module docstring.
    """
    ds = make_dataset(
        source,
        batch_size=batch_size,
        seed=seed,
        tokenize=tokenize,
        shard_index=shard_index,
        shard_count=shard_count,
        num_epochs=num_epochs,
        split_batches=split_batches,
        transform=transform,
    )
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches)
    return iter(ds.to_iter_dataset(read_options))


def make_eval_batches(
    source: Sequence,
    batch_size: int,
    num_batches: int,
    *,
    tokenize: Tokenizer | None = None,
    transform: Transform | None = None,
) -> list[dict[str, np.ndarray]]:
    """The first ``num_batches`` full batches of ``source``, in order (no shuffle), as batch dicts (``transform``
    with rng seeded by (0, position))."""
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    if batch_size * num_batches > len(source):
        raise ValueError(
            f"source has {len(source)} records, fewer than {num_batches} batches of {batch_size}"
        )
    ds = grain.MapDataset.source(source)[: batch_size * num_batches].map(decode_record)
    if transform is not None:
        ds = ds.map_with_index(lambda pos, ex: _apply(transform, ex, 0, pos))
    ds = ds.batch(batch_size, drop_remainder=True, batch_fn=stack_examples)
    if tokenize is not None:
        ds = ds.map(_tokenize_batch(tokenize))
    return [ds[i] for i in range(num_batches)]


# ---------------------------------------------------------------- real image–text data: bad records skipped


class _ReadChunk:
    """Chunk k of a shard's record stream (``batch_size`` record indices) → the surviving examples, stacked, and
    per-reason counts of the skipped ones. A picklable callable: it runs in grain worker processes."""

    def __init__(self, source: Sequence, preprocess: Preprocess, transform: Transform | None,
                 embeddings: KeyedEmbeddings | None, seed: int | None, batch_size: int, shard_index: int,
                 shard_count: int, split_batches: bool):
        self.source, self.preprocess, self.transform, self.embeddings = source, preprocess, transform, embeddings
        self.seed, self.batch_size = seed or 0, batch_size
        self.shard_index, self.shard_count, self.split_batches = shard_index, shard_count, split_batches

    def __call__(self, k: int, idx: np.ndarray) -> dict[str, Any]:
        # Stream position of the chunk's first record: its place in the global stream with split_batches.
        first = ((k * self.shard_count + self.shard_index) if self.split_batches else k) * self.batch_size
        bad = np.zeros(len(BAD_REASONS), np.int64)
        examples = []
        for j, i in enumerate(np.asarray(idx).reshape(-1)):
            rng = np.random.default_rng([self.seed, first + j])
            try:
                try:
                    record = self.source[int(i)]
                except Exception as e:  # a source that decodes features itself (TFDS) fails here
                    raise BadRecord("unreadable_record", f"{type(e).__name__}: {e}") from None
                ex = self.preprocess(record, rng)
                if self.embeddings is not None:
                    ex.update(self.embeddings.lookup(ex["key"]))
                if self.transform is not None:  # e.g. sr.pair_transform: works on the float image
                    ex = self.transform({**ex, "image": to_float(ex["image"])}, rng)
            except BadRecord as e:
                bad[BAD_REASONS.index(e.reason)] += 1
                log.debug("skipped record %d: %s", int(i), e)
                continue
            examples.append(ex)
        return {"batch": _stack(examples) if examples else None, "bad": bad}


def _stack(examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    out = {}
    for k in examples[0]:
        if isinstance(examples[0][k], str):
            out[k] = np.empty(len(examples), dtype=object)
            out[k][:] = [ex[k] for ex in examples]
        else:
            out[k] = np.stack([ex[k] for ex in examples])
    return out


class ImageTextIterator(grain.DatasetIterator):
    """Batches of exactly ``batch_size`` surviving examples from a stream of chunks; checkpointable.

    The state is ``{"parent": <grain state before the chunk the next example comes from>, "offset": examples of
    that chunk already used, "bad_records": {reason: count}}``: restoring re-reads that one chunk (without counting
    it again), so a resumed iterator yields exactly the batches, and reports exactly the counts, of an
    uninterrupted one. ``bad_records``: per-reason counts of the records skipped in the chunks consumed so far.
    """

    def __init__(self, parent: grain.DatasetIterator, batch_size: int, tokenize: Tokenizer | None,
                 drop_remainder: bool = True):
        super().__init__(parent)
        self._src_it, self._batch_size, self._drop_remainder = parent, batch_size, drop_remainder
        self._tokenize = _tokenize_batch(tokenize) if tokenize is not None else None
        self._chunk: dict[str, np.ndarray] | None = None  # the current chunk's surviving examples
        self._chunk_state: Any = None  # parent state before the current chunk
        self._offset = 0  # examples of the current chunk used
        self._bad = np.zeros(len(BAD_REASONS), np.int64)  # counts of every chunk pulled so far
        self._restored: dict[str, Any] | None = None  # set_state's state, until its chunk is re-read

    @property
    def bad_records(self) -> dict[str, int]:
        return dict(zip(BAD_REASONS, (int(x) for x in self._bad)))

    def _remaining(self) -> int:
        return 0 if self._chunk is None else len(self._chunk["image"]) - self._offset

    def _next_chunk(self) -> None:
        state = self._src_it.get_state()
        chunk = next(self._src_it)  # StopIteration propagates
        self._chunk, self._chunk_state, self._offset = chunk["batch"], state, 0
        if self._restored is not None:  # the chunk a restored state points into: counted before the save
            self._offset = min(int(self._restored["offset"]), self._remaining())
            self._restored = None
        else:
            self._bad += np.asarray(chunk["bad"], np.int64)

    def __next__(self) -> dict[str, np.ndarray]:
        pieces, need = [], self._batch_size
        while need:
            if self._remaining() == 0:
                try:
                    self._next_chunk()
                except StopIteration:
                    if pieces and not self._drop_remainder:
                        break
                    raise
                continue
            take = min(need, self._remaining())
            pieces.append({k: v[self._offset:self._offset + take] for k, v in self._chunk.items()})
            self._offset += take
            need -= take
        batch = pieces[0] if len(pieces) == 1 else {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
        if batch["image"].dtype == np.uint8:  # chunks carry uint8 images unless a transform made them float
            batch = {**batch, "image": to_float(batch["image"])}
        return self._tokenize(batch) if self._tokenize else batch

    def get_state(self) -> dict[str, Any]:
        if self._restored is not None:
            return dict(self._restored)
        if self._remaining() == 0:  # nothing buffered: the parent's position says it all
            return {"parent": self._src_it.get_state(), "offset": 0, "bad_records": self.bad_records}
        return {"parent": self._chunk_state, "offset": self._offset, "bad_records": self.bad_records}

    def set_state(self, state: dict[str, Any]) -> None:
        self._src_it.set_state(state["parent"])
        self._bad = np.asarray([int(state["bad_records"].get(r, 0)) for r in BAD_REASONS], np.int64)
        self._chunk, self._chunk_state, self._offset = None, None, 0
        self._restored = dict(state) if int(state["offset"]) > 0 else None

    def close(self) -> None:
        close = getattr(self._src_it, "close", None)
        if close is not None:
            close()


def make_image_text_dataset(
    source: Sequence,
    *,
    preprocess: Preprocess,
    batch_size: int,
    seed: int | None,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    split_batches: bool = False,
    transform: Transform | None = None,
    embeddings: KeyedEmbeddings | None = None,
) -> grain.MapDataset:
    """The grain ``MapDataset`` of chunks ``{"batch": stacked surviving examples or None, "bad": counts}``:
    this shard's record stream (sharded and shuffled as in `make_dataset`, reshuffled every epoch) cut into chunks
    of ``batch_size`` records, each read with ``preprocess`` (+ ``embeddings`` joined by key, + ``transform``;
    one rng per record seeded by (seed, its stream position)). `make_image_text_iterator` re-batches them."""
    ds = record_order(len(source), batch_size=batch_size, seed=seed, shard_index=shard_index,
                      shard_count=shard_count, num_epochs=num_epochs, split_batches=split_batches)
    if not split_batches:
        ds = ds.batch(batch_size, drop_remainder=False)
    return ds.map_with_index(_ReadChunk(source, preprocess, transform, embeddings, seed, batch_size, shard_index,
                                        shard_count, split_batches))


def make_image_text_iterator(
    source: Sequence,
    *,
    preprocess: Preprocess,
    batch_size: int,
    seed: int,
    tokenize: Tokenizer | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    split_batches: bool = False,
    transform: Transform | None = None,
    embeddings: KeyedEmbeddings | None = None,
    num_workers: int = 0,
    num_threads: int = 4,
    prefetch_batches: int = 8,
    drop_remainder: bool = True,
) -> ImageTextIterator:
    """Checkpointable training iterator over real image–text records that skips and counts bad records.

    Bad-record policy: a record that cannot be read, has no image or caption, an empty / undecodable image, a
    non-text or empty caption, or (with ``embeddings``) no embedding for its key is skipped and counted under its
    reason (`records.BAD_REASONS`); nothing is re-read in its place. Batches are the next ``batch_size`` surviving
    records of this shard's stream in order, so for a given seed and data the batches are deterministic, and they do
    not depend on ``num_workers`` (workers read whole chunks; chunk k goes to worker k mod num_workers and grain
    interleaves them back in order). The counts are part of the iterator state, so they survive a resume. With
    ``split_batches`` a host's batches are the surviving records of its blocks of the global batches: the same for
    any number of hosts while no record is bad; each bad record shifts only its own host's stream.

    ``num_workers`` = 0: chunks are read by ``num_threads`` threads of this process; > 0: by that many grain worker
    processes (each with ``num_threads`` threads), ``prefetch_batches`` chunks buffered. Tokenization and
    re-batching run in this process. Batches: ``image`` float32 [B, R, R, 3] in [-1, 1], ``caption`` and ``key``
    object arrays of str, ``lowres`` (SR ``transform``), the embedding fields, and ``tokenize``'s fields.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    ds = make_image_text_dataset(source, preprocess=preprocess, batch_size=batch_size, seed=seed,
                                 shard_index=shard_index, shard_count=shard_count, num_epochs=num_epochs,
                                 split_batches=split_batches, transform=transform, embeddings=embeddings)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches))
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags (defaults outside an absl app)
            flags.FLAGS.mark_as_parsed()
        per_worker = max(1, -(-prefetch_batches // num_workers))
        it_ds = it_ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=per_worker))
    return ImageTextIterator(iter(it_ds), batch_size, tokenize, drop_remainder=drop_remainder)
