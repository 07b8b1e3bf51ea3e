"""Super-resolution stages of the cascade: low-res conditioning, noise-conditioning augmentation, aligned crops.

eDiff-I (Balaji et al. 2022, §4) upsamples its 64² samples with two conditional diffusion models, 64→256 and
256→1024 (the latter trained on random 256² crops of 1024² images and run fully convolutionally). As in NVIDIA's
EDM cascades, the low-resolution input is corrupted in training (noise-conditioning augmentation) and the network
is told how much:

    x̃_lr = x_lr + σ_aug·ε,   ln σ_aug ~ N(aug_p_mean, aug_p_std²)  (training; a small fixed σ_aug at sampling)
    network inputs: [c_in(σ)·x ; up(c_in(σ_aug)·x̃_lr)] (channel concat), c_noise(σ), and ln(σ_aug)/4 added to the
    time embedding (the UNet's `extra_cond`)

`up` is a bicubic resize to the high-res size (c_in(σ_aug) = 1/√(σ_aug² + σ_data²), the EDM input scaling,
keeps the conditioning at unit scale for any σ_aug). The low-res image is the area average of the high-res one
(`downsample`); with random crops the low-res crop is cut from the low-res image of the *whole* high-res image at
the matching position (`aligned_crop`, offsets multiples of the factor), so both crops show the same pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ediffi_jax import edm


def sr_config(factor: int = 0, crop: int = 0) -> ml_collections.ConfigDict:
    """`config.sr`: `factor` = 0 for a base model, else the upsampling factor of this stage (4 for 64→256);
    `crop` = 0 trains on whole images, else on random `crop`² high-res crops (SR1024: 256); σ_aug training
    distribution and the fixed σ_aug used at sampling."""
    return ml_collections.ConfigDict(dict(factor=factor, crop=crop, aug_p_mean=-1.2, aug_p_std=1.2,
                                          sample_sigma_aug=0.002))


def is_sr(config: ml_collections.ConfigDict) -> bool:
    return int(config.get("sr", {}).get("factor", 0)) > 0


def downsample(images: np.ndarray | jax.Array, factor: int) -> np.ndarray | jax.Array:
    """Area average over factor×factor blocks of [..., H, W, C] (H, W divisible by factor); NumPy in, NumPy out
    (a jax.Array gives a jax.Array)."""
    x = images
    h, w, c = x.shape[-3:]
    if factor < 1 or h % factor or w % factor:
        raise ValueError(f"image of {h}x{w} cannot be downsampled by {factor}")
    lead = x.shape[:-3]
    return x.reshape(*lead, h // factor, factor, w // factor, factor, c).mean(axis=(-4, -2))


def aligned_crop(
    rng: np.random.Generator, hr: np.ndarray, lr: np.ndarray, crop: int, factor: int
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """A random crop² of `hr` [H, W, C] and the matching (crop/factor)² of `lr` [H/f, W/f, C]: the high-res offset
    is a multiple of `factor`, so lr_crop == downsample(hr_crop) exactly when lr == downsample(hr)."""
    h, w = hr.shape[:2]
    if crop % factor or crop > min(h, w):
        raise ValueError(f"crop {crop} must be a multiple of the factor {factor} and fit the {h}x{w} image")
    if lr.shape[:2] != (h // factor, w // factor):
        raise ValueError(f"low-res image {lr.shape[:2]} does not match {h}x{w} / {factor}")
    y = int(rng.integers(0, (h - crop) // factor + 1)) * factor
    x = int(rng.integers(0, (w - crop) // factor + 1)) * factor
    c = crop // factor
    return hr[y:y + crop, x:x + crop], lr[y // factor:y // factor + c, x // factor:x // factor + c], (y, x)


def pair_transform(factor: int, crop: int = 0) -> Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]:
    """Record transform for the data pipeline: adds "lowres" (area-downsampled image) and, with `crop`, replaces
    both by aligned random crops."""

    def fn(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        hr = example["image"]
        lr = downsample(hr, factor).astype(np.float32)
        if crop:
            hr, lr, _ = aligned_crop(rng, hr, lr, crop, factor)
        return {**example, "image": np.ascontiguousarray(hr), "lowres": np.ascontiguousarray(lr)}

    return fn


def upsample(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bicubic resize of [B, h, w, C] to [B, *size, C] (float32)."""
    x = x.astype(jnp.float32)
    if x.shape[1:3] == tuple(size):
        return x
    return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), method="bicubic")


def augment(key: jax.Array, lowres: jax.Array, sigma_aug: jax.Array) -> jax.Array:
    """x̃_lr = x_lr + σ_aug·ε (σ_aug per example, [B])."""
    eps = jax.random.normal(key, lowres.shape, jnp.float32)
    return lowres.astype(jnp.float32) + sigma_aug.reshape(-1, 1, 1, 1) * eps


def conditioning(
    lowres_aug: jax.Array, sigma_aug: jax.Array, size: tuple[int, int], sigma_data: float = edm.SIGMA_DATA
) -> dict[str, jax.Array]:
    """The UNet's SR inputs: {"x_cond": up(c_in(σ_aug)·x̃_lr) [B, H, W, C], "extra_cond": ln(σ_aug)/4 [B, 1]}."""
    s = sigma_aug.astype(jnp.float32).reshape(-1)
    scaled = edm.c_in(s, sigma_data).reshape(-1, 1, 1, 1) * lowres_aug.astype(jnp.float32)
    return {"x_cond": upsample(scaled, size), "extra_cond": edm.c_noise(s).reshape(-1, 1)}


def sampling_conditioning(
    key: jax.Array, lowres: jax.Array, sigma_aug: float, size: tuple[int, int], sigma_data: float = edm.SIGMA_DATA
) -> dict[str, jax.Array]:
    """An SR stage's inputs at sampling: the fixed σ_aug (> 0) for every example, x̃_lr = x_lr + σ_aug·ε, then
    `conditioning`."""
    if not sigma_aug > 0:
        raise ValueError(f"sigma_aug must be > 0, got {sigma_aug}")
    s = jnp.full((lowres.shape[0],), sigma_aug, jnp.float32)
    return conditioning(augment(key, jnp.asarray(lowres), s), s, size, sigma_data)


def check_stage_input(lowres_hw: tuple[int, int], config: ml_collections.ConfigDict,
                      stage: str = "SR stage") -> None:
    """One-line error when a cascade stage's input is not what its config expects (previous output × factor must
    be divisible by the UNet's downsampling)."""
    f = int(config.sr.factor)
    want = int(config.model.image_size) // f if not config.sr.crop else None
    h, w = lowres_hw
    if want is not None and (h, w) != (want, want):
        raise ValueError(f"{stage} upsamples {want}x{want} inputs by {f}, got a {h}x{w} input from the previous stage")
    levels = len(tuple(config.model.channel_mult))
    if (h * f) % 2 ** (levels - 1) or (w * f) % 2 ** (levels - 1):
        raise ValueError(f"{stage}: output {h * f}x{w * f} is not divisible by {2 ** (levels - 1)} "
                         f"(the UNet's downsampling)")


__all__ = ["aligned_crop", "augment", "check_stage_input", "conditioning", "downsample", "is_sr", "pair_transform",
           "sampling_conditioning", "sr_config", "upsample"]
