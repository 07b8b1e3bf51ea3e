"""`ediffi-train --config configs/tiny.py --workdir DIR [--config.x=y ...]`: train or resume a run.

A restart loads its compiled steps from XLA's persistent compilation cache (`--compile_cache`, default
WORKDIR/compile_cache unless JAX_COMPILATION_CACHE_DIR names one; ediffi_jax/compile_cache.py).

Multi-host: `--config.distributed.initialize=True` (see launch/) joins the processes through jax.distributed
before anything touches devices.

Exit status:
    0   trained to train.num_steps (or the workdir was already there)
    1   failed; among others after train.max_consecutive_skips consecutive non-finite updates (one error line;
        the last checkpoint is kept)
    2   bad input (flags, config, workdir, data): one error line, before any compile
    75  stopped on SIGTERM (preemption, `launch/tpu_pod.sh stop`, SLURM's warning signal) after writing a complete
        checkpoint at the current step: run the same command again to resume (EX_TEMPFAIL of sysexits.h)
"""

from __future__ import annotations

import os
import sys
import traceback

from absl import flags
from ml_collections import config_flags

from ediffi_jax import compile_cache
from ediffi_jax.cli.common import _one_line, quiet_logs, run_main

EXIT_PREEMPTED = 75

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run: checkpoints, TensorBoard, samples.")
_COMPILE_CACHE = flags.DEFINE_string("compile_cache", "auto", compile_cache.FLAG_HELP)


def _main(argv: list[str]) -> None:
    del argv
    from ediffi_jax.train.loop import NonFiniteUpdates, Preempted, train
    from ediffi_jax.train.sharding import initialize_distributed

    if _WORKDIR.value is None:
        raise ValueError("--workdir is required")
    distributed = initialize_distributed(_CONFIG.value)  # before anything touches devices
    compile_cache.enable(_COMPILE_CACHE.value, _WORKDIR.value)  # before the first compilation
    try:
        metrics = train(_CONFIG.value, _WORKDIR.value)
    except Preempted:  # the loop logged the step; every process stops at it, so they leave jax.distributed alike
        sys.stdout.flush()
        sys.exit(EXIT_PREEMPTED)
    except NonFiniteUpdates as e:
        if os.environ.get("EDIFFI_DEBUG"):
            traceback.print_exc()
        _fail(f"ediffi-train: error: {_one_line(e)}", 1, distributed)
    except BaseException as e:
        if not distributed:
            raise
        # A failed process of a multi-host run exits now: at interpreter exit jax.distributed would wait
        # minutes in its shutdown barrier for the others, which wait for this one inside a collective.
        bad_input = isinstance(e, ValueError | FileNotFoundError)
        if os.environ.get("EDIFFI_DEBUG") or not bad_input:
            traceback.print_exc()
        _fail(f"ediffi-train: error: {_one_line(e)}", 2 if bad_input else 1, distributed)
    print(" ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))


def _fail(line: str, status: int, distributed: bool) -> None:
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    if distributed:
        os._exit(status)
    sys.exit(status)


def main(argv: list[str] | None = None) -> None:
    quiet_logs()
    run_main(_main, argv or sys.argv, required=("config",))


if __name__ == "__main__":
    main()
