"""Text → image with a trained run: load a workdir, encode prompts, sample with guidance, write a PNG grid.

One jitted function per (batch, resolution) runs the whole Heun loop; the guidance scale is a traced argument,
so sweeping it (FID–CLIP curves) does not recompile. Conditional and unconditional branches run as one batch
of 2B through the network.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from PIL import Image
from tqdm import tqdm

from ediffi_jax import edm, sr
from ediffi_jax.config import run_config
from ediffi_jax.encoders import FrozenEncoders, save_encoders, setup_encoders
from ediffi_jax.experts import ExpertTree
from ediffi_jax.models.conditioning import Embedding
from ediffi_jax.paint_with_words import (
    PaintMaps,
    Region,
    build_maps,
    cross_attention_sizes,
    make_attn_bias_fn,
    weight_fn,
)
from ediffi_jax.sampling import Denoiser, HeunConfig, chained_guidance, heun_sample
from ediffi_jax.tracing import abstract_module
from ediffi_jax.train.checkpoint import Checkpointer, abstract_like, config_to_dict
from ediffi_jax.train.step import build_model, init_train_state, make_optimizer, split_model

# Layout of an exported (inference-only) run, beside config.json and encoders/.
ENCODERS = "encoders"
EXPORT_PARAMS = "params"
EXPORT_STEP = "step.txt"


TEXT_EMBEDDINGS = ("clip_text", "t5")


def guidance_branches(names: Sequence[str]) -> list[tuple[str, ...]]:
    """Nested keep-sets for guidance: [()] + [text embeddings present] + [all, when an image embedding is
    present]. The scales are (text, image) in that order (see `sampling.chained_guidance`)."""
    text = tuple(n for n in names if n in TEXT_EMBEDDINGS)
    rest = tuple(n for n in names if n not in TEXT_EMBEDDINGS)
    branches = [()]
    if text:
        branches.append(text)
    if rest:
        branches.append(text + rest)
    return branches


def guided_denoiser(
    model: nnx.Module,
    embeddings: Mapping[str, Embedding],
    guidance_scale: jax.Array | float,
    sigma_data: float = edm.SIGMA_DATA,
    image_guidance_scale: jax.Array | float | None = None,
    paint: Mapping[str, Any] | None = None,
    paint_fn: str = "paper",
    cond: Mapping[str, jax.Array] | None = None,
) -> Denoiser:
    """D̃(x; σ) with per-embedding guidance, every branch in one forward pass of batch K·B.

    D̃ = D_u + s_text·(D_text − D_u) [+ s_image·(D_text+image − D_text) when an image embedding is given];
    `image_guidance_scale=None` means the text scale. A branch keeps the listed embeddings and drops the rest
    (dropped = masked out, only the null token is attended when all are dropped: the unconditional branch).
    `paint` ({"maps": PaintMaps.arrays, "weight": w′}, see paint_with_words.py) biases the cross-attention of
    the conditional branches (paint-with-words); the unconditional branch is left as it is. `cond` (SR stages,
    see sr.conditioning: {"x_cond", "extra_cond"}) is given to every branch.
    """
    branches = guidance_branches(list(embeddings))
    k_b = len(branches)
    many = jax.tree.map(lambda a: jnp.concatenate([a] * k_b, axis=0), dict(embeddings))
    image_scale = guidance_scale if image_guidance_scale is None else image_guidance_scale
    has_text = any(n in TEXT_EMBEDDINGS for n in embeddings)
    scales = [guidance_scale] * has_text + [image_scale] * (len(branches) - 1 - has_text)
    scales = jnp.stack([jnp.asarray(s, jnp.float32) for s in scales])

    cond_kb = {k: jnp.concatenate([v] * k_b) for k, v in (cond or {}).items()}
    maps = None
    if paint is not None:  # A per branch: zeros for the unconditional one (only conditional branches are biased)
        maps = {k: jnp.concatenate([jnp.zeros_like(a)] + [a] * (k_b - 1)) for k, a in paint["maps"].items()}

    def denoise(x: jax.Array, sigma: jax.Array) -> jax.Array:
        b = x.shape[0]
        branch = jnp.repeat(jnp.arange(k_b), b)
        keep = {n: jnp.asarray([n in br for br in branches])[branch] for n in many}
        sigma_kb = jnp.concatenate([jnp.broadcast_to(sigma, (b,))] * k_b)
        kw = dict(cond_kb)
        if maps is not None:
            kw["attn_bias_fn"] = make_attn_bias_fn(maps, sigma_kb, paint["weight"], paint_fn)

        def net(x_in: jax.Array, c_noise: jax.Array) -> jax.Array:
            return model(x_in, c_noise, many, keep, **kw)

        d = edm.precondition(net, jnp.concatenate([x] * k_b), sigma_kb, sigma_data)
        return chained_guidance([d[i * b:(i + 1) * b] for i in range(k_b)], scales)

    return denoise


class StepProgress:
    """Host-side hook for the sampler's per-step callback: advances `self.bar` (a tqdm bar) when one is set."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, i: jax.Array, _: jax.Array) -> None:
        if self.bar is not None:
            self.bar.update(1)


