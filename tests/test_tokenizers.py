"""CLIP BPE tokenizer trained offline (``ediffi_jax.tokenizers.train_clip_bpe``) against HF ``transformers``.

Checks the OpenAI vocabulary layout (byte symbols, ``</w>`` symbols, merges, bos, eos = largest id), that our
padded batches equal ``CLIPTokenizer`` called directly, and that the tokenizer's padded ids + mask pool the same
EOS hidden state in our ``CLIPTextEncoder`` and HF ``CLIPTextModelWithProjection`` (new and legacy eos rules).
"""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from ediffi_jax.tokenizers import TextTokenizer, load_tokenizer, train_clip_bpe, train_sentencepiece

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star")
PLACES = ("top left", "top right", "bottom left", "bottom right", "center")
CAPTIONS = [f"a {c} {s} at the {p}" for c in COLORS for s in SHAPES for p in PLACES[:2]] + [
    "Two small shapes, a RED circle and a Blue square.",
    "an empty white canvas",
]  # 50 captions
MAX_LEN = 16
BATCH = [
    "a red circle at the top left",
    "A BLUE   square",  # upper case and runs of spaces normalize away
    "",  # dropped caption: bos, eos only
    "zebra café!",  # unseen word and non-ASCII bytes: byte-level, never <unk>
    "a green triangle at the top left and a purple star at the bottom right next to an orange circle",  # > MAX_LEN
]


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    a = str(tmp_path_factory.mktemp("clip_tok_a"))
    b = str(tmp_path_factory.mktemp("clip_tok_b"))
    assert train_clip_bpe(CAPTIONS, a, vocab_size=1000) == a
    assert train_clip_bpe(iter(CAPTIONS), b, vocab_size=1000) == b
    return a, b


