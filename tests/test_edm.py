"""EDM formulation: coefficients and loss against the closed-form formulas (NVlabs/edm), σ distributions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ediffi_jax import edm

SIGMAS = np.array([0.002, 0.01, 0.1, 0.5, 1.0, 3.0, 80.0], np.float32)


def test_preconditioning_coefficients_match_closed_form():
    sd = 0.5
    s = SIGMAS.astype(np.float64)
    np.testing.assert_allclose(edm.c_skip(SIGMAS), sd**2 / (s**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(edm.c_out(SIGMAS), s * sd / np.sqrt(s**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(edm.c_in(SIGMAS), 1 / np.sqrt(s**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(edm.c_noise(SIGMAS), np.log(s) / 4, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(edm.loss_weight(SIGMAS), (s**2 + sd**2) / (s * sd) ** 2, rtol=1e-6)
    # EDM's unit-variance property: c_skip² σd² + c_out² ... the training target has unit variance:
    # Var[(y − c_skip(y + σn))/c_out] = 1 for Var y = σd².
    target_var = ((1 - edm.c_skip(s)) ** 2 * sd**2 + edm.c_skip(s) ** 2 * s**2) / edm.c_out(s) ** 2
    np.testing.assert_allclose(target_var, 1.0, rtol=1e-6)
    # λ(σ) = 1 / c_out(σ)²: the weighted loss is the unit-variance F-loss.
    np.testing.assert_allclose(edm.loss_weight(s), 1 / edm.c_out(s) ** 2, rtol=1e-6)


def test_precondition_and_loss_wire_the_network_as_in_edm():
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (3, 4, 4, 3))
    sigma = jnp.array([0.1, 1.0, 10.0])
    seen = {}

    def net(x_in, c_noise):
        seen["x_in"], seen["c_noise"] = x_in, c_noise
        return 2.0 * x_in + c_noise[:, None, None, None]

    d = edm.precondition(net, x, sigma)
    b = lambda v: np.asarray(v)[:, None, None, None]  # noqa: E731
    ci, cs, co, cn = (np.asarray(f(sigma)) for f in (edm.c_in, edm.c_skip, edm.c_out, edm.c_noise))
    np.testing.assert_allclose(seen["x_in"], b(ci) * np.asarray(x), rtol=1e-6)
    np.testing.assert_allclose(seen["c_noise"], cn, rtol=1e-6)
    np.testing.assert_allclose(d, b(cs) * x + b(co) * (2 * b(ci) * x + b(cn)), rtol=1e-5, atol=1e-6)

    y = jax.random.normal(jax.random.PRNGKey(1), x.shape) * 0.5
    n = jax.random.normal(jax.random.PRNGKey(2), x.shape)
    den = lambda xx, ss: edm.precondition(net, xx, ss)  # noqa: E731
    loss = edm.denoising_loss(den, y, sigma, n)
    expected = np.asarray(edm.loss_weight(sigma)) * np.mean(
        (np.asarray(den(y + b(sigma) * n, sigma)) - np.asarray(y)) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_optimal_denoiser_has_zero_f_loss_gradient_direction():
    # For a Gaussian y ~ N(0, σd²), the ideal D is D(x) = σd²/(σ²+σd²)·x = c_skip·x, i.e. F ≡ 0.
    sd = 0.5
    net = lambda x_in, c_noise: jnp.zeros_like(x_in)  # noqa: E731
    x = jnp.ones((2, 2, 2, 1))
    sigma = jnp.array([0.3, 2.0])
    d = edm.precondition(net, x, sigma)
    np.testing.assert_allclose(d[:, 0, 0, 0], sd**2 / (np.asarray(sigma) ** 2 + sd**2), rtol=1e-6)


def test_lognormal_sigma_full_distribution_moments():
    dist = edm.LogNormalSigma()
    s = np.asarray(dist.sample(jax.random.PRNGKey(0), (200_000,)), np.float64)
    ln = np.log(s)
    assert abs(ln.mean() - (-1.2)) < 0.01 and abs(ln.std() - 1.2) < 0.01
    assert stats.kstest(ln, stats.norm(-1.2, 1.2).cdf).pvalue > 1e-3


@pytest.mark.parametrize("lo_q,hi_q", [(0.0, 0.125), (0.125, 1 - 1 / 512), (1 - 1 / 512, 1.0), (0.5, 0.75)])
def test_truncated_sigma_stays_in_interval_and_matches_its_mass(lo_q, hi_q):
    full = edm.LogNormalSigma()
    lo, hi = full.quantile(lo_q), full.quantile(hi_q)
    dist = edm.LogNormalSigma(lo=lo, hi=hi)
    assert dist.mass == pytest.approx(hi_q - lo_q, rel=1e-9, abs=1e-12)
    s = np.asarray(dist.sample(jax.random.PRNGKey(3), (100_000,)), np.float64)
    assert np.all(s >= np.float32(lo)) and np.all(s < np.float32(hi) if math.isfinite(hi) else np.isfinite(s))
    # The conditional distribution: its CDF at interior points equals (F(x) − F(lo)) / mass.
    ref = stats.truncnorm((math.log(lo) + 1.2) / 1.2 if lo > 0 else -np.inf,
                          (math.log(hi) + 1.2) / 1.2 if math.isfinite(hi) else np.inf, loc=-1.2, scale=1.2)
    assert stats.kstest(np.log(s), ref.cdf).pvalue > 1e-3
    for q in (0.25, 0.5, 0.75):
        x = full.quantile(lo_q + q * (hi_q - lo_q))
        assert np.mean(s < x) == pytest.approx(q, abs=0.01)


def test_expert_boundaries_from_anchors():
    full = edm.LogNormalSigma()
    assert full.quantile(1 / 8) == pytest.approx(0.076, abs=5e-4)
    assert full.quantile(1 - 1 / 512) == pytest.approx(9.61, abs=0.01)
    assert full.cdf(full.quantile(0.3)) == pytest.approx(0.3, rel=1e-12)


def test_bad_sigma_intervals_are_rejected():
    with pytest.raises(ValueError, match=r"\[2.0, 1.0\)"):
        edm.LogNormalSigma(lo=2.0, hi=1.0)
    with pytest.raises(ValueError, match="p_std"):
        edm.LogNormalSigma(p_std=0.0)
    with pytest.raises(ValueError, match="quantile"):
        edm.LogNormalSigma().quantile(1.5)
