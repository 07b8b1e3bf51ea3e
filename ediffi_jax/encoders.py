"""The frozen text encoders of a run: tokenizer + T5 encoder, prepared once per workdir.

The embedded default (no weights on disk) is a small randomly initialised T5 v1.1 encoder with a
SentencePiece tokenizer trained in-process on the training captions. Both are written into the workdir
(`tokenizer/`, `text_encoder/`) the first time, and read back from there afterwards, so sampling and resumed
training see exactly the encoder the model was trained with. Frozen random encoders still give distinct
features per token, which the UNet learns to read.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ediffi_jax.models.t5 import T5Config, T5Encoder
from ediffi_jax.tokenizers import TextTokenizer, load_tokenizer, train_sentencepiece


def t5_config(cfg: ml_collections.ConfigDict, vocab_size: int) -> T5Config:
    return T5Config(
        vocab_size=vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        layer_norm_epsilon=cfg.layer_norm_epsilon, feed_forward_proj="gated-gelu", dtype=cfg.dtype,
    )


@dataclasses.dataclass
class TextEncoders:
    """Tokenizer + frozen T5. `encode(params, batch)` is pure and jit-able; `params` stay a separate argument
    so a train step never differentiates (or donates) them."""

    tokenizer: TextTokenizer
    graphdef: nnx.GraphDef
    params: nnx.State

    def __post_init__(self) -> None:
        self._encode_jit = jax.jit(self.encode)  # one compile per prompt-batch shape

    def tokenize(self, captions: Sequence[str]) -> dict[str, np.ndarray]:
        tok = self.tokenizer(list(captions))
        return {"t5_ids": tok["ids"], "t5_mask": tok["mask"]}

    def encode(self, params: nnx.State, batch: Mapping[str, jax.Array]) -> dict[str, dict[str, jax.Array]]:
        t5 = nnx.merge(self.graphdef, params)
        tokens = t5(batch["t5_ids"], batch["t5_mask"])
        return {"t5": {"tokens": tokens, "mask": batch["t5_mask"].astype(bool)}}

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, dict[str, jax.Array]]:
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt must be a non-empty string, got {p!r}")
        return self._encode_jit(self.params, self.tokenize(prompts))


def setup_text_encoders(
    config: ml_collections.ConfigDict, workdir: str, captions: Iterable[str] | None = None
) -> TextEncoders:
    """Loads the run's tokenizer and T5 from `workdir`, creating them on the first call.

    `captions` (the training captions) are needed only the first time, to train the SentencePiece model,
    unless `config.text.tokenizer_dir` points at an existing tokenizer directory.
    """
    text = config.text
    tok_dir = text.tokenizer_dir or os.path.join(workdir, "tokenizer")
    if not os.path.isdir(tok_dir):
        if text.tokenizer_dir:
            raise ValueError(f"config.text.tokenizer_dir={text.tokenizer_dir!r} is not a directory")
        if captions is None:
            raise ValueError(f"workdir {workdir!r} has no tokenizer/ and no captions were given to train one")
        train_sentencepiece(captions, tok_dir, vocab_size=text.vocab_size)
    tokenizer = load_tokenizer(tok_dir, max_length=text.max_length)

    cfg = t5_config(text.t5, tokenizer.vocab_size)
    abstract = nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(text.t5.seed)))
    graphdef, abstract_params = nnx.split(abstract)
    enc_dir = os.path.abspath(os.path.join(workdir, "text_encoder"))
    if os.path.isdir(enc_dir):
        with ocp.StandardCheckpointer() as ckptr:
            try:
                params = ckptr.restore(enc_dir, abstract_params)
            except (ValueError, KeyError) as e:
                raise ValueError(f"text encoder in {enc_dir} does not match config.text.t5: {e}") from None
    else:
        params = nnx.state(T5Encoder(cfg, rngs=nnx.Rngs(text.t5.seed)))
        if jax.process_index() == 0:
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(enc_dir, params)
    return TextEncoders(tokenizer=tokenizer, graphdef=graphdef, params=params)

