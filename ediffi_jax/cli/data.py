"""`ediffi-data COMMAND [flags]`: build image–text TFDS datasets from local / gs:// data, look at them, time them.

    ediffi-data build --layout folder --path photos/ --data_dir ~/tfds [--captions auto] [--min_size 256 --max_aspect 2]
    ediffi-data build --layout webdataset --path gs://bucket/laion-shards/ --data_dir ~/tfds
    ediffi-data build --layout coco --path coco2014/ --data_dir ~/tfds        # train + validation splits
    ediffi-data inspect --dataset_dir ~/tfds/ediffi_coco_captions/<config>/1.0.0 --split validation --out report/
    ediffi-data bench --dataset_dir DIR --resolution 64 --batch_size 64 --num_workers 8 --num_batches 50

build prints the kept / dropped counts per split and the dataset directory (what inspect and bench take, and what
``tfds.builder_from_directory`` reads). Layouts, checks and drop reasons: `ediffi_jax.data.image_text`,
`folder_tfds`, `webdataset_tfds`, `coco_tfds`. inspect prints the counts and a caption-length histogram and writes
``<out>/contact_sheet_<split>.png`` (or --sheet PATH) and ``<out>/caption_lengths_<split>.txt``. bench prints the
training pipeline's examples/s on this host. Bad input exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import json
import logging
import sys

from absl import flags

from ediffi_jax.cli.common import quiet_logs, run_main

COMMANDS = ("build", "inspect", "bench")

_LAYOUT = flags.DEFINE_string("layout", None, "build: folder, webdataset or coco.")
_PATH = flags.DEFINE_string("path", None, "build: the source (folder, tar shard or folder of shards, COCO root); "
                            "local or gs://.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "build: the TFDS data_dir to write into.")
_CAPTIONS = flags.DEFINE_string("captions", "auto", "build --layout folder: sidecar, jsonl (captions.jsonl), csv "
                                "(captions.csv) or auto.")
_YEAR = flags.DEFINE_string("year", "2014", "build --layout coco: the COCO year of captions_<split><year>.json.")
_MIN_SIZE = flags.DEFINE_integer("min_size", 0, "build: drop images whose shorter side is below this (too_small).")
_MAX_ASPECT = flags.DEFINE_float("max_aspect", 0.0, "build: drop images whose long/short side ratio is above this "
                                 "(bad_aspect); 0: no limit.")
_DATASET_DIR = flags.DEFINE_string("dataset_dir", None, "inspect / bench: a prepared dataset directory (printed by "
                                   "build).")
_SPLIT = flags.DEFINE_string("split", None, "inspect / bench: the split (default: train, else the first).")
_NUM = flags.DEFINE_integer("num", 16, "inspect: records on the contact sheet.")
_HIST_NUM = flags.DEFINE_integer("hist_num", 2000, "inspect: random records in the caption-length histogram.")
_SEED = flags.DEFINE_integer("seed", 0, "inspect: sample draw; bench: pipeline seed.")
_OUT = flags.DEFINE_string("out", None, "inspect: folder for contact_sheet_<split>.png and "
                           "caption_lengths_<split>.txt.")
_SHEET = flags.DEFINE_string("sheet", None, "inspect: write the contact sheet to this PNG path.")
_RESOLUTION = flags.DEFINE_integer("resolution", 64, "bench: training resolution.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "bench: batch size.")
_WORKERS = flags.DEFINE_integer("num_workers", 0, "bench: grain worker processes (0: in-process).")
_BATCHES = flags.DEFINE_integer("num_batches", 20, "bench: batches to time.")


def _require(**values: object) -> None:
    for name, value in values.items():
        if value is None:
            raise ValueError(f"--{name} is required")


def _build() -> None:
    from ediffi_jax.data import image_text

    _require(layout=_LAYOUT.value, path=_PATH.value, data_dir=_DATA_DIR.value)
    options = {"captions": _CAPTIONS.value} if _LAYOUT.value == "folder" else (
        {"year": _YEAR.value} if _LAYOUT.value == "coco" else {})
    result = image_text.build_dataset(_LAYOUT.value, _PATH.value, _DATA_DIR.value, min_size=_MIN_SIZE.value,
                                      max_aspect=_MAX_ASPECT.value, **options)
    from ediffi_jax.data.inspect import format_counts

    print(format_counts(result.counts))
    print(json.dumps({"dataset_dir": result.dataset_dir, "counts": result.counts}))


def _inspect() -> None:
    from ediffi_jax.data.inspect import format_counts, inspect_dataset

    _require(dataset_dir=_DATASET_DIR.value)
    report = inspect_dataset(_DATASET_DIR.value, split=_SPLIT.value, num=_NUM.value, seed=_SEED.value,
                             out=_OUT.value, sheet=_SHEET.value, hist_num=_HIST_NUM.value)
    print(format_counts(report["counts"]))
    print(f"{report['split']}: {report['size']} records")
    print(report["histogram"])
    for path in report["files"]:
        print(f"wrote {path}")


def _bench() -> None:
    from ediffi_jax.data.inspect import bench

    _require(dataset_dir=_DATASET_DIR.value)
    result = bench(_DATASET_DIR.value, split=_SPLIT.value, resolution=_RESOLUTION.value, batch_size=_BATCH.value,
                   num_workers=_WORKERS.value, num_batches=_BATCHES.value, seed=_SEED.value)
    print(json.dumps({"num_workers": _WORKERS.value, "batch_size": _BATCH.value, "resolution": _RESOLUTION.value,
                      **{k: float(v) for k, v in result.items()}}))


def _main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise ValueError(f"give a command: ediffi-data {{{','.join(COMMANDS)}}} [flags]")
    if len(argv) > 2:
        raise ValueError(f"unexpected arguments {argv[2:]} (one command, then flags)")
    if argv[1] not in COMMANDS:
        raise ValueError(f"unknown command {argv[1]!r} (one of {', '.join(COMMANDS)})")
    logging.getLogger("absl").setLevel(logging.ERROR)  # tfds' "Using custom data configuration" notices
    {"build": _build, "inspect": _inspect, "bench": _bench}[argv[1]]()


def main(argv: list[str] | None = None) -> None:
    quiet_logs(logging.WARNING)
    run_main(_main, list(argv or sys.argv))


if __name__ == "__main__":
    main()
