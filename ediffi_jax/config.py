"""Defaults shared by every experiment config (configs/*.py override what they change).

A config is the whole experiment: model, conditioning, text encoders, data, EDM, optimiser, schedule and
sampler. Every field can be overridden on the command line, e.g. `--config.optim.lr=3e-4`.
"""

from __future__ import annotations

import ml_collections

from ediffi_jax.models.unet import unet_config


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # The denoiser UNet (see models/unet.py for every field). Paper base-model defaults.
    c.model = unet_config()

    # Conditioning (eDiff-I §3): token embeddings concatenated in `order` for cross-attention; pooled vectors
    # added to the time embedding; each embedding dropped independently in training with `drop_prob`.
    c.conditioning = ml_collections.ConfigDict()
    c.conditioning.order = ("t5",)
    c.conditioning.embeddings = ml_collections.ConfigDict()
    c.conditioning.embeddings.t5 = ml_collections.ConfigDict(
        dict(dim=4096, pooled="mean", pooled_dim=0, drop_prob=0.25))

    # Frozen text encoder. With no pretrained weights, a randomly initialised T5 v1.1 encoder of this size and
    # a SentencePiece tokenizer trained on the training captions (both saved in the workdir).
    c.text = ml_collections.ConfigDict()
    c.text.tokenizer_dir = ""  # "" = train one into <workdir>/tokenizer on first use
    c.text.vocab_size = 64  # SentencePiece vocabulary size when training one
    c.text.max_length = 32
    c.text.t5 = ml_collections.ConfigDict(dict(
        d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, layer_norm_epsilon=1e-6, dtype="float32", seed=1234))

    # Data: the synthetic shapes dataset (TFDS array_record, read with grain).
    c.data = ml_collections.ConfigDict()
    c.data.name = "shapes"
    c.data.data_dir = "~/.cache/ediffi_jax/tensorflow_datasets"
    c.data.resolution = 64
    c.data.num_train = 20000
    c.data.num_val = 512
    c.data.seed = 0

    # EDM (Karras et al. 2022): σ_data and the training distribution ln σ ~ N(p_mean, p_std²).
    c.edm = ml_collections.ConfigDict(dict(sigma_data=0.5, p_mean=-1.2, p_std=1.2))

    # AdamW as in eDiff-I (lr 1e-4, weight decay 0.01, EMA 0.9999).
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-4, warmup_steps=1000, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0,
        ema_decay=0.9999))

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 2048
    c.train.num_steps = 1_000_000
    c.train.log_every = 100
    c.train.ckpt_every = 5000
    c.train.keep_checkpoints = 3
    c.train.eval_every = 0  # 0 = only at the end: sample eval prompts and report the shape-score
    c.train.eval_num = 32

    # Sampler: EDM Heun with optional churn; guidance D = D_uncond + s·(D_cond − D_uncond), s = guidance_scale.
    c.sample = ml_collections.ConfigDict(dict(
        num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0, s_churn=0.0, s_min=0.0, s_max=float("inf"),
        s_noise=1.0, guidance_scale=3.0))
    return c


def tiny_config() -> ml_collections.ConfigDict:
    """The CPU default (embedded, used by `make demo`): a small UNet on 32×32 shapes, a 2-layer random frozen
    T5 and a SentencePiece tokenizer trained on the captions; a few minutes of training on 2 CPU cores."""
    c = default_config()
    c.model.update(dict(
        image_size=32, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
        cross_attn_resolutions=(16, 8), head_dim=32, num_groups=8, dropout=0.0, context_dim=64,
        pooled_dim=64, emb_mult=4))
    c.conditioning.embeddings.t5.dim = 64
    c.text.max_length = 24
    c.text.t5.update(dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                          relative_attention_num_buckets=16, relative_attention_max_distance=32))
    c.data.resolution = 32
    c.data.num_train = 20000
    c.data.num_val = 256
    c.optim.update(dict(lr=1e-3, warmup_steps=100, ema_decay=0.999))
    c.train.update(dict(batch_size=16, num_steps=6000, log_every=50, ckpt_every=500, eval_num=16))
    c.sample.update(dict(num_steps=18, sigma_max=80.0, guidance_scale=3.0))
    return c
