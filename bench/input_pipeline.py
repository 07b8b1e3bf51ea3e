"""Input-pipeline throughput on real-looking data: examples/s of the training pipeline at 64² and 256² with 1 and
2 grain worker processes (and 0 = threads in the trainer process), next to its peers:

    .venv/bin/python bench/input_pipeline.py --num_images 300 --batch_size 32 --num_batches 8

- the single-thread decode+resize rate: `records.Preprocess` (PIL decode, bicubic short-side resize, crop) on the
  same records in one thread with no grain around it (`throughput.measure_decode`), with and without JPEG draft
  decoding (the pipeline decodes JPEGs at the smallest DCT scale whose short side is still ≥ 2R);
- the base model's consumption rate from its measured step time (default: H200, 302.8 ms/step at batch 64 →
  211 images/s): the rate one accelerator host must be fed at.

The script generates its inputs: ``--num_images`` random smooth RGB images of 512 × (448..576) px (low-frequency
noise upsampled, plus fine grain), encoded as JPEG quality 90, held in memory as pipeline records. The pipeline
runs as in training (`pipeline.make_image_text_iterator`, random crops, no tokenizer); one warm-up batch (worker
start-up) is not timed. Numbers depend on the host's free cores: say how loaded it was.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ediffi_jax.data.throughput import measure_decode, measure_pipeline  # noqa: E402


def make_records(n: int, seed: int = 0) -> list[dict]:
    """`n` JPEG (quality 90) records of random smooth images, 512 px tall and 448–576 px wide."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w = int(rng.integers(448, 577))
        low = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, 512), Image.BICUBIC)
        arr = np.clip(np.asarray(low, np.int16) + rng.integers(-12, 13, (512, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        out.append({"image": buf.getvalue(), "caption": f"a smooth random image number {i}", "key": f"{i:06d}"})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_images", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_batches", type=int, default=8, help="timed batches per measurement")
    p.add_argument("--resolutions", default="64,256")
    p.add_argument("--workers", default="0,1,2", help="grain worker processes (0 = threads in this process)")
    p.add_argument("--step_ms", type=float, default=302.8, help="base model step time (H200 measurement)")
    p.add_argument("--step_batch", type=int, default=64, help="batch size of that step")
    args = p.parse_args()

    t = time.perf_counter()
    recs = make_records(args.num_images)
    mb = sum(len(r["image"]) for r in recs) / 2**20
    print(f"{len(recs)} JPEGs (q90, 512x448..576), {mb:.1f} MiB, made in {time.perf_counter() - t:.1f} s; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    consume = args.step_batch / (args.step_ms / 1000)
    rows = []
    for r in (int(x) for x in args.resolutions.split(",")):
        n = args.batch_size * args.num_batches
        for draft in (True, False):
            d = measure_decode(recs, resolution=r, num_examples=n, jpeg_draft=draft)
            rows.append((r, f"1 thread, decode+resize{' (draft)' if draft else ''}", d["examples_per_s"], None))
        peer = rows[-2][2]
        for w in (int(x) for x in args.workers.split(",")):
            m = measure_pipeline(recs, resolution=r, batch_size=args.batch_size, num_workers=w,
                                 num_batches=args.num_batches)
            what = f"pipeline, {w} worker process{'es' if w != 1 else ''}" if w else "pipeline, 0 workers (4 threads)"
            rows.append((r, what, m["examples_per_s"], peer))
    print(f"\nbase model consumption: {args.step_batch} images / {args.step_ms} ms = {consume:.0f} images/s\n")
    print(f"| res | what | examples/s | vs 1-thread decode (draft) | vs model ({consume:.0f}/s) |")
    print("|---|---|---|---|---|")
    for r, what, rate, peer in rows:
        vs_peer = f"{rate / peer:.2f}x" if peer else "1.00x" if "(draft)" in what else ""
        print(f"| {r}² | {what} | {rate:.0f} | {vs_peer} | {rate / consume:.2f}x |")


if __name__ == "__main__":
    main()
