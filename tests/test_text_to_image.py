"""Sampling a trained run: guidance semantics on the real network, determinism, export round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ediffi_jax import edm
from ediffi_jax.data import shapes
from ediffi_jax.models.conditioning import keep_all
from ediffi_jax.text_to_image import TextToImage, guided_denoiser

PROMPTS = ["a red circle on the left", "a blue square at the top and a green circle at the bottom"]


@pytest.fixture(scope="module")
def pipe(trained_run):
    _, workdir, _ = trained_run
    return TextToImage.from_workdir(workdir)


def _denoisers(pipe, keep_value):
    model = nnx.merge(pipe.graphdef, pipe.params)
    emb = pipe.encoders.encode_prompts(PROMPTS)
    keep = keep_all(emb, keep_value)
    plain = jax.jit(lambda x, s: edm.precondition(lambda xi, cn: model(xi, cn, emb, keep), x, s))
    return model, emb, plain


def _guided(model, emb):
    """jit(x, sigma, s_text, s_image) of the guided denoiser (the scales are traced: one compile)."""
    return jax.jit(lambda x, sigma, st, si: guided_denoiser(model, emb, st, image_guidance_scale=si)(x, sigma))


@pytest.mark.parametrize("scale,branch", [(1.0, True), (0.0, False)])
def test_guidance_endpoints_equal_the_plain_branches(pipe, scale, branch):
    model, emb, plain = _denoisers(pipe, branch)
    r = pipe.config.model.image_size
    x = jax.random.normal(jax.random.PRNGKey(0), (2, r, r, 3)) * 2.0
    sigma = jnp.array([0.3, 5.0])
    got = _guided(model, emb)(x, sigma, scale, scale)
    np.testing.assert_allclose(got, plain(x, sigma), atol=2e-5, rtol=1e-5)
    # The conditional and unconditional branches really differ (the model reads the text).
    _, _, other = _denoisers(pipe, not branch)
    assert float(jnp.max(jnp.abs(other(x, sigma) - got))) > 1e-3


def test_guidance_extrapolates_linearly(pipe):
    model, emb, _ = _denoisers(pipe, True)
    r = pipe.config.model.image_size
    x = jax.random.normal(jax.random.PRNGKey(1), (2, r, r, 3))
    sigma = jnp.array([1.0, 1.0])
    g = _guided(model, emb)
    d0, d1, d3 = (g(x, sigma, s, s) for s in (0.0, 1.0, 3.0))
    np.testing.assert_allclose(d3, d0 + 3.0 * (d1 - d0), atol=5e-5)


def test_generate_is_deterministic_and_uint8(pipe):
    a = pipe.generate(PROMPTS, seed=3)
    b = pipe.generate(PROMPTS, seed=3)
    c = pipe.generate(PROMPTS, seed=4)
    r = pipe.config.model.image_size
    assert a.shape == (2, r, r, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert np.any(a != c)
    d = pipe.generate(PROMPTS, seed=3, guidance_scale=7.5)
    assert np.any(a != d)
    # One compile per shape: seeds and guidance scales are traced arguments.
    (sampler,) = pipe._samplers.values()
    assert sampler._cache_size() == 1
    with pytest.raises(ValueError, match="prompt must be a non-empty string, got ''"):
        pipe.generate(["a red circle on the left", ""])


def test_export_round_trip_samples_identically(pipe, tmp_path):
    out = pipe.export(str(tmp_path / "export"))
    loaded = TextToImage.from_workdir(out)
    assert loaded.step == pipe.step
    np.testing.assert_array_equal(loaded.generate(PROMPTS, seed=1), pipe.generate(PROMPTS, seed=1))
    with pytest.raises(ValueError, match="exists and is not empty"):
        pipe.export(out)


def test_text_and_image_guidance_chain(pipe):
    """D̃ = D_u + s_t(D_text − D_u) + s_i(D_text+image − D_text), every branch a plain keep-pattern."""
    model = nnx.merge(pipe.graphdef, pipe.params)
    r = pipe.config.model.image_size
    refs = np.stack([shapes.example(5, i, r)["image"] for i in range(2)])
    emb = pipe.encoders.encode_prompts(PROMPTS, refs)
    assert set(emb) == {"clip_text", "t5", "clip_image"}
    x = jax.random.normal(jax.random.PRNGKey(4), (2, r, r, 3))
    sigma = jnp.array([0.5, 2.0])

    @jax.jit
    def plain_keep(keep):
        return edm.precondition(lambda xi, cn: model(xi, cn, emb, keep), x, sigma)

    def plain(kept):
        return plain_keep({n: jnp.full((2,), n in kept) for n in emb})

    guided = _guided(model, emb)

    def g(st, si):
        return guided(x, sigma, st, si)

    np.testing.assert_allclose(g(1.0, 1.0), plain({"clip_text", "t5", "clip_image"}), atol=2e-5)
    np.testing.assert_allclose(g(0.0, 0.0), plain(set()), atol=2e-5)
    np.testing.assert_allclose(g(1.0, 0.0), plain({"clip_text", "t5"}), atol=2e-5)
    np.testing.assert_allclose(g(2.0, 3.0), g(2.0, 0.0) + 3.0 * (g(2.0, 1.0) - g(2.0, 0.0)), atol=5e-5)
    # Sampling with reference images is deterministic and differs from text-only sampling.
    a = pipe.generate(PROMPTS, seed=0, images=refs, image_guidance_scale=2.0)
    np.testing.assert_array_equal(a, pipe.generate(PROMPTS, seed=0, images=refs, image_guidance_scale=2.0))
    assert np.any(a != pipe.generate(PROMPTS, seed=0))
    with pytest.raises(ValueError, match=r"images must be \[2, H, W, 3\], got shape \(1, 16, 16, 3\)"):
        pipe.generate(PROMPTS, images=refs[:1])


def test_runs_from_before_newer_config_fields_load_with_their_defaults():
    """The committed asset predates the expert section and the real-data fields: loading fills them with the
    defaults (the behaviour from before they existed) instead of failing later (e.g. in save_ensemble)."""
    import json
    import os

    from ediffi_jax.config import default_config, run_config

    asset = os.path.join(os.path.dirname(__file__), "..", "assets", "tiny_shapes")
    with open(os.path.join(asset, "config.json")) as f:
        stored = json.load(f)
    assert "expert" not in stored and "path" not in stored["data"]
    config = run_config(stored)
    assert config.expert.to_dict() == default_config().expert.to_dict() and config.data.path == ""
    assert config.model.channels == stored["model"]["channels"]  # stored values win
    assert config.data.resolution == stored["data"]["resolution"] == 32
