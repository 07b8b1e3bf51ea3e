"""eDiff-I SR1024 at paper size (256² → 1024²): Efficient UNet trained on random 256² crops of 1024² images (with
the aligned 64² crop of the low-res input) and run fully convolutionally on the whole image; cross-attention only
at the lowest level (32² on a crop), no self-attention (secondary source, see ../shared/ANCHORS.md). The number of
res blocks is not confirmed: 2 per level as SR256.
"""

from ediffi_jax.config import default_config
from ediffi_jax.models.unet import unet_config
from ediffi_jax.sr import sr_config


def get_config():
    c = default_config()
    c.model = unet_config(image_size=256, channels=128, channel_mult=(1, 2, 4, 8), num_res_blocks=2,
                          attn_resolutions=(), cross_attn_resolutions=(32,), in_cond_channels=3, extra_cond_dim=1)
    c.data.resolution = 1024
    c.sr = sr_config(factor=4, crop=256)
    c.sample.update(dict(num_steps=18))
    return c
