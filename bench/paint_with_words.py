"""Paint-with-words on the tiny shapes model: does the painted layout show up, and what does it cost?

    .venv/bin/python bench/paint_with_words.py --run assets/tiny_shapes --num 32

Each of `--num` scenes has two objects of different colours (the dataset's scene sampler). The prompt names both
without a position ("a red circle and a blue square"); each object's silhouette at its scene position is painted
on its phrase. The IoU between each painted mask and the pixels of that colour in the sample (the dataset's
deterministic colour segmentation), averaged over both objects and all scenes, is reported without
paint-with-words and with it for each weight function / w′ (same seeds, noise and prompts). A scene counts as a
"hit" when both objects' IoU exceed 0.3.

Timing: one sampler call over all scenes with and without paint-with-words, interleaved `--repeats` times after
a warm-up; the ratio of medians is printed (peer: the same sampler without masks, same run).
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
from absl import flags

from ediffi_jax.data import shapes
from ediffi_jax.paint_with_words import Region
from ediffi_jax.text_to_image import TextToImage

_RUN = flags.DEFINE_string("run", "assets/tiny_shapes", "Trained run or export.")
_NUM = flags.DEFINE_integer("num", 32, "Scenes (samples per setting).")
_SEED = flags.DEFINE_integer("seed", 0, "Scene and sampling seed.")
_SETTINGS = flags.DEFINE_list("settings", ["paper:1", "paper:2", "paper:4", "global_max:2", "row_max:2", "std:2",
                                           "constant:8"], "weight_fn:w′ pairs to evaluate.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved timing repeats (0: skip timing).")
_TIMING = flags.DEFINE_string("timing_setting", "paper:2", "Setting timed against plain sampling.")


def scenes(n: int, seed: int, res: int) -> list[tuple[str, list[Region], list[str]]]:
    """(prompt without positions, regions painted at the objects' positions, colours) of n two-object scenes."""
    out, i = [], 0
    while len(out) < n:
        scene = shapes.sample_scene(shapes.scene_rng(seed + 7919, i), max_objects=2)
        i += 1
        objs = scene.objects
        if len(objs) != 2 or objs[0].color == objs[1].color:
            continue
        regions = []
        for o in objs:
            alone = shapes.render(shapes.Scene((o,)), res)
            mask = (shapes.segment(alone) == shapes.COLOR_NAMES.index(o.color)).astype(np.float32)
            regions.append(Region(f"{o.color} {o.shape}", mask))
        prompt = " and ".join(f"a {o.color} {o.shape}" for o in objs)
        out.append((prompt, regions, [o.color for o in objs]))
    return out


def iou(images: np.ndarray, data) -> tuple[float, float]:
    ious, hits = [], []
    for im, (_, regions, colors) in zip(images, data):
        labels = shapes.segment(im)
        per = []
        for reg, color in zip(regions, colors):
            got, want = labels == shapes.COLOR_NAMES.index(color), reg.mask > 0
            per.append((got & want).sum() / max((got | want).sum(), 1))
        ious += per
        hits.append(min(per) > 0.3)
    return float(np.mean(ious)), float(np.mean(hits))


def main(argv: list[str]) -> None:
    flags.FLAGS(argv)
    pipe = TextToImage.from_workdir(_RUN.value)
    res = pipe.config.model.image_size
    data = scenes(_NUM.value, _SEED.value, res)
    prompts = [d[0] for d in data]
    regions = [d[1] for d in data]
    print(f"{len(data)} scenes, e.g. {prompts[0]!r}; {res}x{res}, {pipe.config.sample.num_steps} Heun steps, "
          f"guidance {pipe.config.sample.guidance_scale}")

    def run(setting: str | None) -> np.ndarray:
        if setting is None:
            return pipe.generate(prompts, seed=_SEED.value)
        fn, w = setting.split(":")
        return pipe.generate(prompts, seed=_SEED.value, regions=regions, paint_fn=fn, paint_weight=float(w))

    print("| setting | mean IoU (painted mask vs colour region) | scenes with both IoU > 0.3 |")
    print("|---|---|---|")
    for setting in [None, *_SETTINGS.value]:
        m, h = iou(run(setting), data)
        print(f"| {setting or 'without paint-with-words'} | {m:.3f} | {h:.2f} |", flush=True)

    if _REPEATS.value:
        times: dict[str | None, list[float]] = {None: [], _TIMING.value: []}
        for _ in range(_REPEATS.value):
            for s in times:
                t = time.perf_counter()
                run(s)
                times[s].append(time.perf_counter() - t)
        plain, painted = statistics.median(times[None]), statistics.median(times[_TIMING.value])
        print(f"sampling {len(prompts)} images: plain {plain:.3f} s, paint-with-words ({_TIMING.value}) "
              f"{painted:.3f} s (medians of {_REPEATS.value}); ratio {painted / plain:.3f}")


if __name__ == "__main__":
    main(sys.argv)
