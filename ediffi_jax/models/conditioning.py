"""Conditioning of the denoiser on text (and later image) embeddings, and the conditioned network F.

eDiff-I (§3, Fig. 4): the token embeddings of each encoder are projected to the UNet's context width and
concatenated along the sequence axis for cross-attention ([CLIP-text; T5; CLIP-image], in `order`); pooled
vectors are projected and added to the time embedding. In training each embedding is dropped independently
(T5 0.25, CLIP-text 0.2, CLIP-image 0.9), so classifier-free guidance can drop any subset at sampling time.

"Dropped" has one meaning throughout the project: the embedding is zeroed *and* its tokens are masked out of
the attention keys; the UNet's learnable null token is always attended, so a fully dropped context is the
unconditional branch. A missing embedding (e.g. no image given) is therefore exactly the dropped case the model
saw in training, never a zero vector it never saw.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ediffi_jax.models.unet import UNet

# One embedding as the encoders produce it: tokens [B, L, D], mask bool [B, L], optional pooled [B, D'].
Embedding = Mapping[str, jax.Array]

_POOLING = ("mean", "given", "none")


def _linear(din: int, dout: int, names: tuple[str | None, str | None], rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        din, dout,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)),
        rngs=rngs,
    )


class Conditioner(nnx.Module):
    """Projects each named embedding to the context / pooled widths and applies per-embedding dropping.

    `config` (the `conditioning` subtree): `order` — names in context order; `embeddings.<name>` with
    `dim` (token width), `pooled` ("mean": masked mean of the tokens, "given": a separate pooled vector of
    width `pooled_dim` is supplied, "none"), `pooled_dim` (for "given"), `drop_prob` (training drop rate).
    """

    def __init__(self, config: ml_collections.ConfigDict, context_dim: int, pooled_dim: int, *, rngs: nnx.Rngs):
        self.order = tuple(config.order)
        if not self.order:
            raise ValueError("conditioning.order is empty: name at least one embedding")
        for name in self.order:
            if name not in config.embeddings:
                raise ValueError(f"conditioning.order names {name!r}, which has no conditioning.embeddings entry")
            if config.embeddings[name].pooled not in _POOLING:
                raise ValueError(f"conditioning.embeddings.{name}.pooled={config.embeddings[name].pooled!r} "
                                 f"is not one of {_POOLING}")
        self.pooling = tuple(config.embeddings[n].pooled for n in self.order)  # static, hashable
        self.token_norm = nnx.Dict({
            n: nnx.LayerNorm(config.embeddings[n].dim, rngs=rngs,
                             scale_metadata={"out_sharding": ("norm",)},
                             bias_metadata={"out_sharding": ("norm",)})
            for n in self.order})
        self.token_proj = nnx.Dict({
            n: _linear(config.embeddings[n].dim, context_dim, ("embed", "context"), rngs) for n in self.order})
        self.pooled_proj = nnx.Dict()
        for n in self.order:
            e = config.embeddings[n]
            if e.pooled != "none" and pooled_dim > 0:
                din = e.dim if e.pooled == "mean" else e.pooled_dim
                self.pooled_proj[n] = _linear(din, pooled_dim, ("embed", "mlp"), rngs)
        self.pooled_dim = pooled_dim

    def __call__(
        self, embeddings: Mapping[str, Embedding], keep: Mapping[str, jax.Array]
    ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """Returns (context [B, ΣL, C], context_mask bool [B, ΣL], pooled [B, P] or None).

        `keep[name]` is bool [B]: False drops that embedding for that example. A name absent from
        `embeddings` must also be absent from `keep` or False everywhere — it is treated as dropped.
        """
        tokens, masks, pooled = [], [], None
        for n, pooling in zip(self.order, self.pooling):
            if n not in embeddings:
                continue
            e = embeddings[n]
            k = keep[n].astype(bool)
            mask = e["mask"].astype(bool) & k[:, None]
            t = self.token_proj[n](self.token_norm[n](e["tokens"]))
            tokens.append(jnp.where(mask[..., None], t, 0.0))
            masks.append(mask)
            if n in self.pooled_proj:
                if pooling == "mean":
                    m = e["mask"].astype(e["tokens"].dtype)[..., None]
                    vec = jnp.sum(e["tokens"] * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
                else:
                    vec = e["pooled"]
                p = jnp.where(k[:, None], self.pooled_proj[n](vec), 0.0)
                pooled = p if pooled is None else pooled + p
        if not tokens:
            raise ValueError(f"no conditioning embedding given; expected some of {self.order}")
        return jnp.concatenate(tokens, axis=1), jnp.concatenate(masks, axis=1), pooled


class ConditionedUNet(nnx.Module):
    """F(c_in·x; c_noise, conditioning): the raw network that `edm.precondition` wraps."""

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.unet = UNet(config.model, rngs=rngs)
        pooled_dim = config.model.pooled_dim
        self.conditioner = Conditioner(config.conditioning, config.model.context_dim, pooled_dim, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        c_noise: jax.Array,
        embeddings: Mapping[str, Embedding],
        keep: Mapping[str, jax.Array],
        *,
        rngs: nnx.Rngs | None = None,
        **unet_kwargs,
    ) -> jax.Array:
        context, context_mask, pooled = self.conditioner(embeddings, keep)
        return self.unet(x, c_noise, context, context_mask, pooled, rngs=rngs, **unet_kwargs)


def keep_all(embeddings: Mapping[str, Embedding], value: bool = True) -> dict[str, jax.Array]:
    """keep-masks that keep (or, with value=False, drop) every embedding of every example."""
    return {n: jnp.full((e["tokens"].shape[0],), value) for n, e in embeddings.items()}


def sample_keep(
    key: jax.Array, batch: int, drop_probs: Mapping[str, float]
) -> dict[str, jax.Array]:
    """Independent per-embedding, per-example keep flags for training: keep ~ Bernoulli(1 − p_drop)."""
    keys = jax.random.split(key, max(len(drop_probs), 1))
    return {n: jax.random.bernoulli(k, 1.0 - p, (batch,)) for k, (n, p) in zip(keys, sorted(drop_probs.items()))}
