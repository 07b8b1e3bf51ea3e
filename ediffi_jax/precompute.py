"""Precomputing embeddings: run the frozen encoders over a run's data once and store them (`ediffi-embed`).

Shapes-like data (records already at the training size): train on the output with `--config.data.precomputed=DIR`;
the train step then reads T5 / CLIP embeddings from the records instead of running the encoders on every batch
(layout: `ediffi_jax.data.embedded`).

Real data (`data.name` folder | webdataset | coco | tfds): only the captions are read (no image is decoded), each
cleaned as the training pipeline cleans it (`records.clean_caption`), and the text embeddings (T5, CLIP text) are
written as one keyed store per split (`data.split`, and `data.val_split` when set) under `DIR/split_<name>/`
(`ediffi_jax.data.keyed_embeddings`, rows in key order, written as they are computed). Train with
`--config.data.embeddings=DIR`: records are joined to their embeddings by key, "clip_image" (an embedding of the
training image, not of the caption) is still computed in the step. Records without a usable caption or key are
left out (counted in the manifest; training skips them too); a key seen twice in a split is an error.

The source data is loaded as training loads it; the encoders are prepared in `DIR/encoders` as training
prepares them in `<workdir>/encoders` (random ones from their seeds, tokenizers trained on the first 5000 train
captions). Each split is encoded in source order by one compiled function: the batch is split over all devices
(`--batch_size` must divide by the device count), the encoder parameters are replicated, or with `--fsdp N`
sharded over N devices; the last partial batch is padded and the padding dropped. A non-empty `DIR` must be an
earlier output of the same config: a complete one makes the run a no-op, an interrupted one is redone (its
encoders kept). A first run that fails or is interrupted removes what it created, and nothing else.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from typing import Any

import ml_collections
import numpy as np

from ediffi_jax.data import pipeline, records, shapes, sources
from ediffi_jax.data.embedded import (
    ENCODERS_DIR,
    FORMAT,
    KEYED_LAYOUT,
    STORAGE_DTYPES,
    TFDS_DIR,
    SplitWriter,
    embedding_widths,
    features,
    field_specs,
    first_difference,
    flatten_embeddings,
    keyed_source_key,
    read_manifest,
    source_key,
    write_dataset_info,
    write_manifest,
)

log = logging.getLogger(__name__)
_PARTIAL = TFDS_DIR + ".partial"



def _check_out(out: str, key: dict) -> tuple[str, dict | None]:
    """("new" | "redo" | "complete", manifest): what `out` holds; refuses anything but an output of `key`."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file, not a directory")
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    manifest = read_manifest(out, f"--out {out!r}") if entries else None
    if manifest is None:
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ValueError(f"--out {out!r} is not empty ({shown}) and is not an ediffi-embed output; "
                             "choose a new directory")
        return "new", None
    diff = first_difference(manifest.get("source", {}), key)
    if diff:
        kind = "a complete" if manifest.get("complete") else "an incomplete"
        raise ValueError(f"--out {out!r} holds {kind} ediffi-embed output of another config: "
                         f"{diff[0]}={diff[1]!r} there, {diff[2]!r} here")
    return ("complete" if manifest.get("complete") else "redo"), manifest


def _decode(record: dict) -> dict:
    """A source record → the float image and caption training feeds the encoders, plus its PNG for storage."""
    ex = pipeline.decode_record({"image": record["image"], "caption": record["caption"]})
    ex["png"] = shapes.encode_png(pipeline.decode_image(record["image"]))
    return ex


def _stack(examples: list[dict]) -> dict:
    return {"image": np.stack([e["image"] for e in examples]), "caption": [e["caption"] for e in examples],
            "png": [e["png"] for e in examples]}


def _host_batches(src: Any, batch_size: int, num_threads: int = 4) -> Any:
    """In-order batches of decoded records (the last one may be short), prepared by background threads."""
    import grain

    ds = grain.MapDataset.source(src).map(_decode).batch(batch_size, drop_remainder=False, batch_fn=_stack)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=num_threads)))


