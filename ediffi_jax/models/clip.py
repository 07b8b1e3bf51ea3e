"""CLIP text and vision towers in Flax NNX (the CLIP encoders of eDiff-I).

Matches HF ``transformers.CLIPTextModelWithProjection`` / ``CLIPVisionModelWithProjection`` (Radford et al.
2021, arXiv 2103.00020): pre-LN transformer layers with biased q/k/v/out projections scaled by
``head_dim ** -0.5``, a ``quick_gelu`` (or exact ``gelu``) MLP, and bias-free output projections. The text
tower uses a causal mask plus the padding mask and pools the hidden state at the EOS token; the vision tower
embeds 2-D patches (NHWC input), prepends a class token and pools the ``post_layernorm``'d class token.
Dropout is omitted (inference only).

Parameter paths mirror the HF names, with logical axes: ``token_embedding`` ("vocab", "embed");
``position_embedding`` (None, "embed") (77 / 257 rows do not divide mesh sizes); ``class_embedding``
("embed",); ``patch_embedding.kernel`` [p,p,C,D] (None, None, None, "embed"); ``layers[i].self_attn.
{q,k,v}_proj`` ("embed", "heads") and ``out_proj`` ("heads", "embed"); ``layers[i].mlp.fc1`` ("embed", "mlp")
and ``fc2`` ("mlp", "embed"), biases on the output axis; all LayerNorms (``layer_norm{1,2}``, ``pre_layrnorm``,
``final_layer_norm``, ``post_layernorm``) ("norm",); ``text_projection`` / ``visual_projection`` ("embed", None).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ediffi_jax.models.hf_checkpoint import (
    ParamTable,
    load_strict,
    read_config_json,
    read_weights,
    require_local_dir,
)

__all__ = [
    "CLIPTextConfig", "CLIPVisionConfig", "CLIPTextEncoder", "CLIPVisionEncoder", "CLIPAttention", "CLIPMLP",
    "CLIPEncoderLayer", "hf_text_param_table", "hf_vision_param_table", "load_hf_text_state_dict",
    "load_hf_vision_state_dict", "from_pretrained_text", "from_pretrained_vision",
]

_ACTS = ("quick_gelu", "gelu")


def _validate(config: Any) -> None:
    name = type(config).__name__
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.type == "int" and field.name != "eos_token_id" and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}.{field.name} must be a positive int, got {value!r}")
    if config.hidden_act not in _ACTS:
        raise ValueError(f"{name}.hidden_act={config.hidden_act!r} is not supported (need one of {_ACTS})")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"{name}.hidden_size={config.hidden_size} is not divisible by num_attention_heads")
    for field in ("dtype", "param_dtype"):
        try:
            jnp.dtype(getattr(config, field))
        except TypeError as err:
            raise ValueError(f"{name}.{field}={getattr(config, field)!r} is not a dtype") from err


def _layer_params(d: int, f: int) -> int:
    return 4 * (d * d + d) + (d * f + f) + (f * d + d) + 4 * d


@dataclass(frozen=True)
class CLIPTextConfig:
    """Hyper-parameters of the CLIP text tower; field names follow HF ``transformers.CLIPTextConfig``.

    The defaults are the ViT-L/14 text tower (not HF's ViT-B/32 defaults). ``dtype`` is the compute dtype,
    ``param_dtype`` the storage dtype; the attention softmax runs in float32.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 768
    eos_token_id: int = 2
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def large(cls, **overrides: Any) -> CLIPTextConfig:
        """Text tower of CLIP ViT-L/14 (``openai/clip-vit-large-patch14``): 123.65M params with projection."""
        return cls(**overrides)

    def num_params(self) -> int:
        """Exact parameter count of :class:`CLIPTextEncoder` (embeddings and projection included)."""
        d = self.hidden_size
        return (
            (self.vocab_size + self.max_position_embeddings) * d
            + self.num_hidden_layers * _layer_params(d, self.intermediate_size)
            + 2 * d
            + d * self.projection_dim
        )


@dataclass(frozen=True)
class CLIPVisionConfig:
    """Hyper-parameters of the CLIP vision tower; field names follow HF ``transformers.CLIPVisionConfig``.

    The defaults are the ViT-L/14 (224 px) vision tower.
    """

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 768
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        _validate(self)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"CLIPVisionConfig.image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
            )

    @property
    def num_positions(self) -> int:
        """Number of tokens: one per patch plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def large(cls, **overrides: Any) -> CLIPVisionConfig:
        """Vision tower of CLIP ViT-L/14 at 224 px: 303.97M params with projection."""
        return cls(**overrides)

    def num_params(self) -> int:
        """Exact parameter count of :class:`CLIPVisionEncoder` (projection included)."""
        d = self.hidden_size
        patch, layers = self.patch_size**2 * self.num_channels * d, _layer_params(d, self.intermediate_size)
        # patch conv + class token + positions + pre/post LN + layers + projection
        return patch + d + self.num_positions * d + 4 * d + self.num_hidden_layers * layers + d * self.projection_dim


# ----- Layers (shared by both towers) -----


def _init(std: float, names: tuple[str | None, ...]) -> Any:
    return nnx.with_partitioning(nnx.initializers.normal(stddev=std), names)


def _dtypes(config: Any) -> dict[str, Any]:
    return dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))


def _linear(din: int, dout: int, names: tuple[str | None, ...], config: Any, rngs: nnx.Rngs, bias: bool = True):
    zeros = nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],))
    init = _init(din**-0.5, names)
    return nnx.Linear(din, dout, use_bias=bias, kernel_init=init, bias_init=zeros, rngs=rngs, **_dtypes(config))


def _layer_norm(config: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
    ones = nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",))
    zeros = nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",))
    kw = dict(epsilon=config.layer_norm_eps, scale_init=ones, bias_init=zeros, rngs=rngs)
    return nnx.LayerNorm(config.hidden_size, **kw, **_dtypes(config))


class CLIPAttention(nnx.Module):
    """HF ``CLIPAttention``: biased q/k/v/out projections, logits scaled by ``head_dim ** -0.5``."""

    def __init__(self, config: Any, *, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.dtype = jnp.dtype(config.dtype)
        self.q_proj = _linear(d, d, ("embed", "heads"), config, rngs)
        self.k_proj = _linear(d, d, ("embed", "heads"), config, rngs)
        self.v_proj = _linear(d, d, ("embed", "heads"), config, rngs)
        self.out_proj = _linear(d, d, ("heads", "embed"), config, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """Self-attend ``x`` [B,L,D]; ``mask`` bool broadcastable to [B,1,L,L] (True = may attend) or None."""
        b, length, d = x.shape
        shape = (b, length, self.num_heads, self.head_dim)
        q = self.q_proj(x).reshape(shape)
        k = self.k_proj(x).reshape(shape)
        v = self.v_proj(x).reshape(shape)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * self.head_dim**-0.5
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        return self.out_proj(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, d))


class CLIPMLP(nnx.Module):
    """HF ``CLIPMLP``: ``fc2(act(fc1(x)))`` with ``quick_gelu`` (x * sigmoid(1.702 x)) or exact ``gelu``."""

    def __init__(self, config: Any, *, rngs: nnx.Rngs):
        self.act = config.hidden_act
        self.fc1 = _linear(config.hidden_size, config.intermediate_size, ("embed", "mlp"), config, rngs)
        self.fc2 = _linear(config.intermediate_size, config.hidden_size, ("mlp", "embed"), config, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the MLP to ``x`` [..., D]."""
        h = self.fc1(x)
        h = h * jax.nn.sigmoid(1.702 * h) if self.act == "quick_gelu" else jax.nn.gelu(h, approximate=False)
        return self.fc2(h)


