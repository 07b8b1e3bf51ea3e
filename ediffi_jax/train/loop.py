"""The training loop: one `train(config, workdir)` in banner sections, as big_vision lays it out.

Re-running on the same workdir resumes from the latest checkpoint (params, EMA, optimizer, step and the data
iterator's position), so an interrupted run continues exactly where it stopped.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

from ediffi_jax.data import pipeline, shapes
from ediffi_jax.data.shapes_tfds import build_shapes
from ediffi_jax.encoders import FrozenEncoders, embeddings_from_batch, setup_encoders
from ediffi_jax.sampling import HeunConfig
from ediffi_jax.text_to_image import make_sampler, save_grid, to_uint8
from ediffi_jax.train.checkpoint import Checkpointer, abstract_like, check_compatible, config_to_dict
from ediffi_jax.train.expert_init import check_parent, copy_parent_encoders, expert_sigma_dist, params_from_parent
from ediffi_jax.train.step import (
    TrainState,
    build_model,
    init_train_state,
    make_optimizer,
    split_model,
    step_spec,
    train_step,
)

log = logging.getLogger(__name__)



def validate(config: ml_collections.ConfigDict) -> None:
    """Cross-field checks that would otherwise fail deep inside a trace."""
    if config.data.resolution != config.model.image_size:
        raise ValueError(f"data.resolution={config.data.resolution} differs from "
                         f"model.image_size={config.model.image_size}")
    if config.train.batch_size < 1:
        raise ValueError(f"train.batch_size must be >= 1, got {config.train.batch_size}")
    if config.data.name != "shapes" and not config.data.precomputed:
        raise ValueError(f"data.name={config.data.name!r}: only 'shapes' is available")
    for n in config.conditioning.order:
        p = config.conditioning.embeddings[n].drop_prob
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"conditioning.embeddings.{n}.drop_prob={p} is not a probability")


def _prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    current = config_to_dict(config)
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        check_compatible(stored, config, workdir)
        if stored == current:
            return
    if jax.process_index() == 0:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(current, f, indent=2)
        os.replace(tmp, path)


def load_data(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
    """(train source, validation source or None when data.num_val = 0), random access (TFDS array_record)."""
    d = config.data
    if d.precomputed:
        from ediffi_jax.data.embedded import load_embedded

        train_src, val_src = load_embedded(d.precomputed, config)
        return train_src, val_src if d.num_val > 0 else None
    builder = build_shapes(os.path.expanduser(d.data_dir), d.resolution, d.num_train, d.num_val, d.seed)
    return builder.as_data_source("train"), builder.as_data_source("validation") if d.num_val > 0 else None


def _device_keys(config: ml_collections.ConfigDict, encoders: FrozenEncoders) -> tuple[str, ...]:
    """Keys of a data batch that go to the device (captions stay on the host)."""
    if not config.data.precomputed:
        return ("image",) + tuple(k for k in encoders.batch_keys if k != "image")
    keys = ["image"]
    for n in encoders.names:
        keys += ["clip_image_pooled"] if n == "clip_image" else [f"{n}_tokens", f"{n}_mask"]
        if n == "clip_text":
            keys.append("clip_text_pooled")
    return tuple(keys)


def _encoder_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    """<workdir>/encoders; with precomputed data, a copy of the encoders the data was embedded with."""
    enc_dir = os.path.join(workdir, "encoders")
    src = os.path.join(os.path.expanduser(config.data.precomputed), "encoders") if config.data.precomputed else ""
    if src and not os.path.isdir(enc_dir) and jax.process_index() == 0:
        if not os.path.isdir(src):
            raise ValueError(f"data.precomputed={config.data.precomputed!r} has no encoders/ directory: "
                             "not an ediffi-embed output")
        shutil.copytree(src, enc_dir)
    return enc_dir


def _device_batch(batch: dict, keys: tuple[str, ...]) -> dict:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"data batch lacks {missing} (has {sorted(batch)}); check data.precomputed and "
                         "conditioning.order")
    return {k: batch[k] for k in keys}


def _caption(record: dict) -> str:
    c = record["caption"]
    return c.decode() if isinstance(c, bytes) else str(c)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) the run in `workdir`; returns the final metrics (loss, shape-score)."""
    validate(config)
    tree, sigma_dist = expert_sigma_dist(config)
    parent = check_parent(config, tree) if config.expert.node else ""
    _prepare_workdir(config, workdir)
    if parent:
        copy_parent_encoders(parent, os.path.join(workdir, "encoders"))

    # ---------------------------------------------------------------- input
    train_src, val_src = load_data(config)
    n_tok = min(len(train_src), 5000)
    encoders = setup_encoders(config, _encoder_dir(config, workdir),
                              captions=(_caption(train_src[i]) for i in range(n_tok)))
    device_keys = _device_keys(config, encoders)
    if config.data.precomputed:
        names = encoders.names
        encode, tokenize = (lambda _, b: embeddings_from_batch(b, names)), None  # noqa: E731
    else:
        encode, tokenize = encoders.encode, encoders.tokenize
    train_iter = pipeline.make_train_iterator(
        train_src, batch_size=config.train.batch_size, seed=config.seed, tokenize=tokenize,
        shard_index=jax.process_index(), shard_count=jax.process_count())

    # ---------------------------------------------------------------- model and optimizer
    graphdef, params = split_model(build_model(config, config.seed))
    tx = make_optimizer(config.optim)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    log.info("denoiser parameters: %s", f"{n_params:,}")

    # ---------------------------------------------------------------- checkpoint / resume
    ckpt = Checkpointer(workdir, max_to_keep=config.train.keep_checkpoints)
    start = 0
    if parent and ckpt.latest_step() is None:
        params = params_from_parent(config, parent, params)  # fresh optimizer, step 0
    state = init_train_state(params, tx)
    if ckpt.latest_step() is not None:
        state, data_state, start = ckpt.restore(abstract_like(state))
        if data_state:
            train_iter.set_state(data_state)
        log.info("resumed from step %d", start)

    # ---------------------------------------------------------------- update (compiled ahead of time)
    key = jax.random.PRNGKey(config.seed)
    if start >= config.train.num_steps:
        ckpt.close()
        log.info("workdir already holds step %d >= train.num_steps=%d: nothing to train",
                 start, config.train.num_steps)
        return {}
    first = next(train_iter)
    enc_params = {} if config.data.precomputed else encoders.params
    t0 = time.perf_counter()
    spec = step_spec(config, sigma_dist)
    step_fn = jax.jit(
        lambda s, b, e, k: train_step(s, b, e, k, graphdef=graphdef, encode=encode, tx=tx, spec=spec),
        donate_argnums=(0,)).lower(state, _device_batch(first, device_keys), enc_params, key).compile()
    log.info("train step compiled in %.1f s", time.perf_counter() - t0)

    writer = SummaryWriter(os.path.join(workdir, "tb")) if jax.process_index() == 0 else None
    metrics: dict[str, float] = {}
    total = config.train.num_steps
    t_last, n_last, window = time.perf_counter(), 0, None
    bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=jax.process_index() != 0)
    try:
        for step in range(start, total):
            batch = first if step == start else next(train_iter)
            state, m = step_fn(state, _device_batch(batch, device_keys), enc_params, key)
            window = m if window is None else _accumulate(window, m)  # stays on device
            n_last += 1
            bar.update(1)
            done = step + 1
            if done % config.train.log_every == 0 or done == total:
                # Means over the steps since the last log line (not one noisy step).
                metrics = {k: float(v) / (1 if k in _EXTREMES else n_last) for k, v in jax.device_get(window).items()}
                dt = time.perf_counter() - t_last
                metrics["images_per_s"] = n_last * config.train.batch_size / dt
                metrics["s_per_step"] = dt / n_last
                t_last, n_last, window = time.perf_counter(), 0, None
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_s']:.1f}")
                if writer:
                    for k, v in metrics.items():
                        writer.add_scalar(f"train/{k}", v, done)
                if not np.isfinite(metrics["loss"]):
                    raise FloatingPointError(f"loss is {metrics['loss']} at step {done}; last checkpoint kept")
            if done % config.train.ckpt_every == 0 or done == total:
                ckpt.save(done, state, train_iter.get_state(), config, force=done == total)
            periodic_eval = config.train.eval_every and done % config.train.eval_every == 0 and done != total
            if val_src is not None and periodic_eval:
                _log_eval(evaluate(config, encoders, graphdef, state, val_src, workdir, done), writer, done)
    finally:
        bar.close()
        ckpt.close()  # waits for an in-flight async save, so an interrupted run keeps its last checkpoint

    # ---------------------------------------------------------------- final evaluation
    if val_src is not None and config.train.eval_num > 0:
        metrics.update(_log_eval(evaluate(config, encoders, graphdef, state, val_src, workdir, total),
                                 writer, total))
    if writer:
        writer.close()
    return metrics


