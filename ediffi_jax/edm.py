"""The EDM formulation (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

Everything that knows about σ lives here; the network only ever sees c_in·x and c_noise.

    D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ))                       (EDM eq. 7)
    c_skip = σd² / (σ² + σd²)      c_out = σ·σd / √(σ² + σd²)                        (EDM Table 1)
    c_in   = 1 / √(σ² + σd²)       c_noise = ¼·ln σ
    loss   = λ(σ)·‖D(y + σn; σ) − y‖²,   λ(σ) = (σ² + σd²) / (σ·σd)²,   ln σ ~ N(P_mean, P_std²)

eDiff-I trains every model, and every expert of the ensemble, with this loss; an expert only sees σ from its
interval of the training distribution, which `LogNormalSigma(lo, hi)` samples by inverse CDF. The interval reaches
the sampler as numbers (`SigmaInterval`), so a compiled train step takes it as an operand: one compile serves the
root and every expert.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from statistics import NormalDist
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SIGMA_DATA = 0.5
P_MEAN = -1.2
P_STD = 1.2

_STD_NORMAL = NormalDist()


def c_skip(sigma: jax.Array, sigma_data: float = SIGMA_DATA) -> jax.Array:
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def c_out(sigma: jax.Array, sigma_data: float = SIGMA_DATA) -> jax.Array:
    return sigma * sigma_data / jnp.sqrt(sigma**2 + sigma_data**2)


def c_in(sigma: jax.Array, sigma_data: float = SIGMA_DATA) -> jax.Array:
    return 1.0 / jnp.sqrt(sigma**2 + sigma_data**2)


def c_noise(sigma: jax.Array) -> jax.Array:
    return jnp.log(sigma) / 4.0


def loss_weight(sigma: jax.Array, sigma_data: float = SIGMA_DATA) -> jax.Array:
    """λ(σ) = (σ² + σd²) / (σ·σd)²: makes the effective training target unit-variance at every σ."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
    """Per-example [B] → [B, 1, 1, 1] (to the rank of x)."""
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def precondition(
    net: Callable[[jax.Array, jax.Array], jax.Array],
    x: jax.Array,
    sigma: jax.Array,
    sigma_data: float = SIGMA_DATA,
) -> jax.Array:
    """D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise) with F = `net(x_in, c_noise)`.

    `sigma` is per example, shape [B]. The network runs in its own dtype; the skip connection and the
    output combination are computed in float32 (EDM does the same: `F_x.to(torch.float32)`).
    """
    sigma = sigma.astype(jnp.float32)
    x = x.astype(jnp.float32)
    f = net(_bcast(c_in(sigma, sigma_data), x) * x, c_noise(sigma)).astype(jnp.float32)
    return _bcast(c_skip(sigma, sigma_data), x) * x + _bcast(c_out(sigma, sigma_data), x) * f


def denoising_loss(
    denoiser: Callable[[jax.Array, jax.Array], jax.Array],
    y: jax.Array,
    sigma: jax.Array,
    noise: jax.Array,
    sigma_data: float = SIGMA_DATA,
) -> jax.Array:
    """Per-example EDM loss λ(σ)·mean‖D(y + σn; σ) − y‖² (mean over pixels), shape [B].

    `denoiser(x, sigma)` is the preconditioned D(x; σ) (see `precondition`).
    """
    d = denoiser(y + _bcast(sigma, y) * noise, sigma)
    err = jnp.mean(jnp.square(d - y.astype(jnp.float32)), axis=tuple(range(1, y.ndim)))
    return loss_weight(sigma, sigma_data) * err


class SigmaInterval(NamedTuple):
    """A σ interval [lo, hi) of a `LogNormalSigma` as the numbers its inverse-CDF sampler uses (scalars; a pytree,
    so it can be an operand of compiled code): u ~ U(u_lo, u_hi), z = ±Φ⁻¹(u) (− when `flip`), σ clipped to
    [lo, hi] = the float32 neighbours inside the interval's edges."""

    u_lo: jax.Array
    u_hi: jax.Array
    flip: jax.Array
    lo: jax.Array
    hi: jax.Array


