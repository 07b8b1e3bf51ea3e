"""`ediffi-eval COMMAND [flags]`: FID, CLIP score, COCO FID-30K and FID–CLIP curves (eDiff-I §4).

    ediffi-eval fid --folder gen/ --ref_stats coco_val2014_256.npz --inception_weights pt_inception.pth
    ediffi-eval clip-score --folder gen/ --clip_dir clip-vit-large-patch14/
    ediffi-eval coco30k --cascade cascade.json --coco_captions captions_val2014.json --guidance 3 \
        --ref_dir val2014/ --ref_resize 256 --inception_weights pt_inception.pth --clip_dir clip-vit-large-patch14/ \
        --out eval/coco30k
    ediffi-eval curve --workdir assets/tiny_shapes --shapes_captions --num 64 --guidance 1,2,3,5 \
        --inception_weights W --clip_dir D --out report/

Generation is resumable (re-run the same command after an interruption: it continues at the first missing image).
Weights are never downloaded: --inception_weights is pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or its
.npz conversion, `python -m ediffi_jax.models.inception SRC DST`), --clip_dir a local CLIPModel directory. The
logic lives in `ediffi_jax.eval.commands`; bad input exits with status 2 and one line on stderr.

On a pod, run the same command on every host with --distributed: generation is split over the processes
(batch k on process k mod P), Inception and CLIP run over every device of every host (each host decodes only
its share of the images), and process 0 writes the reference cache, metrics and reports.
"""

from __future__ import annotations

import logging
import sys

from absl import flags

from ediffi_jax.cli.common import quiet_logs, run_main
from ediffi_jax.eval.commands import COMMANDS, Options, parse_guidance, run_command

_FOLDER = flags.DEFINE_string("folder", None, "fid / clip-score: a folder of generated images (000000.png, ...).")
_CAPTIONS = flags.DEFINE_string("captions", None, "clip-score: captions.jsonl (default: <folder>/captions.jsonl).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Model: a run, export or ensemble directory.")
_CASCADE = flags.DEFINE_string("cascade", None, "Model: a cascade config (JSON); --guidance/--steps apply to stage 1.")
_STEPS = flags.DEFINE_integer("steps", None, "Heun steps (default: the run's config.sample.num_steps).")
_COCO = flags.DEFINE_string("coco_captions", None, "COCO captions annotations JSON (captions_val2014.json layout).")
_SHAPES = flags.DEFINE_bool("shapes_captions", False, "Captions of the run's synthetic shapes data (needs --num).")
_PROMPTS = flags.DEFINE_string("prompts_file", None, "Text file, one prompt per line (cycled up to --num).")
_NUM = flags.DEFINE_integer("num", None, "Images to generate / measure (coco30k: 30000; fid/clip-score on a folder: "
                            "all, or exactly the first --num).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Batch size of generation, Inception and CLIP.")
_GEN_BATCH = flags.DEFINE_integer("gen_batch_size", None, "Generation batch size (default: --batch_size).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the COCO caption draw and of sampling.")
_GUIDANCE = flags.DEFINE_list("guidance", None, "Guidance scale(s): one for fid/coco30k (default: the run's), a "
                              "comma-separated list for curve, e.g. 1,2,3,5.")
_OUT = flags.DEFINE_string("out", None, "Output folder: images (guidance_<s>/), reference_stats.npz, report.json, "
                           "curve.png.")
_REF_STATS = flags.DEFINE_string("ref_stats", None, "Reference statistics .npz (mu, sigma): read if it exists, else "
                                 "computed from the reference images and written (default <out>/reference_stats.npz).")
_REF_DIR = flags.DEFINE_string("ref_dir", None, "Reference images: a folder (e.g. COCO val2014/).")
_REF_TFDS = flags.DEFINE_string("ref_tfds", None, "Reference images: a TFDS dataset directory (with --ref_split).")
_REF_SPLIT = flags.DEFINE_string("ref_split", "validation", "Split of --ref_tfds.")
_REF_SHAPES = flags.DEFINE_bool("ref_shapes", False, "Reference images: the run's shapes data (the default with "
                                "--shapes_captions).")
_REF_NUM = flags.DEFINE_integer("ref_num", None, "Reference images to use (default: all; shapes: --num).")
_REF_RESIZE = flags.DEFINE_integer("ref_resize", None, "Centre-crop reference images and resize them to this size "
                                   "(PIL bicubic), e.g. the generated resolution.")
_INCEPTION = flags.DEFINE_string("inception_weights", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth or "
                                 "its .npz conversion.")
_INCEPTION_SIZE = flags.DEFINE_integer("inception_size", 299, "Inception input size: 299 = FID. Smaller values (>= 75)"
                                       " are only for smoke tests and are not FIDs.")
_CLIP = flags.DEFINE_string("clip_dir", None, "Local CLIPModel directory (e.g. openai/clip-vit-large-patch14).")
_FID_METHOD = flags.DEFINE_enum("fid_method", "sqrtm", ["sqrtm", "eigh"], "sqrtm: pytorch-fid's computation (scipy "
                                "sqrtm); eigh: the same distance from symmetric eigenvalues, much faster on CPUs.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Join a multi-process run (jax.distributed.initialize; on TPU "
                                 "VMs and under SLURM the three flags below are auto-detected): every process runs "
                                 "the same command, each generates and reads its share, process 0 writes reports.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "--distributed: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "--distributed: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "--distributed: this process's index.")


def _main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise ValueError(f"give a command: ediffi-eval {{{','.join(COMMANDS)}}} [flags]")
    if len(argv) > 2:
        raise ValueError(f"unexpected arguments {argv[2:]} (one command, then flags)")
    if _DISTRIBUTED.value:
        import jax

        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    run_command(Options(
        command=argv[1], folder=_FOLDER.value, captions=_CAPTIONS.value, workdir=_WORKDIR.value,
        cascade=_CASCADE.value, steps=_STEPS.value, coco_captions=_COCO.value, shapes_captions=_SHAPES.value,
        prompts_file=_PROMPTS.value, num=_NUM.value, batch_size=_BATCH.value, gen_batch_size=_GEN_BATCH.value,
        seed=_SEED.value, guidance=parse_guidance(_GUIDANCE.value), out=_OUT.value, ref_stats=_REF_STATS.value,
        ref_dir=_REF_DIR.value, ref_tfds=_REF_TFDS.value, ref_split=_REF_SPLIT.value, ref_shapes=_REF_SHAPES.value,
        ref_num=_REF_NUM.value, ref_resize=_REF_RESIZE.value, inception_weights=_INCEPTION.value,
        inception_size=_INCEPTION_SIZE.value, clip_dir=_CLIP.value, progress=_PROGRESS.value,
        fid_method=_FID_METHOD.value))


def main(argv: list[str] | None = None) -> None:
    quiet_logs(logging.WARNING)
    run_main(_main, list(argv or sys.argv))


if __name__ == "__main__":
    main()
