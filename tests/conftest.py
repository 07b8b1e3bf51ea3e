"""Shared pytest set-up: persistent XLA compilation cache so repeated runs compile once."""

import os

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


def micro_config(data_dir: str):
    """The smallest config that still exercises every part of the base model (16×16, one attention level)."""
    from ediffi_jax.config import tiny_config

    c = tiny_config()
    c.model.update(dict(image_size=16, channels=16, channel_mult=(1, 2), attn_resolutions=(8,),
                        cross_attn_resolutions=(8,), head_dim=16, num_groups=4, context_dim=32, pooled_dim=32))
    c.conditioning.embeddings.t5.dim = 32
    c.conditioning.embeddings.clip_text.update(dict(dim=32, pooled_dim=16))
    c.conditioning.embeddings.clip_image.update(dict(dim=16, pooled_dim=16))
    c.encoders.t5.update(dict(max_length=20, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    c.encoders.clip.max_length = 20
    c.encoders.clip.text.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, projection_dim=16))
    c.encoders.clip.vision.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, image_size=16, patch_size=4, projection_dim=16))
    c.data.update(dict(resolution=16, num_train=512, num_val=16, data_dir=data_dir))
    c.optim.update(dict(lr=2e-3, warmup_steps=20))
    c.train.update(dict(batch_size=8, num_steps=300, log_every=25, ckpt_every=100, eval_num=8))
    c.sample.update(dict(num_steps=6))
    return c


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir):
    """A micro run trained once for the whole session: (config, workdir, final metrics)."""
    from ediffi_jax.train.loop import train

    config = micro_config(data_dir)
    config.train.update(dict(num_steps=160, log_every=20, ckpt_every=80))  # enough to read the text; cheap
    workdir = str(tmp_path_factory.mktemp("run"))
    metrics = train(config, workdir)
    return config, workdir, metrics
