"""The frozen encoders of a run — T5, CLIP text, CLIP image — prepared once, and their pure `encode`.

eDiff-I (§3) conditions on three embeddings; `config.conditioning.order` names the ones a run uses:

    "clip_text"  : CLIP-L/14 text tokens (last hidden state, [B, 77, 768]) + pooled text_embeds (projected)
    "t5"         : T5-XXL encoder tokens [B, L, 4096]
    "clip_image" : CLIP-L/14 image_embeds of an image (the training image; a style reference at sampling),
                   used as one context token and as a pooled vector

Each encoder comes from a local Hugging Face directory (`config.encoders.<t5|clip>.pretrained_dir`) or, with
none given (the embedded CPU default), is randomly initialised at the configured size with a tokenizer trained
in-process on the training captions. Random encoders and their tokenizers are written to an encoder directory
(`<workdir>/encoders/`) the first time and read back afterwards, so sampling and resumed training see exactly
the encoders the model was trained with. Frozen random encoders still give distinct features per token/image,
which the UNet learns to read.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ediffi_jax.models import clip as clip_lib
from ediffi_jax.models import t5 as t5_lib
from ediffi_jax.tokenizers import TextTokenizer, load_tokenizer, train_clip_bpe, train_sentencepiece
from ediffi_jax.tracing import abstract_module

EMBEDDINGS = ("clip_text", "t5", "clip_image")
# CLIP's pixel normalisation (OpenAI preprocessing).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Embeddings = dict[str, dict[str, jax.Array]]


def t5_config(cfg: ml_collections.ConfigDict, vocab_size: int) -> t5_lib.T5Config:
    """T5Config of a randomly initialised encoder (`config.encoders.t5`)."""
    return t5_lib.T5Config(
        vocab_size=vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        layer_norm_epsilon=cfg.layer_norm_epsilon, feed_forward_proj="gated-gelu", dtype=cfg.dtype,
    )


def clip_configs(
    cfg: ml_collections.ConfigDict, tokenizer: TextTokenizer
) -> tuple[clip_lib.CLIPTextConfig, clip_lib.CLIPVisionConfig]:
    """CLIP text / vision configs of randomly initialised towers (`config.encoders.clip`)."""
    text = clip_lib.CLIPTextConfig(
        **dict(cfg.text), vocab_size=tokenizer.vocab_size, max_position_embeddings=cfg.max_length,
        eos_token_id=tokenizer.eos_id, dtype=cfg.dtype)
    vision = clip_lib.CLIPVisionConfig(**dict(cfg.vision), dtype=cfg.dtype)
    return text, vision


def clip_pixels(images: jax.Array, size: int) -> jax.Array:
    """Images in [-1, 1] [B, H, W, 3] → CLIP input: bicubic (antialiased) resize to size², CLIP-normalised."""
    x = (images.astype(jnp.float32) + 1.0) * 0.5
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), method="bicubic", antialias=True)
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


@dataclasses.dataclass
class FrozenEncoders:
    """Tokenizers + frozen encoder towers. `encode(params, batch)` is pure and jit-able; `params` stay a
    separate argument so a train step never differentiates (or donates) them.

    `names` are the embeddings produced (a subset of EMBEDDINGS, in conditioning order). `batch` holds
    `t5_ids/t5_mask` and `clip_ids/clip_mask` (from `tokenize`) and, for "clip_image", `image` in [-1, 1].
    """

    names: tuple[str, ...]
    tokenizers: dict[str, TextTokenizer]
    graphdefs: dict[str, nnx.GraphDef]
    params: dict[str, nnx.State]
    clip_image_size: int = 0

    def __post_init__(self) -> None:
        self._encode_jit = jax.jit(self.encode)  # one compile per batch shape

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """Keys of a data batch that `encode` reads."""
        keys = []
        for tok in self.tokenizers:
            keys += [f"{tok}_ids", f"{tok}_mask"]
        return tuple(keys) + (("image",) if "clip_image" in self.names else ())

    def tokenize(self, captions: Sequence[str]) -> dict[str, np.ndarray]:
        out = {}
        for name, tokenizer in self.tokenizers.items():
            tok = tokenizer(list(captions))
            out[f"{name}_ids"], out[f"{name}_mask"] = tok["ids"], tok["mask"]
        return out

    def encode(self, params: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> Embeddings:
        out: Embeddings = {}
        for name in self.names:
            model = nnx.merge(self.graphdefs[name], params[name])
            if name == "t5":
                mask = batch["t5_mask"].astype(bool)
                out[name] = {"tokens": model(batch["t5_ids"], mask), "mask": mask}
            elif name == "clip_text":
                mask = batch["clip_mask"].astype(bool)
                hidden, pooled = model(batch["clip_ids"], mask)
                out[name] = {"tokens": hidden, "mask": mask, "pooled": pooled}
            else:  # clip_image: the projected image embedding is one context token and the pooled vector
                _, pooled = model(clip_pixels(batch["image"], self.clip_image_size))
                out[name] = {"tokens": pooled[:, None], "mask": jnp.ones(pooled.shape[:1] + (1,), bool),
                             "pooled": pooled}
        return out

    def encode_prompts(self, prompts: Sequence[str], images: Any | None = None) -> Embeddings:
        """Embeddings of `prompts` (and, when given, of reference `images` [B, H, W, 3] in [-1, 1], or uint8).
        Without images the "clip_image" embedding is left out, which the model reads as dropped."""
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt must be a non-empty string, got {p!r}")
        batch: dict[str, Any] = self.tokenize(prompts)
        names = self.names
        if images is not None and "clip_image" in names:
            images = np.asarray(images)
            if images.ndim != 4 or images.shape[0] != len(prompts) or images.shape[-1] != 3:
                raise ValueError(f"images must be [{len(prompts)}, H, W, 3], got shape {images.shape}")
            if images.dtype == np.uint8:
                images = images.astype(np.float32) / 127.5 - 1.0
            batch["image"] = images.astype(np.float32)
        else:
            names = tuple(n for n in names if n != "clip_image")
        if not names:
            raise ValueError("this run conditions on the image embedding only; pass images")
        sub = dataclasses.replace(self, names=names) if names != self.names else self
        fn = self._encode_jit if sub is self else jax.jit(sub.encode)
        return fn({n: self.params[n] for n in names}, batch)


def embeddings_from_batch(batch: Mapping[str, jax.Array], names: Sequence[str]) -> Embeddings:
    """Precomputed embeddings (see `cli/embed.py`) → the `encode` output: `<name>_tokens`, `<name>_mask`,
    `<name>_pooled`; "clip_image" is stored only as `clip_image_pooled`."""
    out: Embeddings = {}
    for n in names:
        if n == "clip_image":
            p = batch["clip_image_pooled"].astype(jnp.float32)
            out[n] = {"tokens": p[:, None], "mask": jnp.ones(p.shape[:1] + (1,), bool), "pooled": p}
        else:
            out[n] = {"tokens": batch[f"{n}_tokens"].astype(jnp.float32), "mask": batch[f"{n}_mask"].astype(bool)}
            if f"{n}_pooled" in batch:
                out[n]["pooled"] = batch[f"{n}_pooled"].astype(jnp.float32)
    return out


# ---------------------------------------------------------------- preparing the encoders of a run


def _local_checkpointer() -> ocp.StandardCheckpointer:
    """A checkpointer of this process alone: in a multi-process run the encoder files are written by process 0
    only and read by each process on its own (no cross-process barrier inside Orbax)."""
    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}))


def _restore_or_save(path: str, make: Any, what: str) -> tuple[nnx.GraphDef, nnx.State]:
    """Random-init encoder parameters, saved at `path` the first time and restored from it afterwards (onto this
    process's first device; the train loop shards them)."""
    graphdef, abstract = nnx.split(abstract_module(make))
    path = os.path.abspath(path)
    if os.path.isdir(path):
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
        with _local_checkpointer() as ckptr:
            try:
                return graphdef, ckptr.restore(path, target)
            except (ValueError, KeyError) as e:
                raise ValueError(f"{what} in {path} does not match the config: {e}") from None
    params = nnx.state(make())
    if jax.process_index() == 0:
        with _local_checkpointer() as ckptr:
            ckptr.save(path, jax.device_get(params))  # host arrays: Orbax refuses process-local jax.Arrays
    return graphdef, params


class _Captions:
    """The training captions, read (once) only when a tokenizer has to be trained."""

    def __init__(self, captions: Iterable[str] | None):
        self._source, self._list = captions, None

    def get(self) -> list[str] | None:
        if self._list is None and self._source is not None:
            self._list = list(self._source)
        return self._list


def _tokenizer(cfg: ml_collections.ConfigDict, default_dir: str, captions: _Captions, train: Any,
               what: str) -> TextTokenizer:
    tok_dir = cfg.tokenizer_dir or cfg.pretrained_dir or default_dir
    if not os.path.isdir(tok_dir):
        if cfg.tokenizer_dir or cfg.pretrained_dir:
            raise ValueError(f"{what} tokenizer directory {tok_dir!r} does not exist")
        texts = captions.get()
        if not texts:
            raise ValueError(f"no {what} tokenizer in {default_dir!r} and no captions were given to train one")
        if jax.process_index() == 0:
            train(texts, tok_dir, vocab_size=cfg.vocab_size)
    return load_tokenizer(tok_dir, max_length=cfg.max_length)


def _check_dims(config: ml_collections.ConfigDict, name: str, dim: int, pooled: int, source: str) -> None:
    e = config.conditioning.embeddings[name]
    if e.dim != dim:
        raise ValueError(f"conditioning.embeddings.{name}.dim={e.dim} but the {name} encoder ({source}) "
                         f"gives width {dim}")
    if e.pooled == "given" and e.pooled_dim != pooled:
        raise ValueError(f"conditioning.embeddings.{name}.pooled_dim={e.pooled_dim} but the {name} encoder "
                         f"({source}) gives pooled width {pooled}")


def setup_encoders(
    config: ml_collections.ConfigDict, encoder_dir: str, captions: Iterable[str] | None = None
) -> FrozenEncoders:
    """Loads the encoders the run's `conditioning.order` needs; random ones are created in `encoder_dir` on the
    first call (`captions` — the training captions — are needed then, to train the tokenizers)."""
    names = tuple(config.conditioning.order)
    unknown = [n for n in names if n not in EMBEDDINGS]
    if unknown:
        raise ValueError(f"conditioning.order names {unknown[0]!r}; the encoders provide {EMBEDDINGS}")
    caps = _Captions(captions)
    tokenizers, graphdefs, params = {}, {}, {}
    image_size = 0
    if "t5" in names:
        cfg = config.encoders.t5
        tokenizers["t5"] = _tokenizer(cfg, os.path.join(encoder_dir, "t5", "tokenizer"), caps,
                                      train_sentencepiece, "T5")
        if cfg.pretrained_dir:
            model, tcfg = t5_lib.from_pretrained(cfg.pretrained_dir, dtype=cfg.dtype)
            graphdefs["t5"], params["t5"] = nnx.split(model)
        else:
            tcfg = t5_config(cfg, tokenizers["t5"].vocab_size)
            graphdefs["t5"], params["t5"] = _restore_or_save(
                os.path.join(encoder_dir, "t5", "params"),
                lambda: t5_lib.T5Encoder(tcfg, rngs=nnx.Rngs(cfg.seed)), "T5 encoder")
        _check_dims(config, "t5", tcfg.d_model, 0, cfg.pretrained_dir or "random")
    if "clip_text" in names or "clip_image" in names:
        cfg = config.encoders.clip
        tok = _tokenizer(cfg, os.path.join(encoder_dir, "clip", "tokenizer"), caps, train_clip_bpe, "CLIP")
        if cfg.pretrained_dir:
            text_model, text_cfg = clip_lib.from_pretrained_text(cfg.pretrained_dir, dtype=cfg.dtype)
            vision_model, vision_cfg = clip_lib.from_pretrained_vision(cfg.pretrained_dir, dtype=cfg.dtype)
            towers = {"clip_text": nnx.split(text_model), "clip_image": nnx.split(vision_model)}
        else:
            text_cfg, vision_cfg = clip_configs(cfg, tok)
            make = {"clip_text": lambda: clip_lib.CLIPTextEncoder(text_cfg, rngs=nnx.Rngs(cfg.seed)),
                    "clip_image": lambda: clip_lib.CLIPVisionEncoder(vision_cfg, rngs=nnx.Rngs(cfg.seed + 1))}
            towers = {n: _restore_or_save(os.path.join(encoder_dir, "clip", n), make[n], f"CLIP {n} tower")
                      for n in ("clip_text", "clip_image") if n in names}
        source = cfg.pretrained_dir or "random"
        if "clip_text" in names:
            tokenizers["clip"] = tok
            graphdefs["clip_text"], params["clip_text"] = towers["clip_text"]
            _check_dims(config, "clip_text", text_cfg.hidden_size, text_cfg.projection_dim, source)
        if "clip_image" in names:
            graphdefs["clip_image"], params["clip_image"] = towers["clip_image"]
            image_size = vision_cfg.image_size
            _check_dims(config, "clip_image", vision_cfg.projection_dim, vision_cfg.projection_dim, source)
    return FrozenEncoders(names=names, tokenizers=tokenizers, graphdefs=graphdefs, params=params,
                          clip_image_size=image_size)


def save_encoders(encoders: FrozenEncoders, config: ml_collections.ConfigDict, out_dir: str) -> None:
    """Copies the random (non-pretrained) encoders and all tokenizers into `out_dir` (layout of `setup_encoders`)."""
    for tok_name, tok in encoders.tokenizers.items():
        tok.save(os.path.join(out_dir, tok_name, "tokenizer"))
    where = {"t5": ("t5", "params"), "clip_text": ("clip", "clip_text"), "clip_image": ("clip", "clip_image")}
    with ocp.StandardCheckpointer() as ckptr:
        for n in encoders.names:
            cfg = config.encoders["t5" if n == "t5" else "clip"]
            if not cfg.pretrained_dir:
                ckptr.save(os.path.abspath(os.path.join(out_dir, *where[n])), encoders.params[n])