def make_sampler(
    graphdef: nnx.GraphDef,
    heun: HeunConfig,
    sigma_data: float = edm.SIGMA_DATA,
    progress: StepProgress | None = None,
    tree: ExpertTree | None = None,
    paint_fn: str = "paper",
) -> Callable[..., jax.Array]:
    """jit(params, embeddings, noise, key, guidance_scale, image_guidance_scale, paint=None, cond=None) → images in
    [-1, 1] (float32). `paint`: None, or {"maps": PaintMaps.arrays, "weight": w′} for paint-with-words with the
    weight function `paint_fn` (one more compile per shape; None costs nothing). `cond`: an SR stage's low-res
    conditioning (`sr.conditioning`).

    With an expert `tree`, `params` is a sequence of one parameter state per leaf (all sharing `graphdef`); each
    Heun evaluation runs only the expert owning its σ (`sampling.heun_sample`), one compile per shape.
    """

    weight_fn(paint_fn)  # unknown names fail here, not at trace time

    @jax.jit
    def sample(params, embeddings, noise, key, guidance_scale, image_guidance_scale, paint=None, cond=None):
        leaves = list(params) if tree is not None else [params]
        dens = [guided_denoiser(nnx.merge(graphdef, p), embeddings, guidance_scale, sigma_data, image_guidance_scale,
                                paint, paint_fn, cond)
                for p in leaves]
        route = tree.route_host if tree is not None and len(leaves) > 1 else None
        return heun_sample(dens, noise, heun, key if heun.s_churn > 0 else None, progress=progress, route=route)

    return sample


