"""The eDiff-I cascade: base (ensemble) → SR (ensemble) → … → image, one call.

A cascade config (JSON) lists the stages in order, each a workdir (a training run, an export or an ensemble of
experts) with its own sampler settings:

    {"stages": [
        {"workdir": "runs/base64", "steps": 25, "guidance": 5.0},
        {"workdir": "runs/sr256", "steps": 10, "guidance": 3.0, "sigma_aug": 0.002},
        {"workdir": "runs/sr1024", "steps": 10, "sigma_aug": 0.002}]}

Stage 1 must be a base model, every later stage an SR model (`config.sr.factor` > 0) whose input size is the
previous stage's output size. Each stage's sampler is jitted once per shape (`TextToImage` caches it); the
prompts, paint-with-words regions and style images apply to every stage (regions are resized to each stage's
output; stages without cross-attention ignore them).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ediffi_jax import sr
from ediffi_jax.paint_with_words import Region
from ediffi_jax.sampling import HeunConfig
from ediffi_jax.text_to_image import TextToImage

STAGE_FIELDS = ("workdir", "steps", "guidance", "image_guidance", "sigma_aug", "churn", "raw")


@dataclasses.dataclass
class Stage:
    """One stage: the loaded run and its sampler settings (None = the run's config)."""

    pipe: TextToImage
    steps: int | None = None
    guidance: float | None = None
    image_guidance: float | None = None
    sigma_aug: float | None = None
    churn: float | None = None
    name: str = ""

    def heun(self) -> HeunConfig:
        h = HeunConfig.from_config(self.pipe.config.sample)
        if self.steps is not None:
            h = dataclasses.replace(h, num_steps=int(self.steps))
        if self.churn is not None:
            h = dataclasses.replace(h, s_churn=float(self.churn))
        return h

    @property
    def factor(self) -> int:
        return int(self.pipe.config.sr.factor) if sr.is_sr(self.pipe.config) else 0


class Cascade:
    """Stages checked at construction: a base model first, then SR stages whose sizes chain."""

    def __init__(self, stages: Sequence[Stage]):
        if not stages:
            raise ValueError("a cascade needs at least one stage")
        if stages[0].factor:
            raise ValueError(f"stage 1 ({stages[0].name}) is an SR model (x{stages[0].factor}); the first stage "
                             f"must be a base model")
        size = int(stages[0].pipe.config.model.image_size)
        for i, st in enumerate(stages[1:], start=2):
            if not st.factor:
                raise ValueError(f"stage {i} ({st.name}) is not an SR model (config.sr.factor = 0)")
            sr.check_stage_input((size, size), st.pipe.config, stage=f"stage {i} ({st.name})")
            size *= st.factor
        self.stages = list(stages)

    @classmethod
    def from_config(cls, spec: str | Mapping[str, Any]) -> Cascade:
        """From a JSON file path or the parsed dict (see the module docstring)."""
        if isinstance(spec, str):
            if not os.path.isfile(spec):
                raise ValueError(f"cascade config {spec!r} is not a file")
            try:
                with open(spec) as f:
                    spec = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"cascade config is not valid JSON: {e}") from None
        raw = spec.get("stages") if isinstance(spec, Mapping) else None
        if not isinstance(raw, list) or not raw:
            raise ValueError("cascade config needs a non-empty list 'stages'")
        stages = []
        for i, st in enumerate(raw, start=1):
            unknown = sorted(set(st) - set(STAGE_FIELDS))
            if unknown:
                raise ValueError(f"stage {i}: unknown field(s) {unknown}; known: {list(STAGE_FIELDS)}")
            wd = st.get("workdir")
            if not wd or not os.path.isdir(wd):
                raise ValueError(f"stage {i}: workdir {wd!r} does not exist")
            pipe = TextToImage.from_workdir(wd, use_ema=not st.get("raw", False))
            stages.append(Stage(pipe, st.get("steps"), st.get("guidance"), st.get("image_guidance"),
                                st.get("sigma_aug"), st.get("churn"), name=wd))
        return cls(stages)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        seed: int = 0,
        regions: Sequence[Region] | Sequence[Sequence[Region]] | None = None,
        images: np.ndarray | None = None,
        paint_weight: float | None = None,
        paint_fn: str | None = None,
        progress: bool = False,
    ) -> list[np.ndarray]:
        """uint8 outputs of every stage, [len(prompts), R_i, R_i, 3] each (the last is the cascade's image)."""
        outs: list[np.ndarray] = []
        for i, st in enumerate(self.stages):
            cross = bool(st.pipe.config.model.cross_attn_resolutions)
            use_style = images is not None and "clip_image" in st.pipe.encoders.names
            outs.append(st.pipe.generate(
                prompts, seed=seed + i, guidance_scale=st.guidance, heun=st.heun(), progress=progress,
                images=images if use_style else None, image_guidance_scale=st.image_guidance,
                regions=regions if cross else None, paint_weight=paint_weight, paint_fn=paint_fn,
                lowres=outs[-1] if i else None, sigma_aug=st.sigma_aug))
        return outs


def side_by_side(outputs: Sequence[np.ndarray]) -> np.ndarray:
    """[N, R, R·S, 3]: every stage's output (nearest-upsampled to the last stage's size) next to each other."""
    r = outputs[-1].shape[1]
    cols = [np.repeat(np.repeat(o, r // o.shape[1], axis=1), r // o.shape[2], axis=2) for o in outputs]
    return np.concatenate(cols, axis=2)


__all__ = ["Cascade", "Stage", "side_by_side"]
