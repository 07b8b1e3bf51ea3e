"""The train state and the jitted EDM train step (AdamW, EMA, per-embedding conditioning dropout).

The step is a pure function of (state, batch, encoder params, key): `nnx.merge` of the graph definition with
the parameter state happens inside the trace, so `jax.jit` sees only arrays (cheaper per call than `nnx.jit`).
Randomness is `fold_in(key, step)`, so a resumed run draws exactly what an uninterrupted one would. An expert's
σ interval is an operand of the step (`edm.SigmaInterval`), not a constant: the root and every expert of a tree run
the same compiled step.

A step whose loss or gradient norm is not finite is skipped inside the compiled step (no host round trip):
parameters, EMA and optimizer state keep their values (`jnp.where`, fused into the update), while `state.step`
still advances — the next step draws new noise and the loop reads the next batch, rather than retrying the
same batch with the same randomness forever. `state.skips` counts the consecutive skipped updates (0 after an
applied one); it is saved with checkpoints, so a restart inside a run of skips keeps counting.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct

from ediffi_jax import edm, sr
from ediffi_jax.models.conditioning import ConditionedUNet, sample_keep

EncodeFn = Callable[[Any, Mapping[str, jax.Array]], dict[str, dict[str, jax.Array]]]


@struct.dataclass
class TrainState:
    step: jax.Array  # updates attempted (applied or skipped): the data and randomness position
    params: nnx.State
    ema: nnx.State
    opt_state: optax.OptState
    skips: jax.Array  # consecutive skipped (non-finite) updates up to `step`


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW (eDiff-I: lr 1e-4, weight decay 0.01) with linear warm-up and global-norm clipping."""
    schedule = optax.warmup_constant_schedule(0.0, cfg.lr, max(int(cfg.warmup_steps), 1))
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
    )


def build_model(config: ml_collections.ConfigDict, seed: int) -> ConditionedUNet:
    return ConditionedUNet(config, rngs=nnx.Rngs(seed))


def split_model(model: ConditionedUNet) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params). The model must hold nothing but parameters (no RNG or batch-stat state)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"model holds non-parameter state, which the train step does not carry: {rest}")
    return graphdef, params


