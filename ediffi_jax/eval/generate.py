"""Resumable generation of an evaluation set: one numbered PNG per caption, written as it comes.

`generate_folder` splits the N captions into fixed batches — batch k holds images ``k·B .. k·B + B − 1`` (B =
``batch_size``, the last batch padded to B with copies of its last caption, so every call has one shape) — and
samples batch k with the seed ``batch_seed(seed, k)``. Image i therefore depends only on (model, sampler
settings, seed, B, the captions of its batch), not on which batches ran before, and a re-run after an
interruption regenerates exactly the batches that miss a file and writes only the missing files, bitwise equal
to what the first run would have written. On several processes (`jax.distributed`), process p samples batches
p, p + P, ... of the missing ones on its own devices (the folder must be shared) and process 0 writes the
metadata files. Images are written atomically (`folder.write_png`), so a killed run
leaves no half-written PNG.

``generation.json`` in the folder records the generator, seed, guidance and batch size; resuming with other
settings (or other captions, checked against ``captions.jsonl``) is refused with a ValueError rather than
mixing two distributions in one folder. Growing N is allowed when the old captions are a prefix of the new.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ediffi_jax.eval import distributed
from ediffi_jax.eval.folder import CAPTIONS_FILE, image_name, read_captions, write_captions, write_png

__all__ = ["Generator", "load_generator", "batch_seed", "generate_folder", "GENERATION_FILE"]

GENERATION_FILE = "generation.json"


@dataclasses.dataclass
class Generator:
    """A text-to-image model for evaluation: ``fn(prompts, seed, guidance)`` → uint8 [len(prompts), R, R, 3].

    ``info`` describes it (kind, path, Heun steps) for reports and resume checks; ``data_config`` is the
    ``config.data`` of its (first-stage) run, which `ediffi_jax.eval.captions.shapes_examples` reads."""

    fn: Callable[[Sequence[str], int, float | None], np.ndarray]
    info: dict[str, Any]
    data_config: Any = None

    def generate(self, prompts: Sequence[str], seed: int, guidance: float | None) -> np.ndarray:
        return self.fn(prompts, seed, guidance)


def load_generator(workdir: str | None = None, cascade: str | None = None, steps: int | None = None) -> Generator:
    """A `Generator` of a run (``workdir``: training run, export or ensemble) or a cascade config (JSON).

    ``steps`` overrides the Heun steps (of stage 1 for a cascade). The guidance scale given to ``generate``
    (None = the run's ``config.sample.guidance_scale``) applies to the run or, for a cascade, to stage 1 (the
    base model; later stages keep their configured scales) — the scale a FID–CLIP curve sweeps."""
    if bool(workdir) == bool(cascade):
        raise ValueError("give exactly one of --workdir and --cascade")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if workdir:
        from ediffi_jax.sampling import HeunConfig
        from ediffi_jax.text_to_image import TextToImage

        if not os.path.isdir(workdir):
            raise ValueError(f"workdir {workdir!r} does not exist")
        pipe = TextToImage.from_workdir(workdir)
        heun = HeunConfig.from_config(pipe.config.sample)
        if steps is not None:
            heun = dataclasses.replace(heun, num_steps=steps)

        def fn(prompts: Sequence[str], seed: int, guidance: float | None) -> np.ndarray:
            return pipe.generate(list(prompts), seed=seed, guidance_scale=guidance, heun=heun)

        info = {"kind": "workdir", "path": os.path.abspath(workdir), "step": int(pipe.step),
                "resolution": int(pipe.config.model.image_size), "steps": heun.num_steps,
                "default_guidance": float(pipe.config.sample.guidance_scale)}
        return Generator(fn, info, pipe.config.data)

    from ediffi_jax.cascade import Cascade

    cas = Cascade.from_config(cascade)
    first = cas.stages[0]
    if steps is not None:
        first.steps = steps
    configured = first.guidance

    def fn_cascade(prompts: Sequence[str], seed: int, guidance: float | None) -> np.ndarray:
        first.guidance = configured if guidance is None else guidance
        return cas.generate(list(prompts), seed=seed)[-1]

    size = int(first.pipe.config.model.image_size)
    for st in cas.stages[1:]:
        size *= st.factor
    default = configured if configured is not None else first.pipe.config.sample.guidance_scale
    info = {"kind": "cascade", "path": os.path.abspath(cascade), "stages": [st.name for st in cas.stages],
            "resolution": size, "steps": [st.heun().num_steps for st in cas.stages],
            "default_guidance": float(default)}
    return Generator(fn_cascade, info, first.pipe.config.data)


def batch_seed(seed: int, batch: int) -> int:
    """The sampling seed of batch ``batch`` of a folder generated with ``seed`` (a 31-bit hash of both)."""
    return int(np.random.SeedSequence([int(seed), int(batch)]).generate_state(1)[0] >> 1)


def _check_resume(folder: str, settings: dict[str, Any], captions: Sequence[str]) -> None:
    meta_path = os.path.join(folder, GENERATION_FILE)
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            k = diff[0]
            raise ValueError(f"{folder} was generated with {k}={old.get(k)!r}, not {settings.get(k)!r} "
                             f"({GENERATION_FILE}): use another output folder or the same settings")
    cap_path = os.path.join(folder, CAPTIONS_FILE)
    if os.path.isfile(cap_path):
        old_caps = [c for _, c in read_captions(cap_path)]
        n = min(len(old_caps), len(captions))
        for i in range(n):
            if old_caps[i] != captions[i]:
                raise ValueError(f"{folder}: image {i} was generated for the caption {old_caps[i]!r}, not "
                                 f"{captions[i]!r} ({CAPTIONS_FILE}): use another output folder")


def generate_folder(generator: Generator, captions: Sequence[str], folder: str, *, seed: int = 0,
                    guidance: float | None = None, batch_size: int = 32, progress: bool = True) -> dict[str, int]:
    """Generates image i of ``captions[i]`` into ``folder/{i:06d}.png`` for every missing i (see the module
    docstring), with ``captions.jsonl`` and ``generation.json``. Returns ``{"generated", "existing"}``."""
    captions = [str(c) for c in captions]
    if not captions:
        raise ValueError("no captions to generate from")
    for i, c in enumerate(captions):
        if not c.strip():
            raise ValueError(f"caption {i} is empty")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    os.makedirs(folder, exist_ok=True)
    settings = {"generator": {k: v for k, v in generator.info.items() if k != "step"},
                "step": generator.info.get("step"), "seed": int(seed),
                "guidance": None if guidance is None else float(guidance), "batch_size": int(batch_size)}
    settings = json.loads(json.dumps(settings))  # as it reads back from the file (tuples → lists)
    _check_resume(folder, settings, captions)
    distributed.barrier("ediffi_jax:generate:checked")  # every process has read the old files
    if distributed.is_writer():
        with open(os.path.join(folder, GENERATION_FILE), "w") as f:
            json.dump(settings, f, indent=2)
        cap_path = os.path.join(folder, CAPTIONS_FILE)
        if not os.path.isfile(cap_path) or len(read_captions(cap_path)) < len(captions):
            write_captions(folder, captions)

    n = len(captions)
    missing = [i for i in range(n) if not os.path.isfile(os.path.join(folder, image_name(i)))]
    distributed.barrier("ediffi_jax:generate:listed")  # nobody writes an image before everyone has listed them
    todo = distributed.process_share(sorted({i // batch_size for i in missing}))
    missing_set = set(missing)
    mine = sum(1 for k in todo for i in range(k * batch_size, min((k + 1) * batch_size, n)) if i in missing_set)
    with tqdm(total=mine, unit="img", desc=f"generate {os.path.basename(folder)}", disable=not progress) as bar:
        for k in todo:
            idx = list(range(k * batch_size, min((k + 1) * batch_size, n)))
            prompts = [captions[i] for i in idx]
            prompts += [prompts[-1]] * (batch_size - len(prompts))  # one shape for every batch
            images = generator.generate(prompts, batch_seed(seed, k), guidance)
            for j, i in enumerate(idx):
                if i in missing_set:
                    write_png(os.path.join(folder, image_name(i)), images[j])
                    bar.update(1)
    distributed.barrier("ediffi_jax:generate:done")
    return {"generated": len(missing), "existing": n - len(missing)}
