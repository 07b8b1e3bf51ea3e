"""The CPU default: a ~2M-parameter UNet on 32×32 shapes, a 2-layer random frozen T5, a few minutes of training.

    ediffi-train --config configs/tiny.py --workdir /tmp/tiny
"""

from ediffi_jax.config import default_config


def get_config():
    c = default_config()
    c.model.update(dict(
        image_size=32, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16, 8),
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
    c.train.update(dict(batch_size=16, num_steps=1500, log_every=50, ckpt_every=500, eval_num=16))
    c.sample.update(dict(num_steps=18, sigma_max=80.0, guidance_scale=3.0))
    return c
