"""Paint-with-words (eDiff-I §5, Balaji et al. 2022, arXiv 2211.01324): training-free spatial control.

The user paints regions and names each with a phrase of the prompt. In every cross-attention layer the
unscaled logits get a bias before the softmax:

    softmax((QKᵀ + w·A) / √d) V,        w = w′ · log(1 + σ) · max(QKᵀ)                       (eDiff-I Eq. 4)

A[b, pixel, token] = strength of the region when the pixel lies in it and the token belongs to its phrase,
else 0 (regions that overlap add). Masks are resized (bilinear, antialiased) to each layer's feature-map size.
Only the conditional branches of guidance get the bias (`text_to_image.guided_denoiser`).

The paper does not say over what `max(QKᵀ)` is taken, nor give w′. The weight is therefore a named choice,
`WEIGHT_FUNCTIONS` (all receive the unscaled float32 logits [B, heads, Lq, Lk] of one layer; σ per example):

  * "paper" (default): w′·log(1+σ)·max(QKᵀ), the max over the layer's whole logit tensor of *that example*
    (all heads, queries and keys);
  * "global_max": the same with the max over the whole call's tensor (every example and branch), as the
    best-known public implementation (cloneofsimo/paint-with-words-sd, `qk.max()`) does;
  * "row_max": the max per query row (per example, head and pixel);
  * "std": w′·log(1+σ)·std(QKᵀ) per example (scale-free variant);
  * "constant": w′ alone (no σ, no logit scale).

Because the 1/√d scaling is linear and positive, adding w·A to the unscaled logits with w built from
max(QKᵀ) equals adding the same construction to the scaled logits: implementations that bias after scaling
agree with these definitions.

Inputs: a list of `Region(phrase, mask, strength)` per prompt, or a colour map (PNG) with
{colour: "phrase[,strength[,occurrence]]"} (`regions_from_color_map`, `parse_phrase_spec`). Phrases are found
in the prompt case- and whitespace-insensitively; a phrase occurring several times paints every occurrence
unless `occurrence` (1-based) picks one. Tokens belong to a phrase when their character span (the tokenizers'
offset mappings, T5 and CLIP separately) overlaps it. A map whose size differs from the output is resized
(with a logged note); a colour of the map that names no phrase, a phrase missing from the prompt and an
unreadable file are one-line errors.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ediffi_jax.tokenizers import TextTokenizer

WeightFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
# Colour-map pixels farther than this (RGB distance, 0..255) from every listed colour and from every blend of two
# listed colours (antialiased edges) are "unlisted"; more than UNLISTED_FRACTION of them is an error naming the
# most common unlisted colour.
COLOR_TOLERANCE = 64.0
UNLISTED_FRACTION = 0.01


@dataclasses.dataclass(frozen=True)
class Region:
    """One painted region: `mask` [H, W] in [0, 1] (any size; resized to the output), the `phrase` of the prompt
    it shows, its `strength` (multiplies w), and optionally which `occurrence` (1-based) of a repeated phrase."""

    phrase: str
    mask: np.ndarray
    strength: float = 1.0
    occurrence: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.phrase, str) or not self.phrase.strip():
            raise ValueError(f"region phrase must be a non-empty string, got {self.phrase!r}")
        m = np.asarray(self.mask)
        if m.ndim != 2 or min(m.shape) < 1:
            raise ValueError(f"region mask of {self.phrase!r} must be 2-D [H, W], got shape {m.shape}")
        if not np.isfinite(self.strength):
            raise ValueError(f"region strength of {self.phrase!r} must be finite, got {self.strength}")
        if self.occurrence is not None and self.occurrence < 1:
            raise ValueError(f"occurrence of {self.phrase!r} is 1-based, got {self.occurrence}")


# ------------------------------------------------------------------------------------------ weight functions


def _per_example(fn: Callable[..., jax.Array], logits: jax.Array) -> jax.Array:
    return fn(logits, axis=(1, 2, 3), keepdims=True)


def _log1p_sigma(sigma: jax.Array) -> jax.Array:
    return jnp.log1p(sigma.astype(jnp.float32))[:, None, None, None]


WEIGHT_FUNCTIONS: dict[str, WeightFn] = {
    "paper": lambda lg, s, w: w * _log1p_sigma(s) * _per_example(jnp.max, lg),
    "global_max": lambda lg, s, w: w * _log1p_sigma(s) * jnp.max(lg),
    "row_max": lambda lg, s, w: w * _log1p_sigma(s) * jnp.max(lg, axis=-1, keepdims=True),
    "std": lambda lg, s, w: w * _log1p_sigma(s) * _per_example(jnp.std, lg),
    "constant": lambda lg, s, w: jnp.broadcast_to(jnp.asarray(w, jnp.float32), (lg.shape[0], 1, 1, 1)),
}


def weight_fn(name: str) -> WeightFn:
    """`(logits [B, H, Lq, Lk], sigma [B], w′) -> w` broadcastable to the logits (see the module docstring)."""
    if name not in WEIGHT_FUNCTIONS:
        raise ValueError(f"unknown paint-with-words weight function {name!r}; known: {sorted(WEIGHT_FUNCTIONS)}")
    return WEIGHT_FUNCTIONS[name]


def paint_bias(logits: jax.Array, sigma: jax.Array, a: jax.Array, w: jax.Array | float,
               fn: str = "paper") -> jax.Array:
    """The bias w·A added to the unscaled logits [B, H, Lq, Lk]; `a` is [B, Lq, Lk] (shared by the heads)."""
    return weight_fn(fn)(logits.astype(jnp.float32), sigma, w) * a[:, None].astype(jnp.float32)


def make_attn_bias_fn(maps: Mapping[str, jax.Array], sigma: jax.Array, w: jax.Array | float,
                      fn: str = "paper") -> Callable[[jax.Array, tuple[int, int]], jax.Array]:
    """An `AttnBiasFn` for `UNet(attn_bias_fn=...)`: looks up A of the layer's (h, w) in `maps` (keys "HxW",
    from `PaintMaps.arrays`) and returns w·A for those logits."""
    weight_fn(fn)  # an unknown name fails here, not inside the trace

    def bias(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
        key = f"{size[0]}x{size[1]}"
        if key not in maps:
            raise ValueError(f"paint-with-words has no mask at attention size {key}; built for {sorted(maps)}")
        a = maps[key]
        if a.shape[-1] != logits.shape[-1]:
            raise ValueError(f"paint-with-words token map has {a.shape[-1]} tokens, the layer attends to "
                             f"{logits.shape[-1]}")
        return paint_bias(logits, sigma, a, w, fn)

    return bias


# ------------------------------------------------------------------------------------------ phrases → tokens


def phrase_spans(prompt: str, phrase: str, occurrence: int | None = None) -> list[tuple[int, int]]:
    """Character spans of `phrase` in `prompt`, case-insensitive, any run of whitespace matching any other,
    whole words only. All occurrences, or the `occurrence`-th (1-based). One-line ValueError if absent."""
    words = phrase.split()
    if not words:
        raise ValueError(f"phrase must be non-empty, got {phrase!r}")
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)"
    spans = [m.span() for m in re.finditer(pattern, prompt, flags=re.IGNORECASE)]
    if not spans:
        raise ValueError(f"phrase {phrase!r} does not occur in the prompt {prompt!r}")
    if occurrence is None:
        return spans
    if occurrence > len(spans):
        raise ValueError(f"phrase {phrase!r} occurs {len(spans)} time(s) in the prompt {prompt!r}; "
                         f"occurrence {occurrence} asked")
    return [spans[occurrence - 1]]


def token_strengths(prompt: str, regions: Sequence[Region], tokenizer: TextTokenizer) -> np.ndarray:
    """float32 [max_length, R]: column r holds region r's strength on the tokens of its phrase (character spans
    from the tokenizer's offset mapping that overlap the phrase), 0 elsewhere (specials, padding)."""
    offsets = tokenizer.offsets(prompt)
    out = np.zeros((len(offsets), len(regions)), np.float32)
    for r, reg in enumerate(regions):
        for ps, pe in phrase_spans(prompt, reg.phrase, reg.occurrence):
            for i, (ts, te) in enumerate(offsets):
                if te > ts and ts < pe and te > ps:
                    out[i, r] = reg.strength
    return out