class CLIPEncoderLayer(nnx.Module):
    """HF ``CLIPEncoderLayer``: pre-LN attention and pre-LN MLP, each with a residual."""

    def __init__(self, config: Any, *, rngs: nnx.Rngs):
        self.layer_norm1 = _layer_norm(config, rngs)
        self.self_attn = CLIPAttention(config, rngs=rngs)
        self.layer_norm2 = _layer_norm(config, rngs)
        self.mlp = CLIPMLP(config, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """Transform the residual stream ``x`` [B,L,D]."""
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


def _embed(num: int, dim: int, names: tuple[str | None, ...], config: Any, rngs: nnx.Rngs) -> nnx.Embed:
    return nnx.Embed(num, dim, embedding_init=_init(0.02, names), rngs=rngs, **_dtypes(config))


class CLIPTextEncoder(nnx.Module):
    """CLIP text tower, numerically equivalent to HF ``CLIPTextModelWithProjection``."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(config.dtype)
        d = config.hidden_size
        self.token_embedding = _embed(config.vocab_size, d, ("vocab", "embed"), config, rngs)
        self.position_embedding = _embed(config.max_position_embeddings, d, (None, "embed"), config, rngs)
        self.layers = nnx.List([CLIPEncoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
        self.final_layer_norm = _layer_norm(config, rngs)
        self.text_projection = _linear(d, config.projection_dim, ("embed", None), config, rngs, bias=False)

    def eos_positions(self, input_ids: jax.Array) -> jax.Array:
        """Index [B] of the pooled token: HF's legacy ``argmax(input_ids)`` when ``eos_token_id == 2``, else
        the first position holding ``eos_token_id`` (0 if absent, like torch's argmax of an all-zero row)."""
        if self.config.eos_token_id == 2:
            return jnp.argmax(input_ids, axis=-1)
        return jnp.argmax((input_ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Encode ``input_ids`` int [B,L] (``attention_mask`` [B,L], nonzero = real token; None = all real).

        Returns ``(last_hidden_state [B,L,D], text_embeds [B,projection_dim])``. Attention is causal and
        padded keys are masked out; padded query rows are still computed (as in HF).
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        b, length = input_ids.shape
        if length > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        input_ids = input_ids.astype(jnp.int32)
        mask = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (b, length):
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != "
                                 f"input_ids shape {(b, length)}")
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        x = self.token_embedding(input_ids) + self.position_embedding(jnp.arange(length))[None]
        x = x.astype(self.dtype)
        for layer in self.layers:
            x = layer(x, mask)
        x = self.final_layer_norm(x)
        pooled = x[jnp.arange(b), self.eos_positions(input_ids)]
        return x, self.text_projection(pooled)


class CLIPVisionEncoder(nnx.Module):
    """CLIP vision tower, numerically equivalent to HF ``CLIPVisionModelWithProjection`` (NHWC input)."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(config.dtype)
        d, p = config.hidden_size, config.patch_size
        param_dtype = jnp.dtype(config.param_dtype)
        init = _init((p * p * config.num_channels) ** -0.5, (None, None, None, "embed"))
        kw = dict(kernel_size=(p, p), strides=(p, p), padding="VALID", use_bias=False, kernel_init=init, rngs=rngs)
        self.patch_embedding = nnx.Conv(config.num_channels, d, **kw, **_dtypes(config))
        self.class_embedding = nnx.Param(
            nnx.initializers.normal(stddev=d**-0.5)(rngs.params(), (d,), param_dtype), out_sharding=("embed",)
        )
        self.position_embedding = _embed(config.num_positions, d, (None, "embed"), config, rngs)
        self.pre_layrnorm = _layer_norm(config, rngs)
        self.layers = nnx.List([CLIPEncoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
        self.post_layernorm = _layer_norm(config, rngs)
        self.visual_projection = _linear(d, config.projection_dim, ("embed", None), config, rngs, bias=False)

    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Encode normalized ``pixel_values`` [B,H,W,C] (H = W = image_size).

        Returns ``(last_hidden_state [B, 1 + patches, D], image_embeds [B, projection_dim])``;
        ``last_hidden_state`` is the encoder output before ``post_layernorm`` (as in HF).
        """
        c = self.config
        want = (c.image_size, c.image_size, c.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"pixel_values must be [batch, {want[0]}, {want[1]}, {want[2]}] (NHWC), "
                             f"got shape {tuple(pixel_values.shape)}")
        b = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values.astype(self.dtype))
        patches = patches.reshape(b, -1, c.hidden_size)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, c.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)
        x = (x + self.position_embedding(jnp.arange(c.num_positions))[None]).astype(self.dtype)
        x = self.pre_layrnorm(x)
        for layer in self.layers:
            x = layer(x, None)
        pooled = self.post_layernorm(x[:, 0])
        return x, self.visual_projection(pooled)


# ----- HF state-dict mapping -----

_Table = ParamTable


def _layer_table(table: _Table, prefix: str, num_layers: int) -> None:
    for i in range(num_layers):
        pre = f"{prefix}.encoder.layers.{i}"
        for ln in ("layer_norm1", "layer_norm2"):
            table[f"{pre}.{ln}.weight"] = (("layers", i, ln, "scale"), None)
            table[f"{pre}.{ln}.bias"] = (("layers", i, ln, "bias"), None)
        for sub, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "out_proj")), ("mlp", ("fc1", "fc2"))):
            for name in names:
                table[f"{pre}.{sub}.{name}.weight"] = (("layers", i, sub, name, "kernel"), "T")
                table[f"{pre}.{sub}.{name}.bias"] = (("layers", i, sub, name, "bias"), None)


