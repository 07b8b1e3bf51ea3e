"""Tests for the NNX T5 v1.1 encoder (parity with HF ``T5EncoderModel``) and the SentencePiece tokenizer."""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ediffi_jax  # noqa: F401  (sets flax_always_shard_variable=False)
from ediffi_jax.models.t5 import (
    T5Config,
    T5Encoder,
    hf_param_table,
    load_hf_state_dict,
    relative_position_bucket,
)
from ediffi_jax.tokenizers import TextTokenizer, load_tokenizer, train_sentencepiece
from ediffi_jax.tracing import abstract_module

CAPTIONS = [
    "a red circle on the left and a blue square at the bottom",
    "a green triangle at the top right corner",
    "two yellow stars above a purple moon",
    "a small black dog sitting next to a white cat",
    "an orange square in the center of the image",
    "a blue circle below a red triangle",
    "three green squares in a row at the top",
    "a white star on the right and a black circle on the left",
]

HF_TINY = dict(
    feed_forward_proj="gated-gelu",
    d_model=64,
    num_layers=2,
    num_heads=4,
    d_kv=16,
    d_ff=96,
    vocab_size=100,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    layer_norm_epsilon=1e-6,
)


@pytest.fixture(scope="module")
def hf_pair():
    """A seeded random HF T5EncoderModel and our encoder loaded from its state dict."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.T5EncoderModel(transformers.T5Config(**HF_TINY, dropout_rate=0.0)).eval()
    # Random (non-unit) norm scales so a mis-mapped layer norm cannot pass unnoticed.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.uniform_(0.5, 1.5)
    state_dict = {k: v.detach().cpu().numpy() for k, v in hf.state_dict().items()}
    ours = T5Encoder(T5Config(**HF_TINY), rngs=nnx.Rngs(123))
    load_hf_state_dict(ours, state_dict)
    return hf, ours, state_dict


def _padded_batch():
    rng = np.random.default_rng(0)
    lengths = [23, 9, 1, 17]  # 23 > max_distance=20 exercises the clipped log buckets
    length = 23
    ids = np.zeros((len(lengths), length), dtype=np.int32)
    mask = np.zeros((len(lengths), length), dtype=bool)
    for b, n in enumerate(lengths):
        ids[b, : n - 1] = rng.integers(3, HF_TINY["vocab_size"], size=n - 1)
        ids[b, n - 1] = 1  # </s>
        mask[b, :n] = True
    return ids, mask


def test_parity_with_hf_padded_batch(hf_pair):
    torch = pytest.importorskip("torch")
    hf, ours, _ = hf_pair
    ids, mask = _padded_batch()
    with torch.no_grad():
        ref = hf(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
        ).last_hidden_state.numpy()
    out = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    assert out.shape == ref.shape == (*ids.shape, HF_TINY["d_model"])
    assert out.dtype == np.float32
    err_valid = float(np.abs(out - ref)[mask].max())
    err_pad = float(np.abs(out - ref)[~mask].max())
    print(
        f"T5 parity max|err|: valid={err_valid:.3e} padded={err_pad:.3e} (|ref| max {np.abs(ref).max():.2f})"
    )
    assert err_valid <= 1e-5
    # Padded query rows attend to the same (unmasked) keys as in HF, so they match as well.
    assert err_pad <= 1e-5


def test_relative_position_buckets_match_hf():
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    hf_bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    rel = np.arange(-600, 601)
    for num_buckets, max_distance in [(32, 128), (8, 20), (64, 256)]:
        ref = hf_bucket(torch.from_numpy(rel), True, num_buckets, max_distance).numpy()
        ours = relative_position_bucket(rel, True, num_buckets, max_distance)
        np.testing.assert_array_equal(ours, ref)
        ours_uni = relative_position_bucket(rel, False, num_buckets, max_distance)
        ref_uni = hf_bucket(torch.from_numpy(rel), False, num_buckets, max_distance).numpy()
        np.testing.assert_array_equal(ours_uni, ref_uni)


def test_jit_of_split_state_matches_eager(hf_pair):
    _, ours, _ = hf_pair
    ids, mask = _padded_batch()
    eager = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    graphdef, state = nnx.split(ours)
    fwd = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))
    jitted = np.asarray(fwd(state, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(jitted, eager, atol=1e-5, rtol=0)


def test_bfloat16_compute_is_close(hf_pair):
    _, ours, state_dict = hf_pair
    bf16 = T5Encoder(T5Config(**HF_TINY, dtype="bfloat16"), rngs=nnx.Rngs(0))
    load_hf_state_dict(bf16, state_dict)
    ids, mask = _padded_batch()
    ref = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    out = bf16(jnp.asarray(ids), jnp.asarray(mask))
    assert out.dtype == jnp.bfloat16
    rel = np.abs(np.asarray(out, np.float32) - ref)[mask].max() / np.abs(ref).max()
    assert rel < 0.05


def test_load_hf_state_dict_reports_problems(hf_pair):
    _, _, state_dict = hf_pair
    fresh = T5Encoder(T5Config(**HF_TINY), rngs=nnx.Rngs(1))
    bad = dict(state_dict)
    del bad["encoder.block.1.layer.0.SelfAttention.k.weight"]
    bad["encoder.block.9.layer.0.SelfAttention.q.weight"] = np.zeros((64, 64), np.float32)
    bad["encoder.block.0.layer.1.DenseReluDense.wo.weight"] = np.zeros((64, 95), np.float32)
    with pytest.raises(ValueError) as info:
        load_hf_state_dict(fresh, bad)
    msg = str(info.value)
    assert "encoder.block.1.layer.0.SelfAttention.k.weight" in msg and "missing" in msg
    assert "encoder.block.9.layer.0.SelfAttention.q.weight" in msg and "unexpected" in msg
    assert "encoder.block.0.layer.1.DenseReluDense.wo.weight" in msg and "(64, 95)" in msg
    # Nothing was written on failure; the tied alias alone is enough for the embedding.
    before = np.asarray(fresh.shared.embedding[...])
    assert not np.allclose(before, state_dict["shared.weight"])
    only_alias = {k: v for k, v in state_dict.items() if k != "shared.weight"}
    only_alias["decoder.final_layer_norm.weight"] = np.ones(64, np.float32)
    load_hf_state_dict(fresh, only_alias, ignore_prefixes=("decoder.",))
    np.testing.assert_array_equal(np.asarray(fresh.shared.embedding[...]), state_dict["shared.weight"])
    assert set(hf_param_table(fresh.config)) == set(state_dict) - {"encoder.embed_tokens.weight"}


def test_xxl_abstract_param_count_and_annotations():
    t0 = time.perf_counter()
    config = T5Config.xxl()
    abstract = abstract_module(lambda: T5Encoder(config, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    total = 0
    for path, var in flat:
        assert isinstance(var.get_raw_value(), jax.ShapeDtypeStruct), path
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.shape), f"{path} lacks logical axis names"
        total += int(np.prod(var.shape))
    d, f, v, n = config.d_model, config.d_ff, config.vocab_size, config.num_layers
    inner = config.num_heads * config.d_kv
    formula = v * d + n * (4 * d * inner + 3 * d * f + 2 * d) + d + 32 * 64
    elapsed = time.perf_counter() - t0
    print(f"T5-v1.1-XXL encoder params: {total:,} ({total / 1e9:.4f}e9), abstract build {elapsed:.2f}s")
    assert abs(total - formula) <= 0.01 * formula
    assert total == formula == config.num_params()
    assert abs(total - 4.76e9) / 4.76e9 < 0.01


def test_config_validation():
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="relu")
    with pytest.raises(ValueError, match="dtype"):
        T5Config(dtype="float37")
    tiny = T5Config.tiny(vocab_size=50)
    assert (tiny.d_model, tiny.num_layers, tiny.num_heads, tiny.d_kv, tiny.d_ff) == (64, 2, 4, 16, 128)
    model = T5Encoder(tiny, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(jnp.ones((2, 5), jnp.int32), jnp.ones((2, 4), bool))


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    a = str(tmp_path_factory.mktemp("tok_a"))
    b = str(tmp_path_factory.mktemp("tok_b"))
    assert train_sentencepiece(CAPTIONS, a, vocab_size=64) == a
    assert train_sentencepiece(iter(CAPTIONS), b, vocab_size=64) == b
    return a, b


def test_sentencepiece_training_is_deterministic(tok_dirs):
    a, b = tok_dirs
    for name in ("spiece.model", "tokenizer.json"):
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name


def test_tokenizer_conventions_and_round_trip(tok_dirs):
    tok = load_tokenizer(tok_dirs[0], max_length=32)
    assert isinstance(tok, TextTokenizer)
    assert (tok.pad_id, tok.eos_id, tok.tokenizer.unk_token_id) == (0, 1, 2)
    assert 8 <= tok.vocab_size <= 64
    batch = tok([CAPTIONS[0], "a blue square", ""])
    ids, mask = batch["ids"], batch["mask"]
    assert ids.shape == mask.shape == (3, 32)
    assert ids.dtype == np.int32 and mask.dtype == np.bool_
    assert ids.max() < tok.vocab_size
    for row_ids, row_mask in zip(ids, mask):
        n = int(row_mask.sum())
        assert row_mask[:n].all() and not row_mask[n:].any()  # mask is a prefix
        assert row_ids[n - 1] == 1 and (row_ids[: n - 1] != 1).all()  # single EOS at the end
        assert (row_ids[n:] == 0).all()  # padded with <pad>=0
    assert mask[2].sum() == 1 and ids[2, 0] == 1  # empty caption -> just </s>
    for text in (CAPTIONS[0], "a blue square"):
        row = tok([text])["ids"][0]
        assert tok.decode(row) == text


def test_tokenizer_truncation_keeps_eos(tok_dirs):
    full = load_tokenizer(tok_dirs[0], max_length=64)([CAPTIONS[0]])
    n = int(full["mask"].sum())
    assert n > 8
    short = load_tokenizer(tok_dirs[0], max_length=8)([CAPTIONS[0], "a"])
    assert short["ids"].shape == (2, 8)
    assert short["mask"][0].all()
    np.testing.assert_array_equal(short["ids"][0, :7], full["ids"][0, :7])
    assert short["ids"][0, 7] == 1


def test_tokenizer_errors(tmp_path, tok_dirs):
    missing = str(tmp_path / "no_such_tokenizer")
    with pytest.raises(ValueError, match="no_such_tokenizer"):
        load_tokenizer(missing, max_length=8)
    with pytest.raises(ValueError, match="not an existing directory"):
        load_tokenizer("google/t5-v1_1-xxl", max_length=8)
    tok = load_tokenizer(tok_dirs[0], max_length=8)
    with pytest.raises(ValueError, match="single str"):
        tok("a red circle")
    with pytest.raises(ValueError, match="None"):
        tok(["ok", None])
    with pytest.raises(ValueError, match="max_length"):
        load_tokenizer(tok_dirs[0], max_length=0)
    with pytest.raises(ValueError, match="no non-empty texts"):
        train_sentencepiece(["", "  "], str(tmp_path / "x"))


def test_tokenizer_feeds_encoder(tok_dirs):
    tok = load_tokenizer(tok_dirs[0], max_length=16)
    model = T5Encoder(T5Config.tiny(vocab_size=tok.vocab_size), rngs=nnx.Rngs(0))
    batch = tok(CAPTIONS[:3])
    out = model(jnp.asarray(batch["ids"]), jnp.asarray(batch["mask"]))
    assert out.shape == (3, 16, 64) and bool(jnp.isfinite(out).all())
