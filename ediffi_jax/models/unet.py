"""ADM-style U-Net denoiser for eDiff-I (NHWC, Flax NNX).

The architecture follows ADM (Dhariwal & Nichol 2021, arXiv 2105.05233, App. A / the ``guided-diffusion``
``UNetModel``) as used for the eDiff-I base and super-resolution models (Balaji et al. 2022,
arXiv 2211.01324, §4, Fig. 4 and App. "Network architecture"):

  * scale-shift-norm residual blocks (BigGAN-style up/down-sampling optional), zero-initialised last convs;
  * self-attention at ``attn_resolutions`` and text cross-attention at ``cross_attn_resolutions`` (a
    cross-attention block follows the self-attention block where both apply; cross-attention alone is
    allowed, e.g. the SR1024 model);
  * the noise-level embedding is added to a pooled conditioning vector (CLIP) and, for the SR models,
    an embedding of the augmentation level (``extra_cond``); the low-resolution image is concatenated
    to the input (``x_cond``).

The net knows nothing of σ: the EDM preconditioning (Karras et al. 2022) lives elsewhere and passes
``c_noise = ln(σ)/4``. Noise-level features are ``positional_embedding(noise_emb_scale · c_noise)`` with the
default ``noise_emb_scale = 1`` — exactly what EDM's ``DhariwalUNet`` does with its ADM architecture
(``PositionalEmbedding`` applied directly to ``ln(σ)/4``; NVlabs/edm ``training/networks.py``); with
frequencies 1 … 1e-4 the features are smooth in σ (no aliasing between nearby continuous noise levels).

Middle block (decision): ADM always uses ResBlock → SelfAttention → ResBlock. Here the middle block gets
self-attention iff the lowest resolution is in ``attn_resolutions`` and cross-attention iff it is in
``cross_attn_resolutions`` (ResBlock → [Self] → [Cross] → ResBlock), so the attention lists alone decide
where attention happens; for the paper's base64 config (lowest resolution 8 in both lists) this is ADM's
middle block plus cross-attention.

Resolutions in the attention lists are those of the *configured* ``image_size``; the net runs on any
spatial size divisible by ``2^(levels-1)`` (e.g. SR random-crop training), attention staying at the same
levels.

Precision (``dtype``): parameters are always float32 (the master weights; the optimizer state follows them).
With ``dtype="bfloat16"`` convolutions, linear layers, the residual stream and the U-Net skips run in bfloat16;
GroupNorm statistics and the attention logits/softmax are float32 (``attention.GroupNorm32``,
``attention.dot_product_attention``), and so are the noise / pooled / extra-conditioning embeddings up to their
per-block projections. The output is cast to float32, and the EDM preconditioning (c_skip·x, c_out·F) and the loss
are float32 (``edm.precondition``), so gradients reach the float32 parameters as float32.

Memory (``remat``): each ResBlock / self- / cross-attention layer can be rematerialised in the backward pass
(``nnx.remat`` = ``jax.checkpoint`` of the layer), chosen by name from ``REMAT_POLICIES``:
``"none"`` keeps every activation; ``"blocks"`` keeps only each layer's input and recomputes its norms,
convolutions, projections and attention (the least memory, about one more forward pass of compute);
``"dots_saveable"`` keeps conv / matmul outputs and recomputes the cheap element-wise work (GroupNorm, SiLU,
scale-shift, softmax). Results are identical; only what the backward pass stores changes. (XLA:CPU schedules the
recomputation right after the forward pass of each layer, so on CPU the peak of a fused train step does not drop;
the residuals kept for the backward do: tests/test_precision_remat.py.)

Attention (``attention``, ``attention.ATTENTION_IMPLS``): ``"auto"`` (default) runs cuDNN's fused kernel on a GPU
for unmasked bfloat16/float16 layers (self-attention; ``attention.select_attention``), and otherwise computes a
layer whose float32 logits would exceed 1 MiB on CPU, 16 MiB elsewhere, with query-blocked attention and a
recomputing backward (``models/flash_attention.py``: only O and the row log-sum-exp are kept), smaller ones
densely; ``"dense"`` / ``"flash"`` force one. Same result to float rounding; may change on resume
(``train/checkpoint.FREE_FIELDS``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ediffi_jax.models.attention import (
    ATTENTION_IMPLS,
    AttnBiasFn,
    CrossAttention,
    GroupNorm32,
    SelfAttention,
    conv,
    linear,
    positional_embedding,
    resolve_groups,
)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# ``model.remat``: what the backward pass of each ResBlock / attention layer keeps (module doc, "Memory").
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: every activation of the forward pass is kept
    "blocks": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input; recompute the rest
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep conv / matmul outputs; recompute norms etc.
}


def unet_config(**overrides) -> ml_collections.ConfigDict:
    """Default U-Net config: the eDiff-I base 64×64 model (paper App., Table of architectures).

    ``dropout = 0.1`` follows ADM / EDM ImageNet-64 (the eDiff-I paper does not state it);
    ``context_dim = 1024`` is the width the text-encoder adapter projects T5/CLIP tokens to;
    ``pooled_dim = 768`` is the CLIP pooled text embedding. Unknown override keys raise ValueError.
    """
    fields = dict(
        {
            "image_size": 64,
            "in_channels": 3,
            "out_channels": 3,
            "channels": 256,
            "channel_mult": (1, 2, 4, 4),
            "num_res_blocks": 3,
            "attn_resolutions": (32, 16, 8),
            "cross_attn_resolutions": (32, 16, 8),
            "head_dim": 64,
            "num_groups": 32,
            "dropout": 0.1,
            "context_dim": 1024,
            "pooled_dim": 768,
            "emb_mult": 4,
            "resblock_updown": True,
            "dtype": "float32",
            "extra_cond_dim": 0,
            "in_cond_channels": 0,
            "noise_emb_scale": 1.0,
            "remat": "none",
            "attention": "auto",
        }
    )
    for key, value in overrides.items():  # before the ConfigDict fixes each field's type (int -> tuple is ok)
        if key not in fields:
            raise ValueError(f"unknown U-Net config field {key!r}")
        fields[key] = value
    cfg = ml_collections.ConfigDict(fields)
    return cfg


def _validate(cfg: ml_collections.ConfigDict) -> None:
    """Raise a one-line ValueError for an inconsistent config."""
    mult = tuple(cfg.channel_mult)
    if not mult or any(int(m) <= 0 for m in mult):
        raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {mult}")
    levels = len(mult)
    if cfg.image_size <= 0 or cfg.image_size % (2 ** (levels - 1)):
        raise ValueError(f"image_size {cfg.image_size} not divisible by 2^(levels-1) = {2 ** (levels - 1)}")
    reached = {cfg.image_size // 2**i for i in range(levels)}
    for name in ("attn_resolutions", "cross_attn_resolutions"):
        bad = sorted(set(cfg[name]) - reached)
        if bad:
            raise ValueError(f"{name} {bad} never reached by the net (resolutions {sorted(reached)})")
    nrb = res_blocks_per_level(cfg)
    if cfg.channels <= 0 or min(nrb) < 1 or cfg.emb_mult < 1:
        raise ValueError(f"channels, num_res_blocks and emb_mult must be positive, got {cfg.channels}, "
                         f"{cfg.num_res_blocks}, {cfg.emb_mult}")
    if cfg.channels % 2:
        raise ValueError(f"channels must be even (sinusoidal embedding width), got {cfg.channels}")
    if str(cfg.dtype) not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {cfg.dtype!r}")
    if str(cfg.get("attention", "auto")) not in ATTENTION_IMPLS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_IMPLS)}, got {cfg.get('attention')!r}")
    if str(cfg.get("remat", "none")) not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {cfg.get('remat')!r}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.cross_attn_resolutions and cfg.context_dim <= 0:
        raise ValueError("cross_attn_resolutions set but context_dim <= 0")
    for name in ("pooled_dim", "extra_cond_dim", "in_cond_channels"):
        if cfg.get(name, 0) < 0:
            raise ValueError(f"{name} must be >= 0, got {cfg.get(name)}")
    for level, m in enumerate(mult):
        width, res = cfg.channels * m, cfg.image_size // 2**level
        resolve_groups(width, cfg.num_groups)
        attends = res in cfg.attn_resolutions or res in cfg.cross_attn_resolutions
        if attends and width % cfg.head_dim:
            raise ValueError(f"width {width} at resolution {res} not divisible by head_dim {cfg.head_dim}")


def res_blocks_per_level(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
    """``num_res_blocks`` per level: one int for every level (ADM) or one per level (Imagen's Efficient UNet puts
    more blocks at the low resolutions, e.g. (2, 4, 8, 8))."""
    n = cfg.num_res_blocks
    levels = len(tuple(cfg.channel_mult))
    if isinstance(n, int):
        return (n,) * levels
    n = tuple(int(v) for v in n)
    if len(n) != levels:
        raise ValueError(f"num_res_blocks {n} must give one count per level ({levels} levels)")
    return n


def _resample(x: jax.Array, up: bool, down: bool) -> jax.Array:
    """Nearest ×2 upsampling or 2×2 average pooling of an NHWC map (ADM ``Upsample``/``Downsample``)."""
    b, h, w, c = x.shape
    if up:
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if down:
        return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    return x


class ResBlock(nnx.Module):
    """ADM residual block with scale-shift norm (Dhariwal & Nichol 2021, §3 "adaptive group norm").

    GroupNorm → SiLU → [up/down] → conv3×3 → GroupNorm(h)·(1+scale)+shift (from Linear(SiLU(emb)))
    → SiLU → dropout → conv3×3 (zero-init) + skip (1×1 conv when the width changes).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        *,
        dropout: float,
        num_groups: int,
        dtype: jnp.dtype,
        up: bool = False,
        down: bool = False,
        rngs: nnx.Rngs,
    ):
        self.up, self.down = up, down
        self.in_norm = GroupNorm32(in_ch, num_groups, rngs=rngs)
        self.in_conv = conv(in_ch, out_ch, 3, dtype=dtype, rngs=rngs)
        self.emb_proj = linear(emb_dim, 2 * out_ch, ("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.out_norm = GroupNorm32(out_ch, num_groups, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)
        self.out_conv = conv(out_ch, out_ch, 3, dtype=dtype, zero_init=True, rngs=rngs)
        self.skip = conv(in_ch, out_ch, 1, dtype=dtype, rngs=rngs) if in_ch != out_ch else None

    def __call__(self, x: jax.Array, emb: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        h = nnx.silu(self.in_norm(x))
        h, x = _resample(h, self.up, self.down), _resample(x, self.up, self.down)
        h = self.in_conv(h)
        scale, shift = jnp.split(self.emb_proj(nnx.silu(emb))[:, None, None, :].astype(h.dtype), 2, axis=-1)
        h = nnx.silu(self.out_norm(h) * (1 + scale) + shift)
        if rngs is not None and self.dropout.rate > 0:
            h = self.dropout(h, deterministic=False, rngs=rngs.dropout())
        h = self.out_conv(h)
        return (x if self.skip is None else self.skip(x)) + h


class Downsample(nnx.Module):
    """Stride-2 conv3×3 (ADM ``Downsample(use_conv=True)``)."""

    def __init__(self, ch: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.conv = conv(ch, ch, 3, stride=2, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest ×2 upsampling then conv3×3 (ADM ``Upsample(use_conv=True)``)."""

    def __init__(self, ch: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.conv = conv(ch, ch, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(_resample(x, up=True, down=False))


class _CondMLP(nnx.Module):
    """Sinusoidal features of ``k`` scalars → Linear → SiLU → Linear (ADM ``time_embed``), float32."""

    def __init__(self, num_scalars: int, feat_dim: int, emb_dim: int, scale: float, *, rngs: nnx.Rngs):
        self.feat_dim, self.scale = feat_dim, scale
        self.l1 = linear(num_scalars * feat_dim, emb_dim, ("embed", "mlp"), rngs=rngs)
        # emb → emb: the output lives on the "mlp" axis; the input side is FSDP-sharded like every kernel.
        self.l2 = linear(emb_dim, emb_dim, ("embed", "mlp"), rngs=rngs)

    def __call__(self, s: jax.Array) -> jax.Array:
        """``s``: ``[B, k]`` → ``[B, emb_dim]``."""
        b, k = s.shape
        feats = positional_embedding(self.scale * s.reshape(b * k), self.feat_dim).reshape(
            b, k * self.feat_dim
        )
        return self.l2(nnx.silu(self.l1(feats)))


def _apply_layer(layer: nnx.Module, h: jax.Array, emb: jax.Array, ctx, mask, rngs, bias_fn) -> jax.Array:
    """One layer of a U-Net block: ResBlocks take the embedding, cross-attention the context."""
    if isinstance(layer, ResBlock):
        return layer(h, emb, rngs=rngs)
    if isinstance(layer, CrossAttention):
        return layer(h, ctx, mask, attn_bias_fn=bias_fn)
    return layer(h)


def _strip_null_token(fn: AttnBiasFn) -> AttnBiasFn:
    """Adapt a user hook to the internal key layout: ``fn`` sees logits of the real tokens only
    (``[B, H, Lq, L]``) and its bias gets a zero column for the prepended null token."""

    def wrapped(logits: jax.Array, hw: tuple[int, int]) -> jax.Array:
        n_real = logits.shape[-1] - 1
        bias = jnp.asarray(fn(logits[..., 1:], hw))
        bias = jnp.broadcast_to(bias, jnp.broadcast_shapes(bias.shape, (1, 1, 1, n_real)))
        return jnp.pad(bias, [(0, 0)] * 3 + [(1, 0)])

    return wrapped


class UNet(nnx.Module):
    """eDiff-I / ADM U-Net denoiser ``F(x, c_noise, text, pooled) → [B, H, W, out_channels]`` (module doc)."""

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        _validate(config)
        dtype = _DTYPES[str(config.dtype)]
        self.dtype = dtype
        self.remat = str(config.get("remat", "none"))
        self.in_channels, self.out_channels = int(config.in_channels), int(config.out_channels)
        self.in_cond_channels = int(config.get("in_cond_channels", 0))
        self.extra_cond_dim = int(config.get("extra_cond_dim", 0))
        self.pooled_dim = int(config.pooled_dim)
        self.context_dim = int(config.context_dim)
        mult = tuple(int(m) for m in config.channel_mult)
        self.num_levels = len(mult)
        base, nrbs, groups, head_dim = (
            int(config.channels),
            res_blocks_per_level(config),
            config.num_groups,
            config.head_dim,
        )
        emb_dim = base * int(config.emb_mult)
        attn_res, cross_res = set(config.attn_resolutions), set(config.cross_attn_resolutions)
        self.has_cross = bool(cross_res)
        impl = str(config.get("attention", "auto"))
        scale = float(config.get("noise_emb_scale", 1.0))

        # --- conditioning embeddings -------------------------------------------------------------------
        self.time_embed = _CondMLP(1, base, emb_dim, scale, rngs=rngs)
        self.pooled_proj = (
            linear(self.pooled_dim, emb_dim, ("embed", "mlp"), rngs=rngs) if self.pooled_dim else None
        )
        self.extra_embed = (
            _CondMLP(self.extra_cond_dim, base, emb_dim, scale, rngs=rngs) if self.extra_cond_dim else None
        )
        self.null_token = (
            nnx.Param(
                nnx.with_partitioning(nnx.initializers.normal(0.02), (None, "context"))(
                    rngs.params(), (1, self.context_dim), jnp.float32
                )
            )
            if self.has_cross
            else None
        )

        def res_block(cin: int, cout: int, **kw) -> ResBlock:
            return ResBlock(
                cin, cout, emb_dim, dropout=config.dropout, num_groups=groups, dtype=dtype, rngs=rngs, **kw
            )

        def attn_layers(ch: int, res: int) -> list[nnx.Module]:
            layers: list[nnx.Module] = []
            if res in attn_res:
                layers.append(SelfAttention(ch, head_dim=head_dim, num_groups=groups, dtype=dtype,
                                            attention=impl, rngs=rngs))
            if res in cross_res:
                layers.append(
                    CrossAttention(
                        ch, self.context_dim, head_dim=head_dim, num_groups=groups, dtype=dtype,
                        attention=impl, rngs=rngs
                    )
                )
            return layers

        # --- encoder -----------------------------------------------------------------------------------
        ch = base * mult[0]
        self.conv_in = conv(self.in_channels + self.in_cond_channels, ch, 3, dtype=dtype, rngs=rngs)
        skips, res = [ch], int(config.image_size)
        input_blocks: list[nnx.List] = []
        for level, m in enumerate(mult):
            for _ in range(nrbs[level]):
                layers: list[nnx.Module] = [res_block(ch, base * m)]
                ch = base * m
                layers += attn_layers(ch, res)
                input_blocks.append(nnx.List(layers))
                skips.append(ch)
            if level != len(mult) - 1:
                down = (
                    res_block(ch, ch, down=True)
                    if config.resblock_updown
                    else Downsample(ch, dtype=dtype, rngs=rngs)
                )
                input_blocks.append(nnx.List([down]))
                skips.append(ch)
                res //= 2
        self.input_blocks = nnx.List(input_blocks)

        # --- middle ------------------------------------------------------------------------------------
        self.middle = nnx.List([res_block(ch, ch), *attn_layers(ch, res), res_block(ch, ch)])

        # --- decoder -----------------------------------------------------------------------------------
        output_blocks: list[nnx.List] = []
        for level, m in reversed(list(enumerate(mult))):
            nrb = nrbs[level]
            for i in range(nrb + 1):
                layers = [res_block(ch + skips.pop(), base * m)]
                ch = base * m
                layers += attn_layers(ch, res)
                if level and i == nrb:
                    up = (
                        res_block(ch, ch, up=True)
                        if config.resblock_updown
                        else Upsample(ch, dtype=dtype, rngs=rngs)
                    )
                    layers.append(up)
                    res *= 2
                output_blocks.append(nnx.List(layers))
        self.output_blocks = nnx.List(output_blocks)

        # --- output ------------------------------------------------------------------------------------
        self.out_norm = GroupNorm32(ch, groups, rngs=rngs)
        self.conv_out = conv(ch, self.out_channels, 3, dtype=dtype, zero_init=True, rngs=rngs)

    # ------------------------------------------------------------------------------------------------------
    def _run(self, layers: nnx.List, h: jax.Array, emb: jax.Array, ctx, mask, rngs, bias_fn) -> jax.Array:
        for layer in layers:
            if self.remat != "none" and isinstance(layer, (ResBlock, SelfAttention, CrossAttention)):
                # nnx.remat = jax.checkpoint over the layer's state (and the dropout Rngs, whose counter update
                # propagates out); prevent_cse stays on: nothing here runs under scan.
                def apply(layer, h, emb, ctx, mask, rngs):
                    return _apply_layer(layer, h, emb, ctx, mask, rngs, bias_fn)

                h = nnx.remat(apply, policy=REMAT_POLICIES[self.remat])(layer, h, emb, ctx, mask, rngs)
            else:
                h = _apply_layer(layer, h, emb, ctx, mask, rngs, bias_fn)
        return h

    def __call__(
        self,
        x: jax.Array,
        c_noise: jax.Array,
        context: jax.Array | None,
        context_mask: jax.Array | None,
        pooled: jax.Array | None = None,
        *,
        extra_cond: jax.Array | None = None,
        x_cond: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
        attn_bias_fn: AttnBiasFn | None = None,
    ) -> jax.Array:
        """Denoiser network output (float32).

        Args:
          x: ``[B, H, W, in_channels]`` (preconditioned) noisy image; H, W divisible by ``2^(levels-1)``.
          c_noise: ``[B]`` noise conditioning (EDM: ``ln(σ)/4``).
          context: ``[B, L, context_dim]`` text tokens (L may be 0); may be None if no cross-attention.
          context_mask: bool ``[B, L]``, True = attend; None = all valid. A learnt null token is always
            prepended (mask True), so an all-masked context is well defined (unconditional branch).
          pooled: ``[B, pooled_dim]`` pooled conditioning (used iff ``pooled_dim > 0``); None = zeros, the
            project's "dropped" pooled vector.
          extra_cond: ``[B, extra_cond_dim]`` (e.g. SR augmentation level), required iff
            ``extra_cond_dim > 0``.
          x_cond: ``[B, H, W, in_cond_channels]`` concatenated to ``x`` (SR low-res image), required iff
            ``in_cond_channels > 0``.
          rngs: None ⇒ deterministic; otherwise dropout keys come from ``rngs.dropout()``.
          attn_bias_fn: optional paint-with-words hook ``(logits [B, heads, h·w, L], (h, w)) -> bias``
            called once per cross-attention layer with the *unscaled* logits QKᵀ over the L real tokens
            (the null token is hidden from it and receives zero bias); the bias (broadcastable to the
            logits) is added before the 1/√d scaling.

        Returns:
          ``[B, H, W, out_channels]`` float32.
        """
        b, height, width, cin = x.shape
        if cin != self.in_channels:
            raise ValueError(f"x has {cin} channels, expected {self.in_channels}")
        factor = 2 ** (self.num_levels - 1)
        if height % factor or width % factor:
            raise ValueError(f"spatial size {height}x{width} not divisible by {factor}")
        if c_noise.shape != (b,):
            raise ValueError(f"c_noise must have shape ({b},), got {c_noise.shape}")

        emb = self.time_embed(c_noise.reshape(b, 1))
        if self.pooled_proj is not None:
            if pooled is None:
                pooled = jnp.zeros((b, self.pooled_dim), jnp.float32)
            if pooled.shape != (b, self.pooled_dim):
                raise ValueError(f"pooled must have shape ({b}, {self.pooled_dim}), got {pooled.shape}")
            emb = emb + self.pooled_proj(pooled.astype(jnp.float32))
        if self.extra_embed is not None:
            if extra_cond is None:
                raise ValueError(f"extra_cond [B, {self.extra_cond_dim}] is required (extra_cond_dim > 0)")
            emb = emb + self.extra_embed(extra_cond.reshape(b, self.extra_cond_dim))

        ctx = mask = bias_fn = None
        if self.has_cross:
            if context is None:
                raise ValueError("context is required: the net has cross-attention layers")
            null = jnp.broadcast_to(self.null_token[...].astype(context.dtype), (b, 1, self.context_dim))
            ctx = jnp.concatenate([null, context], axis=1)
            if context_mask is None:
                context_mask = jnp.ones(context.shape[:2], dtype=bool)
            mask = jnp.concatenate([jnp.ones((b, 1), dtype=bool), context_mask.astype(bool)], axis=1)
            bias_fn = None if attn_bias_fn is None else _strip_null_token(attn_bias_fn)

        h = x
        if self.in_cond_channels:
            if x_cond is None or x_cond.shape != (b, height, width, self.in_cond_channels):
                raise ValueError(
                    f"x_cond [B, H, W, {self.in_cond_channels}] is required (in_cond_channels > 0)"
                )
            h = jnp.concatenate([h, x_cond.astype(h.dtype)], axis=-1)
        h = self.conv_in(h.astype(self.dtype))

        hs = [h]
        for block in self.input_blocks:
            h = self._run(block, h, emb, ctx, mask, rngs, bias_fn)
            hs.append(h)
        h = self._run(self.middle, h, emb, ctx, mask, rngs, bias_fn)
        for block in self.output_blocks:
            h = jnp.concatenate([h, hs.pop()], axis=-1)
            h = self._run(block, h, emb, ctx, mask, rngs, bias_fn)
        h = self.conv_out(nnx.silu(self.out_norm(h)))
        return h.astype(jnp.float32)


def param_count(model: nnx.Module) -> int:
    """Number of scalar parameters (works on abstract ``nnx.eval_shape`` models)."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


__all__ = ["ResBlock", "UNet", "param_count", "unet_config"]
