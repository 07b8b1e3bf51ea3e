"""CLIP score (Hessel et al. 2021, arXiv 2104.08718, as ``torchmetrics.multimodal.CLIPScore`` computes it).

For N (image, caption) pairs::

    CLIP score = mean_i  max(100 · cos(E_img(image_i), E_txt(caption_i)), 0)

with E_img the projected CLIP image embedding (``CLIPModel.get_image_features``) and E_txt the projected text
embedding (``get_text_features``), each L2-normalised — torchmetrics' formula (``100 * (img · txt)`` per pair,
clamped at 0, averaged). The model is a CLIP ``save_pretrained`` directory on disk, by default expected in the
layout of ``openai/clip-vit-large-patch14`` (ViT-L/14, the CLIP of most text-to-image papers), run with our NNX
towers (`ediffi_jax.models.clip`). Nothing is downloaded.

Image preprocessing — exactly HF's ``CLIPImageProcessor`` (its PIL backend, which torchmetrics calls):

1. on the host, the uint8 RGB image goes through PIL ``Image.resize`` with ``BICUBIC`` resampling (PIL's
   bicubic, antialiased when shrinking) so that its *shortest* side is ``S`` and the other side
   ``int(S · long / short)`` (HF's rounding down);
2. centre crop to ``C × C`` (top = (h − C) // 2, left = (w − C) // 2);
3. on the device: ÷ 255, then ``(x − mean) / std`` per channel with CLIP's mean (0.48145466, 0.4578275,
   0.40821073) and std (0.26862954, 0.26130258, 0.27577711).

``S``, ``C``, mean, std and the resampling filter come from the directory's ``preprocessor_config.json`` when it
has one (OpenAI's: S = C = 224, bicubic, the values above) and otherwise default to S = C = the vision tower's
``image_size`` and CLIP's mean / std. Unlike torchmetrics' default no antialiasing difference arises (same PIL
call); unlike a GPU ``torchvision`` resize, the result is PIL's.

Text: HF's CLIP tokenizer from the same directory, padded to the text tower's context length (77 for OpenAI's
CLIP) and *truncated* to it keeping ``<|endoftext|>`` as the last token (HF ``truncation=True``); the embedding
is pooled at that EOS. (torchmetrics instead cuts the token sequence at 77 *after* tokenizing, dropping the EOS
of a caption longer than 75 BPE tokens; our value differs from its only for such captions.)

The towers run jitted on fixed-size batches (the last one padded), the batch sharded over the devices of a 1-D
``"data"`` mesh (parameters replicated), matmuls at float32 precision, with a tqdm bar.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from ediffi_jax.eval import distributed
from ediffi_jax.eval.fid import data_mesh
from ediffi_jax.models import clip as clip_lib
from ediffi_jax.tokenizers import TextTokenizer, load_tokenizer

__all__ = ["CLIPScorer", "CLIP_MEAN", "CLIP_STD", "clip_resize_crop", "scores_from_embeddings"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_resize_crop(image: np.ndarray, size: int, crop: int, resample: int = Image.BICUBIC) -> np.ndarray:
    """Steps 1–2 of the module docstring: uint8 [H, W, 3] → uint8 [crop, crop, 3] (HF ``CLIPImageProcessor``:
    shortest side to ``size`` with PIL ``resample``, then the centre crop)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"CLIP score takes uint8 RGB images [H, W, 3], got dtype {image.dtype}, shape "
                         f"{image.shape}")
    h, w = image.shape[:2]
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
    im = Image.fromarray(image)
    if (new_h, new_w) != (h, w):
        im = im.resize((new_w, new_h), resample=resample)
    x = np.asarray(im, np.uint8)
    if new_h < crop or new_w < crop:
        raise ValueError(f"resized image {new_w}x{new_h} is smaller than the CLIP crop {crop} (size {size} < crop)")
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    return x[top:top + crop, left:left + crop]


