"""Attention layers and small shared building blocks for the eDiff-I denoiser (NHWC, Flax NNX).

References:
  * ADM: Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis" (arXiv 2105.05233),
    App. A: self-attention blocks at several resolutions, GroupNorm in float32, zero-initialised
    output projections.
  * eDiff-I: Balaji et al. 2022 (arXiv 2211.01324), §4 / Fig. 4: the base and super-resolution U-Nets
    attend to T5 / CLIP text tokens through cross-attention; §5 "paint-with-words" modifies the
    cross-attention as softmax((QKᵀ + w·A) / √d) V, i.e. a bias is added to the *unscaled* logits.

Every parameter carries *logical* axis names (``nnx.with_partitioning``); they are mapped to mesh axes
by the sharding rules of the train step, never here:

  * conv kernels ``[kh, kw, cin, cout]`` → ``(None, None, "conv_in", "conv_out")``, bias ``("conv_out",)``
  * attention q/k/v from image features → ``("embed", "heads")``; k/v from context tokens →
    ``("context", "heads")``; output projection → ``("heads", "embed")``; biases → their output axis
  * GroupNorm scale / bias → ``("norm",)``
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ediffi_jax.models.flash_attention import flash_attention

Axes = tuple[str | None, ...]
# Attention-bias hook of a cross-attention layer: (unscaled logits QKᵀ [B, H, Lq, Lk] in float32,
# spatial size (h, w) of the layer's feature map, Lq = h·w) -> bias broadcastable to [B, H, Lq, Lk].
AttnBiasFn = Callable[[jax.Array, tuple[int, int]], jax.Array]

_default_kernel_init = nnx.initializers.lecun_normal()

# ``model.attention``: how softmax(QKᵀ/√D)V is computed (same result to float rounding).
#   "dense": the logits [B, H, Lq, Lk] materialised in float32 (XLA fuses what it can);
#   "flash": blocks of queries with a recomputing backward (models/flash_attention.py), O(block) memory;
#   "auto":  on a GPU, cuDNN's fused attention (`jax.nn.dot_product_attention(implementation="cudnn")`) for an
#            unmasked, unbiased layer in bfloat16/float16 with head size a multiple of 8 up to 128 (the U-Net's
#            self-attention); otherwise "flash" where the float32 logits would exceed FLASH_MIN_BYTES (per
#            backend), else "dense".
# A layer with a bias hook (paint-with-words) is always dense: the hook sees the layer's whole logit tensor.
# CPU: flash was faster than dense at every size measured (bench/peers.py small/edm64, docs/benchmarks.md), so only
# trivial layers stay dense; GPU: see `select_attention` and docs/benchmarks.md (peers on a GPU).
ATTENTION_IMPLS = ("auto", "dense", "flash")
FLASH_MIN_BYTES = {"cpu": 1 << 20}
FLASH_MIN_BYTES_DEFAULT = 16 << 20
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


# ----------------------------------------------------------------------------------------------------------
# Annotated layer factories (shared with unet.py)
# ----------------------------------------------------------------------------------------------------------
def linear(
    in_features: int,
    out_features: int,
    axes: Axes,
    *,
    dtype: jnp.dtype = jnp.float32,
    zero_init: bool = False,
    use_bias: bool = True,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """Dense layer with float32 params, compute dtype ``dtype`` and logical axes ``axes`` = (in, out)."""
    kinit = nnx.initializers.zeros_init() if zero_init else _default_kernel_init
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(kinit, axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
    )


def conv(
    in_features: int,
    out_features: int,
    kernel_size: int = 3,
    *,
    stride: int = 1,
    dtype: jnp.dtype = jnp.float32,
    zero_init: bool = False,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """NHWC ``kernel_size``² convolution with symmetric "same" padding (as PyTorch ``padding=k//2``).

    Explicit symmetric padding keeps stride-2 downsampling aligned exactly like ADM's
    ``Conv2d(3, stride=2, padding=1)`` (XLA's "SAME" would pad (0, 1) instead).
    """
    kinit = nnx.initializers.zeros_init() if zero_init else _default_kernel_init
    p = kernel_size // 2
    return nnx.Conv(
        in_features,
        out_features,
        (kernel_size, kernel_size),
        strides=stride,
        padding=((p, p), (p, p)),
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(kinit, (None, None, "conv_in", "conv_out")),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)),
        rngs=rngs,
    )


def resolve_groups(channels: int, num_groups: int) -> int:
    """``min(num_groups, channels)``; raises ValueError when ``channels`` is not divisible by it."""
    g = min(num_groups, channels)
    if g <= 0 or channels % g:
        raise ValueError(f"GroupNorm: {channels} channels are not divisible into {g} groups")
    return g


class GroupNorm32(nnx.Module):
    """GroupNorm computed in float32 whatever the input dtype (ADM ``GroupNorm32``); output in input dtype."""

    def __init__(self, channels: int, num_groups: int = 32, *, eps: float = 1e-5, rngs: nnx.Rngs):
        self.norm = nnx.GroupNorm(
            channels,
            num_groups=resolve_groups(channels, num_groups),
            epsilon=eps,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(x.astype(jnp.float32)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Attention core
# ----------------------------------------------------------------------------------------------------------
def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    key_mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    bias_fn: Callable[[jax.Array], jax.Array] | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Multi-head attention ``softmax((QKᵀ + bias) / √D) V`` with the softmax in float32.

    Args:
      q: ``[B, Lq, H, D]`` queries.
      k, v: ``[B, Lk, H, D]`` keys / values.
      key_mask: optional bool ``[B, Lk]``; False keys get exactly zero weight (a masked key is
        equivalent to a removed key). A row whose keys are all masked attends uniformly (finite output).
      bias: optional additive bias broadcastable to ``[B, H, Lq, Lk]``, added to the **unscaled** logits
        QKᵀ before the 1/√D scaling (eDiff-I §5 paint-with-words: softmax((QKᵀ + w·A)/√d)).
      bias_fn: optional hook ``logits -> bias`` receiving the unscaled float32 logits ``[B, H, Lq, Lk]``
        (e.g. to compute ``max(QKᵀ)``); its result is added like ``bias``.
      impl: one of `ATTENTION_IMPLS` (``model.attention``); with ``bias`` / ``bias_fn`` always dense.

    Returns:
      ``[B, Lq, H, D]`` in the dtype of ``v``.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q/k/v must be [B, L, H, D]; got {q.shape}, {k.shape}, {v.shape}")
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {impl!r}: one of {', '.join(ATTENTION_IMPLS)}")
    has_bias = bias is not None or bias_fn is not None
    chosen = select_attention(q.shape, k.shape, q.dtype, masked=key_mask is not None, has_bias=has_bias, impl=impl)
    if chosen == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn").astype(v.dtype)
        except (ValueError, NotImplementedError, RuntimeError):  # cuDNN too old / shape refused at trace time
            chosen = "flash"
    if chosen == "flash":
        return flash_attention(q, k, v, key_mask)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if bias_fn is not None:
        logits = logits + bias_fn(logits).astype(jnp.float32)
    logits = logits * (1.0 / math.sqrt(q.shape[-1]))
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    # heads-major V and output, transposed explicitly: the fused "bhqk,bkhd->bqhd" ran ~3.5× slower on XLA:CPU
    out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v.transpose(0, 2, 1, 3))
    return out.transpose(0, 2, 1, 3)


def select_attention(
    q_shape: Sequence[int],
    k_shape: Sequence[int],
    dtype: jnp.dtype,
    *,
    masked: bool,
    has_bias: bool,
    impl: str = "auto",
    backend: str | None = None,
) -> str:
    """Which kernel `dot_product_attention` runs for these shapes: ``"cudnn"``, ``"flash"`` or ``"dense"``.

    ``backend`` defaults to ``jax.default_backend()``; a layer with a bias (paint-with-words) is always dense.
    """
    if has_bias or impl == "dense":
        return "dense"
    if impl == "flash":
        return "flash"
    backend = backend or jax.default_backend()
    b, lq, h, d = q_shape
    if (backend in ("gpu", "cuda") and not masked and jnp.dtype(dtype) in _CUDNN_DTYPES and d % 8 == 0
            and d <= 128):
        return "cudnn"
    logit_bytes = 4 * b * h * lq * k_shape[1]
    return "flash" if logit_bytes > FLASH_MIN_BYTES.get(backend, FLASH_MIN_BYTES_DEFAULT) else "dense"


def _check_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention={impl!r}: one of {', '.join(ATTENTION_IMPLS)}")
    return impl


def _num_heads(channels: int, head_dim: int) -> int:
    if head_dim <= 0 or channels % head_dim:
        raise ValueError(f"attention: channels {channels} not divisible by head_dim {head_dim}")
    return channels // head_dim


class SelfAttention(nnx.Module):
    """Spatial self-attention over a ``[B, H, W, C]`` map: GroupNorm → q,k,v → attention → out (zero) + x.

    ``num_heads = C // head_dim`` (ADM's ``num_head_channels``). The zero-initialised output projection makes
    the block the identity at initialisation (ADM ``zero_module(proj_out)``).
    """

    def __init__(
        self,
        channels: int,
        *,
        head_dim: int = 64,
        num_groups: int = 32,
        dtype: jnp.dtype = jnp.float32,
        attention: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.num_heads = _num_heads(channels, head_dim)
        self.head_dim = head_dim
        self.attention = _check_impl(attention)
        self.norm = GroupNorm32(channels, num_groups, rngs=rngs)
        self.q = linear(channels, channels, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.k = linear(channels, channels, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.v = linear(channels, channels, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.out = linear(channels, channels, ("heads", "embed"), dtype=dtype, zero_init=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        t = self.norm(x).reshape(b, h * w, c)
        split = (b, h * w, self.num_heads, self.head_dim)
        o = dot_product_attention(
            self.q(t).reshape(split), self.k(t).reshape(split), self.v(t).reshape(split), impl=self.attention
        )
        return x + self.out(o.reshape(b, h * w, c)).reshape(b, h, w, c).astype(x.dtype)


class CrossAttention(nnx.Module):
    """Cross-attention from image features to context tokens (eDiff-I §4, Fig. 4).

    GroupNorm(x) → q; context ``[B, L, context_dim]`` → k, v; attention with the context key mask →
    zero-initialised output projection → residual. ``attn_bias_fn(logits, (h, w))`` (see ``AttnBiasFn``) lets
    paint-with-words add a bias computed from the unscaled logits of this layer.
    """

    def __init__(
        self,
        channels: int,
        context_dim: int,
        *,
        head_dim: int = 64,
        num_groups: int = 32,
        dtype: jnp.dtype = jnp.float32,
        attention: str = "auto",
        rngs: nnx.Rngs,
    ):
        if context_dim <= 0:
            raise ValueError(f"cross-attention needs context_dim > 0, got {context_dim}")
        self.num_heads = _num_heads(channels, head_dim)
        self.head_dim = head_dim
        self.attention = _check_impl(attention)
        self.norm = GroupNorm32(channels, num_groups, rngs=rngs)
        self.q = linear(channels, channels, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.k = linear(context_dim, channels, ("context", "heads"), dtype=dtype, rngs=rngs)
        self.v = linear(context_dim, channels, ("context", "heads"), dtype=dtype, rngs=rngs)
        self.out = linear(channels, channels, ("heads", "embed"), dtype=dtype, zero_init=True, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array,
        context_mask: jax.Array | None = None,
        *,
        attn_bias_fn: AttnBiasFn | None = None,
    ) -> jax.Array:
        """``x`` [B, H, W, C], ``context`` [B, L, context_dim], ``context_mask`` bool [B, L] → like x."""
        b, h, w, c = x.shape
        t = self.norm(x).reshape(b, h * w, c)
        ctx = context
        n_ctx = ctx.shape[1]
        q = self.q(t).reshape(b, h * w, self.num_heads, self.head_dim)
        k = self.k(ctx).reshape(b, n_ctx, self.num_heads, self.head_dim)
        v = self.v(ctx).reshape(b, n_ctx, self.num_heads, self.head_dim)
        bias_fn = None if attn_bias_fn is None else (lambda logits: attn_bias_fn(logits, (h, w)))
        o = dot_product_attention(q, k, v, key_mask=context_mask, bias_fn=bias_fn, impl=self.attention)
        return x + self.out(o.reshape(b, h * w, c)).reshape(b, h, w, c).astype(x.dtype)


def positional_embedding(x: jax.Array, dim: int, *, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features ``[cos(x·f_i), sin(x·f_i)]``, ``f_i = max_period^(-i/(dim/2))`` (ADM / EDM).

    ``x``: ``[B]`` → ``[B, dim]`` float32 (``dim`` even).
    """
    if dim % 2:
        raise ValueError(f"positional embedding width must be even, got {dim}")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = x.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


__all__: Sequence[str] = (
    "ATTENTION_IMPLS",
    "AttnBiasFn",
    "CrossAttention",
    "GroupNorm32",
    "SelfAttention",
    "conv",
    "dot_product_attention",
    "linear",
    "positional_embedding",
    "resolve_groups",
)
