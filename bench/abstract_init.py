"""Shape-only construction of the paper-size models: plain `nnx.eval_shape` vs `ediffi_jax.tracing.abstract_module`.

    .venv/bin/python bench/abstract_init.py [--repeats 3]

Every training start, export, plan and checkpoint restore builds its model abstractly first; a fresh training start
also traces the construction once more under `jax.jit` (sharded init). Prints seconds per build (median of
`--repeats`, alternating the two) and the ratio plain ÷ ours for the base64 U-Net + conditioning projections and
the frozen T5-XXL and CLIP-L/14 encoders.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from flax import nnx

from ediffi_jax.cli.common import load_config_file
from ediffi_jax.models import clip, t5
from ediffi_jax.models.conditioning import ConditionedUNet
from ediffi_jax.tracing import abstract_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _seconds(build, make) -> float:
    t = time.perf_counter()
    build(make)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    config = load_config_file(os.path.join(ROOT, "configs", "base64.py"))
    models = {
        "base64 U-Net (configs/base64.py)": lambda: ConditionedUNet(config, rngs=nnx.Rngs(0)),
        "T5-XXL encoder": lambda: t5.T5Encoder(t5.T5Config.xxl(), rngs=nnx.Rngs(0)),
        "CLIP-L/14 text": lambda: clip.CLIPTextEncoder(clip.CLIPTextConfig.large(), rngs=nnx.Rngs(0)),
        "CLIP-L/14 vision": lambda: clip.CLIPVisionEncoder(clip.CLIPVisionConfig.large(), rngs=nnx.Rngs(0)),
    }
    print(f"{'model':34s} {'nnx.eval_shape s':>17s} {'abstract_module s':>18s} {'ratio':>7s}")
    totals = [0.0, 0.0]
    for name, make in models.items():
        plain, ours = [], []
        for _ in range(args.repeats):
            plain.append(_seconds(nnx.eval_shape, make))
            ours.append(_seconds(abstract_module, make))
        p, o = statistics.median(plain), statistics.median(ours)
        totals[0] += p
        totals[1] += o
        print(f"{name:34s} {p:17.2f} {o:18.2f} {p / o:6.1f}×", flush=True)
    print(f"{'all four':34s} {totals[0]:17.2f} {totals[1]:18.2f} {totals[0] / totals[1]:6.1f}×")


if __name__ == "__main__":
    main()
