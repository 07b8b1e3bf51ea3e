"""eDiff-I SR256 at paper size (64² → 256²): Imagen-style Efficient UNet, 128 channels, multipliers [1, 2, 4, 8],
2 res blocks per level, self- and cross-attention only at 32² (secondary source, see ../shared/ANCHORS.md);
low-res input concatenated, noise-conditioning augmentation (ln σ_aug ~ N(−1.2, 1.2²), σ_aug = 0.002 at sampling).

    ediffi-train --config configs/sr256.py --workdir gs://…/sr256   # on a pod, see launch/
"""

from ediffi_jax.config import default_config
from ediffi_jax.models.unet import unet_config
from ediffi_jax.sr import sr_config


def get_config():
    c = default_config()
    c.model = unet_config(image_size=256, channels=128, channel_mult=(1, 2, 4, 8), num_res_blocks=2,
                          attn_resolutions=(32,), cross_attn_resolutions=(32,), in_cond_channels=3, extra_cond_dim=1)
    c.data.resolution = 256
    c.sr = sr_config(factor=4)
    c.sample.update(dict(num_steps=18))  # eDiff-I used ~10 DEIS steps for SR (secondary source)
    return c