# ------------------------------------------------------------------------------------------ masks


def resize_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[..., H, W] → [..., h, w] float32, bilinear with antialiasing (area-like when shrinking), any sizes."""
    m = np.asarray(masks, np.float32)
    if m.shape[-2:] == tuple(size):
        return m
    out = jax.image.resize(jnp.asarray(m), m.shape[:-2] + tuple(size), method="linear", antialias=True)
    return np.clip(np.asarray(out), 0.0, 1.0)


def cross_attention_sizes(model_config: Mapping[str, Any], height: int, width: int) -> list[tuple[int, int]]:
    """Feature-map sizes (h, w) of the UNet's cross-attention layers for an output of height × width: level l
    (resolution image_size / 2^l in the config) runs at (height / 2^l, width / 2^l)."""
    levels = len(tuple(model_config.channel_mult))
    cross = set(model_config.cross_attn_resolutions)
    factor = 2 ** (levels - 1)
    if height % factor or width % factor:
        raise ValueError(f"output size {height}x{width} is not divisible by {factor} (the UNet's downsampling)")
    return [(height >> lvl, width >> lvl) for lvl in range(levels) if model_config.image_size >> lvl in cross]


@dataclasses.dataclass
class PaintMaps:
    """A per layer size: {"HxW": float32 [B, h·w, L]} over the context tokens the UNet attends to (without the
    null token), and the weight w′. A pytree argument of the jitted sampler."""

    arrays: dict[str, jax.Array]
    weight: float


def build_maps(
    prompts: Sequence[str],
    regions: Sequence[Sequence[Region]],
    streams: Sequence[tuple[str, int, TextTokenizer | None]],
    sizes: Sequence[tuple[int, int]],
    output_size: tuple[int, int],
    weight: float = 1.0,
) -> PaintMaps:
    """A for every cross-attention size. `streams` lists the context in order as (name, tokens, tokenizer):
    text streams get their phrase tokens, others (tokenizer None: the CLIP image token) zeros."""
    if len(regions) != len(prompts):
        raise ValueError(f"{len(regions)} region lists for {len(prompts)} prompts")
    n_tok = sum(n for _, n, _ in streams)
    r_max = max((len(r) for r in regions), default=0)
    tok = np.zeros((len(prompts), n_tok, r_max), np.float32)
    masks = np.zeros((len(prompts), r_max) + tuple(output_size), np.float32)
    for b, (prompt, regs) in enumerate(zip(prompts, regions)):
        if not regs:
            continue
        start, found = 0, np.zeros(len(regs), bool)
        for _, n, tokenizer in streams:
            if tokenizer is not None:
                t = token_strengths(prompt, regs, tokenizer)[:n]
                tok[b, start:start + len(t), :len(regs)] = t
                found |= (t != 0).any(axis=0)
            start += n
        for r, reg in enumerate(regs):
            if not found[r] and reg.strength != 0:
                raise ValueError(f"phrase {reg.phrase!r} has no token left in any text stream after truncation "
                                 f"(prompt {prompt!r})")
            m = np.asarray(reg.mask, np.float32)
            if m.shape != tuple(output_size):
                logging.info("paint-with-words: mask of %r is %s, resized to the output %s", reg.phrase,
                             m.shape, tuple(output_size))
            masks[b, r] = resize_masks(m, output_size)
    arrays = {}
    for h, w in sizes:
        m = resize_masks(masks, (h, w)).reshape(len(prompts), r_max, h * w)
        arrays[f"{h}x{w}"] = jnp.asarray(np.einsum("brq,blr->bql", m, tok))
    return PaintMaps(arrays, float(weight))


# ------------------------------------------------------------------------------------------ user formats


def parse_color(text: str) -> tuple[int, int, int]:
    """"#rrggbb", "#rgb" or "r,g,b" → (r, g, b); one-line ValueError naming the text otherwise."""
    t = text.strip()
    try:
        if t.startswith("#") and len(t) in (4, 7):
            h = t[1:] if len(t) == 7 else "".join(c * 2 for c in t[1:])
            return tuple(int(h[i:i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
        parts = [int(p) for p in t.split(",")]
        if len(parts) == 3 and all(0 <= p <= 255 for p in parts):
            return tuple(parts)  # type: ignore[return-value]
    except ValueError:
        pass
    raise ValueError(f"cannot read colour {text!r} (use #rrggbb, #rgb or r,g,b)")


def parse_phrase_spec(spec: str) -> tuple[tuple[int, int, int], str, float, int | None]:
    """"#ff0000=rabbit mage,1.0[,occurrence]" → (colour, phrase, strength, occurrence)."""
    if "=" not in spec:
        raise ValueError(f"phrase spec {spec!r} must read COLOUR=phrase[,strength[,occurrence]]")
    colour, rest = spec.split("=", 1)
    return (parse_color(colour), *parse_phrase_value(rest))


def parse_phrase_value(value: str) -> tuple[str, float, int | None]:
    """"phrase[,strength[,occurrence]]" → (phrase, strength, occurrence)."""
    parts = [p.strip() for p in value.split(",")]
    phrase, strength, occurrence = parts[0], 1.0, None
    try:
        if len(parts) > 1:
            strength = float(parts[1])
        if len(parts) > 2:
            occurrence = int(parts[2])
        if len(parts) > 3 or not phrase:
            raise ValueError
    except ValueError:
        raise ValueError(f"cannot read phrase spec {value!r} (use phrase[,strength[,occurrence]])") from None
    return phrase, strength, occurrence


def load_image(path: str) -> np.ndarray:
    """uint8 [H, W, 3] of an image file; one-line ValueError naming the path when it cannot be read."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read image file {path!r}: {err}") from None


