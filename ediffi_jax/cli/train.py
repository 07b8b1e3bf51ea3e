"""`ediffi-train --config configs/tiny.py --workdir DIR [--config.x=y ...]`: train or resume a run."""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from ediffi_jax.cli.common import quiet_logs, run_main

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run: checkpoints, TensorBoard, samples.")


def _main(argv: list[str]) -> None:
    del argv
    from ediffi_jax.train.loop import train

    if _WORKDIR.value is None:
        raise ValueError("--workdir is required")
    metrics = train(_CONFIG.value, _WORKDIR.value)
    print(" ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))


def main(argv: list[str] | None = None) -> None:
    quiet_logs()
    run_main(_main, argv or sys.argv, required=("config",))


if __name__ == "__main__":
    main()
