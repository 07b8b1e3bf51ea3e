"""ediffi-jax: eDiff-I (Balaji et al. 2022, arXiv 2211.01324) in JAX / Flax NNX."""

from ediffi_jax.xla_flags import apply_cpu_flags

apply_cpu_flags()  # before JAX starts a backend: see xla_flags.py

import flax  # noqa: E402

# Parameters carry *logical* axis names (e.g. ("embed", "mlp")); they are mapped to mesh axes by the
# sharding rules of the train step, never at construction time. Flax 0.12 would otherwise try to shard
# every annotated variable eagerly and fail outside a mesh context.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