def _read_vocab(d):
    with open(os.path.join(d, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(d, "merges.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    return vocab, lines


def test_clip_training_is_deterministic(clip_dirs):
    a, b = clip_dirs
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name


def test_clip_vocab_layout_is_openai(clip_dirs):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab, lines = _read_vocab(clip_dirs[0])
    n = len(vocab)
    assert sorted(vocab.values()) == list(range(n))
    assert lines[0] == "#version: 0.2"
    merges = [tuple(line.split(" ")) for line in lines[1:]]
    assert all(len(m) == 2 for m in merges)
    assert n == 512 + len(merges) + 2  # no merge of this corpus repeats a token
    base = list(bytes_to_unicode().values())
    inverse = {i: t for t, i in vocab.items()}
    assert [inverse[i] for i in range(256)] == base
    assert [inverse[256 + i] for i in range(256)] == [c + "</w>" for c in base]
    assert [inverse[512 + i] for i in range(len(merges))] == [left + right for left, right in merges]
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (n - 2, n - 1)
    # The same ids as OpenAI's bpe_simple_vocab_16e6 for the byte symbols.
    assert (vocab["!"], vocab["a"], vocab["!</w>"], vocab["a</w>"]) == (0, 64, 256, 320)
    # Lower-cased words end with </w>; the frequent caption words are single tokens.
    assert "circle</w>" in vocab and "red</w>" in vocab and "the</w>" in vocab
    assert all(t == t.lower() for t, i in vocab.items() if 512 <= i < n - 2)  # merges of lower-cased text
    print(f"vocab {n} tokens, {len(merges)} merges")


def test_clip_tokenizer_conventions(clip_dirs):
    tok = load_tokenizer(clip_dirs[0], max_length=MAX_LEN)
    assert isinstance(tok, TextTokenizer)
    assert tok.tokenizer.is_fast and type(tok.tokenizer).__name__ == "CLIPTokenizer"
    n = tok.vocab_size
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.tokenizer.unk_token_id) == (n - 2, n - 1, n - 1, n - 1)
    assert tok.eos_id == max(tok.tokenizer.get_vocab().values())
    assert tok.tokenizer.tokenize("A RED Circle, at the TOP") == ["a</w>", "red</w>", "circle</w>", ",</w>",
                                                                    "at</w>", "the</w>", "top</w>"]
    assert tok.decode(tok(["A red circle at the top left"])["ids"][0]) == "a red circle at the top left"
    emoji = tok(["🙂 zebra"])  # 4 UTF-8 bytes (the last one word-final) + 5 letters, no <unk>
    assert emoji["mask"].sum() == 2 + 4 + 5 and tok.decode(emoji["ids"][0]) == "🙂 zebra"


def test_clip_batch_matches_transformers(clip_dirs):
    d = clip_dirs[0]
    tok = load_tokenizer(d, max_length=MAX_LEN)
    batch = tok(BATCH)
    ids, mask = batch["ids"], batch["mask"]
    assert ids.shape == mask.shape == (len(BATCH), MAX_LEN) and ids.dtype == np.int32 and mask.dtype == np.bool_

    # transformers called directly: from the saved directory, and from vocab.json + merges.txt alone.
    vocab_only = os.path.join(os.path.dirname(d), "clip_vocab_merges_only")
    os.makedirs(vocab_only, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(d, name), vocab_only)
    for ref_dir in (d, vocab_only):
        ref_tok = transformers.CLIPTokenizer.from_pretrained(ref_dir, local_files_only=True)
        ref = ref_tok(BATCH, padding="max_length", truncation=True, max_length=MAX_LEN)
        np.testing.assert_array_equal(ids, np.asarray(ref["input_ids"]))
        np.testing.assert_array_equal(mask, np.asarray(ref["attention_mask"], bool))
    ref_tok = transformers.CLIPTokenizer(vocab=os.path.join(d, "vocab.json"), merges=os.path.join(d, "merges.txt"))
    np.testing.assert_array_equal(ids, np.asarray(ref_tok(BATCH, padding="max_length", truncation=True,
                                                          max_length=MAX_LEN)["input_ids"]))

    lengths = mask.sum(axis=1)
    print("lengths", lengths.tolist())
    assert lengths.tolist()[2] == 2 and lengths[-1] == MAX_LEN and (lengths[:-1] < MAX_LEN).all()
    for row_ids, row_mask, n in zip(ids, mask, lengths):
        assert row_mask[:n].all() and not row_mask[n:].any()  # mask is a prefix covering bos..eos
        assert row_ids[0] == tok.bos_id and (row_ids[1:] != tok.bos_id).all()
        assert row_ids[n - 1] == tok.eos_id and (row_ids[: n - 1] != tok.eos_id).all()  # first eos = last real
        assert (row_ids[n:] == tok.pad_id).all()  # padded with eos
    assert lengths[0] == 9  # bos + 7 whole-word tokens + eos
    np.testing.assert_array_equal(ids[0], tok(["a red circle at the top left"])["ids"][0])
    np.testing.assert_array_equal(ids[1, :4], tok(["a blue square"])["ids"][0, :4])

    # Truncation keeps bos + the first MAX_LEN - 2 tokens + eos.
    full = load_tokenizer(d, max_length=64)([BATCH[-1]])
    n_full = int(full["mask"].sum())
    assert n_full > MAX_LEN
    np.testing.assert_array_equal(ids[-1, : MAX_LEN - 1], full["ids"][0, : MAX_LEN - 1])
    assert ids[-1, -1] == tok.eos_id and full["ids"][0, MAX_LEN - 1] != tok.eos_id


def test_clip_vocab_size_is_an_upper_bound(clip_dirs, tmp_path):
    vocab_full, lines_full = _read_vocab(clip_dirs[0])
    small = train_clip_bpe(CAPTIONS, str(tmp_path / "small"), vocab_size=530)
    vocab, lines = _read_vocab(small)
    assert len(vocab) == 530 and len(vocab_full) < 1000
    assert lines == lines_full[: len(lines)] and len(lines) == 1 + 530 - 514  # a prefix of the merges
    tok = load_tokenizer(small, max_length=8)
    assert (tok.bos_id, tok.eos_id) == (528, 529)
    bytes_only = _read_vocab(train_clip_bpe(CAPTIONS, str(tmp_path / "bytes"), vocab_size=514))
    assert len(bytes_only[0]) == 514 and bytes_only[1] == ["#version: 0.2"]


@pytest.mark.parametrize("legacy", [False, True], ids=["eos-id", "legacy-eos2-argmax"])
def test_clip_eos_pooling_matches_hf(clip_dirs, tmp_path, legacy):
    from ediffi_jax.models.clip import from_pretrained_text

    tok = load_tokenizer(clip_dirs[0], max_length=MAX_LEN)
    torch.manual_seed(3)
    cfg = transformers.CLIPTextConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_LEN, projection_dim=24, eos_token_id=2 if legacy else tok.eos_id,
        bos_token_id=tok.bos_id, pad_token_id=tok.pad_id,
    )
    hf = transformers.CLIPTextModelWithProjection(cfg).eval()
    hf.save_pretrained(str(tmp_path))
    model, config = from_pretrained_text(str(tmp_path))
    assert config.eos_token_id == cfg.eos_token_id and config.vocab_size == tok.vocab_size

    batch = tok(BATCH)
    ids, mask = batch["ids"], batch["mask"]
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids.astype(np.int64)),
                 attention_mask=torch.from_numpy(mask.astype(np.int64)))
    hidden, embeds = model(jnp.asarray(ids), jnp.asarray(mask))
    lengths = mask.sum(axis=1)
    np.testing.assert_array_equal(np.asarray(model.eos_positions(jnp.asarray(ids))), lengths - 1)
    err_h = np.abs(np.asarray(hidden) - ref.last_hidden_state.numpy())[mask].max()
    err_e = np.abs(np.asarray(embeds) - ref.text_embeds.numpy()).max()
    # HF's pooled output is the final hidden state at the first eos = the last real token.
    pooled = ref.last_hidden_state.numpy()[np.arange(len(BATCH)), lengths - 1]
    np.testing.assert_allclose(ref.text_embeds.numpy(), pooled @ hf.text_projection.weight.detach().numpy().T,
                               atol=1e-6)
    print(f"eos_token_id={cfg.eos_token_id}: max|dh|={err_h:.2e} max|de|={err_e:.2e}")
    assert hidden.shape == (len(BATCH), MAX_LEN, 32) and embeds.shape == (len(BATCH), 24)
    assert err_h <= 1e-5 and err_e <= 1e-5


