"""Text tokenization for the T5 text encoder: offline SentencePiece training and a padded-batch wrapper.

Follows the T5 tokenizer conventions (Raffel et al. 2020, arXiv 1910.10683; HF ``T5Tokenizer``): a unigram
SentencePiece vocabulary with ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, no BOS, and an EOS appended to
every sequence (kept as the last token when a sequence is truncated). Nothing here touches the network:
tokenizers are only ever read from local directories.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["TextTokenizer", "load_tokenizer", "train_sentencepiece"]

SPM_MODEL_NAME = "spiece.model"


def train_sentencepiece(texts: Iterable[str], out_dir: str, vocab_size: int = 64) -> str:
    """Train a small unigram SentencePiece model in-process and write an HF T5 tokenizer to ``out_dir``.

    The model follows T5's special-token layout (pad 0, eos 1 ``</s>``, unk 2, no bos) and uses no sentinel
    ``<extra_id_*>`` tokens. Training is single-threaded and therefore deterministic: the same texts give a
    byte-identical ``spiece.model``. ``vocab_size`` is a soft upper bound (``hard_vocab_limit=False``), so
    a tiny corpus yields a smaller vocabulary instead of an error. ``out_dir`` receives ``spiece.model``,
    ``tokenizer.json`` and ``tokenizer_config.json``, loadable with :func:`load_tokenizer`. Returns
    ``out_dir``.
    """
    import sentencepiece as spm

    corpus = []
    for text in texts:
        if not isinstance(text, str):
            raise ValueError(f"train_sentencepiece: every text must be a str, got {text!r}")
        if text.strip():
            corpus.append(text)
    if not corpus:
        raise ValueError("train_sentencepiece: no non-empty texts to train on")
    if vocab_size < 8:
        raise ValueError(f"train_sentencepiece: vocab_size must be >= 8, got {vocab_size}")

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,
        minloglevel=2,
    )
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, SPM_MODEL_NAME), "wb") as f:
        f.write(buffer.getvalue())

    # transformers 5 converts a SentencePiece ``.model`` to a tokenizers-backed T5 tokenizer only inside
    # ``from_pretrained``; load the directory we just wrote and save the converted tokenizer next to it.
    from transformers import T5Tokenizer

    tokenizer = T5Tokenizer.from_pretrained(out_dir, extra_ids=0, local_files_only=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


class TextTokenizer:
    """Batch tokenizer producing fixed-length T5 inputs (HF ``tokenizer(..., padding="max_length")``).

    Every sequence ends with ``</s>``; sequences longer than ``max_length`` are truncated to
    ``max_length - 1`` tokens plus ``</s>``; the rest is padded with ``<pad>`` (id 0). An empty string is
    valid (dropped captions) and encodes to ``[</s>, <pad>, ...]``; prompt validation is the caller's job.
    """

    def __init__(self, tokenizer: Any, max_length: int):
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("tokenizer must define both a pad and an eos token (T5 conventions)")
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        """Number of token ids (base vocabulary plus added tokens); the T5 embedding needs at least this."""
        return len(self.tokenizer)

    @property
    def pad_id(self) -> int:
        """Id of ``<pad>`` (0 for T5)."""
        return int(self.tokenizer.pad_token_id)

    @property
    def eos_id(self) -> int:
        """Id of ``</s>`` (1 for T5)."""
        return int(self.tokenizer.eos_token_id)

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Tokenize a batch: ``{"ids": int32 [B, max_length], "mask": bool [B, max_length]}``."""
        if isinstance(texts, str):
            raise ValueError(f"TextTokenizer expects a sequence of strings, got a single str {texts!r}")
        texts = list(texts)
        for text in texts:
            if not isinstance(text, str):
                raise ValueError(f"TextTokenizer: every text must be a str, got {text!r}")
        if not texts:
            empty = np.zeros((0, self.max_length))
            return {"ids": empty.astype(np.int32), "mask": empty.astype(bool)}
        encoded = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=True,
            return_attention_mask=True,
        )
        ids = np.asarray(encoded["input_ids"], dtype=np.int32)
        mask = np.asarray(encoded["attention_mask"], dtype=bool)
        return {"ids": ids, "mask": mask}

    def save(self, path: str) -> str:
        """Writes the tokenizer files (loadable with `load_tokenizer(path, max_length)`)."""
        self.tokenizer.save_pretrained(path)
        return path

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Decode one id sequence back to text (special tokens and padding dropped by default)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str, max_length: int) -> TextTokenizer:
    """Load an HF (tokenizers-backed) T5 tokenizer from a local directory, never from the hub."""
    if not isinstance(path, str | os.PathLike) or not os.path.isdir(path):
        raise ValueError(f"tokenizer path {path!r} is not an existing directory (hub names are not allowed)")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load a tokenizer from directory {path!r}: {err}") from err
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer in {path!r} is not a fast (tokenizers-backed) tokenizer")
    return TextTokenizer(tokenizer, max_length)
