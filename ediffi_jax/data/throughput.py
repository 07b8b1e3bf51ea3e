"""Input-pipeline throughput on this host: examples/s of the training pipeline, and of decode+resize alone.

`measure_pipeline` times the pipeline training uses on real data (`pipeline.make_image_text_iterator`: decode,
short-side bicubic resize, random crop, caption cleanup, bad records skipped; no tokenizer) after warm-up batches,
one per worker (worker start-up and first reads are reported separately as ``first_batch_s``). `measure_decode`
is its peer: the same per-record work (`records.Preprocess`) in one thread of this process, no grain around it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from ediffi_jax.data import pipeline
from ediffi_jax.data.records import Preprocess


def measure_pipeline(source: Sequence, *, resolution: int, batch_size: int, num_workers: int, num_batches: int,
                     seed: int = 0) -> dict[str, float]:
    """{"examples_per_s", "seconds", "batches", "examples", "first_batch_s", "bad_records"} of `num_batches`
    batches after max(1, num_workers) warm-up batches (``num_workers`` grain worker processes; 0 = threads of this
    process)."""
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    t0 = time.perf_counter()
    it = pipeline.make_image_text_iterator(source, preprocess=Preprocess(resolution), batch_size=batch_size,
                                           seed=seed, num_workers=num_workers)
    try:
        for _ in range(max(1, num_workers)):  # chunks go round-robin: one batch from every worker once it is up
            next(it)
        t1 = time.perf_counter()
        n = 0
        for _ in range(num_batches):
            n += len(next(it)["image"])
        t2 = time.perf_counter()
        bad = sum(it.bad_records.values())
    finally:
        it.close()
    return {"examples_per_s": n / (t2 - t1), "seconds": t2 - t1, "batches": float(num_batches),
            "examples": float(n), "first_batch_s": t1 - t0, "bad_records": float(bad)}


def measure_decode(source: Sequence, *, resolution: int, num_examples: int, jpeg_draft: bool = True,
                   seed: int = 0) -> dict[str, float]:
    """{"examples_per_s", "seconds", "examples"}: `records.Preprocess` on records 0, 1, ... of `source` (cycling)
    in this thread, no grain, no batching: the single-thread decode+resize+crop rate."""
    import numpy as np

    prep = Preprocess(resolution, jpeg_draft=jpeg_draft)
    rng = np.random.default_rng(seed)
    records = [source[i % len(source)] for i in range(min(num_examples, len(source)))]  # read outside the timing
    t0 = time.perf_counter()
    for i in range(num_examples):
        prep(records[i % len(records)], rng)
    dt = time.perf_counter() - t0
    return {"examples_per_s": num_examples / dt, "seconds": dt, "examples": float(num_examples)}
