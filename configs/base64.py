"""eDiff-I base model at paper size: 64×64 ADM UNet (256 ch, [1,2,4,4], 3 res blocks, attention at 32/16/8),
T5-XXL + CLIP-L/14 text + CLIP-L/14 image conditioning (set config.encoders.*.pretrained_dir to local HF
checkpoints). Train on a TPU pod (see launch/); on one CPU this config only builds abstractly."""

from ediffi_jax.config import default_config


def get_config():
    c = default_config()
    c.model.image_size = 64
    c.data.resolution = 64
    return c
