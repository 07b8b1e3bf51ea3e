"""The run's frozen encoders (encoders.py): random ones kept in the encoder dir, pretrained HF directories
(weights + tokenizer from one local directory) matching transformers end to end, and clear errors."""

import jax
import numpy as np
import pytest
from conftest import micro_config

from ediffi_jax.data import shapes
from ediffi_jax.encoders import clip_pixels, setup_encoders
from ediffi_jax.tokenizers import train_clip_bpe, train_sentencepiece

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CAPTIONS = [shapes.example(0, i, 16)["caption"] for i in range(200)]
PROMPTS = ["a red circle on the left", "a blue square at the top and a green triangle at the bottom", "a cyan"]


def _images(n, r=16):
    return np.stack([shapes.example(1, i, r)["image"] for i in range(n)]).astype(np.float32) / 127.5 - 1.0


def test_random_encoders_are_created_once_and_reloaded(tmp_path):
    config = micro_config(str(tmp_path))
    enc = setup_encoders(config, str(tmp_path / "enc"), CAPTIONS)
    assert enc.names == ("clip_text", "t5", "clip_image")
    again = setup_encoders(config, str(tmp_path / "enc"))  # no captions needed the second time
    batch = {**enc.tokenize(PROMPTS), "image": _images(3)}
    encode = jax.jit(enc.encode)  # eager, every op of the three encoders would compile on its own
    a, b = encode(enc.params, batch), jax.jit(again.encode)(again.params, batch)
    for name in enc.names:
        for k in a[name]:
            np.testing.assert_array_equal(np.asarray(a[name][k]), np.asarray(b[name][k]))
    assert a["clip_text"]["tokens"].shape == (3, 20, 32) and a["clip_text"]["pooled"].shape == (3, 16)
    assert a["t5"]["tokens"].shape == (3, 20, 32)
    assert a["clip_image"]["tokens"].shape == (3, 1, 16) and bool(a["clip_image"]["mask"].all())
    # Different images give different image embeddings; prompts without images leave clip_image out (= dropped).
    other = encode(enc.params, {**batch, "image": _images(3)[::-1]})
    assert float(np.abs(np.asarray(other["clip_image"]["pooled"] - a["clip_image"]["pooled"])).max()) > 1e-3
    assert set(enc.encode_prompts(PROMPTS)) == {"clip_text", "t5"}
    with_images = enc.encode_prompts(PROMPTS, (_images(3) * 127.5 + 127.5).round().astype(np.uint8))
    np.testing.assert_allclose(with_images["clip_image"]["pooled"], a["clip_image"]["pooled"], atol=1e-5)


def test_subset_of_embeddings_and_errors(tmp_path):
    config = micro_config(str(tmp_path))
    config.conditioning.order = ("t5",)
    enc = setup_encoders(config, str(tmp_path / "enc"), CAPTIONS)
    assert enc.names == ("t5",) and enc.batch_keys == ("t5_ids", "t5_mask")
    with pytest.raises(ValueError, match="no T5 tokenizer in .* and no captions"):
        setup_encoders(config, str(tmp_path / "other"))
    config.conditioning.order = ("t5", "clip_txt")
    with pytest.raises(ValueError, match="conditioning.order names 'clip_txt'"):
        setup_encoders(config, str(tmp_path / "enc"))
    config.conditioning.order = ("t5",)
    config.conditioning.embeddings.t5.dim = 48
    with pytest.raises(ValueError, match=r"conditioning.embeddings.t5.dim=48 but the t5 encoder .* width 32"):
        setup_encoders(config, str(tmp_path / "enc"))
    config.conditioning.embeddings.t5.dim = 32
    config.encoders.t5.pretrained_dir = "google/t5-v1_1-xxl"
    with pytest.raises(ValueError, match="google/t5-v1_1-xxl"):
        setup_encoders(config, str(tmp_path / "enc"))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A tiny T5 v1.1 and a tiny CLIPModel saved by transformers, each with its tokenizer in the same directory."""
    t5_dir, clip_dir = str(tmp_path_factory.mktemp("hf_t5")), str(tmp_path_factory.mktemp("hf_clip"))
    train_sentencepiece(CAPTIONS, t5_dir, vocab_size=64)
    train_clip_bpe(CAPTIONS, clip_dir, vocab_size=600)
    t5_tok = transformers.AutoTokenizer.from_pretrained(t5_dir)
    clip_tok = transformers.AutoTokenizer.from_pretrained(clip_dir)
    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, relative_attention_max_distance=16)).eval()
    t5.save_pretrained(t5_dir)
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=len(clip_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=20, eos_token_id=clip_tok.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=24, patch_size=8),
        projection_dim=16)).eval()
    clip.save_pretrained(clip_dir)
    return t5_dir, clip_dir, t5, clip


def test_pretrained_directories_match_transformers(hf_dirs, tmp_path):
    t5_dir, clip_dir, t5, clip = hf_dirs
    config = micro_config(str(tmp_path))
    config.encoders.t5.pretrained_dir = t5_dir
    config.encoders.clip.pretrained_dir = clip_dir
    enc = setup_encoders(config, str(tmp_path / "enc"))  # no captions: tokenizers come from the directories
    images = _images(3)
    batch = {**enc.tokenize(PROMPTS), "image": images}
    ours = enc.encode(enc.params, batch)
    with torch.no_grad():
        ids, mask = (torch.from_numpy(np.asarray(batch[k], np.int64)) for k in ("t5_ids", "t5_mask"))
        ref_t5 = t5(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
        ids, mask = (torch.from_numpy(np.asarray(batch[k], np.int64)) for k in ("clip_ids", "clip_mask"))
        text_out = clip.text_model(input_ids=ids, attention_mask=mask)
        ref_text = text_out.last_hidden_state.numpy()
        ref_text_embeds = clip.text_projection(text_out.pooler_output).numpy()
        pixels = torch.from_numpy(np.array(clip_pixels(images, 24))).permute(0, 3, 1, 2)
        ref_image_embeds = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output).numpy()
    real = np.asarray(batch["t5_mask"], bool)
    np.testing.assert_allclose(np.asarray(ours["t5"]["tokens"])[real], ref_t5[real], atol=1e-5)
    real = np.asarray(batch["clip_mask"], bool)
    np.testing.assert_allclose(np.asarray(ours["clip_text"]["tokens"])[real], ref_text[real], atol=1e-5)
    np.testing.assert_allclose(ours["clip_text"]["pooled"], ref_text_embeds, atol=1e-5)
    np.testing.assert_allclose(ours["clip_image"]["pooled"], ref_image_embeds, atol=1e-5)
    # The tokenizers are the directories' own (transformers' fast tokenizers, padded to max_length).
    hf = transformers.AutoTokenizer.from_pretrained(clip_dir)(PROMPTS, padding="max_length", max_length=20,
                                                              truncation=True)
    np.testing.assert_array_equal(batch["clip_ids"], hf["input_ids"])
    np.testing.assert_array_equal(batch["clip_mask"], hf["attention_mask"])
