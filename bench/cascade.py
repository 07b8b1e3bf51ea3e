"""The tiny 2-stage cascade (32² base → 64² SR): does stage 2 keep the content and add detail over bicubic?

    .venv/bin/python bench/cascade.py --base assets/tiny_shapes --sr assets/tiny_shapes_sr --num 64

1. Cascade on `--num` validation captions: shape-score of stage 1 (32²) and stage 2 (64²) outputs.
2. Super-resolution of ground truth: `--num` validation images at 64², area-downsampled to 32², upsampled by
   (a) bicubic and (b) the SR stage; PSNR against the 64² ground truth, and detail (spectral energy above the
   low-res Nyquist frequency, ground truth = 1.0) — the peer, bicubic, measured in the same run.
3. Detail of the cascade's stage-2 outputs vs bicubic upsampling of its stage-1 outputs.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from absl import flags

from ediffi_jax import sr
from ediffi_jax.cascade import Cascade, Stage
from ediffi_jax.data import shapes
from ediffi_jax.text_to_image import TextToImage, to_uint8

_BASE = flags.DEFINE_string("base", "assets/tiny_shapes", "Base run or export (stage 1).")
_SR = flags.DEFINE_string("sr", "assets/tiny_shapes_sr", "SR run or export (stage 2).")
_NUM = flags.DEFINE_integer("num", 64, "Captions / images.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def sharpness(images: np.ndarray) -> float:
    """Detail beyond the low-res image: spectral energy (grey, per image) at frequencies the half-resolution image
    cannot hold (max(|fx|, |fy|) > 1/4 cycle per pixel), mean over images."""
    x = images.astype(np.float64).mean(-1)
    x = x - x.mean(axis=(1, 2), keepdims=True)
    p = np.abs(np.fft.fft2(x)) ** 2
    f = np.abs(np.fft.fftfreq(x.shape[1]))
    hi = np.maximum(f[:, None], f[None, :]) > 0.25
    return float(p[:, hi].sum(-1).mean() / x[0].size)


def bicubic(images: np.ndarray, size: int) -> np.ndarray:
    x = images.astype(np.float32) / 127.5 - 1.0
    return to_uint8(sr.upsample(jax.numpy.asarray(x), (size, size)))


def main(argv: list[str]) -> None:
    flags.FLAGS(argv)
    base, up = TextToImage.from_workdir(_BASE.value), TextToImage.from_workdir(_SR.value)
    cascade = Cascade([Stage(base, name=_BASE.value), Stage(up, name=_SR.value)])
    r_lo, r_hi = base.config.model.image_size, up.config.model.image_size
    n = _NUM.value
    val = shapes.ShapesSource(up.config.data.seed, n, r_hi, start=up.config.data.num_train)
    captions = [val[i]["caption"] for i in range(n)]
    gt = np.stack([val[i]["image"] for i in range(n)])

    outs = cascade.generate(captions, seed=_SEED.value)
    print(f"cascade {r_lo}² → {r_hi}², {n} validation captions, seed {_SEED.value}")
    print("| output | colour | shape | position | overall |")
    print("|---|---|---|---|---|")
    for name, o in (("stage 1 (base)", outs[0]), ("stage 2 (SR)", outs[1]),
                    ("bicubic of stage 1", bicubic(outs[0], r_hi))):
        s = shapes.score_batch(o, captions)
        print(f"| {name} | {s['color']:.3f} | {s['shape']:.3f} | {s['position']:.3f} | {s['overall']:.3f} |")

    lr = to_uint8(sr.downsample(gt.astype(np.float32) / 127.5 - 1.0, r_hi // r_lo))
    sr_out = up.generate(captions, seed=_SEED.value, lowres=lr)
    bic = bicubic(lr, r_hi)
    g = sharpness(gt)
    print(f"\nground truth {r_hi}² from its {r_lo}² area-downsampled version ({n} validation images):")
    print(f"| upsampler | PSNR vs ground truth (dB) | detail above the {r_lo}² Nyquist (ground truth = 1) |")
    print("|---|---|---|")
    for name, o in (("bicubic (peer)", bic), ("SR stage", sr_out)):
        print(f"| {name} | {np.mean([psnr(a, b) for a, b in zip(o, gt)]):.2f} | {sharpness(o) / g:.3f} |")
    print(f"\ncascade detail above the low-res Nyquist: stage 2 {sharpness(outs[1]) / g:.3f}, bicubic of stage 1 "
          f"{sharpness(bicubic(outs[0], r_hi)) / g:.3f} (ground truth = 1)")


if __name__ == "__main__":
    main(sys.argv)
