"""`make demo`: text → image with the tiny shapes model, a PNG grid of prompts, and its shape-score.

By default it samples the small model committed in `assets/tiny_shapes` (an export of the run that
`ediffi-train --config configs/tiny.py` produces; see docs/benchmarks.md for the exact command and its time).
With `--train` it trains the embedded tiny config first into `--workdir` (resuming if interrupted) and samples
that instead.
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags

from ediffi_jax.cli.common import quiet_logs, run_main

_MODEL = flags.DEFINE_string("model", None, "Run or export to sample (default: assets/tiny_shapes of the repo).")
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

ASSET = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                     "assets", "tiny_shapes")


def _main(argv: list[str]) -> None:
    del argv
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
    t0 = time.perf_counter()
    pipe = TextToImage.from_workdir(model)
    prompts = [p for p in PROMPTS for _ in range(_NUM.value)]
    images = pipe.generate(prompts, seed=0, progress=True)
    path = save_grid(images, _OUT.value, ncols=_NUM.value)
    print(f"demo: {model} (step {pipe.step}) → {path}: {len(PROMPTS)} prompts × {_NUM.value} (a row each), "
          f"{pipe.config.sample.num_steps} Heun steps, guidance {pipe.config.sample.guidance_scale}, "
          f"{time.perf_counter() - t0:.0f} s")
    for p in PROMPTS:
        print(f"  {p}")
    score = shapes.score_batch(images, prompts)
    print("demo: shape-score " + " ".join(f"{k}={v:.3f}" for k, v in score.items()))


def main(argv: list[str] | None = None) -> None:
    quiet_logs()
    run_main(_main, argv or sys.argv)


if __name__ == "__main__":
    main()
