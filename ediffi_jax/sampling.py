"""EDM sampling: the ρ-schedule, Heun's 2nd-order sampler with optional churn, and classifier-free guidance.

Karras et al. 2022, Algorithm 2 ("deterministic" when S_churn = 0):

    σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ,  σ_N = 0                            (eq. 5)
    γ_i = min(S_churn/N, √2 − 1) if S_min ≤ σ_i ≤ S_max else 0;  σ̂ = σ_i(1 + γ_i)
    x̂ = x_i + √(σ̂² − σ_i²)·S_noise·ε
    d = (x̂ − D(x̂; σ̂))/σ̂;  x_{i+1} = x̂ + (σ_{i+1} − σ̂)·d                                     (Euler)
    if σ_{i+1} ≠ 0:  d' = (x_{i+1} − D(x_{i+1}; σ_{i+1}))/σ_{i+1};  x_{i+1} = x̂ + (σ_{i+1} − σ̂)(d + d')/2  (Heun)

N steps cost 2N − 1 network evaluations: the last step (to σ = 0) is Euler only, so it is taken outside the
`lax.fori_loop` that runs the N − 1 Heun steps.

Guidance convention (named `guidance_scale` everywhere in this project):
    D̃ = D_uncond + s·(D_cond − D_uncond)
so s = 1 is the plain conditional model, s = 0 the unconditional one, s > 1 extrapolates (Imagen / EDM / Rosetta
convention; diffusers' `cond + w·(cond − uncond)` is s = w + 1).

With several embeddings (eDiff-I: text, and a CLIP image embedding for style), guidance chains nested branches
B_0 ⊂ B_1 ⊂ … ⊂ B_K of kept embeddings (B_0 = nothing kept):
    D̃ = D_0 + Σ_k s_k·(D_k − D_{k−1})
e.g. D_u + s_text·(D_text − D_u) + s_image·(D_text+image − D_text). With all s_k = s this is the single-scale
rule on the full conditioning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]  # D(x [B,...], sigma [B]) -> [B,...]


@dataclasses.dataclass(frozen=True)
class HeunConfig:
    num_steps: int = 32
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    s_churn: float = 0.0
    s_min: float = 0.0
    s_max: float = float("inf")
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min}, "
                             f"sigma_max={self.sigma_max}")
        if self.s_churn < 0:
            raise ValueError(f"s_churn must be >= 0, got {self.s_churn}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> HeunConfig:
        """From an ml_collections `sample` subtree (unknown fields are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(cfg).items() if k in names})


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """The N + 1 noise levels σ_0 = σ_max > … > σ_{N−1} = σ_min > σ_N = 0 (EDM eq. 5), float64."""
    if num_steps == 1:
        return np.array([sigma_max, 0.0])
    i = np.arange(num_steps, dtype=np.float64)
    inv = 1.0 / rho
    s = (sigma_max**inv + i / (num_steps - 1) * (sigma_min**inv - sigma_max**inv)) ** rho
    return np.append(s, 0.0)


def churn_gammas(sigmas: np.ndarray, cfg: HeunConfig) -> np.ndarray:
    """γ_i for each of the N steps (zero outside [S_min, S_max] and when S_churn = 0)."""
    n = len(sigmas) - 1
    g = min(cfg.s_churn / n, np.sqrt(2.0) - 1.0)
    s = sigmas[:-1]
    return np.where((s >= cfg.s_min) & (s <= cfg.s_max), g, 0.0)