def regions_from_color_map(
    color_map: np.ndarray | str,
    phrases: Mapping[str | tuple[int, int, int], str],
    tolerance: float = COLOR_TOLERANCE,
) -> list[Region]:
    """Regions of a colour map ([H, W, 3] uint8 or a PNG path) and {colour: "phrase[,strength[,occurrence]]"}:
    each pixel belongs to the nearest listed colour (pixels blending two listed colours, as antialiased edges do,
    to the nearer one). A colour listed but absent from the map and a colour of the map with no phrase (more than
    1% of the pixels) are one-line errors."""
    img = load_image(color_map) if isinstance(color_map, str) else np.asarray(color_map)
    if img.ndim != 3 or img.shape[-1] < 3:
        raise ValueError(f"colour map must be [H, W, 3], got shape {img.shape}")
    if not phrases:
        raise ValueError("no phrases given for the colour map")
    img = img[..., :3].astype(np.float32)
    cols = [(parse_color(c) if isinstance(c, str) else tuple(int(x) for x in c)) for c in phrases]
    palette = np.asarray(cols, np.float32)
    d = np.sqrt(((img[:, :, None, :] - palette[None, None]) ** 2).sum(-1))
    nearest = d.argmin(-1)
    blend = d.min(-1)  # distance to the nearest colour or blend of two colours (antialiasing mixes them)
    for i in range(len(cols)):
        for j in range(i + 1, len(cols)):
            e = palette[j] - palette[i]
            t = np.clip(((img - palette[i]) @ e) / max(float(e @ e), 1e-6), 0.0, 1.0)
            blend = np.minimum(blend, np.linalg.norm(img - palette[i] - t[..., None] * e, axis=-1))
    listed = blend <= tolerance
    if (~listed).mean() > UNLISTED_FRACTION:
        px = img[~listed].astype(np.int64)
        values, counts = np.unique(px, axis=0, return_counts=True)
        top = values[counts.argmax()]
        raise ValueError(f"colour #{top[0]:02x}{top[1]:02x}{top[2]:02x} covers {counts.max() / listed.size:.1%} "
                         f"of the colour map but has no phrase")
    out = []
    for i, ((colour, value), rgb) in enumerate(zip(phrases.items(), cols)):
        mask = (listed & (nearest == i)).astype(np.float32)
        if not mask.any():
            raise ValueError(f"colour {colour!r} (#{rgb[0]:02x}{rgb[1]:02x}{rgb[2]:02x}) does not occur in the "
                             f"colour map")
        phrase, strength, occ = parse_phrase_value(value)
        out.append(Region(phrase, mask, strength, occ))
    return out