def embed(config: ml_collections.ConfigDict, out: str, *, batch_size: int = 64, dtype: str = "float32",
          fsdp: int = 1) -> dict[str, Any]:
    """Writes the embedded dataset of `config`'s data to `out`; returns {"skipped": bool, "counts": {split: n}}."""
    import jax

    from ediffi_jax import sharding
    from ediffi_jax.encoders import setup_encoders
    from ediffi_jax.train.loop import load_data, validate

    # ---------------------------------------------------------------- arguments (before touching `out`)
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"--dtype={dtype!r}: expected one of {STORAGE_DTYPES}")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    if jax.process_count() > 1:
        raise ValueError(f"ediffi-embed runs in one process; this is one of {jax.process_count()}")
    n_dev = jax.device_count()
    if batch_size % n_dev:
        raise ValueError(f"--batch_size={batch_size} is not divisible by the {n_dev} devices")
    mesh = sharding.make_mesh(data=-1, fsdp=fsdp)
    config = config.copy_and_resolve_references()
    config.data.precomputed = config.data.embeddings = ""
    validate(config)
    keyed = config.data.name in sources.IMAGE_TEXT_NAMES  # real data: keyed stores of caption embeddings
    out = os.path.abspath(os.path.expanduser(out))
    key = keyed_source_key(config, dtype) if keyed else source_key(config, dtype)
    status, manifest = _check_out(out, key)
    if status == "complete":
        log.info("%s already holds the complete output of this config: nothing to do", out)
        return {"skipped": True, "counts": manifest["counts"]}

    # ---------------------------------------------------------------- input (as training loads it)
    train_src, val_src = load_data(config)
    if keyed:
        splits = {config.data.split: train_src, **({config.data.val_split: val_src} if val_src is not None else {})}
    else:
        splits = {"train": train_src, **({"validation": val_src} if val_src is not None else {})}

    existed = os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    write_manifest(out, {"format": FORMAT, "complete": False, "source": key})
    try:
        # ------------------------------------------------------------ encoders (as training prepares them)
        enc_dir = os.path.join(out, ENCODERS_DIR)
        os.makedirs(enc_dir, exist_ok=True)  # stays empty for pretrained encoders; training copies it
        n_tok = min(len(train_src), 5000)
        captions = (pipeline.decode_caption(train_src[i]["caption"]) for i in range(n_tok))
        if keyed:  # as training's, but a record without a readable caption gives none
            captions = (c for c in (_raw_caption(train_src, i) for i in range(n_tok)) if c is not None)
        encoders = setup_encoders(config, enc_dir, captions=captions)
        if keyed:
            result = _embed_keyed(config, encoders, mesh, splits, out, key, batch_size, dtype, fsdp)
            log.info("embedded %s captions in %.1f s", result["counts"], result["seconds"])
            return {"skipped": False, "counts": result["counts"]}
        params = sharding.shard_state(encoders.params, mesh)

        # ------------------------------------------------------------ encode and write, split by split
        for stale in (_PARTIAL, TFDS_DIR):  # leftovers of an interrupted run of this same config
            shutil.rmtree(os.path.join(out, stale), ignore_errors=True)
        partial = os.path.join(out, _PARTIAL)
        os.makedirs(partial)
        run = _Encoder(encoders, params, mesh, batch_size, dtype)
        infos, counts = [], {}
        t0 = time.perf_counter()
        for split, src in splits.items():
            infos.append(run.split(split, src, partial))
            counts[split] = len(src)
        dt = time.perf_counter() - t0
        write_dataset_info(partial, run.features, infos)
        os.replace(partial, os.path.join(out, TFDS_DIR))
        write_manifest(out, {
            "format": FORMAT, "complete": True, "source": key, "names": list(encoders.names), "dtype": dtype,
            "resolution": run.resolution, "fields": run.specs, "embeddings": embedding_widths(run.specs),
            "counts": counts, "tfds_dir": TFDS_DIR, "encoders_dir": ENCODERS_DIR,
            "batch_size": batch_size, "devices": n_dev, "fsdp": fsdp, "seconds": round(dt, 3)})
    except BaseException:
        if status == "new":  # undo what this run created, so a corrected config can use the same --out
            if existed:
                for name in os.listdir(out):
                    p = os.path.join(out, name)
                    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
            else:
                shutil.rmtree(out, ignore_errors=True)
        raise
    log.info("embedded %s records in %.1f s (%.1f records/s)", counts, dt, sum(counts.values()) / dt)
    return {"skipped": False, "counts": counts}


