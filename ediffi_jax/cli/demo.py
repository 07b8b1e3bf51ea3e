"""`make demo`: train the embedded tiny config on synthetic shapes, sample prompts to a PNG grid, score it.

Re-running resumes (or, when training already finished, only samples).
"""

from __future__ import annotations

import logging
import sys
import time

from absl import flags

from ediffi_jax.cli.common import run_main

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "Run directory.")
_OUT = flags.DEFINE_string("out", "demo_out/demo.png", "Output PNG grid.")
_STEPS = flags.DEFINE_integer("steps", None, "Training steps (default: the tiny config's).")
_NUM = flags.DEFINE_integer("num", 4, "Images per prompt.")

PROMPTS = (
    "a red circle on the left",
    "a blue square at the top",
    "a green triangle in the center",
    "a yellow circle at the bottom",
    "a magenta square on the right",
    "a cyan triangle on the left and a red square on the right",
)


def _main(argv: list[str]) -> None:
    del argv
    from ediffi_jax.config import tiny_config
    from ediffi_jax.data import shapes
    from ediffi_jax.text_to_image import TextToImage, save_grid
    from ediffi_jax.train.loop import train

    config = tiny_config()
    if _STEPS.value is not None:
        config.train.num_steps = _STEPS.value
    t0 = time.perf_counter()
    train(config, _WORKDIR.value)
    t_train = time.perf_counter() - t0
    pipe = TextToImage.from_workdir(_WORKDIR.value)
    prompts = [p for p in PROMPTS for _ in range(_NUM.value)]
    images = pipe.generate(prompts, seed=0)
    path = save_grid(images, _OUT.value, ncols=_NUM.value)
    score = shapes.score_batch(images, prompts)
    print(f"demo: trained {config.train.num_steps} steps in {t_train:.0f} s; wrote {path} "
          f"({len(PROMPTS)} prompts × {_NUM.value}, one row per prompt)")
    print("demo: shape-score " + " ".join(f"{k}={v:.3f}" for k, v in score.items()))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    run_main(_main, argv or sys.argv)


if __name__ == "__main__":
    main()