def scores_from_embeddings(image_embeds: Any, text_embeds: Any) -> Any:
    """Per-pair 100 · cos(image, text), unclamped (works on NumPy and JAX arrays)."""
    xp = jnp if isinstance(image_embeds, jax.Array) else np
    img = image_embeds / xp.linalg.norm(image_embeds, axis=-1, keepdims=True)
    txt = text_embeds / xp.linalg.norm(text_embeds, axis=-1, keepdims=True)
    return 100.0 * xp.sum(img * txt, axis=-1)


@partial(jax.jit, static_argnums=(0, 1))
def _pair_scores(text_def: nnx.GraphDef, vision_def: nnx.GraphDef, text_state: nnx.State, vision_state: nnx.State,
                 pixels: jax.Array, ids: jax.Array, mask: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    x = (pixels.astype(jnp.float32) / 255.0 - mean) / std
    _, image_embeds = nnx.merge(vision_def, vision_state)(x)
    _, text_embeds = nnx.merge(text_def, text_state)(ids, mask)
    return scores_from_embeddings(image_embeds.astype(jnp.float32), text_embeds.astype(jnp.float32))


def _size(value: Any, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, dict) and isinstance(value.get(key), int):
        return value[key]
    if isinstance(value, dict) and isinstance(value.get("height"), int):
        return value["height"]
    return None


class _PairList:
    """An indexed source over an in-memory list of (image, caption) pairs."""

    def __init__(self, pairs: list):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, i: int) -> Any:
        return self.pairs[i]

    def name(self, i: int) -> str:
        return f"pair {i}"


