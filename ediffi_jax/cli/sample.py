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

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by ediffi-train (or use --cascade).")
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
_CASCADE = flags.DEFINE_string("cascade", None, "Cascade config (JSON, see ediffi_jax/cascade.py) instead of "
                               "--workdir: runs every stage; --steps/--guidance/--churn then apply to stage 1 only.")
_STAGES_OUT = flags.DEFINE_string("stages_out", None, "With --cascade: also write every stage's output side by side.")
_DASHED = ("--style-scale", "--paint-weight", "--paint-fn", "--stages-out")  # accepted spellings of flags above


def _main(argv: list[str]) -> None:
    del argv
    import dataclasses

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
    styles = None if style is None else np.repeat(style[None], len(_PROMPT.value) * _NUM.value, axis=0)
    if bool(_CASCADE.value) == bool(_WORKDIR.value):
        raise ValueError("give exactly one of --workdir and --cascade")
    if _CASCADE.value:
        _run_cascade(regions, styles)
        return
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
        images=styles, image_guidance_scale=_STYLE_SCALE.value)
    path = save_grid(images, _OUT.value, ncols=_NUM.value)
    print(f"wrote {path} ({len(prompts)} images, step {pipe.step})")
    _print_score(images, prompts)


def _print_score(images, prompts) -> None:
    from ediffi_jax.data import shapes

    try:
        print("shape-score:", shapes.score_batch(images, prompts))
    except ValueError:
        pass  # prompts outside the shapes vocabulary: no score


def _run_cascade(regions, styles) -> None:
    from ediffi_jax.cascade import Cascade, side_by_side
    from ediffi_jax.text_to_image import save_grid

    cascade = Cascade.from_config(_CASCADE.value)
    first = cascade.stages[0]
    first.steps = _STEPS.value if _STEPS.value is not None else first.steps
    first.guidance = _GUIDANCE.value if _GUIDANCE.value is not None else first.guidance
    first.churn = _CHURN.value if _CHURN.value is not None else first.churn
    prompts = [p for p in _PROMPT.value for _ in range(_NUM.value)]
    outs = cascade.generate(prompts, seed=_SEED.value, regions=regions, images=styles,
                            paint_weight=_PAINT_WEIGHT.value, paint_fn=_PAINT_FN.value, progress=True)
    path = save_grid(outs[-1], _OUT.value, ncols=_NUM.value)
    sizes = " -> ".join(f"{o.shape[1]}x{o.shape[2]}" for o in outs)
    print(f"wrote {path} ({len(prompts)} images, {len(outs)} stages: {sizes})")
    if _STAGES_OUT.value:
        print(f"wrote {save_grid(side_by_side(outs), _STAGES_OUT.value, ncols=_NUM.value)} (stages side by side)")
    for i, o in enumerate(outs, start=1):
        print(f"stage {i}:", end=" ")
        _print_score(o, prompts)


def main(argv: list[str] | None = None) -> None:
    quiet_logs(logging.WARNING)
    argv = [_undash(a) for a in (argv or sys.argv)]
    run_main(_main, argv)


def _undash(arg: str) -> str:
    name = arg.split("=", 1)[0]
    return arg.replace(name, name[:2] + name[2:].replace("-", "_"), 1) if name in _DASHED else arg


if __name__ == "__main__":
    main()
