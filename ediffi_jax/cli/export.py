"""`ediffi-export --workdir RUN --out DIR [--raw]`: an inference-only copy of a run (no optimizer state)."""

from __future__ import annotations

import sys

from absl import flags

from ediffi_jax.cli.common import quiet_logs, run_main

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by ediffi-train.")
_OUT = flags.DEFINE_string("out", None, "New directory for the export (must not exist or be empty).")
_RAW = flags.DEFINE_bool("raw", False, "Export the raw parameters instead of their EMA.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def _main(argv: list[str]) -> None:
    del argv
    from ediffi_jax.text_to_image import TextToImage

    pipe = TextToImage.from_workdir(_WORKDIR.value, use_ema=not _RAW.value, step=_STEP.value)
    print(f"exported step {pipe.step} of {_WORKDIR.value} to {pipe.export(_OUT.value)}")


def main(argv: list[str] | None = None) -> None:
    quiet_logs()
    run_main(_main, argv or sys.argv, required=("workdir", "out"))


if __name__ == "__main__":
    main()