def to_uint8(images: jax.Array | np.ndarray) -> np.ndarray:
    x = np.asarray(images, np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_grid(images: np.ndarray, path: str, ncols: int | None = None) -> str:
    """Writes uint8 images [N, H, W, 3] as one PNG grid (row-major); returns the path."""
    n, h, w, _ = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.zeros((nrows * h, ncols * w, 3), np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


@dataclasses.dataclass
class TextToImage:
    """A trained run, ready to sample. Build with `TextToImage.from_workdir(dir)`."""

    config: ml_collections.ConfigDict
    encoders: FrozenEncoders
    graphdef: nnx.GraphDef
    params: nnx.State
    step: int
    tree: ExpertTree | None = None  # an ensemble of experts (see ensemble.py): one state per leaf in `experts`
    experts: tuple[nnx.State, ...] = ()
    _samplers: dict = dataclasses.field(default_factory=dict, repr=False)
    _progress: StepProgress = dataclasses.field(default_factory=StepProgress, repr=False)

    @classmethod
    def from_workdir(cls, workdir: str, *, use_ema: bool = True, step: int | None = None) -> TextToImage:
        """Loads a training run (`checkpoints/`), an exported one (`params/`, see `export`) or an ensemble of
        experts (`ensemble.json`, see `ensemble.py`)."""
        if os.path.isfile(os.path.join(workdir, "ensemble.json")):
            from ediffi_jax.ensemble import load_ensemble

            return load_ensemble(workdir)
        cfg_path = os.path.join(workdir, "config.json")
        if not os.path.isfile(cfg_path):
            raise ValueError(f"workdir {workdir!r} has no config.json: not an ediffi-train run")
        with open(cfg_path) as f:
            stored = json.load(f)
        config = run_config(stored)
        encoders = setup_encoders(config, os.path.join(workdir, ENCODERS))
        graphdef, params = split_model(abstract_module(lambda: build_model(config, config.seed)))
        exported = os.path.join(os.path.abspath(workdir), EXPORT_PARAMS)
        if os.path.isdir(exported):
            with ocp.StandardCheckpointer() as ckptr:
                params = ckptr.restore(exported, abstract_like(params))
            with open(os.path.join(workdir, EXPORT_STEP)) as f:
                return cls(config, encoders, graphdef, params, int(f.read()))
        tx = make_optimizer(config.optim)
        abstract = jax.eval_shape(lambda p: init_train_state(p, tx), params)
        ckpt = Checkpointer(workdir, read_only=True)
        try:
            state, _, step = ckpt.restore(abstract_like(abstract), step)
        finally:
            ckpt.close()
        return cls(config, encoders, graphdef, state.ema if use_ema else state.params, step)

    def export(self, out_dir: str) -> str:
        """Writes an inference-only copy of this run (config, tokenizers, random encoders, these parameters):
        no optimizer state, a quarter of a checkpoint's size. `from_workdir(out_dir)` loads it. Pretrained
        encoders are referenced by their `pretrained_dir`, not copied."""
        if self.tree is not None and len(self.experts) > 1:
            from ediffi_jax.ensemble import save_ensemble

            return save_ensemble(out_dir, self.config, self.encoders, self.tree, self.experts,
                                 [self.step] * len(self.experts), ["export"] * len(self.experts))
        if os.path.exists(out_dir) and os.listdir(out_dir):
            raise ValueError(f"export directory {out_dir!r} exists and is not empty; refusing to overwrite it")
        os.makedirs(out_dir, exist_ok=True)
        config = config_to_dict(self.config)
        for enc in config["encoders"].values():
            if not enc["pretrained_dir"]:
                enc["tokenizer_dir"] = ""  # the copy in out_dir/encoders/<name>/tokenizer
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        save_encoders(self.encoders, self.config, os.path.join(out_dir, ENCODERS))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.abspath(os.path.join(out_dir, EXPORT_PARAMS)), self.params)
        with open(os.path.join(out_dir, EXPORT_STEP), "w") as f:
            f.write(str(self.step))
        return out_dir

    def generate(
        self,
        prompts: Sequence[str],
        *,
        seed: int = 0,
        guidance_scale: float | None = None,
        images: np.ndarray | None = None,
        image_guidance_scale: float | None = None,
        heun: HeunConfig | None = None,
        progress: bool = False,
        regions: Sequence[Region] | Sequence[Sequence[Region]] | None = None,
        paint_weight: float | None = None,
        paint_fn: str | None = None,
        lowres: np.ndarray | None = None,
        sigma_aug: float | None = None,
    ) -> np.ndarray:
        """uint8 images [len(prompts), R, R, 3]; `progress` shows a tqdm bar over the Heun steps.

        `images` (optional, [len(prompts), H, W, 3], uint8 or [-1, 1]): reference images whose CLIP image
        embedding conditions the samples (style), guided with `image_guidance_scale`; without them the image
        embedding is dropped. Scales default to `config.sample.guidance_scale` / `image_guidance_scale`.

        `regions` (paint-with-words, see paint_with_words.py): one list of `Region`s for every prompt, or one list
        per prompt; `paint_weight` w′ and `paint_fn` default to `config.sample.paint_weight` / `paint_fn`. No
        regions (or empty lists) sample exactly as without paint-with-words.

        SR stages (`config.sr.factor` > 0) need `lowres` ([len(prompts), h, w, 3], uint8 or [-1, 1]: the previous
        stage's output); the output is (h·factor)², the input augmented with `sigma_aug` (default
        `config.sr.sample_sigma_aug`).
        """
        if not prompts:
            raise ValueError("no prompts given")
        heun = heun or HeunConfig.from_config(self.config.sample)
        s = self.config.sample.guidance_scale if guidance_scale is None else guidance_scale
        si = self.config.sample.get("image_guidance_scale", s) if image_guidance_scale is None else image_guidance_scale
        if images is not None and "clip_image" not in self.encoders.names:
            raise ValueError(f"this run does not condition on an image embedding (conditioning.order="
                             f"{self.encoders.names}); images cannot be used")
        embeddings = self.encoders.encode_prompts(prompts, images)
        key = jax.random.PRNGKey(seed)
        out_hw, cond = self._sr_inputs(lowres, sigma_aug, len(prompts), jax.random.fold_in(key, 2))
        pw_fn = paint_fn or self.config.sample.get("paint_fn", "paper")
        paint = None
        if regions is not None and len(regions) and any(len(x) for x in self._per_prompt(regions, len(prompts))):
            w = self.config.sample.get("paint_weight", 1.0) if paint_weight is None else paint_weight
            paint = {"maps": self.paint_maps(prompts, regions, embeddings, out_hw).arrays,
                     "weight": jnp.float32(w)}
        noise = jax.random.normal(jax.random.fold_in(key, 0), (len(prompts), *out_hw, self.config.model.out_channels))
        # One compile per sampler config (and shape). The per-step progress callback only when a bar is shown:
        # XLA's persistent compilation cache skips functions with host callbacks.
        if (heun, pw_fn, progress) not in self._samplers:
            self._samplers[heun, pw_fn, progress] = make_sampler(
                self.graphdef, heun, self.config.edm.sigma_data, self._progress if progress else None, self.tree,
                pw_fn)
        sample = self._samplers[heun, pw_fn, progress]
        params = tuple(self.experts) if self.tree is not None else self.params
        with tqdm(total=heun.num_steps, desc="sample", unit="step", disable=not progress) as bar:
            self._progress.bar = bar
            try:
                images = sample(params, embeddings, noise, jax.random.fold_in(key, 1), jnp.float32(s),
                                jnp.float32(si), paint, cond)
                images = to_uint8(images)
                jax.effects_barrier()
            finally:
                self._progress.bar = None
        return images

    def _sr_inputs(self, lowres, sigma_aug, n: int, key: jax.Array):
        """(output size, None) for a base model; ((h·f, w·f), sr.conditioning(...)) for an SR stage."""
        r = int(self.config.model.image_size)
        if not sr.is_sr(self.config):
            if lowres is not None:
                raise ValueError("this run is not a super-resolution stage (config.sr.factor = 0); lowres cannot "
                                 "be used")
            return (r, r), None
        if lowres is None:
            raise ValueError(f"this run is an SR stage (x{self.config.sr.factor}): pass lowres images")
        x = np.asarray(lowres)
        if x.ndim != 4 or x.shape[0] != n or x.shape[-1] != 3:
            raise ValueError(f"lowres must be [{n}, h, w, 3], got shape {x.shape}")
        sr.check_stage_input(x.shape[1:3], self.config)
        x = x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x.astype(np.float32)
        f = int(self.config.sr.factor)
        s_aug = float(self.config.sr.sample_sigma_aug if sigma_aug is None else sigma_aug)
        out_hw = (x.shape[1] * f, x.shape[2] * f)
        cond = sr.sampling_conditioning(key, x, s_aug, out_hw, self.config.edm.sigma_data)
        return out_hw, cond

    @staticmethod
    def _per_prompt(regions, n: int) -> list[Sequence[Region]]:
        if regions and isinstance(regions[0], Region):
            return [list(regions)] * n
        if len(regions) != n:
            raise ValueError(f"regions: expected one list of Regions for all prompts or one per prompt ({n}), "
                             f"got {len(regions)} lists")
        return [list(r) for r in regions]

    def paint_maps(self, prompts: Sequence[str], regions: Sequence[Region] | Sequence[Sequence[Region]],
                   embeddings: Mapping[str, Embedding], output_size: tuple[int, int]) -> PaintMaps:
        """The paint-with-words token maps A of `prompts` for the context of `embeddings` (conditioning order,
        the null token excluded), at every cross-attention size of the UNet for `output_size`."""
        streams = []
        for n in self.config.conditioning.order:
            if n in embeddings:
                tok = self.encoders.tokenizers.get("clip" if n == "clip_text" else n) if n != "clip_image" else None
                streams.append((n, int(embeddings[n]["tokens"].shape[1]), tok))
        sizes = cross_attention_sizes(self.config.model, *output_size)
        return build_maps(prompts, self._per_prompt(regions, len(prompts)), streams, sizes, output_size)
