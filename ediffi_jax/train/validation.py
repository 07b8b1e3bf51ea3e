"""The validation loss of a real-data run (`data.val_split`): the EDM loss of the EMA model on a fixed held-out set.

The set: the first `data.val_examples` examples of `data.val_split` that pass the bad-record checks (rounded up to
whole global batches; a split smaller than that is read again from its start), in split order, centre-cropped,
joined to their keyed embeddings when `data.embeddings` is set. Every example is scored at the same `NUM_SIGMAS`
noise levels, the mid-quantiles (k + ½)/8 of the run's training σ distribution (an expert: of its interval), with
noise from a fixed key per (batch, σ), every embedding kept (no conditioning dropout) and no network dropout. So
`val_loss` (the mean λ(σ)-weighted loss over examples and σ, the training loss's weighting) is a deterministic
function of the EMA parameters: comparable across steps and resumes (across meshes up to the float rounding of
the sums). An SR stage is scored at σ_aug = `sr.sample_sigma_aug` with fixed augmentation noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ediffi_jax import edm, sr
from ediffi_jax.data import pipeline, records
from ediffi_jax.models.conditioning import keep_all
from ediffi_jax.train import sharding

NUM_SIGMAS = 8
_KEY_TAG = 0x56414C  # fold_in tag of the validation noise (apart from the training keys)


def sigma_grid(dist: edm.LogNormalSigma, n: int = NUM_SIGMAS) -> np.ndarray:
    """σ at the mid-quantiles (k + ½)/n, k = 0..n-1, of `dist` (truncated to its [lo, hi) interval), float32."""
    lo, mass = dist.cdf(dist.lo), dist.mass
    return np.asarray([dist.quantile(lo + mass * (k + 0.5) / n) for k in range(n)], np.float32)


def _loss_sum(ema: Any, batch: dict, enc_params: Any, key: jax.Array, *, graphdef: Any, encode: Callable,
              sigmas: tuple[float, ...], sigma_data: float, sigma_aug: float | None) -> jax.Array:
    """Σ over the batch's examples and `sigmas` of the weighted EDM loss (float32 scalar)."""
    embeddings = encode(enc_params, batch)
    keep = keep_all(embeddings)
    y = batch["image"]
    b = y.shape[0]
    cond = {}
    if sigma_aug is not None:
        s_aug = jnp.full((b,), sigma_aug, jnp.float32)
        cond = sr.conditioning(sr.augment(jax.random.fold_in(key, len(sigmas)), batch["lowres"], s_aug), s_aug,
                               y.shape[1:3], sigma_data)

    def one(total: jax.Array, i: jax.Array) -> tuple[jax.Array, None]:
        model = nnx.merge(graphdef, ema)

        def net(x_in: jax.Array, c_noise: jax.Array) -> jax.Array:
            return model(x_in, c_noise, embeddings, keep, **cond)

        sigma = jnp.full((b,), jnp.asarray(sigmas, jnp.float32)[i])
        noise = jax.random.normal(jax.random.fold_in(key, i), y.shape, jnp.float32)
        loss = edm.denoising_loss(lambda x, s: edm.precondition(net, x, s, sigma_data), y, sigma, noise, sigma_data)
        return total + jnp.sum(loss), None

    total, _ = jax.lax.scan(one, jnp.zeros((), jnp.float32), jnp.arange(len(sigmas)))
    return total


class ValidationLoss:
    """`ValidationLoss(...)(state)` → ``{"val_loss": float}`` (module docstring). The held-out batches are read
    once, at construction (this process's block of each global batch); the loss function compiles on first use."""

    def __init__(self, config: ml_collections.ConfigDict, val_src: Any, *, store: Any, tokenize: Any,
                 device_keys: tuple[str, ...], encode: Callable, enc_params: Any, graphdef: Any, mesh: Any,
                 local_batch: int, sigma_dist: edm.LogNormalSigma, ema_shardings: Any):
        d = config.data
        global_batch = local_batch * jax.process_count()
        self.num_batches = max(1, math.ceil(int(d.val_examples) / global_batch))
        self.num_examples = self.num_batches * global_batch
        if len(val_src) == 0:
            raise ValueError(f"data.val_split={d.val_split!r} is empty")
        epochs = math.ceil(self.num_examples / len(val_src)) + 1  # room for bad records; a small split repeats
        pair = sr.pair_transform(int(config.sr.factor), int(config.sr.crop)) if sr.is_sr(config) else None
        try:
            it = pipeline.make_image_text_iterator(
                val_src, preprocess=records.Preprocess(d.resolution, "center", d.resize_filter, d.max_caption_chars),
                batch_size=local_batch, seed=None, tokenize=tokenize, shard_index=jax.process_index(),
                shard_count=jax.process_count(), num_epochs=epochs, split_batches=True, transform=pair,
                embeddings=store, num_threads=d.num_threads, prefetch_batches=d.prefetch)
        except ValueError as e:  # e.g. fewer records than one global batch
            raise ValueError(f"data.val_split={d.val_split!r}: {e}") from None
        try:
            self.batches = []
            for _ in range(self.num_batches):
                batch = next(it)
                self.batches.append({k: batch[k] for k in device_keys})
        except StopIteration:
            raise ValueError(f"data.val_split={d.val_split!r} has too few usable records for "
                             f"{self.num_examples} validation examples (skipped: "
                             f"{ {k: v for k, v in it.bad_records.items() if v} })") from None
        finally:
            it.close()
        self.bad_records = it.bad_records
        self.sigmas = sigma_grid(sigma_dist)
        base = jax.random.fold_in(jax.random.PRNGKey(config.seed), _KEY_TAG)
        rep = sharding.replicated(mesh)
        self.keys = [jax.device_put(jax.random.fold_in(base, i), rep) for i in range(self.num_batches)]
        self.mesh, self.enc_params = mesh, enc_params
        sigma_aug = float(config.sr.sample_sigma_aug) if sr.is_sr(config) else None
        fn = lambda e, b, p, k: _loss_sum(e, b, p, k, graphdef=graphdef, encode=encode,  # noqa: E731
                                          sigmas=tuple(float(s) for s in self.sigmas),
                                          sigma_data=float(config.edm.sigma_data), sigma_aug=sigma_aug)
        self.fn = jax.jit(fn, in_shardings=(ema_shardings, sharding.batch_shardings(self.batches[0], mesh),
                                            sharding.tree_shardings(enc_params, mesh), rep), out_shardings=rep)

    def __call__(self, state: Any) -> dict[str, float]:
        total = 0.0
        for batch, key in zip(self.batches, self.keys):
            total += float(jax.device_get(self.fn(state.ema, sharding.global_batch(batch, self.mesh),
                                                  self.enc_params, key)))
        return {"val_loss": total / (self.num_examples * len(self.sigmas))}
