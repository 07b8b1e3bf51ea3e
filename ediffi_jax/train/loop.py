"""The training loop: one `train(config, workdir)` in banner sections, as big_vision lays it out.

Re-running on the same workdir resumes from the latest checkpoint (params, EMA, optimizer, step and the data
iterator's position), so an interrupted run continues exactly where it stopped — on any mesh.

The step runs on the device mesh of `config.mesh` (train/sharding.py): parameters, EMA and optimizer state
sharded by the logical-axis rules, the batch split over ("data", "fsdp"), compiled once ahead of time with donated
state. Multi-host (`config.distributed`): every process runs this same function; each reads its own block of
every global batch, only process 0 writes config.json, TensorBoard, samples and the random encoders, and all
processes take part in Orbax saves and restores. The workdir must be one directory all processes see.

Fault tolerance:
- SIGTERM (TPU preemption, SLURM `--signal=TERM@300`, `launch/tpu_pod.sh stop`): the loop finishes the step in
  flight, writes a checkpoint at that step and waits until it is complete, logs one line and raises `Preempted`
  (ediffi-train then exits with status 75). One process: a Python handler sets a flag, read after every step for
  free; a second SIGTERM ends the process at once. Under jax.distributed, JAX's preemption service (its own
  SIGTERM notifier) makes every process stop at the same step (`reached_preemption_sync_point`, asked after
  every step; no collective in the loop). The handler is in place from the first step on; a SIGTERM during
  set-up ends the process (nothing trained yet is lost).
- Restart resumes from the newest checkpoint that restores (`Checkpointer.restore_latest`): an unfinished or
  unreadable newer one is reported by step and moved aside to `checkpoints/<step>.corrupt`, never deleted.
- A non-finite loss or gradient skips that update inside the compiled step (train/step.py; `state.step` still
  advances). Windows with skips log a warning and the `skipped_steps` / `consecutive_skips` scalars; once
  `train.max_consecutive_skips` updates in a row were skipped the loop raises `NonFiniteUpdates` (ediffi-train:
  one error line, status 1) without writing a checkpoint: the last one is kept. The count is read where the loop
  reads the device anyway: at log and checkpoint steps.
- Test hook: `EDIFFI_TEST_SIGNAL=STEP:NAME` (e.g. `5:KILL`, `4:TERM`) makes the process wait for its pending
  checkpoint writes after step STEP and then send itself signal NAME, so tests interrupt a run at a known step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter
from tqdm import tqdm

from ediffi_jax import compile_cache, sr
from ediffi_jax.data import pipeline, records, shapes, sources
from ediffi_jax.data.embedded import load_keyed
from ediffi_jax.encoders import FrozenEncoders, embeddings_from_batch, setup_encoders
from ediffi_jax.host_memory import release_free_heap
from ediffi_jax.sampling import HeunConfig
from ediffi_jax.text_to_image import make_sampler, save_grid, to_uint8
from ediffi_jax.tracing import abstract_module, fast_tracing
from ediffi_jax.train import sharding, step_cache
from ediffi_jax.train.checkpoint import Checkpointer, check_compatible, config_to_dict
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
from ediffi_jax.train.validation import ValidationLoss

log = logging.getLogger(__name__)


class Preempted(Exception):
    """`train` stopped on SIGTERM after writing a complete checkpoint at `step`: run it again to resume."""

    def __init__(self, step: int):
        super().__init__(f"stopped on SIGTERM after step {step}, with a checkpoint there")
        self.step = step


class NonFiniteUpdates(FloatingPointError):
    """`train` stopped after `train.max_consecutive_skips` consecutive non-finite updates (none was applied)."""


class _StopOnSigterm:
    """`stop(step)`: whether to stop after `step` because of SIGTERM; all processes of a run answer alike."""

    def __init__(self) -> None:
        self._flag, self._previous = False, None
        self._jax_service = jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service
        if self._jax_service:
            return  # JAX's notifier owns SIGTERM; a Python handler would replace it
        if jax.process_count() > 1:
            log.warning("jax_enable_preemption_service is off: SIGTERM ends this multi-process run without a "
                        "checkpoint")
            return
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: SIGTERM keeps its action
            log.info("train() runs outside the main thread: SIGTERM does not checkpoint")

    def _handle(self, signum: int, frame: Any) -> None:
        self._flag = True
        signal.signal(signal.SIGTERM, self._previous)  # a second SIGTERM acts as before (by default: end now)

    def __call__(self, step: int) -> bool:
        if self._jax_service:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._flag

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _test_signal() -> tuple[int, signal.Signals] | None:
    """The `EDIFFI_TEST_SIGNAL=STEP:NAME` test hook (module docstring)."""
    spec = os.environ.get("EDIFFI_TEST_SIGNAL")
    if not spec:
        return None
    step, name = spec.split(":")
    return int(step), signal.Signals["SIG" + name.upper().removeprefix("SIG")]


def validate(config: ml_collections.ConfigDict) -> None:
    """Cross-field checks that would otherwise fail deep inside a trace."""
    if sr.is_sr(config):  # an SR stage trains on (image, image / factor) pairs, whole or as crops
        f, crop = int(config.sr.factor), int(config.sr.crop)
        size = crop or config.data.resolution
        if config.data.resolution % f or size % f or size > config.data.resolution:
            raise ValueError(f"sr.factor={f}, sr.crop={crop} do not fit data.resolution={config.data.resolution}")
        if size != config.model.image_size:
            raise ValueError(f"model.image_size={config.model.image_size} differs from the training size {size} "
                             f"({'sr.crop' if crop else 'data.resolution'})")
    elif config.data.resolution != config.model.image_size:
        raise ValueError(f"data.resolution={config.data.resolution} differs from "
                         f"model.image_size={config.model.image_size}")
    if config.train.batch_size < 1:
        raise ValueError(f"train.batch_size must be >= 1, got {config.train.batch_size}")
    d = config.data
    if d.name not in sources.NAMES and not d.precomputed:
        raise ValueError(f"data.name={d.name!r}: one of {', '.join(sources.NAMES)}")
    if d.embeddings and d.precomputed:
        raise ValueError(f"data.embeddings={d.embeddings!r} and data.precomputed={d.precomputed!r}: give one "
                         "(data.embeddings for real data, data.precomputed for shapes)")
    if d.embeddings and d.name not in sources.IMAGE_TEXT_NAMES:
        raise ValueError(f"data.embeddings={d.embeddings!r} joins real data by record key; data.name={d.name!r} is "
                         f"not one of {', '.join(sources.IMAGE_TEXT_NAMES)}")
    if d.name in sources.IMAGE_TEXT_NAMES and not d.precomputed:
        records.Preprocess(d.resolution, d.crop, d.resize_filter, d.max_caption_chars)  # checks those fields
        if d.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {d.num_workers}")
        if d.val_split and d.val_examples < 1:
            raise ValueError(f"data.val_examples must be >= 1 with data.val_split, got {d.val_examples}")
    for n in config.conditioning.order:
        p = config.conditioning.embeddings[n].drop_prob
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"conditioning.embeddings.{n}.drop_prob={p} is not a probability")


def _prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
    if "://" in workdir:
        raise ValueError(f"--workdir={workdir!r}: remote paths are not supported yet; use a directory every "
                         "process sees (e.g. a mounted bucket: gcsfuse, NFS)")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create workdir {workdir!r}: {e.strerror or e}") from None
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
    """(train source, validation source or None when data.num_val = 0 / data.val_split = ""), random access (TFDS
    array_record; data/sources.py names them)."""
    d = config.data
    if d.precomputed:
        from ediffi_jax.data.embedded import load_embedded

        train_src, val_src = load_embedded(d.precomputed, config)
        return train_src, val_src if d.num_val > 0 else None

    if jax.process_count() > 1:  # one writer: process 0 generates / prepares the dataset, the others then open it
        if jax.process_index() == 0:
            sources.build(d)
        multihost_utils.sync_global_devices("ediffi_jax:data")
    builder = sources.build(d)
    if d.name in sources.IMAGE_TEXT_NAMES:  # real data: records read by pipeline.make_image_text_iterator
        return sources.image_text_sources(d, builder)
    return builder.as_data_source("train"), builder.as_data_source("validation") if d.num_val > 0 else None


def _device_keys(config: ml_collections.ConfigDict, encoders: FrozenEncoders | None) -> tuple[str, ...]:
    """Keys of a data batch that go to the device (captions stay on the host)."""
    images = ("image", "lowres") if sr.is_sr(config) else ("image",)
    if not config.data.precomputed and not config.data.embeddings:
        return images + tuple(k for k in encoders.batch_keys if k != "image")
    keys = list(images)
    for n in config.conditioning.order:
        if n == "clip_image":  # stored as its pooled vector; a keyed store has none: the step encodes "image"
            keys += ["clip_image_pooled"] if config.data.precomputed else []
            continue
        keys += [f"{n}_tokens", f"{n}_mask"]
        if n == "clip_text":
            keys.append("clip_text_pooled")
    return tuple(keys)


def _encoder_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    """<workdir>/encoders; with embedded data (data.precomputed / data.embeddings: an ediffi-embed output), a copy
    of the encoders the data was embedded with."""
    enc_dir = os.path.join(workdir, "encoders")
    field = next((f for f in ("precomputed", "embeddings") if config.data[f]), "")
    src = os.path.join(os.path.expanduser(config.data[field]), "encoders") if field else ""
    if src and not os.path.isdir(enc_dir) and jax.process_index() == 0:
        if not os.path.isdir(src):
            raise ValueError(f"data.{field}={config.data[field]!r} has no encoders/ directory: "
                             "not an ediffi-embed output")
        shutil.copytree(src, enc_dir)
    return enc_dir


def _keyed_encode(order: tuple[str, ...], image_encoder: FrozenEncoders | None) -> Any:
    """The train step's `encode` with a keyed store: the text embeddings read from the batch, "clip_image" from
    the CLIP image tower (`image_encoder`, the only encoder loaded) on the batch's image."""
    stored = tuple(n for n in order if n != "clip_image")

    def encode(params: Any, batch: dict) -> dict:
        out = embeddings_from_batch(batch, stored)
        if image_encoder is not None:
            out.update(image_encoder.encode(params, batch))
        return out

    return encode


