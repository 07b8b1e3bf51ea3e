"""XLA:CPU flags this package sets for its processes (before JAX starts a backend).

`--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`: jaxlib 0.10's XLA:CPU hands every convolution
to YNNPACK, whose backward-filter (weight-gradient) kernels are slow for the U-Net's layers; without that fusion
type the convolutions run on XLA's Eigen path while dots and reductions stay on YNNPACK. Measured on the 2-core
development machine (bench/attention.py, bench/peers.py; docs/benchmarks.md): one 3×3 conv 64→64 at 64², batch 8,
forward + backward 88 → 26 ms; the edm64 train step 7.4 → 5.5 s; attention unchanged.

Applied on `import ediffi_jax` by adding the flag to the environment's XLA_FLAGS, which JAX reads when it starts a
backend: a process that already ran JAX computations before importing this package keeps its flags. Not applied
when XLA_FLAGS already names the option (the user's setting wins), when EDIFFI_XLA_FLAGS=0, or with a jaxlib other
than the pinned one (an unknown XLA flag aborts the process). CPU-only: GPU and TPU backends ignore it.
"""

from __future__ import annotations

import os

CPU_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "-individual_convolution"}
TESTED_JAXLIB = ("0.10.",)


def apply_cpu_flags(environ: dict[str, str] | None = None, jaxlib_version: str | None = None) -> list[str]:
    """Adds `CPU_FLAGS` missing from ``environ["XLA_FLAGS"]`` (default: os.environ); returns the flags added."""
    env = os.environ if environ is None else environ
    if env.get("EDIFFI_XLA_FLAGS", "1") == "0":
        return []
    if jaxlib_version is None:
        from jaxlib import version

        jaxlib_version = version.__version__
    if not jaxlib_version.startswith(TESTED_JAXLIB):
        return []
    current = env.get("XLA_FLAGS", "")
    added = [f"--{k}={v}" for k, v in CPU_FLAGS.items() if f"--{k}" not in current]
    if added:
        env["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