def test_t5_tokenizer_has_no_bos(tmp_path):
    d = train_sentencepiece(CAPTIONS, str(tmp_path / "t5"), vocab_size=64)
    tok = load_tokenizer(d, max_length=8)
    assert (tok.bos_id, tok.pad_id, tok.eos_id) == (None, 0, 1)


def test_tokenizer_bad_input(tmp_path, clip_dirs):
    a_file = os.path.join(clip_dirs[0], "vocab.json")
    with pytest.raises(ValueError, match="vocab.json.*not an existing directory"):
        load_tokenizer(a_file, max_length=8)
    with pytest.raises(ValueError, match="openai/clip-vit-large-patch14"):
        load_tokenizer("openai/clip-vit-large-patch14", max_length=8)
    with pytest.raises(ValueError, match=r"no non-empty texts.*got 0 texts"):
        train_clip_bpe([], str(tmp_path / "x"))
    with pytest.raises(ValueError, match=r"no non-empty texts.*got 2 texts"):
        train_clip_bpe(["", " \n"], str(tmp_path / "x"))
    with pytest.raises(ValueError, match="got 3"):
        train_clip_bpe(["ok", 3], str(tmp_path / "x"))
    with pytest.raises(ValueError, match="vocab_size must be an int >= 514.*got 100"):
        train_clip_bpe(CAPTIONS, str(tmp_path / "x"), vocab_size=100)
    assert not os.path.exists(tmp_path / "x")  # nothing written on bad input
    with pytest.raises(ValueError, match="single str"):
        load_tokenizer(clip_dirs[0], max_length=8)("a red circle")
