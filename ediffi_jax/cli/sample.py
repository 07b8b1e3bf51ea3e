"""`ediffi-sample --workdir DIR --prompt "..." --num 8 --out grid.png`: sample a trained run to a PNG grid."""

from __future__ import annotations

import logging
import sys

from absl import flags

from ediffi_jax.cli.common import quiet_logs, run_main

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by ediffi-train.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt (repeat the flag for several prompts).")
_NUM = flags.DEFINE_integer("num", 8, "Images per prompt.")
_OUT = flags.DEFINE_string("out", "grid.png", "Output PNG grid (one row per prompt).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEPS = flags.DEFINE_integer("steps", None, "Heun steps (default: the run's config.sample.num_steps).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Guidance scale s in D_u + s(D_c - D_u) (1 = conditional).")
_CHURN = flags.DEFINE_float("churn", None, "S_churn of the EDM sampler (default: the run's config).")
_RAW = flags.DEFINE_bool("raw", False, "Sample the raw parameters instead of their EMA.")


def _main(argv: list[str]) -> None:
    del argv
    import dataclasses

    from ediffi_jax.data import shapes
    from ediffi_jax.sampling import HeunConfig
    from ediffi_jax.text_to_image import TextToImage, save_grid

    if not _PROMPT.value:
        raise ValueError("--prompt is required")
    for p in _PROMPT.value:
        if not p.strip():
            raise ValueError(f"--prompt must be non-empty, got {p!r}")
    if _NUM.value < 1:
        raise ValueError(f"--num must be >= 1, got {_NUM.value}")
    pipe = TextToImage.from_workdir(_WORKDIR.value, use_ema=not _RAW.value)
    heun = HeunConfig.from_config(pipe.config.sample)
    if _STEPS.value is not None:
        heun = dataclasses.replace(heun, num_steps=_STEPS.value)
    if _CHURN.value is not None:
        heun = dataclasses.replace(heun, s_churn=_CHURN.value)
    prompts = [p for p in _PROMPT.value for _ in range(_NUM.value)]
    images = pipe.generate(prompts, seed=_SEED.value, guidance_scale=_GUIDANCE.value, heun=heun, progress=True)
    path = save_grid(images, _OUT.value, ncols=_NUM.value)
    print(f"wrote {path} ({len(prompts)} images, step {pipe.step})")
    try:
        print("shape-score:", shapes.score_batch(images, prompts))
    except ValueError:
        pass  # prompts outside the shapes vocabulary: no score


def main(argv: list[str] | None = None) -> None:
    quiet_logs(logging.WARNING)
    run_main(_main, argv or sys.argv, required=("workdir",))


if __name__ == "__main__":
    main()