@dataclasses.dataclass(frozen=True)
class LogNormalSigma:
    """Training σ distribution ln σ ~ N(p_mean, p_std²), optionally truncated to [lo, hi).

    The truncated distribution (an expert's interval, eDiff-I §4) is sampled exactly by inverse CDF:
    u ~ U(Φ(a), Φ(b)), ln σ = p_mean + p_std·Φ⁻¹(u) with a, b the standardised bounds. For an interval in the
    upper tail (e.g. the top 1/512 of the mass) the mirrored form u ~ U(Φ(−b), Φ(−a)), z = −Φ⁻¹(u) keeps the
    float32 uniform away from 1, where it would have no resolution left.
    """

    p_mean: float = P_MEAN
    p_std: float = P_STD
    lo: float = 0.0
    hi: float = math.inf

    def __post_init__(self) -> None:
        if not self.p_std > 0:
            raise ValueError(f"p_std must be > 0, got {self.p_std}")
        if not (0.0 <= self.lo < self.hi):
            raise ValueError(f"sigma interval must satisfy 0 <= lo < hi, got [{self.lo}, {self.hi})")

    def _z(self, sigma: float) -> float:
        if sigma <= 0.0:
            return -math.inf
        if math.isinf(sigma):
            return math.inf
        return (math.log(sigma) - self.p_mean) / self.p_std

    def cdf(self, sigma: float) -> float:
        """P(σ' < sigma) under the *untruncated* distribution (float64, host side)."""
        z = self._z(sigma)
        return 0.0 if z == -math.inf else 1.0 if z == math.inf else _STD_NORMAL.cdf(z)

    def quantile(self, q: float) -> float:
        """σ such that P(σ' < σ) = q under the untruncated distribution."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        if q == 0.0:
            return 0.0
        if q == 1.0:
            return math.inf
        return math.exp(self.p_mean + self.p_std * _STD_NORMAL.inv_cdf(q))

    @property
    def mass(self) -> float:
        """Probability mass of [lo, hi) under the untruncated distribution."""
        return self.cdf(self.hi) - self.cdf(self.lo)

    def interval(self) -> SigmaInterval:
        """[lo, hi) as the numbers `sample` draws with (host side, float32): the uniform's range, the mirror
        flag and the clipping bounds. Raises ValueError when the interval has no probability mass."""
        a, b = self._z(self.lo), self._z(self.hi)
        flip = a > 0.0  # interval entirely in the upper half: sample the mirrored lower tail instead
        if flip:
            a, b = -b, -a
        u_lo = 0.0 if a == -math.inf else _STD_NORMAL.cdf(a)
        u_hi = 1.0 if b == math.inf else _STD_NORMAL.cdf(b)
        if not u_hi > u_lo:
            raise ValueError(f"sigma interval [{self.lo}, {self.hi}) has no probability mass to sample")
        f32 = np.float32
        # Guard the half-open interval against float32 rounding at its edges.
        lo = np.nextafter(f32(self.lo), f32(np.inf)) if self.lo > 0 else f32(0.0)
        hi = np.nextafter(f32(self.hi), f32(0.0)) if math.isfinite(self.hi) else f32(np.inf)
        return SigmaInterval(u_lo=f32(max(u_lo, np.finfo(f32).tiny)), u_hi=f32(u_hi), flip=np.bool_(flip), lo=lo,
                             hi=hi)

    def sample(self, key: jax.Array, shape: tuple[int, ...], interval: SigmaInterval | None = None) -> jax.Array:
        """σ of the interval [lo, hi), float32. `interval`: draw from that `SigmaInterval` of this distribution
        instead (e.g. a traced operand, so that one compiled function serves several intervals)."""
        iv = self.interval() if interval is None else interval
        u = jax.random.uniform(key, shape, jnp.float32, minval=iv.u_lo, maxval=iv.u_hi)
        z = jax.scipy.special.ndtri(u)
        z = jnp.where(iv.flip, -z, z)
        sigma = jnp.exp(self.p_mean + self.p_std * z)
        return jnp.clip(sigma, iv.lo, iv.hi)
