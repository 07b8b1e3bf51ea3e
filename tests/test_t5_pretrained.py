"""Loading local HF T5 v1.1 checkpoint directories with ``ediffi_jax.models.t5.from_pretrained``."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from ediffi_jax.models.t5 import from_pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF_TINY = dict(
    feed_forward_proj="gated-gelu",
    d_model=32,
    num_layers=2,
    num_heads=4,
    d_kv=8,
    d_ff=64,
    vocab_size=64,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    dropout_rate=0.0,
)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """(torch model, safetensors dir, pytorch_model.bin dir or None, reason if None)."""
    torch.manual_seed(0)
    hf = transformers.T5EncoderModel(transformers.T5Config(**HF_TINY)).eval()
    safe_dir = str(tmp_path_factory.mktemp("t5_safe"))
    hf.save_pretrained(safe_dir)
    bin_dir, reason = str(tmp_path_factory.mktemp("t5_bin")), None
    try:
        hf.save_pretrained(bin_dir, safe_serialization=False)
    except TypeError as e:  # transformers may drop the option
        bin_dir, reason = None, f"save_pretrained(safe_serialization=False) unsupported: {e}"
    if bin_dir is not None and not os.path.isfile(os.path.join(bin_dir, "pytorch_model.bin")):
        # transformers 5 ignores safe_serialization=False; write the legacy layout by hand instead.
        print(f"save_pretrained(safe_serialization=False) wrote {sorted(os.listdir(bin_dir))}; using torch.save")
        os.remove(os.path.join(bin_dir, "model.safetensors"))
        torch.save(hf.state_dict(), os.path.join(bin_dir, "pytorch_model.bin"))
    return hf, safe_dir, bin_dir, reason


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 64, size=(3, 11)).astype(np.int64)
    mask = np.ones_like(ids)
    for row, length in enumerate((11, 7, 3)):
        ids[row, length:] = 0
        mask[row, length:] = 0
    return ids, mask


def _max_err(hf, local_dir):
    ids, mask = _batch()
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    model, config = from_pretrained(local_dir)
    assert config.d_model == 32 and config.num_layers == 2 and config.relative_attention_num_buckets == 8
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    err = float(np.max(np.abs(out - ref)))
    print(f"{os.listdir(local_dir)}: max abs err {err:.3g}")
    return err


def test_safetensors_matches_torch(hf_checkpoint):
    hf, safe_dir, _, _ = hf_checkpoint
    assert _max_err(hf, safe_dir) <= 1e-5


def test_pytorch_bin_matches_torch(hf_checkpoint):
    hf, _, bin_dir, reason = hf_checkpoint
    if bin_dir is None:
        print(reason)
        pytest.skip(reason)
    assert _max_err(hf, bin_dir) <= 1e-5


def test_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        from_pretrained(str(tmp_path / "nope"))


def test_dir_without_weights(hf_checkpoint, tmp_path):
    shutil.copy(os.path.join(hf_checkpoint[1], "config.json"), tmp_path / "config.json")
    with pytest.raises(ValueError, match="model.safetensors"):
        from_pretrained(str(tmp_path))


def test_wrong_model_type(hf_checkpoint, tmp_path):
    with open(os.path.join(hf_checkpoint[1], "config.json")) as f:
        raw = json.load(f)
    raw["model_type"] = "bert"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="bert") as info:
        from_pretrained(str(tmp_path))
    assert "config.json" in str(info.value)


def test_wrong_tensor_shape(hf_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    safe_dir = hf_checkpoint[1]
    shutil.copy(os.path.join(safe_dir, "config.json"), tmp_path / "config.json")
    state = load_file(os.path.join(safe_dir, "model.safetensors"))
    bad = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    state[bad] = np.zeros((32, 65), np.float32)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=bad) as info:
        from_pretrained(str(tmp_path))
    assert "model.safetensors" in str(info.value)
