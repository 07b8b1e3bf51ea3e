"""`make demo`: text → image with the tiny 2-stage cascade, a PNG grid of prompts, and its shape-scores.

By default it samples the small models committed in `assets/tiny_shapes` (32² base: an export of the run that
`ediffi-train --config configs/tiny.py` produces) and `assets/tiny_shapes_sr` (32² → 64² SR stage, from
`configs/tiny_sr.py`); see docs/benchmarks.md for the exact commands and their time. Each grid cell shows stage 1
(nearest-upsampled) and stage 2 side by side. With `--train` it trains the embedded tiny base config first into
`--workdir` (resuming if interrupted) and samples that instead (base stage only unless --sr is given).
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags

from ediffi_jax.cli.common import quiet_logs, run_main

_MODEL = flags.DEFINE_string("model", None, "Run or export to sample (default: assets/tiny_shapes of the repo).")
_SR = flags.DEFINE_string("sr", None, "SR stage run or export (default: assets/tiny_shapes_sr; 'none' = base only).")
_TRAIN = flags.DEFINE_bool("train", False, "Train the tiny config into --workdir first, then sample it.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "Run directory for --train.")
_STEPS = flags.DEFINE_integer("steps", None, "Training steps for --train (default: the tiny config's).")
_OUT = flags.DEFINE_string("out", "demo_out/demo.png", "Output PNG grid.")
_NUM = flags.DEFINE_integer("num", 6, "Images per prompt.")

PROMPTS = (
    "a red circle on the left",
    "a blue square at the top",
    "a green triangle in the center",
    "a yellow circle at the bottom",
    "a magenta square on the right",
    "a cyan triangle on the left and a red square on the right",
    "a white circle at the top and a green square at the bottom",
)

_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "assets")
ASSET = os.path.join(_ASSETS, "tiny_shapes")
SR_ASSET = os.path.join(_ASSETS, "tiny_shapes_sr")


def _main(argv: list[str]) -> None:
    del argv
    from ediffi_jax.cascade import Cascade, Stage, side_by_side
    from ediffi_jax.data import shapes
    from ediffi_jax.text_to_image import TextToImage, save_grid

    model = _MODEL.value or ASSET
    if _TRAIN.value:
        from ediffi_jax.config import tiny_config
        from ediffi_jax.train.loop import train

        config = tiny_config()
        if _STEPS.value is not None:
            config.train.num_steps = _STEPS.value
        t0 = time.perf_counter()
        train(config, _WORKDIR.value)
        print(f"demo: trained {config.train.num_steps} steps in {time.perf_counter() - t0:.0f} s")
        model = _WORKDIR.value
    sr_model = _SR.value or (SR_ASSET if not _TRAIN.value and os.path.isdir(SR_ASSET) else "none")
    t0 = time.perf_counter()
    pipe = TextToImage.from_workdir(model)
    stages = [Stage(pipe, name=model)]
    if sr_model != "none":
        stages.append(Stage(TextToImage.from_workdir(sr_model), name=sr_model))
    prompts = [p for p in PROMPTS for _ in range(_NUM.value)]
    outs = Cascade(stages).generate(prompts, seed=0, progress=True)
    path = save_grid(side_by_side(outs), _OUT.value, ncols=_NUM.value)
    desc = " → ".join(f"{s.name} (step {s.pipe.step}, {s.heun().num_steps} Heun steps)" for s in stages)
    print(f"demo: {desc} → {path}: {len(PROMPTS)} prompts × {_NUM.value} (a row each; stages side by side), "
          f"guidance {pipe.config.sample.guidance_scale}, {time.perf_counter() - t0:.0f} s")
    for p in PROMPTS:
        print(f"  {p}")
    for i, images in enumerate(outs, start=1):
        score = shapes.score_batch(images, prompts)
        size = f"{images.shape[1]}x{images.shape[2]}"
        print(f"demo: stage {i} ({size}) shape-score " + " ".join(f"{k}={v:.3f}" for k, v in score.items()))


def main(argv: list[str] | None = None) -> None:
    quiet_logs()
    run_main(_main, argv or sys.argv)


if __name__ == "__main__":
    main()
