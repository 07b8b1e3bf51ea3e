"""Super-resolution stages: low-res pairs and aligned crops (pixel-exact), the conditioning the network receives,
fully convolutional SR on inputs larger than the training crop, cascade checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ediffi_jax import edm, sr
from ediffi_jax.data.pipeline import make_dataset


def _coord_image(h, w):
    """Float image whose pixels encode their coordinates (distinct block means)."""
    y, x = np.mgrid[:h, :w].astype(np.float32)
    return np.stack([y / h, x / w, (y * w + x) / (h * w)], -1) * 2 - 1


def test_downsample_is_the_block_mean():
    img = _coord_image(12, 8)
    lr = sr.downsample(img, 4)
    assert lr.shape == (3, 2, 3)
    np.testing.assert_allclose(lr[1, 1], img[4:8, 4:8].reshape(-1, 3).mean(0), rtol=1e-6)
    with pytest.raises(ValueError, match="cannot be downsampled by 5"):
        sr.downsample(img, 5)


def test_aligned_crop_is_pixel_exact():
    rng = np.random.default_rng(0)
    hr = _coord_image(64, 48)
    lr = sr.downsample(hr, 4)
    seen = set()
    for _ in range(20):
        hc, lc, (y, x) = sr.aligned_crop(rng, hr, lr, 16, 4)
        seen.add((y, x))
        assert y % 4 == 0 and x % 4 == 0 and hc.shape == (16, 16, 3) and lc.shape == (4, 4, 3)
        np.testing.assert_array_equal(hc, hr[y:y + 16, x:x + 16])
        np.testing.assert_array_equal(lc, sr.downsample(hc, 4))  # the low-res crop shows the same pixels
    assert len(seen) > 10
    with pytest.raises(ValueError, match="crop 18 must be a multiple of the factor 4"):
        sr.aligned_crop(rng, hr, lr, 18, 4)


def test_pipeline_pairs_are_aligned_and_reproducible():
    src = [{"image": ((_coord_image(32, 32) + 1) * 127.5).round().astype(np.uint8), "caption": f"c{i}"}
           for i in range(6)]
    ds = make_dataset(src, batch_size=3, seed=5, transform=sr.pair_transform(4, crop=16))
    b0, b1 = ds[0], ds[1]
    assert b0["image"].shape == (3, 16, 16, 3) and b0["lowres"].shape == (3, 4, 4, 3)
    np.testing.assert_allclose(b0["lowres"], sr.downsample(b0["image"], 4), atol=1e-6)
    again = make_dataset(src, batch_size=3, seed=5, transform=sr.pair_transform(4, crop=16))
    np.testing.assert_array_equal(again[1]["image"], b1["image"])  # crops depend on (seed, position) only
    split = make_dataset(src, batch_size=3, seed=5, transform=sr.pair_transform(4, crop=16), split_batches=True)
    np.testing.assert_array_equal(split[1]["lowres"], b1["lowres"])  # the multi-host layout draws the same crops


def test_conditioning_is_c_in_scaled_upsampled_augmented_input_and_log_sigma_aug():
    key = jax.random.PRNGKey(0)
    lr = jax.random.uniform(key, (2, 4, 4, 3), minval=-1, maxval=1)
    s_aug = jnp.array([0.05, 2.0])
    aug = sr.augment(jax.random.PRNGKey(1), lr, s_aug)
    eps = jax.random.normal(jax.random.PRNGKey(1), lr.shape)
    np.testing.assert_allclose(aug, lr + s_aug[:, None, None, None] * eps, rtol=1e-6)
    c = sr.conditioning(aug, s_aug, (8, 8))
    want = jax.image.resize(edm.c_in(s_aug)[:, None, None, None] * aug, (2, 8, 8, 3), "bicubic")
    np.testing.assert_allclose(c["x_cond"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c["extra_cond"][:, 0], np.log(s_aug) / 4, rtol=1e-6)


def _tiny_sr_model(crop):
    from ediffi_jax.config import tiny_sr_config
    from ediffi_jax.train.step import build_model

    c = tiny_sr_config()
    c.model.update(dict(image_size=crop, channels=16, num_groups=4, head_dim=16, cross_attn_resolutions=(crop // 4,)))
    return c, build_model(c, 0)


def test_sr_model_runs_fully_convolutionally_on_larger_inputs():
    c, model = _tiny_sr_model(16)  # "trained" on 16² crops
    emb = {"t5": {"tokens": jnp.ones((1, 5, 64)), "mask": jnp.ones((1, 5), bool)}}
    keep = {"t5": jnp.ones((1,), bool)}
    for size in (16, 48):
        cond = sr.conditioning(jnp.zeros((1, size // 2, size // 2, 3)), jnp.array([0.002]), (size, size))
        out = nnx.jit(lambda m, x, cd: m(x, jnp.zeros((1,)), emb, keep, **cd))(model, jnp.zeros((1, size, size, 3)),
                                                                               cond)
        assert out.shape == (1, size, size, 3) and bool(jnp.isfinite(out).all())


def test_sr_stage_input_checks():
    from ediffi_jax.config import tiny_sr_config

    c = tiny_sr_config()
    sr.check_stage_input((32, 32), c)
    with pytest.raises(ValueError, match="SR stage upsamples 32x32 inputs by 2, got a 16x16 input"):
        sr.check_stage_input((16, 16), c)
    c.sr.crop = 32  # a crop-trained (fully convolutional) stage takes any size its UNet can divide
    sr.check_stage_input((48, 48), c)
    with pytest.raises(ValueError, match="output 90x90 is not divisible by 8"):
        sr.check_stage_input((45, 45), c)


def test_train_step_feeds_the_network_the_augmented_low_res_input(monkeypatch):
    """The known bug pattern stores the noised low-res image and feeds the clean one: here the clean input is all
    zeros, so whatever the network sees of it is the augmentation: up(c_in(σ_aug)·σ_aug·ε), with ln(σ_aug)/4 in its
    embedding; and the loss depends on the low-res input through the real network."""
    import optax

    from ediffi_jax.train import step as step_mod

    c, model = _tiny_sr_model(16)
    c.conditioning.order = ("t5",)
    graphdef, params = step_mod.split_model(model)
    s_aug = 0.7
    c.sr.update(dict(aug_p_mean=float(np.log(s_aug)), aug_p_std=0.0))  # a fixed σ_aug
    spec = step_mod.step_spec(c)
    assert spec.sr_aug == (float(np.log(s_aug)), 0.0)
    tx = optax.sgd(0.0)
    b, r = 4, 32
    enc = {"t5": {"tokens": jnp.ones((b, 5, 64)), "mask": jnp.ones((b, 5), bool)}}
    seen = {}
    real_net = step_mod._net

    def spy(model, embeddings, keep, rngs, cond, x_in, c_noise):
        seen.update(cond)
        return real_net(model, embeddings, keep, rngs, cond, x_in, c_noise)

    monkeypatch.setattr(step_mod, "_net", spy)
    batch = {"image": jnp.zeros((b, r, r, 3)), "lowres": jnp.zeros((b, r // 2, r // 2, 3))}
    state = step_mod.init_train_state(params, tx)

    @jax.jit  # compiled, not op by op: what the spy saw while tracing comes back as an output
    def step_and_seen(state, batch):
        step_mod.train_step(state, batch, None, jax.random.PRNGKey(0), graphdef=graphdef, encode=lambda _, x: enc,
                            tx=tx, spec=spec)
        return dict(seen)

    seen = step_and_seen(state, batch)
    x_cond = np.asarray(seen["x_cond"])
    assert x_cond.shape == (b, r, r, 3)
    ref = np.asarray(sr.upsample(jax.random.normal(jax.random.PRNGKey(9), (64, r // 2, r // 2, 3)), (r, r))).std()
    got = x_cond.std() / (float(edm.c_in(jnp.float32(s_aug))) * s_aug)
    assert abs(got / ref - 1) < 0.1, (got, ref)  # the augmentation noise, at its level (clean input: 0)
    np.testing.assert_allclose(np.asarray(seen["extra_cond"]), np.log(s_aug) / 4, rtol=1e-5)

    # ... and the real network's loss depends on the low-res input (the UNet concatenates it).
    monkeypatch.setattr(step_mod, "_net", real_net)
    model.unet.conv_out.kernel[...] = model.unet.conv_out.kernel[...] + 0.1  # wake the zero-initialised output
    graphdef, params = step_mod.split_model(model)
    state = step_mod.init_train_state(params, tx)

    @jax.jit
    def loss(lowres):
        _, m = step_mod.train_step(state, {**batch, "lowres": lowres}, None, jax.random.PRNGKey(0),
                                   graphdef=graphdef, encode=lambda _, x: enc, tx=tx, spec=spec)
        return m["loss"]

    l0, l1 = loss(batch["lowres"]), loss(batch["lowres"] + 0.5)
    assert float(l0) != float(l1)
