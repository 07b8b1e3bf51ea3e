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
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from ediffi_jax import edm
from ediffi_jax.encoders import TextEncoders, setup_text_encoders
from ediffi_jax.models.conditioning import Embedding
from ediffi_jax.sampling import HeunConfig, guided, heun_sample
from ediffi_jax.train.checkpoint import Checkpointer, abstract_like, check_compatible
from ediffi_jax.train.step import build_model, init_train_state, make_optimizer, split_model


def guided_denoiser(
    model: nnx.Module,
    embeddings: Mapping[str, Embedding],
    guidance_scale: jax.Array | float,
    sigma_data: float = edm.SIGMA_DATA,
):
    """D̃(x; σ) = D_u + s·(D_c − D_u), both branches in one forward pass of batch 2B.

    The unconditional branch drops every embedding (keep = False), i.e. only the null token is attended.
    """
    both = jax.tree.map(lambda a: jnp.concatenate([a, a], axis=0), dict(embeddings))

    def denoise(x: jax.Array, sigma: jax.Array) -> jax.Array:
        b = x.shape[0]
        keep = {n: jnp.arange(2 * b) < b for n in both}

        def net(x_in: jax.Array, c_noise: jax.Array) -> jax.Array:
            return model(x_in, c_noise, both, keep)

        d = edm.precondition(net, jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]), sigma_data)
        return guided(d[:b], d[b:], guidance_scale)

    return denoise


def make_sampler(graphdef: nnx.GraphDef, heun: HeunConfig, sigma_data: float = edm.SIGMA_DATA):
    """jit(params, embeddings, noise, key, guidance_scale) → images in [-1, 1] (float32)."""

    @jax.jit
    def sample(params, embeddings, noise, key, guidance_scale):
        model = nnx.merge(graphdef, params)
        den = guided_denoiser(model, embeddings, guidance_scale, sigma_data)
        return heun_sample(den, noise, heun, key if heun.s_churn > 0 else None)

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
    encoders: TextEncoders
    graphdef: nnx.GraphDef
    params: nnx.State
    step: int

    @classmethod
    def from_workdir(cls, workdir: str, *, use_ema: bool = True, step: int | None = None) -> TextToImage:
        cfg_path = os.path.join(workdir, "config.json")
        if not os.path.isfile(cfg_path):
            raise ValueError(f"workdir {workdir!r} has no config.json: not an ediffi-train run")
        with open(cfg_path) as f:
            stored = json.load(f)
        config = ml_collections.ConfigDict(stored)
        check_compatible(stored, config, workdir)
        encoders = setup_text_encoders(config, workdir)
        graphdef, params = split_model(nnx.eval_shape(lambda: build_model(config, config.seed)))
        tx = make_optimizer(config.optim)
        abstract = jax.eval_shape(lambda p: init_train_state(p, tx), params)
        ckpt = Checkpointer(workdir)
        try:
            state, _, step = ckpt.restore(abstract_like(abstract), step)
        finally:
            ckpt.close()
        return cls(config, encoders, graphdef, state.ema if use_ema else state.params, step)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        seed: int = 0,
        guidance_scale: float | None = None,
        heun: HeunConfig | None = None,
    ) -> np.ndarray:
        """uint8 images [len(prompts), R, R, 3]."""
        if not prompts:
            raise ValueError("no prompts given")
        heun = heun or HeunConfig.from_config(self.config.sample)
        s = self.config.sample.guidance_scale if guidance_scale is None else guidance_scale
        embeddings = self.encoders.encode_prompts(prompts)
        r = self.config.model.image_size
        key = jax.random.PRNGKey(seed)
        noise = jax.random.normal(jax.random.fold_in(key, 0), (len(prompts), r, r, self.config.model.out_channels))
        sample = make_sampler(self.graphdef, heun, self.config.edm.sigma_data)
        images = sample(self.params, embeddings, noise, jax.random.fold_in(key, 1), jnp.float32(s))
        return to_uint8(images)
