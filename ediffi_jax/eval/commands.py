"""The four ``ediffi-eval`` commands as a library: `Options` (one field per flag) → `run_command` → report.

    fid         FID of a generated folder (--folder), or of a model (--workdir / --cascade) generating from
                captions, against reference statistics (--ref_stats .npz) or reference images
    clip-score  CLIP score of a folder's (image, caption) pairs (its captions.jsonl, or --captions)
    coco30k     COCO FID-30K and CLIP score: --num (30,000) captions drawn from captions_val2014.json with
                --seed, generated at one guidance scale
    curve       the same over several guidance scales (--guidance 1,2,3,5): report.json + curve.png

Captions for generation come from exactly one of --coco_captions (COCO annotations JSON), --shapes_captions
(the shapes data of the run) and --prompts_file (one per line, cycled up to --num). The reference is
--ref_stats when that file exists; otherwise it is computed from --ref_dir (a folder), --ref_tfds/--ref_split
(a TFDS directory) or the shapes data (--ref_shapes, the default with --shapes_captions: the images of the same
examples as the captions) and cached at --ref_stats (default ``<out>/reference_stats.npz``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from ediffi_jax.eval import distributed
from ediffi_jax.eval.run import REF_STATS_FILE, REPORT_FILE, EvalConfig, Evaluator, run_data_config, run_scales

__all__ = ["COMMANDS", "Options", "parse_guidance", "run_command", "COCO_NUM"]

COMMANDS = ("fid", "clip-score", "coco30k", "curve")
COCO_NUM = 30000


@dataclasses.dataclass
class Options:
    """Every flag of ``ediffi-eval`` (see ``ediffi_jax/cli/eval.py`` for their help)."""

    command: str
    folder: str | None = None
    captions: str | None = None
    workdir: str | None = None
    cascade: str | None = None
    steps: int | None = None
    coco_captions: str | None = None
    shapes_captions: bool = False
    prompts_file: str | None = None
    num: int | None = None
    batch_size: int = 32
    gen_batch_size: int | None = None
    seed: int = 0
    guidance: Sequence[float] | None = None
    out: str | None = None
    ref_stats: str | None = None
    ref_dir: str | None = None
    ref_tfds: str | None = None
    ref_split: str = "validation"
    ref_shapes: bool = False
    ref_num: int | None = None
    ref_resize: int | None = None
    inception_weights: str | None = None
    inception_size: int = 299
    clip_dir: str | None = None
    progress: bool = True
    fid_method: str = "sqrtm"


def parse_guidance(values: Sequence[str] | str | None) -> list[float] | None:
    """Floats of a ``--guidance`` list ("1,2,3.5" or its parts); a ValueError names a bad value."""
    if values is None:
        return None
    if isinstance(values, str):
        values = values.split(",")
    out = []
    for v in values:
        v = str(v).strip()
        if not v:
            continue
        try:
            g = float(v)
        except ValueError:
            raise ValueError(f"--guidance: {v!r} is not a number (give a comma-separated list, e.g. 1,2,3,5)") from None
        if not math.isfinite(g) or g < 0:
            raise ValueError(f"--guidance: {v!r} must be a finite scale >= 0")
        out.append(g)
    if len(set(out)) != len(out):
        raise ValueError(f"--guidance lists a scale twice: {list(values)}")
    return out or None


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"--{name} must be >= 1, got {value}")


def _check(o: Options) -> None:
    if o.command not in COMMANDS:
        raise ValueError(f"unknown command {o.command!r}: use one of {', '.join(COMMANDS)}")
    for name in ("num", "batch_size", "gen_batch_size", "steps", "ref_num", "ref_resize"):
        _positive(name, getattr(o, name))
    sources = [n for n in ("coco_captions", "shapes_captions", "prompts_file") if getattr(o, n)]
    refs = [n for n in ("ref_dir", "ref_tfds", "ref_shapes") if getattr(o, n)]
    if len(refs) > 1:
        raise ValueError(f"give at most one reference source, got --{' and --'.join(refs)}")
    if o.command == "clip-score":
        if not o.folder:
            raise ValueError("clip-score needs --folder (a folder of images with captions.jsonl)")
        return
    if o.command == "fid" and o.folder:
        if sources:
            raise ValueError(f"fid --folder measures existing images: --{sources[0]} is not used with it")
        return
    if o.folder:
        raise ValueError(f"{o.command} generates its images: --folder is only for fid and clip-score")
    if bool(o.workdir) == bool(o.cascade):
        raise ValueError(f"{o.command} needs exactly one of --workdir and --cascade (or, for fid/clip-score, "
                         "--folder)")
    if o.command == "coco30k" and sources != ["coco_captions"]:
        raise ValueError("coco30k needs --coco_captions (captions_val2014.json) and no other caption source")
    if len(sources) != 1:
        raise ValueError("give exactly one caption source: --coco_captions, --shapes_captions or --prompts_file")
    if not o.out:
        raise ValueError(f"{o.command} needs --out (the folder for images and the report)")
    if o.command in ("fid", "coco30k") and o.guidance is not None and len(o.guidance) > 1:
        raise ValueError(f"{o.command} takes one --guidance scale, got {list(o.guidance)} (use curve for several)")
    if o.command == "curve" and not o.guidance:
        raise ValueError("curve needs --guidance, a list of scales, e.g. --guidance 1,2,3,5")
    if o.shapes_captions and o.num is None:
        raise ValueError("--shapes_captions needs --num (how many captions / images)")


def _reference_source(o: Options, num: int | None, data_config: Any = None) -> Any:
    from ediffi_jax.eval.reference import FolderReference, ShapesReference, TFDSReference

    if o.ref_dir:
        return FolderReference(o.ref_dir, o.ref_num, o.ref_resize)
    if o.ref_tfds:
        return TFDSReference(o.ref_tfds, o.ref_split, o.ref_num, o.ref_resize)
    if o.ref_shapes or (o.shapes_captions and not (o.ref_stats and os.path.isfile(o.ref_stats))):
        if data_config is None:
            if not (o.workdir or o.cascade):
                raise ValueError("--ref_shapes needs --workdir or --cascade (the run whose shapes data to use)")
            data_config = run_data_config(o.workdir, o.cascade)
        n = o.ref_num or num
        if n is None:
            raise ValueError("--ref_shapes needs --ref_num or --num (how many reference images)")
        return ShapesReference(data_config, n)
    return None


def _captions(o: Options, data_config: Any) -> tuple[list[str], dict[str, Any]]:
    from ediffi_jax.eval import captions as cap

    if o.coco_captions:
        num = o.num or COCO_NUM
        records = cap.coco_captions(o.coco_captions, num, o.seed)
        info = {"source": "coco", "path": os.path.abspath(o.coco_captions), "seed": o.seed, "num": num,
                "rule": "distinct images drawn without replacement, one random caption each"}
        return [r["caption"] for r in records], info
    if o.shapes_captions:
        src = cap.shapes_examples(data_config, o.num)
        info = {"source": "shapes", "seed": src.seed, "start": src.start, "num": o.num,
                "resolution": src.resolution}
        return [src[i]["caption"] for i in range(o.num)], info
    prompts = cap.read_prompts(o.prompts_file)
    num = o.num or len(prompts)
    info = {"source": "prompts_file", "path": os.path.abspath(o.prompts_file), "num": num,
            "distinct": len(prompts)}
    return [prompts[i % len(prompts)] for i in range(num)], info


def run_command(o: Options, log: Callable[[str], None] = print, generator: Any = None) -> dict[str, Any]:
    """Runs one ``ediffi-eval`` command (checks every flag combination first; bad input is a ValueError).
    ``generator``: an already loaded `ediffi_jax.eval.generate.Generator` to use instead of loading
    ``o.workdir`` / ``o.cascade`` again (a library caller running several commands on one model)."""
    from ediffi_jax.eval.report import write_report

    _check(o)
    ev = Evaluator(EvalConfig(o.inception_weights, o.inception_size, o.clip_dir, o.batch_size, o.progress, log,
                              o.fid_method))

    if o.command == "clip-score":
        ev.clip()
        result = ev.clip_folder(o.folder, o.num, o.captions)
        report = {"command": "clip-score", "folder": os.path.abspath(o.folder), **result, "clip": ev.clip().info}
        log(f"CLIP score {result['clip_score']:.4f} ({result['num']} pairs)")
        if o.out:
            path = write_report(os.path.join(o.out, REPORT_FILE), report)
            if distributed.is_writer():
                log(f"wrote {path}")
        return report

    if o.command == "fid" and o.folder:
        from ediffi_jax.eval.folder import ImageFolder

        ImageFolder(o.folder, o.num, what="generated images")  # too few files: fail before loading anything
        source = _reference_source(o, o.ref_num or o.num)
        ref_path = o.ref_stats or (os.path.join(o.out, REF_STATS_FILE) if o.out else None)
        mu, sigma, ref_info = ev.reference(ref_path, source)  # a cached file loads without the Inception
        info = ev.inception_info()
        result = ev.fid_folder(o.folder, (mu, sigma), o.num)
        report = {"command": "fid", "folder": os.path.abspath(o.folder), **result, "reference": ref_info,
                  "notes": info.pop("notes"), "inception": info}
        log(f"FID {result['fid']:.4f} ({result['num']} images)")
        for note in report["notes"]:
            log(f"note: {note}")
        if o.out:
            path = write_report(os.path.join(o.out, REPORT_FILE), report)
            if distributed.is_writer():
                log(f"wrote {path}")
        return report

    # Generating commands: load the metric models first (a bad weights file fails before any sampling).
    metrics = ("fid",) if o.command == "fid" else ("fid", "clip_score")
    ev.inception()
    if "clip_score" in metrics:
        ev.clip()
    from ediffi_jax.eval.generate import load_generator

    generator = generator or load_generator(o.workdir, o.cascade, o.steps)
    captions, cap_info = _captions(o, generator.data_config)
    source = _reference_source(o, len(captions), generator.data_config)
    scales = list(o.guidance) if o.guidance else [generator.info["default_guidance"]]
    report = run_scales(generator, captions, scales, o.out, ev, ref_stats=o.ref_stats, ref_source=source,
                        seed=o.seed, gen_batch_size=o.gen_batch_size, metrics=metrics, command=o.command,
                        captions_info=cap_info, plot=o.command == "curve")
    if o.command in ("fid", "coco30k"):  # one scale: its numbers at the top level too
        only = next(iter(report["results"].values()))
        report.update({m: only[m] for m in metrics}, guidance=only["guidance"])
        write_report(os.path.join(o.out, REPORT_FILE), report)
    for note in report["notes"]:
        log(f"note: {note}")
    return report
