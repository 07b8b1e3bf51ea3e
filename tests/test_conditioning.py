"""The eDiff-I conditioning (models/conditioning.py): [CLIP-text; T5; CLIP-image] context, pooled vectors, and
per-embedding dropping, where a missing embedding is exactly the dropped one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import micro_config
from flax import nnx

from ediffi_jax.config import default_config
from ediffi_jax.models.conditioning import ConditionedUNet, keep_all, sample_keep


@pytest.fixture(scope="module")
def model():
    """The micro ConditionedUNet with every parameter random (the UNet's output layer is zero at init), built
    abstractly and filled in — no eager initialisation."""
    config = micro_config("/nonexistent")
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: ConditionedUNet(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(1)  # host random numbers: no compile per parameter shape

    def fill(p):
        n = rng.standard_normal(p.shape).astype(np.float32)
        return jnp.asarray(0.5 + 0.1 * n if len(p.shape) == 1 else n / np.sqrt(np.prod(p.shape[:-1])))

    return nnx.merge(graphdef, jax.tree.map(fill, abstract))


def _embeddings(b=2, seed=0):
    r = np.random.default_rng(seed)
    mask = np.arange(20)[None] < np.array([[14], [6]])[:b]
    f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)  # noqa: E731
    return {"clip_text": {"tokens": f(b, 20, 32), "mask": jnp.asarray(mask), "pooled": f(b, 16)},
            "t5": {"tokens": f(b, 20, 32), "mask": jnp.asarray(mask)},
            "clip_image": {"tokens": f(b, 1, 16), "mask": jnp.ones((b, 1), bool), "pooled": f(b, 16)}}


@jax.jit
def _forward(graphdef, params, emb, keep):
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 16, 3))
    return nnx.merge(graphdef, params)(x, jnp.array([0.1, -0.3]), emb, keep)


def _run(model, emb, keep):
    graphdef, params = nnx.split(model)
    return _forward(graphdef, params, emb, keep)


def test_context_layout_and_pooled(model):
    emb = _embeddings()
    ctx, mask, pooled = model.conditioner(emb, keep_all(emb))
    assert ctx.shape == (2, 20 + 20 + 1, 32) and mask.shape == (2, 41)  # [CLIP-text; T5; CLIP-image]
    np.testing.assert_array_equal(mask[:, :20], emb["clip_text"]["mask"])
    np.testing.assert_array_equal(mask[:, 40], [True, True])
    assert pooled.shape == (2, 32)
    # Dropping an embedding removes exactly its pooled projection from the sum.
    keep = {**keep_all(emb), "clip_image": jnp.array([False, False])}
    _, _, pooled_no_img = model.conditioner(emb, keep)
    proj = model.conditioner.pooled_proj["clip_image"](emb["clip_image"]["pooled"])
    np.testing.assert_allclose(pooled - pooled_no_img, proj, atol=1e-5)


def test_missing_embedding_equals_dropped(model):
    emb = _embeddings()
    drop_img = {**keep_all(emb), "clip_image": jnp.array([False, False])}
    without = {k: v for k, v in emb.items() if k != "clip_image"}
    np.testing.assert_allclose(_run(model, emb, drop_img), _run(model, without, keep_all(without)), atol=1e-5)
    # ... and it is not what zeros would give (the case the model never sees in training).
    zeros = {**emb, "clip_image": {k: jnp.zeros_like(v) if k != "mask" else v for k, v in emb["clip_image"].items()}}
    assert float(jnp.abs(_run(model, zeros, keep_all(zeros)) - _run(model, emb, drop_img)).max()) > 1e-4
    # Every embedding changes the output when kept.
    full = _run(model, emb, keep_all(emb))
    for name in emb:
        dropped = _run(model, emb, {**keep_all(emb), name: jnp.array([False, False])})
        assert float(jnp.abs(full - dropped).max()) > 1e-4, name
    # Per example: dropping for example 1 only leaves example 0 unchanged.
    one = _run(model, emb, {**keep_all(emb), "t5": jnp.array([True, False])})
    np.testing.assert_allclose(one[0], full[0], atol=1e-6)


def test_training_drop_rates_are_the_papers_and_independent():
    c = default_config()
    drops = {n: c.conditioning.embeddings[n].drop_prob for n in c.conditioning.order}
    assert drops == {"clip_text": 0.2, "t5": 0.25, "clip_image": 0.9}
    n = 200_000
    keep = {k: np.asarray(v) for k, v in sample_keep(jax.random.PRNGKey(0), n, drops).items()}
    for name, p in drops.items():
        assert abs((~keep[name]).mean() - p) < 4 * np.sqrt(p * (1 - p) / n), name
    all_dropped = (~keep["clip_text"] & ~keep["t5"] & ~keep["clip_image"]).mean()
    assert abs(all_dropped - 0.2 * 0.25 * 0.9) < 0.003  # independent: the unconditional share is the product
