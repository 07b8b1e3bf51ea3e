"""T5 v1.1 text encoder in Flax NNX (the frozen text encoder of eDiff-I).

Matches HF ``transformers.T5EncoderModel`` with ``feed_forward_proj="gated-gelu"`` (T5 v1.1 / Flan-T5;
Raffel et al. 2020, arXiv 1910.10683, and the T5.1.1 release notes): pre-norm blocks with RMS layer norm,
un-scaled dot-product attention with a bucketed bidirectional relative position bias that is computed
once and shared by every layer, and a gated-GELU feed-forward. Dropout is omitted (inference only).

Parameters carry logical axis names ("vocab", "embed", "heads", "mlp", "rel_buckets") that are mapped to
mesh axes by the caller. Parameter tree (``nnx.state(model, nnx.Param)`` paths)::

    shared.embedding                       [vocab, d_model]           ("vocab", "embed")
    relative_attention_bias                [num_buckets, num_heads]   ("rel_buckets", None)
    blocks[i].attn_norm.scale              [d_model]                  ("norm",)
    blocks[i].attn.{q,k,v}.kernel          [d_model, heads*d_kv]      ("embed", "heads")
    blocks[i].attn.o.kernel                [heads*d_kv, d_model]      ("heads", "embed")
    blocks[i].ffn_norm.scale               [d_model]                  ("norm",)
    blocks[i].ffn.{wi_0,wi_1}.kernel       [d_model, d_ff]            ("embed", "mlp")
    blocks[i].ffn.wo.kernel                [d_ff, d_model]            ("mlp", "embed")
    final_layer_norm.scale                 [d_model]                  ("norm",)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ediffi_jax.models.hf_checkpoint import (
    ParamTable,
    load_strict,
    read_config_json,
    read_weights,
    require_local_dir,
)

__all__ = [
    "T5Config",
    "T5Encoder",
    "T5LayerNorm",
    "T5Attention",
    "T5GatedFeedForward",
    "T5Block",
    "relative_position_bucket",
    "hf_param_table",
    "load_hf_state_dict",
    "from_pretrained",
]

_SUPPORTED_FF = ("gated-gelu",)


@dataclass(frozen=True)
class T5Config:
    """Hyper-parameters of a T5 encoder; field names follow HF ``transformers.T5Config``.

    ``dtype`` is the compute dtype (activations / matmuls); ``param_dtype`` the storage dtype of the
    parameters. Layer-norm statistics and the attention softmax always run in float32, as in HF T5.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.feed_forward_proj not in _SUPPORTED_FF:
            raise ValueError(
                f"T5Config.feed_forward_proj={self.feed_forward_proj!r} is not supported; "
                f"this encoder implements {_SUPPORTED_FF} (T5 v1.1)"
            )
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"T5Config.{name} must be a positive int, got {value!r}")
        if self.relative_attention_num_buckets < 4 or self.relative_attention_num_buckets % 2:
            raise ValueError(
                "T5Config.relative_attention_num_buckets must be an even int >= 4 (bidirectional buckets), "
                f"got {self.relative_attention_num_buckets!r}"
            )
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            raise ValueError(
                "T5Config.relative_attention_max_distance must exceed num_buckets // 4, got "
                f"{self.relative_attention_max_distance!r}"
            )
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError as err:
                raise ValueError(f"T5Config.{name}={getattr(self, name)!r} is not a dtype") from err

    @property
    def inner_dim(self) -> int:
        """Fused attention width ``num_heads * d_kv`` (HF ``inner_dim``)."""
        return self.num_heads * self.d_kv

    @classmethod
    def tiny(cls, vocab_size: int = 64, **overrides: Any) -> T5Config:
        """A few-hundred-KB encoder for tests and CPU smoke runs (vocab usually from the tokenizer)."""
        fields: dict[str, Any] = dict(
            vocab_size=vocab_size,
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def xxl(cls, **overrides: Any) -> T5Config:
        """T5 v1.1 XXL encoder (``google/t5-v1_1-xxl``), the text encoder used by eDiff-I (~4.76e9 params)."""
        fields: dict[str, Any] = dict(
            vocab_size=32128,
            d_model=4096,
            d_kv=64,
            d_ff=10240,
            num_layers=24,
            num_heads=64,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            layer_norm_epsilon=1e-6,
        )
        fields.update(overrides)
        return cls(**fields)

    def num_params(self) -> int:
        """Exact parameter count of :class:`T5Encoder` for this config (embedding included)."""
        per_layer = 4 * self.d_model * self.inner_dim + 3 * self.d_model * self.d_ff + 2 * self.d_model
        return (
            self.vocab_size * self.d_model
            + self.relative_attention_num_buckets * self.num_heads
            + self.num_layers * per_layer
            + self.d_model
        )


def relative_position_bucket(
    relative_position: np.ndarray, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> np.ndarray:
    """Map ``memory_pos - query_pos`` to a bucket id, exactly as HF ``T5Attention._relative_position_bucket``.

    Half the buckets (per direction) are exact offsets, the rest are log-spaced up to ``max_distance``. The
    log branch is evaluated in float32 and truncated, like the PyTorch / Mesh-TensorFlow reference, so that
    the bucket boundaries (which pretrained checkpoints depend on) agree bit for bit.
    """
    relative_position = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).astype(np.int64) * num_buckets
        relative_position = np.abs(relative_position)
    else:
        relative_position = -np.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    # Clamp to max_exact inside the log so the (unused) small branch never evaluates log(0).
    safe = np.maximum(relative_position, max_exact).astype(np.float32)
    scaled = (
        np.log(safe / np.float32(max_exact))
        / np.float32(math.log(max_distance / max_exact))
        * np.float32(num_buckets - max_exact)
    )
    if_large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
    return buckets + np.where(is_small, relative_position, if_large)


def _normal(std: float, names: tuple[str | None, ...]) -> Any:
    return nnx.with_partitioning(nnx.initializers.normal(stddev=std), names)


def _linear(
    in_features: int, out_features: int, std: float, names: tuple[str, str], config: T5Config, rngs: nnx.Rngs
) -> nnx.Linear:
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=False,
        kernel_init=_normal(std, names),
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        rngs=rngs,
    )