_EXTREMES = {"sigma_min": jnp.minimum, "sigma_max": jnp.maximum}  # window min / max; the rest are means


def _accumulate(window: dict, m: dict) -> dict:
    return {k: _EXTREMES.get(k, jnp.add)(window[k], v) for k, v in m.items()}


def _log_eval(result: dict[str, float], writer: SummaryWriter | None, step: int) -> dict[str, float]:
    if writer:
        for k, v in result.items():
            writer.add_scalar(f"eval/{k}", v, step)
    log.info("step %d eval: %s", step, result)
    return {f"eval_{k}": v for k, v in result.items()}


# Periodic evaluations of a run reuse one compiled sampler.
_eval_sampler = functools.lru_cache(maxsize=4)(make_sampler)


def evaluate(
    config: ml_collections.ConfigDict,
    encoders: FrozenEncoders,
    graphdef: Any,
    state: TrainState,
    val_src: Any,
    workdir: str,
    step: int,
) -> dict[str, float]:
    """Samples `train.eval_num` validation captions with the EMA params; writes a grid; returns shape-scores."""
    n = min(config.train.eval_num, len(val_src))
    captions = [_caption(val_src[i]) for i in range(n)]
    embeddings = encoders.encode_prompts(captions)
    r = config.model.image_size
    key = jax.random.PRNGKey(config.seed + 1)
    noise = jax.random.normal(key, (n, r, r, config.model.out_channels))
    sample = _eval_sampler(graphdef, HeunConfig.from_config(config.sample), config.edm.sigma_data)
    s = jnp.float32(config.sample.guidance_scale)
    images = to_uint8(sample(state.ema, embeddings, noise, key, s, s))
    if jax.process_index() == 0:
        save_grid(images, os.path.join(workdir, "samples", f"step_{step:08d}.png"))
    return shapes.score_batch(images, captions)