def _ln_table(table: _Table, key: str, attr: str) -> None:
    table[f"{key}.weight"] = ((attr, "scale"), None)
    table[f"{key}.bias"] = ((attr, "bias"), None)


def hf_text_param_table(config: CLIPTextConfig) -> _Table:
    """HF ``CLIPTextModelWithProjection`` key -> (path in :class:`CLIPTextEncoder`, transform)."""
    table: _Table = {
        "text_model.embeddings.token_embedding.weight": (("token_embedding", "embedding"), None),
        "text_model.embeddings.position_embedding.weight": (("position_embedding", "embedding"), None),
        "text_projection.weight": (("text_projection", "kernel"), "T"),
    }
    _layer_table(table, "text_model", config.num_hidden_layers)
    _ln_table(table, "text_model.final_layer_norm", "final_layer_norm")
    return table


def hf_vision_param_table(config: CLIPVisionConfig) -> _Table:
    """HF ``CLIPVisionModelWithProjection`` key -> (path in :class:`CLIPVisionEncoder`, transform)."""
    table: _Table = {
        "vision_model.embeddings.patch_embedding.weight": (("patch_embedding", "kernel"), "conv"),
        "vision_model.embeddings.class_embedding": (("class_embedding",), None),
        "vision_model.embeddings.position_embedding.weight": (("position_embedding", "embedding"), None),
        "visual_projection.weight": (("visual_projection", "kernel"), "T"),
    }
    _ln_table(table, "vision_model.pre_layrnorm", "pre_layrnorm")
    _layer_table(table, "vision_model", config.num_hidden_layers)
    _ln_table(table, "vision_model.post_layernorm", "post_layernorm")
    return table


