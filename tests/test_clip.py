"""CLIP text / vision towers (``ediffi_jax.models.clip``) against HF ``transformers`` on tiny seeded models."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ediffi_jax.models.clip import (
    CLIPTextConfig,
    CLIPTextEncoder,
    CLIPVisionConfig,
    CLIPVisionEncoder,
    from_pretrained_text,
    from_pretrained_vision,
)
from ediffi_jax.tracing import abstract_module

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXT_TINY = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=16, projection_dim=24)
VISION_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                   patch_size=8, projection_dim=24)


def _save_text(tmp_path_factory, eos_token_id, hidden_act="quick_gelu", seed=0):
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(**TEXT_TINY, eos_token_id=eos_token_id, hidden_act=hidden_act,
                                      bos_token_id=0, pad_token_id=1)
    hf = transformers.CLIPTextModelWithProjection(cfg).eval()
    d = str(tmp_path_factory.mktemp(f"clip_text_{eos_token_id}"))
    hf.save_pretrained(d)
    return hf, d


@pytest.fixture(scope="module", params=[(2, "quick_gelu"), (97, "gelu")], ids=["eos2-argmax", "eos97-gelu"])
def text_ckpt(request, tmp_path_factory):
    return _save_text(tmp_path_factory, *request.param)


@pytest.fixture(scope="module")
def vision_ckpt(tmp_path_factory):
    torch.manual_seed(1)
    hf = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VISION_TINY)).eval()
    d = str(tmp_path_factory.mktemp("clip_vision"))
    hf.save_pretrained(d)
    return hf, d


def _text_batch(eos):
    """Padded batch: bos (0), random tokens (< 97), eos at the last real position, pad (1) after."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 97, size=(3, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    for row, length in enumerate((12, 8, 4)):
        ids[row, 0] = 0
        ids[row, length - 1] = 98 if eos == 2 else eos
        if eos != 2:  # a larger id before the EOS: the legacy argmax rule would pool the wrong token
            ids[row, 1] = 98
        ids[row, length:] = 1
        mask[row, length:] = 0
    return ids, mask


def test_text_matches_hf_padded(text_ckpt):
    hf, d = text_ckpt
    model, config = from_pretrained_text(d)
    assert config.eos_token_id == hf.config.eos_token_id and config.hidden_act == hf.config.hidden_act
    ids, mask = _text_batch(config.eos_token_id)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    hidden, embeds = model(jnp.asarray(ids), jnp.asarray(mask))
    real = mask.astype(bool)
    err_h = np.abs(np.asarray(hidden) - ref.last_hidden_state.numpy())[real].max()
    err_e = np.abs(np.asarray(embeds) - ref.text_embeds.numpy()).max()
    print(f"text eos={config.eos_token_id} act={config.hidden_act}: max|dh|={err_h:.2e} max|de|={err_e:.2e}")
    assert hidden.shape == (3, 12, 32) and embeds.shape == (3, 24)
    assert err_h <= 1e-5 and err_e <= 1e-5