class CLIPScorer:
    """CLIP towers + tokenizer + preprocessing of one CLIP directory; `from_pretrained` builds it."""

    def __init__(self, text_model: clip_lib.CLIPTextEncoder, vision_model: clip_lib.CLIPVisionEncoder,
                 tokenizer: TextTokenizer, *, size: int, crop: int, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, resample: int = Image.BICUBIC, info: dict | None = None):
        if crop != vision_model.config.image_size:
            raise ValueError(f"CLIP crop size {crop} differs from the vision tower's image_size "
                             f"{vision_model.config.image_size}")
        self.text_def, self.text_state = nnx.split(text_model)
        self.vision_def, self.vision_state = nnx.split(vision_model)
        self.tokenizer = tokenizer
        self.size, self.crop, self.resample = int(size), int(crop), int(resample)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.info = dict(info or {})

    @classmethod
    def from_pretrained(cls, clip_dir: str) -> CLIPScorer:
        """From a local HF ``CLIPModel`` directory (config.json, weights, tokenizer files, optionally
        preprocessor_config.json), e.g. a download of ``openai/clip-vit-large-patch14``."""
        if not clip_dir:
            raise ValueError("--clip_dir is required: a local CLIPModel directory (e.g. a download of "
                             "openai/clip-vit-large-patch14)")
        text, text_cfg = clip_lib.from_pretrained_text(clip_dir)
        vision, vision_cfg = clip_lib.from_pretrained_vision(clip_dir)
        has = {f for f in ("tokenizer.json", "vocab.json", "merges.txt") if os.path.isfile(os.path.join(clip_dir, f))}
        if "tokenizer.json" not in has and not {"vocab.json", "merges.txt"} <= has:
            raise ValueError(f"CLIP directory {clip_dir!r} has no tokenizer files (tokenizer.json, or vocab.json and "
                             "merges.txt, as openai/clip-vit-large-patch14 has)")
        tokenizer = load_tokenizer(clip_dir, text_cfg.max_position_embeddings)
        if tokenizer.vocab_size > text_cfg.vocab_size:
            raise ValueError(f"{clip_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the text tower only "
                             f"{text_cfg.vocab_size} embeddings: tokenizer and model do not belong together")
        size = crop = vision_cfg.image_size
        mean, std, resample = CLIP_MEAN, CLIP_STD, Image.BICUBIC
        pre = os.path.join(clip_dir, "preprocessor_config.json")
        if os.path.isfile(pre):
            with open(pre) as f:
                p = json.load(f)
            size = _size(p.get("size"), "shortest_edge") or size
            crop = _size(p.get("crop_size"), "height") or crop
            mean, std = p.get("image_mean", mean), p.get("image_std", std)
            resample = int(p.get("resample", resample))
        info = {"dir": os.path.abspath(clip_dir), "image_size": vision_cfg.image_size,
                "patch_size": vision_cfg.patch_size, "vision_width": vision_cfg.hidden_size,
                "vision_layers": vision_cfg.num_hidden_layers, "text_width": text_cfg.hidden_size,
                "projection_dim": text_cfg.projection_dim, "context_length": text_cfg.max_position_embeddings,
                "resize": size, "crop": crop}
        large = clip_lib.CLIPVisionConfig.large()
        if (vision_cfg.hidden_size, vision_cfg.num_hidden_layers, vision_cfg.patch_size, vision_cfg.image_size) != (
                large.hidden_size, large.num_hidden_layers, large.patch_size, large.image_size):
            info["note"] = ("this CLIP is not ViT-L/14 at 224 px (openai/clip-vit-large-patch14): CLIP scores are "
                            "not comparable with published ones")
        return cls(text, vision, tokenizer, size=size, crop=crop, mean=mean, std=std, resample=resample, info=info)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """uint8 [crop, crop, 3] of a uint8 image (steps 1–2)."""
        return clip_resize_crop(image, self.size, self.crop, self.resample)

    def pixel_values(self, images: Iterable[np.ndarray]) -> np.ndarray:
        """float32 NHWC model input (all three steps, on the host): what HF's processor gives, channels last."""
        x = np.stack([self.preprocess(im) for im in images]).astype(np.float32) / np.float32(255.0)
        return (x - self.mean) / self.std

    def scores(self, pairs: Any, *, batch_size: int = 32, need: int | None = None, progress: bool = True,
               mesh: Any = None, result: bool = False) -> np.ndarray | distributed.MapResult:
        """Per-pair 100 · cos (unclamped, float32) of (uint8 image, caption) pairs: a list / iterator of pairs,
        or an indexed source (``__len__``, ``load(i)`` → a pair or None when unreadable, ``name(i)``).

        On every device of every process (`ediffi_jax.eval.distributed.map_indexed`; each process preprocesses
        the pairs of its rows); ``need``: the first ``need`` readable pairs; ``result=True`` returns the
        `MapResult` (kept / skipped indices) instead of the array."""
        mesh = data_mesh() if mesh is None else mesh
        batch_size = -(-batch_size // mesh.size) * mesh.size
        if not hasattr(pairs, "load"):
            pairs = _PairList(list(pairs))
        if len(pairs) == 0:
            raise ValueError("CLIP score got no (image, caption) pairs")

        def load(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
            pair = pairs.load(i)
            if pair is None:
                return None
            tok = self.tokenizer([str(pair[1])])
            return self.preprocess(pair[0]), tok["ids"][0], tok["mask"][0]

        def step(text_state, vision_state, mean, std, pixels, ids, mask):
            with jax.default_matmul_precision("float32"):
                return _pair_scores(self.text_def, self.vision_def, text_state, vision_state, pixels, ids, mask,
                                    mean, std)

        out = distributed.map_indexed(
            step, load, len(pairs), batch_size, mesh=mesh, need=need, progress=progress, desc="CLIP score",
            unit="pair", name=pairs.name,
            replicated=(self.text_state, self.vision_state, jnp.asarray(self.mean), jnp.asarray(self.std)))
        out.outputs = out.outputs.astype(np.float32)
        return out if result else out.outputs

    def score(self, images: Iterable[np.ndarray], captions: Sequence[str], **kw: Any) -> float:
        """The CLIP score of images[i] ↔ captions[i] (same length), see the module docstring."""
        images = list(images)
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        s = self.scores(list(zip(images, captions)), **kw)
        return float(np.mean(np.maximum(s, 0.0)))