def _load(model: nnx.Module, table: _Table, state_dict: Mapping[str, Any], ignore_prefixes: Sequence[str],
          what: str) -> None:
    arrays = {
        k: v for k, v in state_dict.items()
        if not k.endswith("position_ids") and not any(k.startswith(p) for p in ignore_prefixes)
    }
    load_strict(model, table, arrays, f"CLIP {what}")


_TEXT_IGNORE = ("vision_model.", "visual_projection.", "logit_scale")
_VISION_IGNORE = ("text_model.", "text_projection.", "logit_scale")


def load_hf_text_state_dict(
    model: CLIPTextEncoder, state_dict: Mapping[str, Any], *, ignore_prefixes: Sequence[str] = _TEXT_IGNORE
) -> CLIPTextEncoder:
    """Strictly copy an HF CLIP text state dict into ``model`` in place (one ``ValueError`` listing every
    missing / unexpected / wrong-shape tensor). ``*position_ids`` buffers and, by default, the vision tower
    of a full ``CLIPModel`` checkpoint are ignored. Values are cast to the parameter dtype."""
    _load(model, hf_text_param_table(model.config), state_dict, ignore_prefixes, "text")
    return model


def load_hf_vision_state_dict(
    model: CLIPVisionEncoder, state_dict: Mapping[str, Any], *, ignore_prefixes: Sequence[str] = _VISION_IGNORE
) -> CLIPVisionEncoder:
    """Vision counterpart of :func:`load_hf_text_state_dict` (the conv kernel is transposed to HWIO)."""
    _load(model, hf_vision_param_table(model.config), state_dict, ignore_prefixes, "vision")
    return model


# ----- Loading a local HF checkpoint directory -----

def _read_config(local_dir: str, tower: str, cls: type, **kw: Any) -> Any:
    path, raw = read_config_json(local_dir, "CLIP")
    model_type = raw.get("model_type")
    if model_type == "clip":
        sub = dict(raw.get(f"{tower}_config") or {})
        if "projection_dim" in raw:  # CLIPModel's projections use the top-level projection_dim
            sub["projection_dim"] = raw["projection_dim"]
        raw = sub
    elif model_type != f"clip_{tower}_model":
        raise ValueError(f"{path}: model_type={model_type!r} is not 'clip' or 'clip_{tower}_model'")
    try:
        names = [f.name for f in dataclasses.fields(cls) if f.name not in kw]
        return cls(**{k: raw[k] for k in names if raw.get(k) is not None}, **kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


def _from_pretrained(local_dir: str, tower: str, config_cls: type, model_cls: type, loader: Any, **kw: Any):
    require_local_dir(local_dir, "CLIP")
    config = _read_config(local_dir, tower, config_cls, **kw)
    path, state_dict = read_weights(local_dir, "CLIP")
    model = model_cls(config, rngs=nnx.Rngs(0))
    try:
        loader(model, state_dict)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return model, config


def from_pretrained_text(
    local_dir: str, *, dtype: str = "float32", param_dtype: str = "float32"
) -> tuple[CLIPTextEncoder, CLIPTextConfig]:
    """Load a local ``CLIPTextModelWithProjection`` or full ``CLIPModel`` ``save_pretrained`` directory
    (``config.json`` + ``model.safetensors``, a sharded index, or ``pytorch_model.bin``). Returns
    ``(model, config)``. Hub names are never downloaded."""
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    return _from_pretrained(local_dir, "text", CLIPTextConfig, CLIPTextEncoder, load_hf_text_state_dict, **kw)


def from_pretrained_vision(
    local_dir: str, *, dtype: str = "float32", param_dtype: str = "float32"
) -> tuple[CLIPVisionEncoder, CLIPVisionConfig]:
    """Vision counterpart of :func:`from_pretrained_text` (``CLIPVisionModelWithProjection`` or ``CLIPModel``)."""
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    return _from_pretrained(local_dir, "vision", CLIPVisionConfig, CLIPVisionEncoder, load_hf_vision_state_dict, **kw)