def regions_from_specs(color_map: np.ndarray | str, specs: Sequence[str]) -> list[Region]:
    """CLI form: a colour map and ["#ff0000=rabbit mage,1.0", "#0000ff=clouds"]."""
    phrases: dict[str | tuple[int, int, int], str] = {}
    seen = set()
    for spec in specs:
        rgb, phrase, strength, occ = parse_phrase_spec(spec)
        if rgb in seen:
            raise ValueError(f"colour of {spec!r} is listed twice")
        seen.add(rgb)
        phrases[spec.split("=", 1)[0].strip()] = f"{phrase},{strength}" + ("" if occ is None else f",{occ}")
    return regions_from_color_map(color_map, phrases)


def center_crop_square(image: np.ndarray) -> np.ndarray:
    """The central square of [H, W, C] (CLIP's preprocessing crops before resizing; `encoders.clip_pixels`
    then resizes the square to the CLIP input size)."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return image[top:top + s, left:left + s]


__all__ = [
    "COLOR_TOLERANCE", "PaintMaps", "Region", "WEIGHT_FUNCTIONS", "build_maps", "center_crop_square",
    "cross_attention_sizes", "load_image", "make_attn_bias_fn", "paint_bias", "parse_color", "parse_phrase_spec",
    "phrase_spans", "regions_from_color_map", "regions_from_specs", "resize_masks", "token_strengths",
    "weight_fn",
]
