"""Stage 2 of the tiny CPU cascade: 32² → 64² shapes (see ediffi_jax.config.tiny_sr_config).

    ediffi-train --config configs/tiny_sr.py --workdir /tmp/tiny_sr
"""

from ediffi_jax.config import tiny_sr_config


def get_config():
    return tiny_sr_config()