def init_train_state(params: nnx.State, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema=jax.tree.map(jnp.copy, params),
                      opt_state=tx.init(params), skips=jnp.zeros((), jnp.int32))


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """EMA decay with the usual warm-up min(decay, (1 + t)/(10 + t)), so short runs still average."""
    t = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static the train step closes over (hashable, so the step compiles once). `sigma_dist` is the
    distribution σ is drawn from unless the step is given an interval of it (`train_step(..., interval)`)."""

    sigma_dist: edm.LogNormalSigma
    drop_probs: tuple[tuple[str, float], ...]
    ema_decay: float
    sigma_data: float = edm.SIGMA_DATA
    # SR stage (sr.py): (aug_p_mean, aug_p_std) of the noise-conditioning augmentation ln σ_aug; None: base model.
    sr_aug: tuple[float, float] | None = None


def step_spec(config: ml_collections.ConfigDict, sigma_dist: edm.LogNormalSigma | None = None) -> StepSpec:
    drop = tuple((n, float(config.conditioning.embeddings[n].drop_prob)) for n in config.conditioning.order)
    dist = sigma_dist or edm.LogNormalSigma(config.edm.p_mean, config.edm.p_std)
    sr_aug = (float(config.sr.aug_p_mean), float(config.sr.aug_p_std)) if sr.is_sr(config) else None
    return StepSpec(sigma_dist=dist, drop_probs=drop, ema_decay=float(config.optim.ema_decay),
                    sigma_data=float(config.edm.sigma_data), sr_aug=sr_aug)


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    enc_params: Any,
    key: jax.Array,
    interval: edm.SigmaInterval | None = None,
    *,
    graphdef: nnx.GraphDef,
    encode: EncodeFn,
    tx: optax.GradientTransformation,
    spec: StepSpec,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One EDM step: encode text (frozen), draw σ and keep-flags, weighted loss, AdamW update, EMA.

    σ is drawn from `spec.sigma_dist`, restricted to `interval` when given (an expert's interval, e.g.
    `tree.sigma_dist(node).interval()`; traced, so one compiled step serves every interval).
    An SR stage (`spec.sr_aug`) also reads batch["lowres"]: the network gets the noise-conditioning-augmented
    low-res input and ln σ_aug (`sr.conditioning`), drawn with keys of their own, so the base model's randomness
    is the same with or without it.
    With a non-finite loss or gradient norm the update is skipped (see the module docstring). Metrics include
    `skipped_steps` (1.0 or 0.0; the loop sums it over a log window) and `consecutive_skips`; the means (loss,
    norms) read 0 on a skipped step, so that the loop averages them over the applied steps only.
    """
    y = batch["image"]
    b = y.shape[0]
    k_step = jax.random.fold_in(key, state.step)
    k_sigma, k_noise, k_drop, k_dropout = jax.random.split(k_step, 4)
    embeddings = jax.lax.stop_gradient(encode(enc_params, batch))
    keep = sample_keep(k_drop, b, dict(spec.drop_probs))
    sigma = spec.sigma_dist.sample(k_sigma, (b,), interval)
    noise = jax.random.normal(k_noise, y.shape, jnp.float32)
    cond = {}
    if spec.sr_aug is not None:  # x̃_lr = x_lr + σ_aug·ε, ln σ_aug ~ N(aug_p_mean, aug_p_std²)
        k_aug, k_aug_noise = jax.random.split(jax.random.fold_in(k_step, _SR_KEY_TAG))
        aug_mean, aug_std = spec.sr_aug
        sigma_aug = jnp.exp(aug_mean + aug_std * jax.random.normal(k_aug, (b,), jnp.float32))
        cond = sr.conditioning(sr.augment(k_aug_noise, batch["lowres"], sigma_aug), sigma_aug, y.shape[1:3],
                               spec.sigma_data)

    def loss_fn(params: nnx.State) -> tuple[jax.Array, jax.Array]:
        model = nnx.merge(graphdef, params)
        rngs = nnx.Rngs(dropout=k_dropout)

        def denoiser(x: jax.Array, s: jax.Array) -> jax.Array:
            net = functools.partial(_net, model, embeddings, keep, rngs, cond)
            return edm.precondition(net, x, s, spec.sigma_data)

        per_example = edm.denoising_loss(denoiser, y, sigma, noise, spec.sigma_data)
        return jnp.mean(per_example), per_example

    (loss, per_example), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    d = ema_decay_at(state.step, spec.ema_decay)
    ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema, params)

    def keep_if_skipped(new: Any, old: Any) -> Any:
        return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

    params = keep_if_skipped(params, state.params)
    new_state = TrainState(step=state.step + 1, params=params, ema=keep_if_skipped(ema, state.ema),
                           opt_state=keep_if_skipped(opt_state, state.opt_state),
                           skips=jnp.where(ok, 0, state.skips + 1))
    means = {
        "loss": loss,
        "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(params),
        # Unweighted reconstruction error is easier to read across σ: split at σ_data.
        "loss_low_sigma": _masked_mean(per_example, sigma < spec.sigma_data),
        "loss_high_sigma": _masked_mean(per_example, sigma >= spec.sigma_data),
    }
    metrics = {k: jnp.where(ok, v, 0.0) for k, v in means.items()}
    metrics.update({
        # The σ actually drawn (experts: inside their interval); aggregated as min / max, not means.
        "sigma_min": jnp.min(sigma),
        "sigma_max": jnp.max(sigma),
        "skipped_steps": 1.0 - ok.astype(jnp.float32),
        "consecutive_skips": new_state.skips.astype(jnp.float32),
    })
    return new_state, metrics


# fold_in tag of the SR augmentation's keys (apart from the four keys every step splits).
_SR_KEY_TAG = 0x5352


def _net(model: ConditionedUNet, embeddings, keep, rngs, cond, x_in: jax.Array, c_noise: jax.Array) -> jax.Array:
    return model(x_in, c_noise, embeddings, keep, rngs=rngs, **cond)


def _masked_mean(v: jax.Array, m: jax.Array) -> jax.Array:
    m = m.astype(v.dtype)
    return jnp.sum(v * m) / jnp.maximum(jnp.sum(m), 1.0)