class T5LayerNorm(nnx.Module):
    """RMS layer norm of HF ``T5LayerNorm``: no mean subtraction, no bias, statistics in float32."""

    def __init__(self, dim: int, eps: float, *, dtype: str = "float32", param_dtype: str = "float32"):
        self.eps = eps
        self.dtype = jnp.dtype(dtype)
        self.scale = nnx.Param(jnp.ones((dim,), dtype=jnp.dtype(param_dtype)), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Return ``scale * x / sqrt(mean(x**2) + eps)`` in the compute dtype."""
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(self.dtype)
        return self.scale[...].astype(self.dtype) * y


class T5Attention(nnx.Module):
    """Bidirectional self-attention of HF ``T5Attention`` (no 1/sqrt(d) scaling; bias added to logits)."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        d, inner = config.d_model, config.inner_dim
        self.num_heads = config.num_heads
        self.d_kv = config.d_kv
        self.dtype = jnp.dtype(config.dtype)
        # Initialisation scales follow HF T5PreTrainedModel._init_weights (the attention is un-scaled, so
        # the 1/sqrt(d_kv) lives in q's init instead).
        self.q = _linear(d, inner, (d * config.d_kv) ** -0.5, ("embed", "heads"), config, rngs)
        self.k = _linear(d, inner, d**-0.5, ("embed", "heads"), config, rngs)
        self.v = _linear(d, inner, d**-0.5, ("embed", "heads"), config, rngs)
        self.o = _linear(inner, d, inner**-0.5, ("heads", "embed"), config, rngs)

    def __call__(self, x: jax.Array, position_bias: jax.Array, key_mask: jax.Array) -> jax.Array:
        """Attend ``x`` [B,L,D] to itself; ``position_bias`` [1,H,L,L] float32, ``key_mask`` [B,L] bool."""
        b, length, _ = x.shape
        shape = (b, length, self.num_heads, self.d_kv)
        q = self.q(x).reshape(shape)
        k = self.k(x).reshape(shape)
        v = self.v(x).reshape(shape)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = logits + position_bias
        # Replace (rather than add to) masked logits so a fully padded row stays finite (uniform weights).
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, self.num_heads * self.d_kv)
        return self.o(out)


