"""What XLA's persistent compilation cache saves a restarted `ediffi-train` (ediffi_jax/compile_cache.py).

    .venv/bin/python bench/restart.py [--config configs/tiny.py] [--workdir /tmp/restart_bench]

Trains 2 steps (the cold run, which writes WORKDIR/run/compile_cache), then resumes twice to 2 more steps each:
once with the cache (the default `--compile_cache=auto`), once with `--compile_cache=none` (the peer: what every
restart cost before). Each run is its own `ediffi-train` process, as after a preemption; JAX_COMPILATION_CACHE_DIR
is removed from their environment so `auto` picks the workdir's cache. Prints each run's wall time and its train
step's compile (or cache-load) seconds from the log, and the ratios cached ÷ uncached.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

STEP_LINE = re.compile(r"train step (compiled|loaded from the persistent compilation cache) in ([0-9.]+) s")


def run(args: argparse.Namespace, steps: int, *extra: str) -> tuple[float, str, float]:
    """(wall seconds, how the step was obtained, its seconds) of one ediffi-train process."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    cmd = [os.path.join(os.path.dirname(sys.executable), "ediffi-train"), "--config", args.config,
           "--workdir", os.path.join(args.workdir, "run"), f"--config.data.data_dir={args.workdir}/data",
           f"--config.train.num_steps={steps}", "--config.train.ckpt_every=2", "--config.train.eval_num=0",
           "--config.train.log_every=1", *extra]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"restart bench: {' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    m = STEP_LINE.search(p.stderr)
    return wall, m.group(1) if m else "?", float(m.group(2)) if m else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.py")
    ap.add_argument("--workdir", default="/tmp/restart_bench")
    args = ap.parse_args()
    shutil.rmtree(os.path.join(args.workdir, "run"), ignore_errors=True)
    rows = [("cold start (writes the cache)", *run(args, 2)),
            ("restart, cache (default)", *run(args, 4)),
            ("restart, --compile_cache=none", *run(args, 6, "--compile_cache=none"))]
    print(f"{'run':32s} {'wall s':>7s} {'step s':>7s}  step")
    for name, wall, how, step_s in rows:
        print(f"{name:32s} {wall:7.1f} {step_s:7.1f}  {how}")
    (_, w_c, _, s_c), (_, w_n, _, s_n) = rows[1], rows[2]
    print(f"cached ÷ uncached restart: wall {w_c / w_n:.2f}, train step {s_c / s_n:.2f}")


if __name__ == "__main__":
    main()
