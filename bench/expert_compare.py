"""Compare runs — single models and ensembles of experts — on held-out data: denoising loss per σ bucket and the
shape-score of samples.

    .venv/bin/python bench/expert_compare.py --run single=/runs/tiny_8k --run ensemble=/runs/experts/ensemble \
        [--num 256] [--buckets 8] [--samples 64]

Each run loads with `ensemble.load_ensemble` (a single model is a one-leaf ensemble). The loss is the EDM loss
λ(σ)·‖D(y + σn; σ) − y‖² on the first `--num` validation images, with the *same* σ, noise and conditioning for
every run; σ is set at the mid-quantiles of `--buckets` equal-mass buckets of the training p(σ), and each σ is
denoised by the expert that owns it. Text conditioning is kept (no dropout), the image embedding dropped, as at
sampling. The shape-score samples `--samples` validation captions with the run's sampler settings.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from ediffi_jax import edm
from ediffi_jax.data import pipeline, shapes
from ediffi_jax.ensemble import load_ensemble
from ediffi_jax.models.conditioning import keep_all
from ediffi_jax.train.loop import load_data

_RUNS = flags.DEFINE_multi_string("run", [], "NAME=DIR of a run, export or ensemble (repeatable).")
_NUM = flags.DEFINE_integer("num", 256, "Validation images for the loss.")
_BUCKETS = flags.DEFINE_integer("buckets", 8, "Equal-mass σ buckets.")
_SAMPLES = flags.DEFINE_integer("samples", 64, "Validation captions to sample for the shape-score (0: skip).")
_BATCH = flags.DEFINE_integer("batch", 64, "Batch size of the loss evaluation.")


def bucket_losses(pipe, images: np.ndarray, captions: list[str], buckets: int, seed: int = 0) -> np.ndarray:
    """Mean EDM loss at each bucket's mid-quantile σ; [buckets]."""
    dist = pipe.tree.dist
    sigmas = [dist.quantile((k + 0.5) / buckets) for k in range(buckets)]
    owners = pipe.tree.route_host(np.asarray(sigmas, np.float32))

    @jax.jit
    def loss(params, y, emb, sigma, noise):
        model = nnx.merge(pipe.graphdef, params)
        keep = keep_all(emb)
        den = lambda x, s: edm.precondition(lambda xi, cn: model(xi, cn, emb, keep), x, s)  # noqa: E731
        return edm.denoising_loss(den, y, sigma, noise, pipe.config.edm.sigma_data)

    out = np.zeros(buckets)
    b = _BATCH.value
    for start in range(0, len(images), b):
        y = jnp.asarray(images[start:start + b])
        emb = pipe.encoders.encode_prompts(captions[start:start + b])
        for k, (s, owner) in enumerate(zip(sigmas, owners)):
            noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), start * buckets + k), y.shape)
            sig = jnp.full((y.shape[0],), s, jnp.float32)
            out[k] += float(jnp.sum(loss(pipe.experts[owner], y, emb, sig, noise)))
    return out / len(images)


def main(argv):
    flags.FLAGS(argv)
    if not _RUNS.value:
        raise SystemExit("give at least one --run NAME=DIR")
    runs = dict(r.split("=", 1) for r in _RUNS.value)
    pipes = {name: load_ensemble(d) for name, d in runs.items()}
    first = next(iter(pipes.values()))
    _, val = load_data(first.config)
    n = min(_NUM.value, len(val))
    records = [pipeline.decode_record(val[i]) for i in range(n)]
    images = np.stack([r["image"] for r in records])
    captions = [r["caption"] for r in records]
    dist = first.tree.dist
    edges = [dist.quantile(k / _BUCKETS.value) for k in range(1, _BUCKETS.value)]
    print(f"σ buckets (equal mass of ln σ ~ N({dist.p_mean}, {dist.p_std}²)), edges: "
          + ", ".join(f"{e:.3g}" for e in edges))
    for name, pipe in pipes.items():
        losses = bucket_losses(pipe, images, captions, _BUCKETS.value)
        line = f"{name:10s} leaves {list(pipe.tree.leaf_paths)} step {pipe.step}: loss/bucket " + " ".join(
            f"{v:.4f}" for v in losses) + f" | mean {losses.mean():.4f}"
        if _SAMPLES.value > 0:
            caps = [str(pipeline.decode_caption(val[i]["caption"])) for i in range(min(_SAMPLES.value, len(val)))]
            score = shapes.score_batch(pipe.generate(caps, seed=0), caps)
            line += " | shape-score " + " ".join(f"{k}={v:.3f}" for k, v in score.items())
        print(line, flush=True)


if __name__ == "__main__":
    main(sys.argv)