class T5GatedFeedForward(nnx.Module):
    """HF ``T5DenseGatedActDense`` with ``gelu_new``: ``wo(gelu_tanh(wi_0 x) * wi_1 x)``."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        d, f = config.d_model, config.d_ff
        self.wi_0 = _linear(d, f, d**-0.5, ("embed", "mlp"), config, rngs)
        self.wi_1 = _linear(d, f, d**-0.5, ("embed", "mlp"), config, rngs)
        self.wo = _linear(f, d, f**-0.5, ("mlp", "embed"), config, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the gated-GELU MLP to ``x`` [..., d_model]."""
        return self.wo(jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x))


class T5Block(nnx.Module):
    """One encoder ``T5Block``: pre-norm self-attention and pre-norm gated FFN, each with a residual."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        norm_kw = dict(dtype=config.dtype, param_dtype=config.param_dtype)
        self.attn_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, **norm_kw)
        self.attn = T5Attention(config, rngs=rngs)
        self.ffn_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, **norm_kw)
        self.ffn = T5GatedFeedForward(config, rngs=rngs)

    def __call__(self, x: jax.Array, position_bias: jax.Array, key_mask: jax.Array) -> jax.Array:
        """Transform the residual stream ``x`` [B,L,D]."""
        x = x + self.attn(self.attn_norm(x), position_bias, key_mask)
        return x + self.ffn(self.ffn_norm(x))


class T5Encoder(nnx.Module):
    """T5 v1.1 encoder stack, numerically equivalent to HF ``T5EncoderModel(...).last_hidden_state``.

    The relative position bias table lives at the top level (HF stores it in block 0's attention and
    shares the computed bias with all later blocks; the computation here is identical).
    """

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(config.dtype)
        param_dtype = jnp.dtype(config.param_dtype)
        self.shared = nnx.Embed(
            config.vocab_size,
            config.d_model,
            embedding_init=_normal(1.0, ("vocab", "embed")),
            dtype=self.dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.relative_attention_bias = nnx.Param(
            nnx.initializers.normal(stddev=config.d_model**-0.5)(
                rngs.params(), (config.relative_attention_num_buckets, config.num_heads), param_dtype
            ),
            out_sharding=("rel_buckets", None),
        )
        self.blocks = nnx.List([T5Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_layer_norm = T5LayerNorm(
            config.d_model, config.layer_norm_epsilon, dtype=config.dtype, param_dtype=config.param_dtype
        )

    def position_bias(self, length: int) -> jax.Array:
        """Bidirectional relative position bias [1, heads, length, length] in float32 (HF compute_bias)."""
        positions = np.arange(length)
        buckets = relative_position_bucket(
            positions[None, :] - positions[:, None],
            bidirectional=True,
            num_buckets=self.config.relative_attention_num_buckets,
            max_distance=self.config.relative_attention_max_distance,
        )
        table = self.relative_attention_bias[...].astype(jnp.float32)
        values = jnp.take(table, jnp.asarray(buckets, dtype=jnp.int32), axis=0)  # [L, L, H]
        return jnp.transpose(values, (2, 0, 1))[None]

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Encode ``input_ids`` int [B,L] with ``attention_mask`` [B,L] (nonzero = real token).

        Returns the final-layer-normed hidden states [B, L, d_model] in the compute dtype. Padded keys are
        masked out of every attention; padded query rows are still computed (as in HF).
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != "
                f"input_ids shape {tuple(input_ids.shape)}"
            )
        key_mask = attention_mask.astype(bool)
        x = self.shared(input_ids.astype(jnp.int32)).astype(self.dtype)
        bias = self.position_bias(input_ids.shape[1])
        for block in self.blocks:
            x = block(x, bias, key_mask)
        return self.final_layer_norm(x)


# --------------------------------------------------------------------------------------------------
# HF state-dict mapping
# --------------------------------------------------------------------------------------------------

_TIED_EMBED_ALIAS = "encoder.embed_tokens.weight"


def hf_param_table(config: T5Config) -> ParamTable:
    """HF ``T5EncoderModel`` state-dict key -> (path in :class:`T5Encoder`, transform).

    ``"T"`` marks ``nn.Linear`` weights, which PyTorch stores as [out, in] while NNX kernels are [in, out].
    ``encoder.embed_tokens.weight`` (tied to ``shared.weight``) is handled by the loader.
    """
    table: ParamTable = {
        "shared.weight": (("shared", "embedding"), None),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (
            ("relative_attention_bias",),
            None,
        ),
        "encoder.final_layer_norm.weight": (("final_layer_norm", "scale"), None),
    }
    for i in range(config.num_layers):
        pre = f"encoder.block.{i}.layer"
        table[f"{pre}.0.layer_norm.weight"] = (("blocks", i, "attn_norm", "scale"), None)
        for name in ("q", "k", "v", "o"):
            table[f"{pre}.0.SelfAttention.{name}.weight"] = (("blocks", i, "attn", name, "kernel"), "T")
        table[f"{pre}.1.layer_norm.weight"] = (("blocks", i, "ffn_norm", "scale"), None)
        for name in ("wi_0", "wi_1", "wo"):
            table[f"{pre}.1.DenseReluDense.{name}.weight"] = (("blocks", i, "ffn", name, "kernel"), "T")
    return table


def load_hf_state_dict(
    model: T5Encoder,
    state_dict: Mapping[str, Any],
    *,
    ignore_prefixes: Sequence[str] = (),
) -> T5Encoder:
    """Copy an HF ``T5EncoderModel`` state dict (name -> array-like) into ``model`` in place.

    Strict, like ``torch.nn.Module.load_state_dict(strict=True)``: raises ``ValueError`` listing every
    missing key, unexpected key (unless it starts with one of ``ignore_prefixes``, e.g. ``("decoder.",
    "lm_head.")`` for a full ``T5ForConditionalGeneration`` checkpoint) and shape mismatch. The tied alias
    ``encoder.embed_tokens.weight`` may stand in for ``shared.weight``; if both are given they must agree.
    Values are cast to the model's parameter dtype. Returns ``model``.
    """
    table = hf_param_table(model.config)
    arrays = {k: v for k, v in state_dict.items() if not any(k.startswith(p) for p in ignore_prefixes)}

    if _TIED_EMBED_ALIAS in arrays:
        alias = np.asarray(arrays.pop(_TIED_EMBED_ALIAS))
        if "shared.weight" not in arrays:
            arrays["shared.weight"] = alias
        elif alias.shape != np.shape(arrays["shared.weight"]) or not np.array_equal(
            alias, np.asarray(arrays["shared.weight"])
        ):
            raise ValueError(f"{_TIED_EMBED_ALIAS!r} differs from 'shared.weight' (they must be tied)")

    load_strict(model, table, arrays, "T5 encoder")
    return model


# --------------------------------------------------------------------------------------------------
# Loading a local HF checkpoint directory
# --------------------------------------------------------------------------------------------------

_HF_CONFIG_FIELDS = (
    "vocab_size",
    "d_model",
    "d_kv",
    "d_ff",
    "num_layers",
    "num_heads",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
    "layer_norm_epsilon",
)
def _read_hf_config(local_dir: str, dtype: str, param_dtype: str) -> T5Config:
    path, raw = read_config_json(local_dir, "T5")
    if raw.get("model_type") != "t5":
        raise ValueError(f"{path}: model_type={raw.get('model_type')!r} is not 't5'")
    ff = raw.get("feed_forward_proj", "relu")
    if ff not in _SUPPORTED_FF:
        raise ValueError(f"{path}: feed_forward_proj={ff!r} is not supported (need one of {_SUPPORTED_FF}, T5 v1.1)")
    fields = {name: raw[name] for name in _HF_CONFIG_FIELDS if name in raw}
    try:
        return T5Config(**fields, feed_forward_proj=ff, dtype=dtype, param_dtype=param_dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


def from_pretrained(
    local_dir: str, *, dtype: str = "float32", param_dtype: str = "float32"
) -> tuple[T5Encoder, T5Config]:
    """Load a local HF T5 v1.1 checkpoint directory (``T5EncoderModel`` / ``T5ForConditionalGeneration``
    ``save_pretrained`` output) into a :class:`T5Encoder`. Hub names are never downloaded.

    Reads ``config.json`` and ``model.safetensors``, a sharded ``model.safetensors.index.json`` or
    ``pytorch_model.bin`` (needs torch). Decoder / LM-head weights are ignored. Returns ``(model, config)``.
    """
    require_local_dir(local_dir, "T5")
    config = _read_hf_config(local_dir, dtype, param_dtype)
    path, state_dict = read_weights(local_dir, "T5")
    model = T5Encoder(config, rngs=nnx.Rngs(0))
    try:
        load_hf_state_dict(model, state_dict, ignore_prefixes=("decoder.", "lm_head."))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return model, config