def _device_batch(batch: dict, keys: tuple[str, ...]) -> dict:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"data batch lacks {missing} (has {sorted(batch)}); check data.precomputed and "
                         "conditioning.order")
    return {k: batch[k] for k in keys}


def _caption(record: dict) -> str:
    c = record["caption"]
    return c.decode() if isinstance(c, bytes) else str(c)


def _setup_encoders(config: ml_collections.ConfigDict, workdir: str, parent: str,
                    train_src: Any) -> FrozenEncoders | None:
    """The run's frozen encoders. Multi-host: process 0 creates what is missing (copies of the parent's or the
    precomputed data's encoders, random encoders, trained tokenizers) while the others wait, then they read it.
    With data.embeddings only the CLIP image tower is loaded (None when the run does not use "clip_image"): the
    text embeddings come with the data."""
    def setup() -> FrozenEncoders | None:
        if parent:
            copy_parent_encoders(parent, os.path.join(workdir, "encoders"))
        enc_dir = _encoder_dir(config, workdir)
        cfg = config
        if config.data.embeddings:
            if "clip_image" not in config.conditioning.order:
                return None
            cfg = config.copy_and_resolve_references()
            cfg.conditioning.order = ("clip_image",)
        n_tok = min(len(train_src), 5000)
        return setup_encoders(cfg, enc_dir, captions=(_caption(train_src[i]) for i in range(n_tok)))

    if jax.process_count() == 1:
        return setup()
    encoders = setup() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("ediffi_jax:encoders")
    return encoders if jax.process_index() == 0 else setup()


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) the run in `workdir`; returns the final metrics (loss, shape-score)."""
    # ---------------------------------------------------------------- processes, mesh, checks before any work
    sharding.initialize_distributed(config)  # before anything touches devices
    validate(config)
    tree, sigma_dist = expert_sigma_dist(config)
    parent = check_parent(config, tree) if config.expert.node else ""
    mesh = sharding.mesh_from_config(config.get("mesh"))
    local_batch = sharding.check_batch_size(config.train.batch_size, mesh)
    _prepare_workdir(config, workdir)
    log.info("mesh %s, %d process(es), batch %d per process", sharding.describe_mesh(mesh), jax.process_count(),
             local_batch)

    # ---------------------------------------------------------------- input
    train_src, val_src = load_data(config)
    d = config.data
    train_store, val_store = load_keyed(d.embeddings, config) if d.embeddings else (None, None)
    encoders = _setup_encoders(config, workdir, parent, train_src)
    device_keys = _device_keys(config, encoders)
    if d.precomputed:
        names = encoders.names
        encode, tokenize = (lambda _, b: embeddings_from_batch(b, names)), None  # noqa: E731
    elif d.embeddings:  # text embeddings from the keyed store; "clip_image" (if used) encoded from the image
        encode, tokenize = _keyed_encode(tuple(config.conditioning.order), encoders), None
    else:
        encode, tokenize = encoders.encode, encoders.tokenize
    # Every process reads its own block of each global batch; the global batches do not depend on the
    # number of processes, so a run on 1 host and on N hosts sees the same examples at every step.
    pair = sr.pair_transform(int(config.sr.factor), int(config.sr.crop)) if sr.is_sr(config) else None
    real = d.name in sources.IMAGE_TEXT_NAMES and not d.precomputed
    if real:  # resize, crop, bad records skipped and counted
        train_iter = pipeline.make_image_text_iterator(
            train_src, preprocess=records.Preprocess(d.resolution, d.crop, d.resize_filter, d.max_caption_chars),
            batch_size=local_batch, seed=config.seed, tokenize=tokenize, shard_index=jax.process_index(),
            shard_count=jax.process_count(), split_batches=True, transform=pair, embeddings=train_store,
            num_workers=d.num_workers, num_threads=d.num_threads, prefetch_batches=d.prefetch)
    else:
        train_iter = pipeline.make_train_iterator(
            train_src, batch_size=local_batch, seed=config.seed, tokenize=tokenize,
            shard_index=jax.process_index(), shard_count=jax.process_count(), split_batches=True, transform=pair)
    bad_seen: dict[str, int] = {}

    # ---------------------------------------------------------------- model, optimizer and their shardings
    graphdef, abstract_params = split_model(abstract_module(lambda: build_model(config, config.seed)))
    tx = make_optimizer(config.optim)
    abstract_state = jax.eval_shape(lambda p: init_train_state(p, tx), abstract_params)
    state_shardings = sharding.tree_shardings(abstract_state, mesh)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(abstract_params))
    log.info("denoiser parameters: %s", f"{n_params:,}")

    # ---------------------------------------------------------------- state: resume, parent, or fresh (sharded)
    ckpt = Checkpointer(workdir, max_to_keep=config.train.keep_checkpoints)
    start, data_state = 0, None
    restored = ckpt.restore_latest(sharding.with_shardings(abstract_state, state_shardings))
    if restored is not None:
        state, data_state, start = restored
        log.info("resumed from step %d", start)
    elif parent:  # fresh optimizer at step 0 on the parent's parameters, restored straight onto this mesh
        params = params_from_parent(config, parent, abstract_params, mesh)
        state = jax.jit(lambda p: init_train_state(p, tx), out_shardings=state_shardings)(params)
    else:  # built under jit straight into its shardings: never whole on one device
        with fast_tracing():  # tracing the construction: see ediffi_jax/tracing.py
            state = jax.jit(lambda: init_train_state(split_model(build_model(config, config.seed))[1], tx),
                            out_shardings=state_shardings)()
    if data_state:
        train_iter.set_state(data_state)
    if start >= config.train.num_steps:
        ckpt.close()
        log.info("workdir already holds step %d >= train.num_steps=%d: nothing to train",
                 start, config.train.num_steps)
        return {}

    # ---------------------------------------------------------------- update (compiled once, ahead of time)
    first = _device_batch(next(train_iter), device_keys)
    # Frozen encoders sharded by the same rules (evaluation encodes prompts with them next to the sharded EMA).
    if encoders is not None:
        encoders = dataclasses.replace(encoders, params=sharding.shard_params(encoders.params, mesh))
    enc_params = {} if d.precomputed or encoders is None else encoders.params
    rep = sharding.replicated(mesh)
    key = jax.device_put(jax.random.PRNGKey(config.seed), rep)
    # The untruncated distribution, and this node's σ interval as an operand: every expert compiles the same step.
    spec = step_spec(config)
    interval = jax.device_put(jax.tree.map(jnp.asarray, sigma_dist.interval()), rep)
    t0, disk_hits = time.perf_counter(), compile_cache.hits()
    step_args = (sharding.with_shardings(abstract_state, state_shardings), sharding.abstract_batch(first, mesh),
                 enc_params, key, interval)
    step_fn, reused = step_cache.cached_compile(step_cache.step_key(config, mesh, *step_args), lambda: jax.jit(
        lambda s, b, e, k, i: train_step(s, b, e, k, i, graphdef=graphdef, encode=encode, tx=tx, spec=spec),
        in_shardings=(state_shardings, sharding.batch_shardings(first, mesh),
                      sharding.tree_shardings(enc_params, mesh), rep, rep),
        out_shardings=(state_shardings, rep),
        donate_argnums=(0,),
    ).lower(*step_args).compile())
    compile_s = time.perf_counter() - t0
    if reused:  # an earlier run of this process compiled the same step (train/step_cache.py)
        log.info("train step reused from an earlier run of this process (%.1f s)", compile_s)
    else:
        freed = release_free_heap()  # the compiler's freed heap, returned before the step's temporaries
        how = ("loaded from the persistent compilation cache" if compile_cache.hits() > disk_hits  # compile_cache.py
               else "compiled")
        log.info("train step %s in %.1f s; %.2f GB of freed host memory returned", how, compile_s, freed / 1e9)
    sharding.log_memory(step_fn)
    # Real data: the validation loss on a fixed held-out set of data.val_split (shapes: sampled shape-scores).
    validation = ValidationLoss(
        config, val_src, store=val_store, tokenize=tokenize, device_keys=device_keys, encode=encode,
        enc_params=enc_params, graphdef=graphdef, mesh=mesh, local_batch=local_batch, sigma_dist=sigma_dist,
        ema_shardings=state_shardings.ema) if real and val_src is not None else None

    writer = SummaryWriter(os.path.join(workdir, "tb")) if jax.process_index() == 0 else None
    metrics: dict[str, float] = {}
    total, limit = config.train.num_steps, config.train.max_consecutive_skips
    t_last, n_last, window = time.perf_counter(), 0, None
    bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=jax.process_index() != 0)
    stop, hook = _StopOnSigterm(), _test_signal()
    try:
        try:
            for step in range(start, total):
                batch = first if step == start else _device_batch(next(train_iter), device_keys)
                state, m = step_fn(state, sharding.global_batch(batch, mesh), enc_params, key, interval)
                window = m if window is None else _accumulate(window, m)  # stays on device
                n_last += 1
                bar.update(1)
                done = step + 1
                if hook and done == hook[0]:
                    ckpt.wait()
                    os.kill(os.getpid(), hook[1])
                stopping = stop(done)
                save = done % config.train.ckpt_every == 0 or done == total or stopping
                if done % config.train.log_every == 0 or done == total or stopping:
                    metrics = _log_window(window, n_last, time.perf_counter() - t_last, done,
                                          config.train.batch_size, writer, bar)
                    t_last, n_last, window = time.perf_counter(), 0, None
                    _check_skips(metrics["consecutive_skips"], limit, done, ckpt)
                elif save:  # never checkpoint past the limit
                    _check_skips(float(jax.device_get(window["consecutive_skips"])), limit, done, ckpt)
                bad_every = config.data.bad_record_log_every
                if hasattr(train_iter, "bad_records") and (save or bad_every and done % bad_every == 0):
                    bad_seen = _log_bad_records(train_iter.bad_records, bad_seen, done, writer)
                if save:
                    ckpt.save(done, state, train_iter.get_state(), config, force=done == total or stopping)
                if stopping:
                    ckpt.wait()
                    log.warning("SIGTERM: stopped after step %d and wrote a checkpoint there; run the same "
                                "command to resume", done)
                    raise Preempted(done)
                periodic_eval = config.train.eval_every and done % config.train.eval_every == 0 and done != total
                if validation is not None and periodic_eval:
                    _log_eval(validation(state), writer, done)
                elif val_src is not None and periodic_eval:
                    _log_eval(evaluate(config, encoders, graphdef, state, val_src, workdir, done), writer, done)
        finally:
            stop.close()
            if isinstance(train_iter, pipeline.ImageTextIterator):
                train_iter.close()  # ends its grain worker processes, if any
            bar.close()
            ckpt.close()  # waits for an in-flight async save, so an interrupted run keeps its last checkpoint

        # ------------------------------------------------------------ final evaluation
        if validation is not None:
            metrics.update(_log_eval(validation(state), writer, total))
        elif val_src is not None and config.train.eval_num > 0:
            metrics.update(_log_eval(evaluate(config, encoders, graphdef, state, val_src, workdir, total),
                                     writer, total))
    finally:
        if writer:
            writer.close()
    return metrics


def _log_window(window: dict, n: int, dt: float, step: int, batch_size: int, writer: SummaryWriter | None,
                bar: tqdm) -> dict[str, float]:
    """The metrics of the `n` steps up to `step`: means over the applied updates (not one noisy step), σ extremes,
    skip counts; to TensorBoard, the progress bar, and a warning when updates were skipped."""
    sums = jax.device_get(window)
    applied = n - round(float(sums["skipped_steps"]))
    metrics = {k: float(v) if k in _EXTREMES or k in _COUNTS else float(v) / applied if applied else float("nan")
               for k, v in sums.items()}
    metrics["images_per_s"] = n * batch_size / dt
    metrics["s_per_step"] = dt / n
    if applied < n:
        log.warning("step %d: %d of the last %d updates skipped (non-finite loss or gradient), up to %d in a row",
                    step, n - applied, n, metrics["consecutive_skips"])
    bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_s']:.1f}")
    if writer:
        for k, v in metrics.items():
            writer.add_scalar(f"train/{k}", v, step)
    return metrics


def _log_bad_records(counts: dict[str, int], seen: dict[str, int], step: int,
                     writer: SummaryWriter | None) -> dict[str, int]:
    """Logs this process's skipped-record counts per reason (totals since the run began, from the iterator state,
    so they survive resumes) when they grew since the last log; returns them."""
    if counts != seen and any(counts.values()):
        log.warning("step %d: skipped records so far (this process): %s", step,
                    ", ".join(f"{k} {v}" for k, v in counts.items() if v))
    if writer:
        for k, v in counts.items():
            writer.add_scalar(f"data/bad_{k}", v, step)
    return dict(counts)


def _check_skips(consecutive: float, limit: int, step: int, ckpt: Checkpointer) -> None:
    if limit and consecutive >= limit:
        last = ckpt.latest_step()
        raise NonFiniteUpdates(
            f"{int(consecutive)} consecutive updates skipped for a non-finite loss or gradient "
            f"(train.max_consecutive_skips={limit}): stopped at step {step}; "
            + (f"the last checkpoint (step {last}) is kept" if last is not None else "no checkpoint was written"))


# Window min / max; `skipped_steps` is a count; the rest are means over the applied (not skipped) updates.
_EXTREMES = {"sigma_min": jnp.minimum, "sigma_max": jnp.maximum, "consecutive_skips": jnp.maximum}
_COUNTS = ("skipped_steps",)


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
    """Samples `train.eval_num` validation captions with the EMA params; writes a grid; returns shape-scores.
    An SR stage upsamples the validation images' low-res versions (whole images, σ_aug = sr.sample_sigma_aug)."""
    n = min(config.train.eval_num, len(val_src))
    captions = [_caption(val_src[i]) for i in range(n)]
    embeddings = encoders.encode_prompts(captions)
    r = config.data.resolution if sr.is_sr(config) else config.model.image_size
    key = jax.random.PRNGKey(config.seed + 1)
    # Host values (the same on every process) next to the sharded EMA; the images come back to every host.
    noise = np.asarray(jax.random.normal(key, (n, r, r, config.model.out_channels)))
    cond = None
    if sr.is_sr(config):
        hr = np.stack([pipeline.decode_image(val_src[i]["image"]) for i in range(n)]).astype(np.float32) / 127.5 - 1
        lowres = sr.downsample(hr, int(config.sr.factor))
        cond = jax.tree.map(np.asarray, sr.sampling_conditioning(jax.random.fold_in(key, 2), lowres,
                                                                 float(config.sr.sample_sigma_aug), (r, r),
                                                                 config.edm.sigma_data))
    sample = _eval_sampler(graphdef, HeunConfig.from_config(config.sample), config.edm.sigma_data)
    s = np.float32(config.sample.guidance_scale)
    out = sample(state.ema, embeddings, noise, np.asarray(key), s, s, cond=cond)
    images = to_uint8(multihost_utils.process_allgather(out, tiled=True) if jax.process_count() > 1 else out)
    if jax.process_index() == 0:
        save_grid(images, os.path.join(workdir, "samples", f"step_{step:08d}.png"))
    return shapes.score_batch(images, captions)
