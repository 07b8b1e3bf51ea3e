"""Grain input pipeline for (image, caption) sources: sharded, shuffled, batched, tokenized, checkpointable.

A *source* is any random-access sequence of records ``{"image": ..., "caption": ...}`` where ``image``
is a uint8 [H, W, 3] array (what ``tfds`` ``as_data_source`` returns), encoded PNG/JPEG bytes, or a PIL
image, and ``caption`` is ``str`` or UTF-8 ``bytes``. Examples: a TFDS ``ArrayRecordDataSource``, a
`ediffi_jax.data.shapes.ShapesSource`, or a plain list of dicts.

Batches are dicts with ``image`` float32 [B, H, W, 3] in [-1, 1], ``caption`` an object array of B
Python ``str``, plus whatever ``tokenize(list_of_captions)`` returns.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

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
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index=} {shard_count=}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    if split_batches:
        if not drop_remainder:
            raise ValueError("split_batches needs drop_remainder=True (every shard reads a full block)")
        if len(source) < batch_size * shard_count:
            raise ValueError(f"a source of {len(source)} records holds no global batch of "
                             f"{batch_size} x {shard_count} shards")
        ds = grain.MapDataset.range(len(source))  # record indices; records are read after the split
    else:
        ds = grain.MapDataset.source(source)
        if shard_count > 1:
            ds = ds[shard_index::shard_count]
    if len(ds) == 0:
        raise ValueError(f"shard {shard_index}/{shard_count} of a source of {len(source)} records is empty")
    if seed is not None:
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        ds = ds.shuffle(seed=seed)  # ShuffleMapDataset reshuffles each epoch (epoch-dependent seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    if split_batches:
        global_batch = batch_size * shard_count
        if num_epochs is not None:
            ds = ds[: len(ds) // global_batch * global_batch]  # whole global batches only
        ds = ds.batch(batch_size, drop_remainder=True)[shard_index::shard_count]

        def read_block(k: int, idx: np.ndarray) -> dict[str, np.ndarray]:
            first = (k * shard_count + shard_index) * batch_size  # global stream position of the block's first
            return stack_examples([_apply(transform, decode_record(source[int(i)]), seed, first + j)
                                   for j, i in enumerate(idx)])

        ds = ds.map_with_index(read_block)
    else:
        ds = ds.map(decode_record)
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
