"""Stand-in evaluation weights for smoke tests: random FID Inception weights and a tiny random CLIP directory.

The real weights (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``, ``openai/clip-vit-large-patch14``)
are downloads this code never makes. To run the evaluation pipeline end to end without them — tests,
benchmarks, a first try on a machine without the files — these helpers write files in *the same layouts*:

* `write_random_inception` — a seeded random state dict with every key and shape of pytorch-fid's file
  (He-scaled convolutions, random BatchNorm statistics, so activations stay O(1) through the 94 conv layers),
  saved as a torch ``.pth`` (needs torch) or as the ``.npz`` that `ediffi_jax.models.inception` also reads;
* `write_random_clip` — a tiny random ``transformers.CLIPModel`` saved with ``save_pretrained`` (needs torch and
  transformers) plus a CLIP BPE tokenizer trained in-process on the given texts, in the directory layout of
  ``openai/clip-vit-large-patch14`` (``config.json``, ``model.safetensors``, ``vocab.json``, ``merges.txt``, ...).

FID and CLIP scores computed with these are NOT meaningful (random features); they only show the pipeline runs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["random_inception_state_dict", "write_random_inception", "write_random_clip", "TINY_CLIP"]

# torch's default generator is one per process: two threads seeding it and drawing a model's initial weights at the
# same time (the test suite writes these files from a background thread too) would interleave their draws.
_TORCH_RNG = threading.Lock()

# A tiny CLIPModel: 77 text positions (CLIP's context length), 32×32 images in 8×8 patches.
TINY_CLIP = dict(
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=77),
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8),
    projection_dim=24,
)


def random_inception_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """name → float32 array in pytorch-fid's layout (OIHW kernels, BN weight/bias/running_mean/running_var, the
    unused ``fc``), seeded. Convolutions are He-scaled so the pool3 features are O(1) and differ per image."""
    from ediffi_jax.models import inception

    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}
    for key, (variable, is_kernel) in inception.param_table(inception.abstract_model()).items():
        shape = tuple(variable.shape)
        if is_kernel:  # ours HWIO → torch OIHW
            kh, kw, cin, cout = shape
            state[key] = (rng.standard_normal((cout, cin, kh, kw)) * np.sqrt(2.0 / (cin * kh * kw)))
        elif key.endswith("bn.weight"):
            state[key] = 0.5 + rng.random(shape)
        elif key.endswith("bn.bias"):
            state[key] = 0.2 * rng.standard_normal(shape)
        elif key.endswith("running_mean"):
            state[key] = 0.2 * rng.standard_normal(shape)
        else:  # running_var
            state[key] = 0.5 + 1.5 * rng.random(shape)
    state["fc.weight"] = 0.01 * rng.standard_normal((1008, inception.FEATURE_DIM))
    state["fc.bias"] = np.zeros(1008)
    return {k: np.asarray(v, np.float32) for k, v in state.items()}


def write_random_inception(path: str, seed: int = 0) -> str:
    """Writes `random_inception_state_dict` to ``path``: an ``.npz`` (NumPy only) or, for any other suffix, a
    torch ``.pth`` state dict like pytorch-fid's file (needs torch). Returns ``path``."""
    state = random_inception_state_dict(seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if str(path).endswith(".npz"):
        with open(path, "wb") as f:
            np.savez(f, **state)
        return path
    import torch

    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    return path


def write_random_clip(out_dir: str, texts: Iterable[str], seed: int = 0, **overrides: Any) -> str:
    """Writes a tiny random HF ``CLIPModel`` (`TINY_CLIP`, updated by ``overrides``: ``text``, ``vision``,
    ``projection_dim``) and a CLIP BPE tokenizer trained on ``texts`` to ``out_dir``, loadable by
    `ediffi_jax.eval.clip_score.CLIPScorer.from_pretrained` and by ``transformers.CLIPModel.from_pretrained``.
    The text vocabulary is the tokenizer's; the EOS is its largest id. Returns ``out_dir``."""
    import torch
    import transformers

    from ediffi_jax.tokenizers import load_tokenizer, train_clip_bpe

    os.makedirs(out_dir, exist_ok=True)
    train_clip_bpe(list(texts), out_dir, vocab_size=1024)
    tok = load_tokenizer(out_dir, 77)
    spec = {**TINY_CLIP, **overrides}
    text = dict(spec["text"], vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id,
                pad_token_id=tok.pad_id)
    config = transformers.CLIPConfig(text_config=text, vision_config=dict(spec["vision"]),
                                     projection_dim=spec["projection_dim"])
    with _TORCH_RNG:
        torch.manual_seed(seed)
        model = transformers.CLIPModel(config).eval()
    model.save_pretrained(out_dir)
    return out_dir
