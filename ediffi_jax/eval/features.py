"""The FID feature extractor of an evaluation run: pytorch-fid's InceptionV3 loaded from a weights file, with
the input size as a switch for smoke tests, and (μ, Σ) of a stream of images.

``input_size`` 299 (the default) is pytorch-fid's network exactly (`ediffi_jax.models.inception`: bilinear
resize to 299², no antialiasing). Any other size resizes to that size instead with the same bilinear kernel and
runs the same (fully convolutional) network on it; the features are then NOT FID features — it exists only to
make CPU smoke tests cheap (75² is InceptionV3's smallest input, ~16× fewer FLOPs), and reports say so.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from ediffi_jax.eval.fid import compute_statistics, extract_features
from ediffi_jax.models import inception

__all__ = ["load_inception", "inception_info", "image_features", "image_statistics", "OFFICIAL_SHA256_PREFIX",
           "MIN_INPUT_SIZE"]

OFFICIAL_SHA256_PREFIX = "6726825d"  # the hash in pytorch-fid's file name (pt_inception-2015-12-05-6726825d.pth)
MIN_INPUT_SIZE = 75


class ResizedInception(nnx.Module):
    """``net`` (an InceptionV3 built with ``resize_input=False``) behind a bilinear resize to ``size``²."""

    def __init__(self, net: inception.InceptionV3, size: int):
        self.net, self.size = net, size

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net(inception.resize_bilinear(x.astype(np.float32), (self.size, self.size)))


def load_inception(weights: str, input_size: int = inception.INPUT_SIZE) -> nnx.Module:
    """The FID InceptionV3 from pytorch-fid's ``.pth`` (or its converted ``.npz``); see the module docstring
    for ``input_size``. A missing or mismatched file raises a one-line ValueError (naming the file)."""
    if not weights:
        raise ValueError("--inception_weights is required: the path of pytorch-fid's "
                         f"{inception.FID_WEIGHTS_FILE} (from {inception.FID_WEIGHTS_URL}) or its .npz conversion")
    if input_size < MIN_INPUT_SIZE:
        raise ValueError(f"--inception_size must be >= {MIN_INPUT_SIZE} (InceptionV3's smallest input), got "
                         f"{input_size}")
    if input_size == inception.INPUT_SIZE:
        return inception.load_pytorch_fid_weights(weights)
    return ResizedInception(inception.load_pytorch_fid_weights(weights, resize_input=False), input_size)


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def inception_info(weights: str, input_size: int) -> dict[str, Any]:
    """What a report records about the feature extractor, with a note when the numbers are not FIDs comparable
    with published ones (other input size, or a weights file whose SHA-256 does not start with the hash in the
    name of pytorch-fid's release file — e.g. the random weights of `ediffi_jax.eval.smoke`)."""
    sha = file_sha256(weights)
    official = sha.startswith(OFFICIAL_SHA256_PREFIX)
    info: dict[str, Any] = {"weights": os.path.abspath(weights), "sha256": sha, "input_size": int(input_size),
                            "pytorch_fid_weights": official, "notes": []}
    if not official:
        info["notes"].append(
            f"the Inception weights file's SHA-256 does not start with {OFFICIAL_SHA256_PREFIX} (pytorch-fid's "
            f"{inception.FID_WEIGHTS_FILE}): unless it is a conversion of that file, the FID values (e.g. with random "
            "smoke-test weights) are not meaningful and not comparable with published FIDs")
    if input_size != inception.INPUT_SIZE:
        info["notes"].append(f"images were resized to {input_size}x{input_size}, not 299x299: these are not FID "
                             "values (a smoke-test setting)")
    return info


def image_features(model: nnx.Module, images: Any, batch_size: int, *, progress: bool = True) -> np.ndarray:
    """(N, 2048) float32 pool3 features of uint8 images (`ediffi_jax.eval.fid.extract_features`, on every device
    of every process; ``batch_size`` is rounded up to a multiple of the device count). An indexed source with a
    ``need`` attribute gives its first ``need`` readable images, and its ``account(kept, skipped)`` is called."""
    n_dev = jax.device_count()
    batch_size = -(-batch_size // n_dev) * n_dev
    out = extract_features(model, images, batch_size, need=getattr(images, "need", None), progress=progress,
                           result=True)
    if hasattr(images, "account"):
        images.account(len(out.kept), out.skipped)
    return out.outputs


def image_statistics(model: nnx.Module, images: Any, batch_size: int, *,
                     progress: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """(μ, Σ, N) of the pool3 features of uint8 images (see `image_features`)."""
    feats = image_features(model, images, batch_size, progress=progress)
    mu, sigma = compute_statistics(feats)
    return mu, sigma, int(feats.shape[0])
