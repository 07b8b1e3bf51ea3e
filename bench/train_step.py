"""Train-step and sampler speed of a config on this machine: compile time, s/step, images/s.

    .venv/bin/python bench/train_step.py --config configs/tiny.py [--config.train.batch_size=32] [--steps 20]

It times the real jitted train step (frozen T5 + CLIP text/image encode + EDM loss + AdamW + EMA, donated state)
on synthetic batches, and the one-call Heun sampler with guidance (2B network evaluations per step). The peer in
the same run is the same step under `nnx.jit` on the live module (flax's convenience path), so the ratio shows
what jitting a pure function of split state buys.
"""

from __future__ import annotations

import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags

from ediffi_jax.data import shapes
from ediffi_jax.encoders import setup_encoders
from ediffi_jax.sampling import HeunConfig
from ediffi_jax.text_to_image import make_sampler
from ediffi_jax.train.step import build_model, init_train_state, make_optimizer, split_model, step_spec, train_step

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 8, "Images per sampler call (0: skip the sampler).")


def _time(fn, n):
    out = fn()
    jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(n):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n


def main(argv):
    flags.FLAGS(argv)
    c = _CONFIG.value
    b, r = c.train.batch_size, c.model.image_size
    rng = np.random.default_rng(0)
    captions = [shapes.example(0, i, r)["caption"] for i in range(max(b, 256))]
    with tempfile.TemporaryDirectory() as tmp:  # random encoders + tokenizers trained on shape captions
        encoders = setup_encoders(c, tmp, captions)
    encode, enc_params = encoders.encode, encoders.params
    batch = {"image": jnp.asarray(rng.uniform(-1, 1, (b, r, r, 3)), jnp.float32),
             **{k: jnp.asarray(v) for k, v in encoders.tokenize(captions[:b]).items()}}
    model = build_model(c, 0)
    graphdef, params = split_model(model)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    tx = make_optimizer(c.optim)
    spec = step_spec(c)
    key = jax.random.PRNGKey(0)

    step = jax.jit(lambda s, bt, e, k: train_step(s, bt, e, k, graphdef=graphdef, encode=encode, tx=tx, spec=spec),
                   donate_argnums=(0,))
    holder = {"s": init_train_state(params, tx)}
    t0 = time.perf_counter()
    compiled = step.lower(holder["s"], batch, enc_params, key).compile()
    t_compile = time.perf_counter() - t0

    def one():
        holder["s"], m = compiled(holder["s"], batch, enc_params, key)
        return m["loss"]

    t_ours = _time(one, _STEPS.value)

    # Peer: the same update through nnx.jit on the live module and optimizer.
    model = build_model(c, 0)  # fresh arrays: the first model's were donated to the jitted step
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def peer_step(model, opt, batch, enc_params, key):
        from ediffi_jax import edm
        from ediffi_jax.models.conditioning import sample_keep

        emb = encode(enc_params, batch)
        ks, kn, kd = jax.random.split(key, 3)
        keep = sample_keep(kd, b, dict(spec.drop_probs))
        sigma = spec.sigma_dist.sample(ks, (b,))
        noise = jax.random.normal(kn, batch["image"].shape)

        def loss_fn(m):
            den = lambda x, s: edm.precondition(lambda xi, cn: m(xi, cn, emb, keep), x, s)  # noqa: E731
            return jnp.mean(edm.denoising_loss(den, batch["image"], sigma, noise))

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    t_peer = _time(lambda: peer_step(model, opt, batch, enc_params, key), _STEPS.value)

    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}), {jax.device_count()} device(s)")
    n_enc = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(enc_params))
    print(f"config: {r}x{r}, batch {b}, UNet+conditioning {n_params:,} params, frozen encoders "
          f"{'+'.join(encoders.names)} {n_enc:,} params")
    print(f"train step: compile {t_compile:.1f} s; {t_ours * 1e3:.1f} ms/step; {b / t_ours:.1f} images/s")
    print(f"peer nnx.jit step: {t_peer * 1e3:.1f} ms/step; ratio peer/ours = {t_peer / t_ours:.2f}")
    if _SAMPLE_BATCH.value < 1:
        return
    heun = HeunConfig.from_config(c.sample)
    sampler = make_sampler(graphdef, heun, c.edm.sigma_data)
    sb = _SAMPLE_BATCH.value
    emb = encoders.encode_prompts(captions[:sb])  # text only: the image embedding is dropped
    noise = jax.random.normal(key, (sb, r, r, 3))
    t0 = time.perf_counter()
    params = holder["s"].params
    s = jnp.float32(3.0)
    jax.block_until_ready(sampler(params, emb, noise, key, s, s))
    t_sample_first = time.perf_counter() - t0
    t_sample = _time(lambda: sampler(params, emb, noise, key, s, s), 2)

    print(f"sampler ({heun.num_steps} Heun steps = {2 * heun.num_steps - 1} NFE, guidance → batch {2 * sb}): "
          f"first call {t_sample_first:.1f} s, then {t_sample:.2f} s per {sb} images")


if __name__ == "__main__":
    main(sys.argv)
