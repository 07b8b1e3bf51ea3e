"""A mid-size config between tiny and the paper: 64×64 shapes, 33M-parameter UNet, 4-layer random T5 and CLIP
text/vision towers.

    ediffi-train --config configs/mid.py --workdir /tmp/mid
"""

from ediffi_jax.config import tiny_config


def get_config():
    c = tiny_config()
    c.model.update(dict(image_size=64, channels=64, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                        attn_resolutions=(16, 8), cross_attn_resolutions=(16, 8), head_dim=32, num_groups=32,
                        context_dim=256, pooled_dim=256))
    c.conditioning.embeddings.t5.dim = 256
    c.conditioning.embeddings.clip_text.update(dict(dim=128, pooled_dim=128))
    c.conditioning.embeddings.clip_image.update(dict(dim=128, pooled_dim=128))
    c.encoders.t5.update(dict(d_model=256, d_kv=32, d_ff=512, num_layers=4, num_heads=8))
    c.encoders.clip.text.update(dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                     num_attention_heads=4, projection_dim=128))
    c.encoders.clip.vision.update(dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                       num_attention_heads=4, image_size=64, patch_size=8, projection_dim=128))
    c.data.resolution = 64
    c.optim.update(dict(lr=3e-4, warmup_steps=500, ema_decay=0.9995))
    c.train.update(dict(batch_size=32, num_steps=50_000, ckpt_every=2000))
    c.sample.update(dict(num_steps=32))
    return c
