"""One self-attention layer, forward + backward: our dense and blocked (flash) paths vs PyTorch's SDPA.

    .venv/bin/python bench/attention.py                        # edm64's 32² layer and attn64's 64² layer
    .venv/bin/python bench/attention.py --shape 8,1024,16,8 --block_mib 1,2,4,8
    python3 bench/attention.py --dtype bfloat16 --batch_mult 8     # on a GPU: + cuDNN's fused kernel ("auto")

Shapes are batch, sequence length, heads, head dim (queries = keys). Loss = Σ O², gradients for Q, K and V; the
median of `--reps` interleaved repetitions (every candidate once per round, so drift hits all alike). The peer is
`torch.nn.functional.scaled_dot_product_attention` (CPU flash kernel with the same threads; on a CUDA device its
fused kernels), in this process. Prints ms per layer and the ratio to the peer, XLA's temporary bytes of each
compiled JAX candidate, and each candidate's largest error (output and gradients, relative to the largest entry)
against the dense path computed in float32 from the same inputs. On a GPU with a half-precision `--dtype` the
candidates include "auto", i.e. what the U-Net's self-attention runs (`attention.select_attention`: cuDNN).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ediffi_jax.models.attention import dot_product_attention, select_attention  # noqa: E402
from ediffi_jax.models.flash_attention import block_shape, flash_attention  # noqa: E402

SHAPES = {"edm64 32² self-attention": (8, 1024, 16, 8), "attn64 64² self-attention": (4, 4096, 8, 8)}


def run(shape: tuple[int, int, int, int], block_mib: list[float], reps: int, dense_max_gb: float,
        dtype: str = "float32") -> None:
    import torch

    b, length, h, d = shape
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3))
    cands = {}
    auto = select_attention(shape, shape, q.dtype, masked=False, has_bias=False)
    if auto == "cudnn":
        cands["auto = cudnn (jax.nn, fused)"] = lambda q, k, v: dot_product_attention(q, k, v, impl="auto")
    if 4 * b * h * length * length * 3 <= dense_max_gb * 1e9:
        cands["dense"] = lambda q, k, v: dot_product_attention(q, k, v, impl="dense")
    for mib in block_mib:
        nbytes = int(mib * 2**20)
        g, bq = block_shape(b * h, length, length, nbytes, 1 if jax.default_backend() == "cpu" else None)
        cands[f"flash {mib:g} MiB (heads {g} × rows {bq})"] = (
            lambda nb: lambda q, k, v: flash_attention(q, k, v, block_bytes=nb))(nbytes)
    def value_and_grads(fn):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2), argnums=(0, 1, 2))

    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = jax.jit(value_and_grads(lambda q, k, v: dot_product_attention(q, k, v, impl="dense")))(*f32)
    want_out = dot_product_attention(*f32, impl="dense")
    fns, temps, errs = {}, {}, {}
    for name, fn in cands.items():
        grad = jax.jit(value_and_grads(fn))
        compiled = grad.lower(q, k, v).compile()
        temps[name] = compiled.memory_analysis().temp_size_in_bytes
        fns[name] = (lambda c: lambda: jax.block_until_ready(c(q, k, v)))(compiled)
        got = [jax.jit(fn)(q, k, v), *compiled(q, k, v)[1]]
        errs[name] = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r)) / jnp.max(jnp.abs(r)))
                         for g, r in zip(got, [want_out, *want[1]]))

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    tq, tk, tv = (torch.tensor(np.asarray(x.astype(jnp.float32))).to(dev, getattr(torch, dtype)).transpose(1, 2)
                  .contiguous().requires_grad_(True) for x in (q, k, v))

    def peer():
        o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
        (o.float() ** 2).sum().backward()
        for t in (tq, tk, tv):
            t.grad = None
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    fns["torch SDPA (peer)"] = peer
    for f in fns.values():  # warm-up
        f()
    times = {n: [] for n in fns}
    for _ in range(reps):
        for n, f in fns.items():
            t = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t)
    ref = statistics.median(times["torch SDPA (peer)"])
    for n, ts in times.items():
        med = statistics.median(ts)
        temp = f"{temps[n] / 2**20:9.1f} MiB" if n in temps else " " * 13
        err = f"   max error vs float32 dense {errs[n]:.1e}" if n in errs else ""
        print(f"  {n:38s} {med * 1e3:8.2f} ms  ÷ peer {med / ref:5.2f}   XLA temp {temp}{err}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="", help="B,L,H,D (default: the two layers of SHAPES)")
    ap.add_argument("--block_mib", default="1,4,16", help="flash block sizes to try (MiB of float32 logits)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dense_max_gb", type=float, default=4.0, help="skip dense above this many logit bytes ×3")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="q, k, v dtype (all)")
    ap.add_argument("--batch_mult", type=int, default=1, help="multiply the batch of every shape by this")
    args = ap.parse_args()
    try:
        shapes = ({"given": tuple(int(x) for x in args.shape.split(","))} if args.shape else SHAPES)
        blocks = [float(x) for x in args.block_mib.split(",")]
    except ValueError:
        ap.error(f"--shape={args.shape!r} / --block_mib={args.block_mib!r}: comma-separated numbers")
    if any(len(s) != 4 for s in shapes.values()):
        ap.error(f"--shape={args.shape!r}: four numbers B,L,H,D")
    shapes = {n: (s[0] * args.batch_mult, *s[1:]) for n, s in shapes.items()}
    flags = os.environ.get("XLA_FLAGS", "")
    print(f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores, XLA_FLAGS={flags!r}, load {os.getloadavg()[0]:.2f}")
    for name, shape in shapes.items():
        print(f"{name}: B, L, H, D = {shape}")
        run(shape, blocks, args.reps, args.dense_max_gb, args.dtype)


if __name__ == "__main__":
    main()