def test_vision_matches_hf(vision_ckpt):
    hf, d = vision_ckpt
    model, config = from_pretrained_vision(d)
    assert config.num_positions == 17
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(pixels))
    hidden, embeds = model(jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    err_h = np.abs(np.asarray(hidden) - ref.last_hidden_state.numpy()).max()
    err_e = np.abs(np.asarray(embeds) - ref.image_embeds.numpy()).max()
    print(f"vision: max|dh|={err_h:.2e} max|de|={err_e:.2e}")
    assert hidden.shape == (2, 17, 32) and embeds.shape == (2, 24)
    assert err_h <= 1e-5 and err_e <= 1e-5


def test_full_clipmodel_checkpoint_loads_both_towers(tmp_path_factory):
    torch.manual_seed(2)
    cfg = transformers.CLIPConfig(text_config=dict(TEXT_TINY), vision_config=dict(VISION_TINY), projection_dim=24)
    hf = transformers.CLIPModel(cfg).eval()
    d = str(tmp_path_factory.mktemp("clip_full"))
    hf.save_pretrained(d)
    text, _ = from_pretrained_text(d)
    vision, _ = from_pretrained_vision(d)
    np.testing.assert_array_equal(
        np.asarray(text.text_projection.kernel[...]), hf.text_projection.weight.detach().numpy().T
    )
    np.testing.assert_array_equal(
        np.asarray(vision.visual_projection.kernel[...]), hf.visual_projection.weight.detach().numpy().T
    )


@pytest.mark.parametrize("layout", ["sharded-safetensors", "pytorch_model.bin"])
def test_other_weight_layouts(tmp_path, layout):
    """A CLIPModel saved as sharded safetensors (with index) or as a legacy pytorch_model.bin loads identically."""
    torch.manual_seed(3)
    cfg = transformers.CLIPConfig(text_config=dict(TEXT_TINY), vision_config=dict(VISION_TINY), projection_dim=24)
    hf = transformers.CLIPModel(cfg).eval()
    d = str(tmp_path / layout)
    if layout == "pytorch_model.bin":
        hf.save_pretrained(d)
        os.remove(os.path.join(d, "model.safetensors"))
        torch.save(hf.state_dict(), os.path.join(d, "pytorch_model.bin"))
    else:
        hf.save_pretrained(d, max_shard_size="50KB")
        assert os.path.isfile(os.path.join(d, "model.safetensors.index.json"))
        assert len([f for f in os.listdir(d) if f.endswith(".safetensors")]) > 1
    text, _ = from_pretrained_text(d)
    vision, _ = from_pretrained_vision(d)
    ids = torch.from_numpy(np.array([[0, 5, 9, 2, 1, 1]]))
    pixels = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        ref_t = hf.get_text_features(input_ids=ids)
        ref_v = hf.get_image_features(pixel_values=pixels)
    ref_t = getattr(ref_t, "pooler_output", ref_t).numpy()
    ref_v = getattr(ref_v, "pooler_output", ref_v).numpy()
    _, got_t = text(jnp.asarray(ids.numpy()))
    _, got_v = vision(jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(got_t, ref_t, atol=1e-5)
    np.testing.assert_allclose(got_v, ref_v, atol=1e-5)


def test_dir_without_weights_names_the_files(text_ckpt, tmp_path):
    shutil.copy(os.path.join(text_ckpt[1], "config.json"), tmp_path / "config.json")
    with pytest.raises(ValueError, match="model.safetensors") as info:
        from_pretrained_text(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_missing_dir_raises():
    with pytest.raises(ValueError, match="does-not-exist"):
        from_pretrained_text("/tmp/does-not-exist-clip")
    with pytest.raises(ValueError, match="does-not-exist"):
        from_pretrained_vision("/tmp/does-not-exist-clip")


def test_wrong_shape_names_tensor(vision_ckpt, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, d = vision_ckpt
    bad = str(tmp_path / "bad")
    shutil.copytree(d, bad)
    state = load_file(os.path.join(bad, "model.safetensors"))
    key = "vision_model.encoder.layers.1.mlp.fc1.weight"
    state[key] = np.zeros((65, 32), np.float32)
    del state["visual_projection.weight"]
    save_file(state, os.path.join(bad, "model.safetensors"))
    with pytest.raises(ValueError, match=r"fc1\.weight: got \(65, 32\), expected \(64, 32\)") as info:
        from_pretrained_vision(bad)
    assert "visual_projection.weight" in str(info.value) and "missing" in str(info.value)


def test_wrong_model_type(text_ckpt, tmp_path):
    _, d = text_ckpt
    bad = str(tmp_path / "bad")
    shutil.copytree(d, bad)
    with open(os.path.join(bad, "config.json")) as f:
        raw = json.load(f)
    raw["model_type"] = "t5"
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(raw, f)
    with pytest.raises(ValueError, match="model_type"):
        from_pretrained_text(bad)


def _abstract_count(cls, config):
    abstract = abstract_module(lambda: cls(config, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_large_param_counts():
    text, vision = CLIPTextConfig.large(), CLIPVisionConfig.large()
    n_text, n_vision = _abstract_count(CLIPTextEncoder, text), _abstract_count(CLIPVisionEncoder, vision)
    print(f"ViT-L/14 text tower: {n_text:,} params; vision tower: {n_vision:,} params")
    assert n_text == text.num_params() == 123_650_304
    assert n_vision == vision.num_params() == 303_966_208


def test_small_configs_match_formula():
    text, vision = CLIPTextConfig(**TEXT_TINY), CLIPVisionConfig(**VISION_TINY)
    assert _abstract_count(CLIPTextEncoder, text) == text.num_params()
    assert _abstract_count(CLIPVisionEncoder, vision) == vision.num_params()


def test_config_validation():
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="patch_size"):
        CLIPVisionConfig(image_size=30, patch_size=8)


def test_partitioning_names():
    model = CLIPVisionEncoder(CLIPVisionConfig(**VISION_TINY), rngs=nnx.Rngs(0))
    assert model.patch_embedding.kernel.get_metadata()["out_sharding"] == (None, None, None, "embed")
    assert model.layers[0].self_attn.q_proj.kernel.get_metadata()["out_sharding"] == ("embed", "heads")
    assert model.layers[0].self_attn.out_proj.kernel.get_metadata()["out_sharding"] == ("heads", "embed")
    assert model.layers[0].mlp.fc2.kernel.get_metadata()["out_sharding"] == ("mlp", "embed")
    assert model.post_layernorm.scale.get_metadata()["out_sharding"] == ("norm",)
    assert model.visual_projection.kernel.get_metadata()["out_sharding"] == ("embed", None)
