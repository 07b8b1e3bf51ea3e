"""Text tokenization for the T5 and CLIP text encoders: offline tokenizer training and a padded-batch wrapper.

T5 (Raffel et al. 2020, arXiv 1910.10683; HF ``T5Tokenizer``): a unigram SentencePiece vocabulary with
``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, no BOS, and an EOS appended to every sequence.

CLIP (Radford et al. 2021, arXiv 2103.00020; OpenAI ``simple_tokenizer.py``, HF ``CLIPTokenizer``): a lower-cased
byte-level BPE whose word-final symbols carry the ``</w>`` suffix; every sequence is
``<|startoftext|> ... <|endoftext|>`` and is padded with ``<|endoftext|>``. The vocabulary is laid out as in
OpenAI's ``bpe_simple_vocab_16e6``: the 256 byte symbols, the same with ``</w>``, one token per merge, then
``<|startoftext|>`` and ``<|endoftext|>``, so EOS has the largest id (49407 in OpenAI's vocabulary). Legacy HF
CLIP configs (``eos_token_id=2``) pool the text embedding at ``argmax(input_ids)``, which relies on that.

In both, the EOS is kept as the last token when a sequence is truncated. Nothing here touches the network:
tokenizers are only ever read from local directories.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["TextTokenizer", "load_tokenizer", "train_clip_bpe", "train_sentencepiece"]

SPM_MODEL_NAME = "spiece.model"
CLIP_VOCAB_NAME = "vocab.json"
CLIP_MERGES_NAME = "merges.txt"
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_WORD_SUFFIX = "</w>"
CLIP_MIN_VOCAB = 2 * 256 + 2  # byte symbols, byte symbols + "</w>", bos, eos


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


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / OpenAI CLIP byte -> printable-symbol table, in OpenAI's vocabulary order (``"!"`` first)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = list(bs)
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)  # 188 bytes are printable as themselves; the rest map to 256, 257, ...
    return [chr(c) for c in cs]


def train_clip_bpe(texts: Iterable[str], out_dir: str, vocab_size: int = 49408) -> str:
    """Train a CLIP byte-level BPE in-process (HF ``tokenizers``) and write an HF ``CLIPTokenizer`` to ``out_dir``.

    Texts are normalized and pre-tokenized exactly as HF ``CLIPTokenizer`` does at encode time (NFC, whitespace
    collapsed, lower-cased, CLIP's word regex, byte-level symbols); word-final symbols carry ``</w>``. Only the
    merges are learned; the vocabulary is then laid out as OpenAI's: 256 byte symbols, the same 256 with
    ``</w>``, one token per merge in merge order, ``<|startoftext|>``, ``<|endoftext|>`` (so ``eos_id ==
    vocab_size - 1``, and ``pad`` = ``unk`` = ``<|endoftext|>`` as in OpenAI CLIP). ``vocab_size`` (default:
    OpenAI's 49408) is an upper bound: a small corpus runs out of merges first. Training is deterministic.

    ``out_dir`` receives ``vocab.json`` + ``merges.txt`` (the format of ``openai/clip-vit-*``, read by
    ``CLIPTokenizer(vocab=..., merges=...)`` and ``CLIPTokenizer.from_pretrained``) plus ``tokenizer.json`` and
    ``tokenizer_config.json`` from ``save_pretrained`` (``model_max_length`` 77, OpenAI's context length),
    loadable with :func:`load_tokenizer`. Returns ``out_dir``.
    """
    corpus, count = [], 0
    for text in texts:
        if not isinstance(text, str):
            raise ValueError(f"train_clip_bpe: every text must be a str, got {text!r}")
        count += 1
        if text.strip():
            corpus.append(text)
    if not corpus:
        raise ValueError(f"train_clip_bpe: no non-empty texts to train on (got {count} texts, all blank)")
    if not isinstance(vocab_size, int) or vocab_size < CLIP_MIN_VOCAB:
        raise ValueError(f"train_clip_bpe: vocab_size must be an int >= {CLIP_MIN_VOCAB} "
                         f"(512 byte symbols + 2 specials), got {vocab_size!r}")

    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import CLIPTokenizer

    # Borrow the normalizer / pre-tokenizer from transformers' own CLIPTokenizer so that training sees words
    # exactly as encoding will (a CLIPTokenizer() with no files is a valid empty-vocabulary tokenizer).
    reference = CLIPTokenizer().backend_tokenizer
    bpe = Tokenizer(BPE(end_of_word_suffix=CLIP_WORD_SUFFIX, continuing_subword_prefix=""))
    bpe.normalizer = reference.normalizer
    bpe.pre_tokenizer = reference.pre_tokenizer
    base = _bytes_to_unicode()
    symbols = base + [b + CLIP_WORD_SUFFIX for b in base]
    trainer = trainers.BpeTrainer(
        # Our vocabulary is the 512 symbols + one token per merge + bos/eos: leave room for the two specials.
        vocab_size=vocab_size - 2,
        min_frequency=0,
        # Determinism: BpeTrainer breaks ties between equally frequent pairs by symbol id, and gives the
        # word-final "x</w>" symbols ids in hash-map order (so tied merges came out in a different order from
        # run to run). Registering all 512 symbols up front as "special tokens" fixes their ids in OpenAI's
        # order; they are only vocabulary entries to the trainer and do not change how words are split.
        special_tokens=symbols,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix=CLIP_WORD_SUFFIX,
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    learned = json.loads(bpe.to_str())["model"]["merges"]

    tokens = list(symbols)
    seen = set(tokens)
    merges: list[tuple[str, str]] = []
    for left, right in learned:
        merged = left + right
        if merged not in seen:
            if len(tokens) + 1 + 2 > vocab_size:  # no room for this merge's token plus the two specials
                break
            seen.add(merged)
            tokens.append(merged)
        merges.append((left, right))  # a merge whose result already exists adds no token: keep it
    tokens += [CLIP_BOS, CLIP_EOS]

    os.makedirs(out_dir, exist_ok=True)
    vocab_path = os.path.join(out_dir, CLIP_VOCAB_NAME)
    merges_path = os.path.join(out_dir, CLIP_MERGES_NAME)
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(tokens)}, f, ensure_ascii=False, indent=2)
        f.write("\n")
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{left} {right}\n" for left, right in merges)

    # Build the tokenizer from the files just written (not from_pretrained: a stale tokenizer.json in out_dir
    # would win over them) and save the tokenizers-backed form next to them.
    tokenizer = CLIPTokenizer(vocab=vocab_path, merges=merges_path, model_max_length=77)
    if tokenizer.eos_token_id != len(tokens) - 1 or tokenizer.bos_token_id != len(tokens) - 2:
        raise AssertionError(f"train_clip_bpe: bos/eos ids {tokenizer.bos_token_id}/{tokenizer.eos_token_id} "
                             f"are not the last two of {len(tokens)}")
    tokenizer.save_pretrained(out_dir)
    return out_dir


class TextTokenizer:
    """Batch tokenizer producing fixed-length encoder inputs (HF ``tokenizer(..., padding="max_length")``).

    Works for any HF tokenizer that adds its own special tokens; the layouts in this project are

    * T5: ``text </s> <pad>...``: sequences longer than ``max_length`` keep ``max_length - 1`` text tokens
      plus ``</s>``; padding is ``<pad>`` (id 0); an empty string encodes to ``[</s>, <pad>, ...]``.
    * CLIP: ``<|startoftext|> text <|endoftext|> <|endoftext|>...``: truncation keeps ``max_length - 2`` text
      tokens between bos and eos; padding repeats ``<|endoftext|>`` (pad id == eos id), so the mask, not the
      ids, tells the eos from the padding (the first eos is at ``mask.sum() - 1``); an empty string encodes
      to ``[bos, eos, eos, ...]``.

    The mask is a prefix of ones covering every special token (bos..eos). Empty strings are valid (dropped
    captions); prompt validation is the caller's job.
    """

    def __init__(self, tokenizer: Any, max_length: int):
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("tokenizer must define both a pad and an eos token (T5 / CLIP conventions)")
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        """Number of token ids (base vocabulary plus added tokens); the text encoder's embedding needs at least
        this many rows (CLIP: exactly ``eos_id + 1``)."""
        return len(self.tokenizer)

    @property
    def pad_id(self) -> int:
        """Id of the padding token (T5: ``<pad>`` = 0; CLIP: ``<|endoftext|>``, the same as :attr:`eos_id`)."""
        return int(self.tokenizer.pad_token_id)

    @property
    def eos_id(self) -> int:
        """Id of the end token (T5: ``</s>`` = 1; CLIP: ``<|endoftext|>``, the largest id)."""
        return int(self.tokenizer.eos_token_id)

    @property
    def bos_id(self) -> int | None:
        """Id of the start token (CLIP: ``<|startoftext|>``, ``eos_id - 1``), or None when there is none (T5)."""
        bos = self.tokenizer.bos_token_id
        return None if bos is None else int(bos)

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

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Character span ``(start, end)`` in ``text`` of each of the ``max_length`` positions that ``__call__``
        produces (same truncation); special tokens and padding get ``(0, 0)``. Paint-with-words maps phrases to
        token positions with it."""
        encoded = self.tokenizer(
            [text], padding="max_length", truncation=True, max_length=self.max_length, add_special_tokens=True,
            return_offsets_mapping=True, return_special_tokens_mask=True,
        )
        special = encoded["special_tokens_mask"][0]
        return [(0, 0) if sp else (int(a), int(b)) for (a, b), sp in zip(encoded["offset_mapping"][0], special)]

    def save(self, path: str) -> str:
        """Writes the tokenizer files (loadable with `load_tokenizer(path, max_length)`)."""
        self.tokenizer.save_pretrained(path)
        return path

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Decode one id sequence back to text (special tokens and padding dropped by default)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str, max_length: int) -> TextTokenizer:
    """Load an HF (tokenizers-backed) tokenizer, e.g. T5 or CLIP, from a local directory, never from the hub."""
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
