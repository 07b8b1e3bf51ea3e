"""`ediffi-embed --config configs/tiny.py --out DIR [--batch_size 64] [--dtype float32|float16] [--fsdp 1]
[--config.x=y ...]`: run the frozen encoders over a run's data once and store the embeddings (see
`ediffi_jax.precompute`). Train on the output with `--config.data.precomputed=DIR` (shapes) or, for real data
(`--config.data.name=folder|webdataset|coco|tfds`: caption embeddings in keyed stores), `--config.data.embeddings=DIR`.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from ediffi_jax.cli.common import quiet_logs, run_main
from ediffi_jax.data.embedded import STORAGE_DTYPES
from ediffi_jax.precompute import embed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file (get_config()).",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Output directory (new or empty, or an earlier output of this config).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Records per encoder call; a multiple of the device count.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(STORAGE_DTYPES), "Storage dtype of the embeddings.")
_FSDP = flags.DEFINE_integer("fsdp", 1, "Shard the encoder parameters over this many devices (FSDP).")


def _main(argv: list[str]) -> None:
    del argv
    if _OUT.value is None:
        raise ValueError("--out is required")
    result = embed(_CONFIG.value, _OUT.value, batch_size=_BATCH.value, dtype=_DTYPE.value, fsdp=_FSDP.value)
    counts = ", ".join(f"{n} {split}" for split, n in result["counts"].items())
    if result["skipped"]:
        print(f"{_OUT.value} already holds the complete embeddings of this config ({counts} records): nothing to do")
    else:
        print(f"wrote {counts} records to {_OUT.value}")


def main(argv: list[str] | None = None) -> None:
    quiet_logs()
    run_main(_main, argv or sys.argv, required=("config",))


if __name__ == "__main__":
    main()
