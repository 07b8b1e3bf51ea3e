"""The CPU default: a small UNet on 32×32 shapes with small random frozen T5 / CLIP encoders (see ediffi_jax.config).

    ediffi-train --config configs/tiny.py --workdir /tmp/tiny
"""

from ediffi_jax.config import tiny_config


def get_config():
    return tiny_config()