class _Encoder:
    """One compiled `encode` for the fixed (padded) batch shape, and the writing of its outputs."""

    def __init__(self, encoders: Any, params: Any, mesh: Any, batch_size: int, dtype: str):
        self.encoders, self.params, self.mesh = encoders, params, mesh
        self.batch_size, self.dtype = batch_size, dtype
        self.compiled = self.specs = self.features = self.resolution = None

    def _device_batch(self, host: dict) -> dict:
        import jax

        from ediffi_jax.sharding import batch_sharding

        batch = self.encoders.tokenize(host["caption"])
        if "image" in self.encoders.batch_keys:
            batch["image"] = host["image"]
        pad = self.batch_size - len(host["caption"])
        if pad:  # repeat the last record; its outputs are dropped
            batch = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in batch.items()}
        return {k: jax.device_put(v, batch_sharding(self.mesh, v.ndim)) for k, v in batch.items()}

    def _compile(self, batch: dict, resolution: int | None) -> None:
        import jax

        self.compiled = jax.jit(self.encoders.encode).lower(self.params, batch).compile()
        shapes = flatten_embeddings(jax.eval_shape(self.encoders.encode, self.params, batch))
        self.specs = field_specs(shapes, self.dtype)
        self.resolution = resolution
        self.features = features(resolution, self.specs) if resolution else None

    def _write(self, writer: SplitWriter, host: dict, outputs: Any) -> None:
        import jax

        fields = jax.device_get(flatten_embeddings(outputs))
        for i, (png, caption) in enumerate(zip(host["png"], host["caption"])):
            record = {"image": png, "caption": caption}
            for k, v in fields.items():
                record[k] = v[i].astype(self.specs[k]["dtype"])
            writer.write(record)

    def split(self, name: str, src: Any, data_dir: str) -> Any:
        """Encodes and writes one split; returns its TFDS SplitInfo."""
        from tqdm import tqdm

        writer, pending = None, None
        bar = tqdm(total=len(src), desc=f"embed {name}", unit="rec", dynamic_ncols=True)
        try:
            for host in _host_batches(src, self.batch_size):
                batch = self._device_batch(host)
                if self.compiled is None:
                    self._compile(batch, host["image"].shape[1])
                if writer is None:
                    per_record = sum(int(np.prod(s["shape"])) * np.dtype(s["dtype"]).itemsize
                                     for s in self.specs.values()) + 3 * self.resolution**2 + 256
                    writer = SplitWriter(data_dir, name, self.features, len(src), per_record)
                outputs = self.compiled(self.params, batch)  # dispatched; the previous batch is written meanwhile
                if pending:
                    self._write(writer, *pending)
                    bar.update(len(pending[0]["caption"]))
                pending = (host, outputs)
            if pending:
                self._write(writer, *pending)
                bar.update(len(pending[0]["caption"]))
        finally:
            bar.close()
        return writer.close()


# ---------------------------------------------------------------- real data: keyed stores of caption embeddings


def _raw_caption(src: Any, i: int) -> str | None:
    try:
        return pipeline.decode_caption(src[i]["caption"])
    except Exception:  # unreadable record, no caption, not text: the pipeline skips it too
        return None


def split_dir(split: str) -> str:
    """The directory (under an output) of a split's keyed store: its name with odd characters replaced."""
    return "split_" + re.sub(r"[^A-Za-z0-9_.-]", "_", split)


class _ReadCaption:
    """Record i → (key, cleaned caption, None) as the training pipeline sees them, or (None, None, reason)."""

    def __init__(self, src: Any, max_chars: int):
        self.src, self.max_chars = src, max_chars

    def __call__(self, i: int) -> tuple[str | None, str | None, str | None]:
        try:
            try:
                record = self.src[int(i)]
            except Exception as e:
                raise records.BadRecord("unreadable_record", f"{type(e).__name__}: {e}") from None
            if not hasattr(record, "keys") or "caption" not in record:
                raise records.BadRecord("missing_field")
            caption = records.clean_caption(record["caption"], self.max_chars)
        except records.BadRecord as e:
            return None, None, e.reason
        key = records.record_key(record)
        return (key, caption, None) if key else (None, None, "missing_key")


