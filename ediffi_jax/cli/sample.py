"""`ediffi-sample --workdir DIR --prompt "..." --num 8 --out grid.png`: sample a trained run to a PNG grid.

Paint-with-words and style (eDiff-I §5):

    ediffi-sample --workdir DIR --prompt "a rabbit mage above the clouds" --paint map.png \
        --phrase "#ff0000=rabbit mage,1.0" --phrase "#0000ff=clouds" --style ref.png --style-scale 3 --out out.png

`--paint` is a colour map (any size: resized to the output, with a note); each `--phrase COLOUR=phrase[,strength
[,occurrence]]` names the phrase of the prompt painted with that colour (every colour of the map needs one).
`--style` conditions on the CLIP image embedding of a reference image (centre square), guided with
`--style-scale` (default: the run's sample.image_guidance_scale).
"""

from __future__ import annotations

import logging
import sys

import numpy as np
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
_PAINT = flags.DEFINE_string("paint", None, "Paint-with-words colour map (PNG); needs --phrase for each colour.")
_PHRASE = flags.DEFINE_multi_string("phrase", None, "COLOUR=phrase[,strength[,occurrence]], e.g. '#ff0000=cat,1.0'.")
_PAINT_WEIGHT = flags.DEFINE_float("paint_weight", None, "w' of paint-with-words (default: config.sample).")
_PAINT_FN = flags.DEFINE_string("paint_fn", None, "Weight function: paper, global_max, row_max, std, constant.")
_STYLE = flags.DEFINE_string("style", None, "Reference image whose CLIP image embedding conditions the samples.")
_STYLE_SCALE = flags.DEFINE_float("style_scale", None, "Guidance scale of the style image (default: config).")
_DASHED = ("--style-scale", "--paint-weight", "--paint-fn")  # accepted spellings of the flags above


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
    from ediffi_jax import paint_with_words as pww

    if _PHRASE.value and not _PAINT.value:
        raise ValueError("--phrase needs --paint (a colour map)")
    if _PAINT.value and not _PHRASE.value:
        raise ValueError(f"--paint {_PAINT.value!r} needs at least one --phrase COLOUR=phrase")
    regions = pww.regions_from_specs(_PAINT.value, _PHRASE.value) if _PAINT.value else None
    style = pww.center_crop_square(pww.load_image(_STYLE.value)) if _STYLE.value else None
    pipe = TextToImage.from_workdir(_WORKDIR.value, use_ema=not _RAW.value)
    heun = HeunConfig.from_config(pipe.config.sample)
    if _STEPS.value is not None:
        heun = dataclasses.replace(heun, num_steps=_STEPS.value)
    if _CHURN.value is not None:
        heun = dataclasses.replace(heun, s_churn=_CHURN.value)
    prompts = [p for p in _PROMPT.value for _ in range(_NUM.value)]
    images = pipe.generate(
        prompts, seed=_SEED.value, guidance_scale=_GUIDANCE.value, heun=heun, progress=True, regions=regions,
        paint_weight=_PAINT_WEIGHT.value, paint_fn=_PAINT_FN.value,
        images=None if style is None else np.repeat(style[None], len(prompts), axis=0),
        image_guidance_scale=_STYLE_SCALE.value)
    path = save_grid(images, _OUT.value, ncols=_NUM.value)
    print(f"wrote {path} ({len(prompts)} images, step {pipe.step})")
    try:
        print("shape-score:", shapes.score_batch(images, prompts))
    except ValueError:
        pass  # prompts outside the shapes vocabulary: no score


def main(argv: list[str] | None = None) -> None:
    quiet_logs(logging.WARNING)
    argv = [_undash(a) for a in (argv or sys.argv)]
    run_main(_main, argv, required=("workdir",))


def _undash(arg: str) -> str:
    name = arg.split("=", 1)[0]
    return arg.replace(name, name[:2] + name[2:].replace("-", "_"), 1) if name in _DASHED else arg


if __name__ == "__main__":
    main()