def heun_sample(
    denoise: Denoiser | Sequence[Denoiser],
    noise: jax.Array,
    cfg: HeunConfig,
    key: jax.Array | None = None,
    progress: Callable[[jax.Array, jax.Array], None] | None = None,
    route: Callable[[np.ndarray], np.ndarray] | None = None,
) -> jax.Array:
    """Runs Algorithm 2 from x_0 = σ_max·noise. Traceable: call it inside `jax.jit`.

    `noise` is standard normal of the output shape; `key` drives the churn noise (needed iff S_churn > 0);
    `progress(i, x0)` is called on the host after step i (via `jax.debug.callback`; x0, one element of the
    state, ties the call to the end of the step's compute), e.g. to advance a tqdm bar.

    Ensembles of experts (eDiff-I §4): `denoise` is a sequence of K denoisers and `route(σ) -> index` (host,
    NumPy) says which one owns each noise level. The schedule is known at trace time, so it is cut into
    contiguous segments of steps whose two evaluations (at σ̂_i and σ_{i+1}) use the same pair of experts; each
    segment is one `fori_loop` calling only its experts — no per-step parameter gather, the cost of one model
    per evaluation. A step whose evaluations fall in different experts uses each evaluation's own expert.
    """
    denoisers = list(denoise) if isinstance(denoise, Sequence) else [denoise]
    if len(denoisers) > 1 and route is None:
        raise ValueError(f"{len(denoisers)} denoisers need a route(sigma) -> index function")
    sigmas_np = karras_sigmas(cfg.num_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
    gammas_np = churn_gammas(sigmas_np, cfg)
    if np.any(gammas_np > 0) and key is None:
        raise ValueError("heun_sample with s_churn > 0 needs a PRNG key")
    sigmas = jnp.asarray(sigmas_np, jnp.float32)
    gammas = jnp.asarray(gammas_np, jnp.float32)
    batch = noise.shape[0]
    x = noise.astype(jnp.float32) * sigmas[0]
    n = cfg.num_steps
    # Which expert evaluates each step: first at σ̂_i (float32, as the trace computes it), then at σ_{i+1}.
    sig32 = sigmas_np.astype(np.float32)
    hats = sig32[:-1] * (np.float32(1.0) + gammas_np.astype(np.float32))
    first = np.zeros(n, np.int64) if route is None else np.asarray(route(hats), np.int64)
    second = np.zeros(n, np.int64) if route is None else np.asarray(route(sig32[1:]), np.int64)
    if first.min() < 0 or max(first.max(), second[:-1].max(initial=0)) >= len(denoisers):
        raise ValueError(f"route() returned expert indices outside [0, {len(denoisers)})")

    def d_of(den: Denoiser, x: jax.Array, sigma: jax.Array) -> jax.Array:
        return (x - den(x, jnp.full((batch,), sigma))) / sigma

    def churn(i: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        sigma = sigmas[i]
        sigma_hat = sigma * (1.0 + gammas[i])
        if key is None:
            return x, sigma_hat
        eps = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        return x + jnp.sqrt(jnp.maximum(sigma_hat**2 - sigma**2, 0.0)) * cfg.s_noise * eps, sigma_hat

    def heun_step(den1: Denoiser, den2: Denoiser) -> Callable[[jax.Array, jax.Array], jax.Array]:
        def step(i: jax.Array, x: jax.Array) -> jax.Array:
            x_hat, sigma_hat = churn(i, x)
            sigma_next = sigmas[i + 1]
            d = d_of(den1, x_hat, sigma_hat)
            x_next = x_hat + (sigma_next - sigma_hat) * d
            d_prime = d_of(den2, x_next, sigma_next)
            x_next = x_hat + (sigma_next - sigma_hat) * 0.5 * (d + d_prime)
            if progress is not None:
                jax.debug.callback(progress, i, x_next.ravel()[0])
            return x_next

        return step

    start = 0
    for stop in range(1, n):  # segments of the N − 1 Heun steps with one (first, second) expert pair
        if stop == n - 1 or (first[stop], second[stop]) != (first[start], second[start]):
            step = heun_step(denoisers[first[start]], denoisers[second[start]])
            # Opaque bounds: XLA must not unroll or constant-fold a segment by its length, so every step
            # computes bit for bit the same whatever the segmentation (ensemble == single model).
            lo, hi = jax.lax.optimization_barrier((jnp.int32(start), jnp.int32(stop)))
            x = jax.lax.fori_loop(lo, hi, step, x)
            start = stop
    # Final step to σ_N = 0: Euler, i.e. x_N = D(x̂; σ̂).
    x_hat, sigma_hat = churn(jnp.int32(n - 1), x)
    x = x_hat + (sigmas[n] - sigma_hat) * d_of(denoisers[first[n - 1]], x_hat, sigma_hat)
    if progress is not None:
        jax.debug.callback(progress, jnp.int32(n - 1), x.ravel()[0])
    return x


def guided(d_cond: jax.Array, d_uncond: jax.Array, guidance_scale: float | jax.Array) -> jax.Array:
    """D̃ = D_uncond + s·(D_cond − D_uncond) (see the module docstring for the convention)."""
    return d_uncond + guidance_scale * (d_cond - d_uncond)


def chained_guidance(ds: list[jax.Array] | tuple[jax.Array, ...], scales: jax.Array) -> jax.Array:
    """D̃ = D_0 + Σ_k s_k·(D_k − D_{k−1}) for nested branches D_0 (unconditional) … D_K; `scales` [K]."""
    if len(ds) != scales.shape[0] + 1:
        raise ValueError(f"{len(ds)} branches need {len(ds) - 1} guidance scales, got {scales.shape[0]}")
    out = ds[0]
    for k in range(1, len(ds)):
        out = out + scales[k - 1] * (ds[k] - ds[k - 1])
    return out
