"""EDM Heun sampler: schedule, NFE count, and exact sampling of a Gaussian through its closed-form denoiser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ediffi_jax.sampling import HeunConfig, churn_gammas, guided, heun_sample, karras_sigmas

MU, STD = 0.3, 0.7  # data distribution N(MU, STD²) per pixel


def gaussian_denoiser(x, sigma):
    """E[y | y + σn = x] for y ~ N(MU, STD²): the exact D(x; σ)."""
    s = sigma[:, None, None, None]
    return MU + STD**2 / (STD**2 + s**2) * (x - MU)


def test_karras_schedule_closed_form():
    s = karras_sigmas(5, 0.002, 80.0, 7.0)
    assert len(s) == 6 and s[-1] == 0.0
    assert s[0] == pytest.approx(80.0) and s[4] == pytest.approx(0.002)
    i = 2
    ref = (80.0 ** (1 / 7) + i / 4 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    assert s[i] == pytest.approx(ref, rel=1e-12)
    assert np.all(np.diff(s) < 0)


def test_churn_gammas():
    s = karras_sigmas(10, 0.002, 80.0)
    g = churn_gammas(s, HeunConfig(num_steps=10, s_churn=40.0, s_min=0.05, s_max=50.0))
    inside = (s[:-1] >= 0.05) & (s[:-1] <= 50.0)
    np.testing.assert_allclose(g[inside], np.sqrt(2) - 1)  # min(40/10, √2−1)
    assert np.all(g[~inside] == 0)
    g2 = churn_gammas(s, HeunConfig(num_steps=10, s_churn=2.0))
    np.testing.assert_allclose(g2, 0.2)


def test_network_evaluations_are_2n_minus_1():
    calls = []

    def den(x, sigma):
        calls.append(float(sigma[0]))
        return gaussian_denoiser(x, sigma)

    with jax.disable_jit():
        heun_sample(den, jnp.zeros((1, 1, 1, 1)), HeunConfig(num_steps=6))
    assert len(calls) == 2 * 6 - 1
    assert calls[0] == pytest.approx(80.0) and calls[-1] == pytest.approx(0.002, rel=1e-5)


@pytest.mark.parametrize("churn", [0.0, 10.0])
def test_heun_reproduces_gaussian_data_distribution(churn):
    cfg = HeunConfig(num_steps=128, s_churn=churn, s_min=0.01, s_max=10.0)
    n = (4096, 4, 4, 1)
    noise = jax.random.normal(jax.random.PRNGKey(0), n)
    x = jax.jit(lambda z, k: heun_sample(gaussian_denoiser, z, cfg, k))(noise, jax.random.PRNGKey(1))
    x = np.asarray(x, np.float64).ravel()
    # The ODE maps N(MU, STD² + σmax²) exactly onto N(MU, STD²); starting from N(0, σmax²) instead gives
    # x0 = MU + (xT − MU)·k with k = STD/√(STD²+σmax²): mean MU·(1 − k), std σmax·k.
    k = STD / np.sqrt(STD**2 + 80.0**2)
    mean_ref, std_ref = MU * (1 - k), 80.0 * k
    m = x.size  # i.i.d. pixels; 5-sigma sampling-error bounds
    assert abs(x.mean() - mean_ref) < 5 * std_ref / np.sqrt(m)
    assert abs(x.std() - std_ref) < 5 * std_ref / np.sqrt(2 * m)


def test_heun_is_second_order():
    noise = jax.random.normal(jax.random.PRNGKey(0), (256, 1, 1, 1))

    def run(n):
        return np.asarray(heun_sample(gaussian_denoiser, noise, HeunConfig(num_steps=n)), np.float64)

    ref = run(1024)
    e16, e32, e64 = (np.abs(run(n) - ref).max() for n in (16, 32, 64))
    # Halving the step size divides a 2nd-order method's error by ~4 (Euler: by ~2).
    assert e16 / e32 > 3.0 and e32 / e64 > 3.0, (e16, e32, e64)


def test_deterministic_sampler_is_deterministic_and_progress_reports_every_step():
    seen = []
    cfg = HeunConfig(num_steps=4)
    noise = jax.random.normal(jax.random.PRNGKey(0), (2, 2, 2, 1))
    f = jax.jit(lambda z: heun_sample(gaussian_denoiser, z, cfg, progress=lambda i, _: seen.append(int(i))))
    a, b = f(noise), f(noise)
    jax.effects_barrier()
    np.testing.assert_array_equal(a, b)
    assert sorted(seen) == sorted([0, 1, 2, 3] * 2)


def test_guidance_convention():
    c, u = jnp.array([2.0]), jnp.array([1.0])
    assert float(guided(c, u, 1.0)[0]) == 2.0  # s = 1: conditional only
    assert float(guided(c, u, 0.0)[0]) == 1.0  # s = 0: unconditional
    assert float(guided(c, u, 3.0)[0]) == 4.0  # u + 3(c − u)


def test_bad_sampler_config():
    with pytest.raises(ValueError, match="num_steps"):
        HeunConfig(num_steps=0)
    with pytest.raises(ValueError, match="sigma_min=90"):
        HeunConfig(sigma_min=90.0)
    with pytest.raises(ValueError, match="PRNG key"):
        heun_sample(gaussian_denoiser, jnp.zeros((1, 1, 1, 1)), HeunConfig(num_steps=3, s_churn=1.0))


def _other_denoiser(x, sigma):
    """A different (wrong) denoiser: shrinks towards 0 instead of MU."""
    s = sigma[:, None, None, None]
    return 0.5 / (0.5 + s**2) * x


@pytest.mark.parametrize("churn", [0.0, 5.0])
def test_expert_ensemble_uses_each_expert_on_its_own_evaluations(churn):
    cfg = HeunConfig(num_steps=12, sigma_min=0.002, sigma_max=80.0, s_churn=churn)
    boundaries = np.array([0.1, 3.0], np.float32)
    route = lambda s: np.searchsorted(boundaries, s, side="right")  # noqa: E731  [lo, hi) intervals
    experts = [gaussian_denoiser, _other_denoiser, gaussian_denoiser]

    def gathered(x, sigma):  # reference: evaluate every expert, pick per σ (what the segmented sampler avoids)
        idx = jnp.searchsorted(jnp.asarray(boundaries), sigma, side="right")[:, None, None, None]
        return jnp.where(idx == 1, _other_denoiser(x, sigma), gaussian_denoiser(x, sigma))

    noise = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
    key = jax.random.PRNGKey(1)
    ens = jax.jit(lambda n: heun_sample(experts, n, cfg, key, route=route))(noise)
    ref = jax.jit(lambda n: heun_sample(gathered, n, cfg, key))(noise)
    np.testing.assert_allclose(ens, ref, atol=1e-6)
    # The middle expert really ran: without it the result differs.
    plain = jax.jit(lambda n: heun_sample(gaussian_denoiser, n, cfg, key))(noise)
    assert float(jnp.abs(plain - ens).max()) > 1e-2


def test_ensemble_of_identical_experts_is_bitwise_the_single_model():
    cfg = HeunConfig(num_steps=10)
    route = lambda s: np.searchsorted(np.array([0.07, 9.6], np.float32), s, side="right")  # noqa: E731
    noise = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 3))
    one = jax.jit(lambda n: heun_sample(gaussian_denoiser, n, cfg))(noise)
    three = jax.jit(lambda n: heun_sample([gaussian_denoiser] * 3, n, cfg, route=route))(noise)
    np.testing.assert_array_equal(np.asarray(one), np.asarray(three))
    with pytest.raises(ValueError, match="3 denoisers need a route"):
        heun_sample([gaussian_denoiser] * 3, noise, cfg)