def read_captions(src: Any, max_chars: int, num_threads: int = 8) -> tuple[list[str], list[str], dict[str, int]]:
    """(keys, cleaned captions, {reason: records skipped}) of a real-data source, in source order. Images are not
    decoded. Records the training pipeline would skip anyway (no caption, not text, empty) are left out, as are
    records without a key ("missing_key"); a key seen twice is an error (its embedding would be ambiguous)."""
    import grain

    ds = grain.MapDataset.range(len(src)).map(_ReadCaption(src, max_chars))
    keys, captions, skipped, first = [], [], {}, {}
    opts = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4 * num_threads)
    for i, (key, caption, reason) in enumerate(ds.to_iter_dataset(opts)):
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        if key in first:
            raise ValueError(f"key {key!r} of records {first[key]} and {i}: keyed embeddings need unique record keys")
        first[key] = i
        keys.append(key)
        captions.append(caption)
    return keys, captions, skipped


def _embed_keyed(config: ml_collections.ConfigDict, encoders: Any, mesh: Any, splits: dict[str, Any], out: str,
                 key: dict, batch_size: int, dtype: str, fsdp: int) -> dict[str, Any]:
    """Encodes every split's cleaned captions (text embeddings only: "clip_image" comes from the training image, so
    the train step computes it) into `out/<split_dir>/`, a keyed store in key order, then the final manifest."""
    import dataclasses

    import jax
    from tqdm import tqdm

    from ediffi_jax import sharding
    from ediffi_jax.data.keyed_embeddings import KeyedEmbeddingsWriter

    names = tuple(n for n in encoders.names if n != "clip_image")
    if not names:
        raise ValueError("conditioning.order has no text embedding to precompute (clip_image is computed from the "
                         "training image in the train step)")
    text = dataclasses.replace(encoders, names=names, params={n: encoders.params[n] for n in names})
    run = _Encoder(text, sharding.shard_state(text.params, mesh), mesh, batch_size, dtype)
    info, counts, t0 = {}, {}, time.perf_counter()
    for split, src in splits.items():
        keys, captions, skipped = read_captions(src, int(config.data.max_caption_chars))
        if not keys:
            raise ValueError(f"split {split!r} has no record with a key and a caption ({skipped})")
        order = np.argsort(np.asarray(keys), kind="stable")
        final = os.path.join(out, split_dir(split))
        partial = final + ".partial"
        for stale in (final, partial):  # leftovers of an interrupted run of this same config
            shutil.rmtree(stale, ignore_errors=True)
        writer, pending = None, None
        bar = tqdm(total=len(keys), desc=f"embed {split}", unit="caption", dynamic_ncols=True)
        try:
            for start in range(0, len(keys), batch_size):
                host = {"caption": [captions[i] for i in order[start:start + batch_size]]}
                batch = run._device_batch(host)
                if run.compiled is None:
                    run._compile(batch, None)
                if writer is None:
                    meta = {"source": key, "names": list(names), "split": split}
                    writer = KeyedEmbeddingsWriter(partial, [keys[i] for i in order], run.specs, meta)
                outputs = run.compiled(run.params, batch)  # dispatched; the previous batch is written meanwhile
                if pending:
                    _write_rows(writer, run.specs, *pending)
                    bar.update(pending[0])
                pending = (len(host["caption"]), outputs)
            _write_rows(writer, run.specs, *pending)
            bar.update(pending[0])
        finally:
            bar.close()
        writer.close()
        os.replace(partial, final)
        info[split] = {"dir": split_dir(split), "count": len(keys), "skipped": skipped}
        counts[split] = len(keys)
        if skipped:
            log.warning("split %s: %d records without a usable caption or key left out: %s", split,
                        sum(skipped.values()), skipped)
    dt = time.perf_counter() - t0
    write_manifest(out, {
        "format": FORMAT, "complete": True, "layout": KEYED_LAYOUT, "source": key, "names": list(names),
        "dtype": dtype, "fields": run.specs, "embeddings": embedding_widths(run.specs), "splits": info,
        "counts": counts, "encoders_dir": ENCODERS_DIR, "batch_size": batch_size, "devices": jax.device_count(),
        "fsdp": fsdp, "seconds": round(dt, 3)})
    return {"counts": counts, "seconds": dt}


def _write_rows(writer: Any, specs: dict, n: int, outputs: Any) -> None:
    import jax

    fields = jax.device_get(flatten_embeddings(outputs))
    writer.write({k: np.asarray(v[:n]).astype(specs[k]["dtype"]) for k, v in fields.items()})
