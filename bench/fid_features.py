"""Throughput of FID feature extraction (our InceptionV3 at 299², `ediffi_jax.eval.fid.extract_features`) on one
device and on N devices, the batch sharded over a 1-D "data" mesh:

    .venv/bin/python bench/fid_features.py --num 64 --batch_size 16 --devices 8

JAX fixes its device count when the backend starts, so each measurement runs in a fresh child process; on a CPU
machine the N devices are fake host devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``) sharing the
same cores, so the ratio shows the cost of sharding there, not a speed-up. Random weights in pytorch-fid's layout
(`ediffi_jax.eval.smoke`) are written to a temporary file (same FLOPs as the real ones). Each child compiles
and runs one warm-up batch first (not timed), then times ``--num`` random 64×64 uint8 images (resized to 299²
inside the network, as for generated images) and prints images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def child(weights: str, num: int, batch_size: int, size: int) -> dict:
    import jax

    from ediffi_jax.eval.fid import extract_features
    from ediffi_jax.models.inception import load_pytorch_fid_weights

    model = load_pytorch_fid_weights(weights)
    rng = np.random.default_rng(0)
    warm = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    images = rng.integers(0, 256, (num, size, size, 3), dtype=np.uint8)
    t = time.perf_counter()
    extract_features(model, warm, batch_size, progress=False)  # compile + one batch
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    feats = extract_features(model, images, batch_size, progress=False)
    run_s = time.perf_counter() - t
    assert feats.shape == (num, 2048) and np.isfinite(feats).all()
    return {"devices": jax.device_count(), "platform": jax.devices()[0].platform, "num": num,
            "batch_size": batch_size, "seconds": run_s, "images_per_s": num / run_s, "warmup_s": compile_s}


def run_child(devices: int, weights: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
        env["JAX_PLATFORMS"] = "cpu"  # fake devices are host devices
    env["XLA_FLAGS"] = " ".join(flags)
    cmd = [sys.executable, __file__, "--child", "--weights", weights, "--num", str(args.num), "--batch_size",
           str(args.batch_size), "--size", str(args.size)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"child with {devices} device(s) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=64, help="timed images per configuration")
    p.add_argument("--batch_size", type=int, default=16, help="must be a multiple of --devices")
    p.add_argument("--devices", type=int, default=8, help="device count of the sharded run")
    p.add_argument("--size", type=int, default=64, help="input image size (resized to 299 in the network)")
    p.add_argument("--weights", default=None, help="Inception weights (default: random, written to a temp file)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.weights, args.num, args.batch_size, args.size)))
        return
    if args.batch_size % args.devices:
        raise SystemExit(f"--batch_size {args.batch_size} must be a multiple of --devices {args.devices}")
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            from ediffi_jax.eval.smoke import write_random_inception

            weights = write_random_inception(os.path.join(tmp, "random_inception.npz"))
        one = run_child(1, weights, args)
        many = run_child(args.devices, weights, args)
    for r in (one, many):
        print(f"{r['devices']} {r['platform']} device(s): {r['images_per_s']:.2f} images/s ({r['num']} images at 299², "
              f"batch {r['batch_size']}, {r['seconds']:.1f} s; warm-up incl. compile {r['warmup_s']:.1f} s)")
    print(f"ratio {many['devices']} devices / 1 device: {many['images_per_s'] / one['images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
