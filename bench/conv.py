"""The U-Net's 3×3 convolutions, forward + backward (input and weight gradients), ours vs PyTorch, per layer.

    .venv/bin/python bench/conv.py [--repeats 7]

Each edm64 conv shape (batch 8, fp32, NHWC for JAX, NCHW for PyTorch's oneDNN) as jitted
`jax.grad(0.5·Σ conv(x, w)²)` through XLA:CPU with this package's flags (Eigen convolutions), the same as a
matmul over an explicit im2col buffer (XLA's dot path), and `torch.nn.Conv2d` forward + backward; median of
`--repeats`, the two frameworks alternating. GFLOP/s counts 3 × the forward's 2·N·H·W·Cin·Cout·9.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import ediffi_jax  # noqa: F401  (the XLA:CPU flags)

SHAPES = [(8, 64, 64, 64, 64), (8, 64, 64, 64, 128), (8, 32, 32, 128, 128), (8, 16, 16, 256, 256),
          (8, 8, 8, 256, 256)]


def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_im2col(x, w):
    n, h, wd, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([xp[:, i:i + h, j:j + wd, :] for i in range(3) for j in range(3)], axis=-1)
    return (cols.reshape(n * h * wd, 9 * c) @ w.reshape(9 * c, -1)).reshape(n, h, wd, -1)


def _jax_step(fn, x, w):
    g = jax.jit(jax.grad(lambda x, w: 0.5 * jnp.sum(fn(x, w) ** 2), argnums=(0, 1)))
    jax.block_until_ready(g(x, w))
    return lambda: jax.block_until_ready(g(x, w))


def _torch_step(torch, shape):
    n, h, wd, c, co = shape
    x = torch.randn(n, c, h, wd, requires_grad=True)
    layer = torch.nn.Conv2d(c, co, 3, padding=1, bias=False)

    def run():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        (0.5 * (layer(x) ** 2).sum()).backward()

    run()
    return run


def _time(run) -> float:
    t = time.perf_counter()
    run()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    print(f"{'N,H,W,Cin,Cout':22s} {'ours ms':>8s} {'GF/s':>5s} {'im2col ms':>10s} {'GF/s':>5s} {'torch ms':>9s} "
          f"{'GF/s':>5s} {'ours/torch GF/s':>16s}")
    for shape in SHAPES:
        n, h, wd, c, co = shape
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((n, h, wd, c)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((3, 3, c, co)) * 0.05, jnp.float32)
        runs = {"ours": _jax_step(conv, x, w), "im2col": _jax_step(conv_im2col, x, w),
                "torch": _torch_step(torch, shape)}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, run in runs.items():
                times[k].append(_time(run))
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        gf = {k: 3 * 2 * n * h * wd * c * co * 9 / (v * 1e6) for k, v in ms.items()}
        print(f"{str(shape):22s} {ms['ours']:8.1f} {gf['ours']:5.0f} {ms['im2col']:10.1f} {gf['im2col']:5.0f} "
              f"{ms['torch']:9.1f} {gf['torch']:5.0f} {gf['ours'] / gf['torch']:15.2f}×", flush=True)


if __name__ == "__main__":
    main()
