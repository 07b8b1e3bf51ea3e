"""`ediffi-train --config configs/tiny.py --workdir DIR [--config.x=y ...]`: train or resume a run.

Multi-host: `--config.distributed.initialize=True` (see launch/) joins the processes through jax.distributed
before anything touches devices.
"""

from __future__ import annotations

import os
import sys
import traceback

from absl import flags
from ml_collections import config_flags

from ediffi_jax.cli.common import _one_line, quiet_logs, run_main

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run: checkpoints, TensorBoard, samples.")


def _main(argv: list[str]) -> None:
    del argv
    from ediffi_jax.train.loop import train
    from ediffi_jax.train.sharding import initialize_distributed

    if _WORKDIR.value is None:
        raise ValueError("--workdir is required")
    if not initialize_distributed(_CONFIG.value):  # before anything touches devices
        metrics = train(_CONFIG.value, _WORKDIR.value)
    else:
        try:
            metrics = train(_CONFIG.value, _WORKDIR.value)
        except BaseException as e:
            # A failed process of a multi-host run exits now: at interpreter exit jax.distributed would wait
            # minutes in its shutdown barrier for the others, which wait for this one inside a collective.
            bad_input = isinstance(e, ValueError | FileNotFoundError)
            if os.environ.get("EDIFFI_DEBUG") or not bad_input:
                traceback.print_exc()
            print(f"ediffi-train: error: {_one_line(e)}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(2 if bad_input else 1)
    print(" ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))


def main(argv: list[str] | None = None) -> None:
    quiet_logs()
    run_main(_main, argv or sys.argv, required=("config",))


if __name__ == "__main__":
    main()
