"""Fréchet Inception Distance (Heusel et al. 2017, arXiv 1706.08500), computed as pytorch-fid does.

FID = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) between Gaussians fitted to the 2048-d ``pool3`` features of
InceptionV3 (`ediffi_jax.models.inception`). The statistics and the distance are computed on the host in
float64 (NumPy/SciPy); only the feature extraction runs on the accelerators.

Image preprocessing (the "resize mode"). `extract_features` takes uint8 RGB images (any size) and gives them to
the network exactly as pytorch-fid (Seitzer, https://github.com/mseitzer/pytorch-fid) does: uint8 → float32 in
[0, 1] (÷255), then *inside the network* a bilinear resize to 299×299 equal to ``torch.nn.functional.
interpolate(mode='bilinear', align_corners=False)`` (no antialiasing), then [0, 1] → [−1, 1]. clean-fid
(Parmar et al. 2022, "On Aliased Resizing and Surprising Subtleties in GAN Evaluation", arXiv 2104.11222) calls
this preprocessing "legacy_pytorch": it resizes on the host with the same ``F.interpolate`` bilinear
(align_corners=False) call on 0..255 floats, clips to [0, 255] (a no-op for a convex combination) and runs
pytorch-fid's InceptionV3 with its own resize switched off — the same computation up to float rounding, and the
same weights. We match pytorch-fid / legacy_pytorch, *not* clean-fid's default "clean" mode (a PIL bicubic
resize to 299 on the host, antialiased when shrinking, followed by NVIDIA's TorchScript port of the TF Inception
graph) nor its "legacy_tensorflow" mode: pytorch-fid is widely used for published FIDs, so our
numbers are comparable with those (a paper's FID is comparable only when it used the same preprocessing). "clean"
FIDs of the same images differ, most for images resized down, so never mix the two in one table, and compute
reference statistics (`save_statistics`) with this same pipeline.

Statistics files are ``.npz`` with keys ``mu`` (d,) and ``sigma`` (d, d), the layout pytorch-fid and clean-fid
write, so their precomputed reference statistics load directly (when made with the same preprocessing).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from scipy import linalg

from ediffi_jax.eval import distributed

__all__ = ["frechet_distance", "frechet_distance_eigh", "compute_statistics", "save_statistics", "load_statistics",
           "fid_from_statistics_files", "extract_features", "data_mesh"]


def _sqrtm(a: np.ndarray) -> np.ndarray:
    return linalg.sqrtm(a)


def _check_stats(mu: np.ndarray, sigma: np.ndarray, name: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: mu must be (d,) and sigma (d, d), got mu {mu.shape} and sigma {sigma.shape}")


def _float64_pair(mu1, sigma1, mu2, sigma2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Both statistics as float64 (μ 1-d, Σ 2-d), checked for shape and for a common dimension."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    _check_stats(mu1, sigma1, "first statistics")
    _check_stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"the statistics have different dimensions: {mu1.shape[0]} and {mu2.shape[0]} "
                         "(both must come from the same feature layer, e.g. 2048-d pool3)")
    return mu1, sigma1, mu2, sigma2


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) between N(μ₁, Σ₁) and N(μ₂, Σ₂), in float64.

    As pytorch-fid's ``calculate_frechet_distance`` (after Dougal Sutherland's stable version): when
    ``scipy.linalg.sqrtm(Σ₁Σ₂)`` is not finite (a near-singular product, e.g. fewer samples than dimensions),
    ``eps·I`` is added to both covariances and the square root recomputed; a small imaginary part left by
    rounding is dropped, and a large one (|imag| > 1e-3 on the diagonal) raises ValueError.
    """
    mu1, sigma1, mu2, sigma2 = _float64_pair(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"(Σ₁Σ₂)^½ has a large imaginary component {np.max(np.abs(covmean.imag)):.3g}: the "
                             "covariances are not positive semi-definite or far too singular (too few samples?)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_eigh(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *,
                          features1: np.ndarray | None = None) -> float:
    """The same Fréchet distance with Tr((Σ₁Σ₂)^½) from symmetric eigenvalues instead of ``sqrtm``, in float64.

    For PSD Σ₁, Σ₂ the eigenvalues of Σ₁Σ₂ are those of the symmetric PSD Σ₁^½ Σ₂ Σ₁^½, so Tr((Σ₁Σ₂)^½) =
    Σ √λ(Σ₁^½ Σ₂ Σ₁^½) (two ``eigh`` of d×d, several times faster than ``sqrtm``'s Schur form). With
    ``features1`` — the (N, d) features (μ₁, Σ₁) were computed from — and N − 1 < d, Σ₁ = AAᵀ with A = (X − μ₁)ᵀ
    / √(N − 1), and the nonzero eigenvalues are those of the N×N matrix AᵀΣ₂A: exact, and O(d²N). Equal to
    `frechet_distance` up to rounding (~1e-6 relative, see tests/test_fid.py) except where that one needs its
    eps fallback (a non-finite ``sqrtm``): there this has no eps, so use `frechet_distance` for numbers that
    must match pytorch-fid digit for digit. Negative eigenvalues from rounding are clipped at 0.
    """
    mu1, sigma1, mu2, sigma2 = _float64_pair(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    x = None if features1 is None else np.asarray(features1, np.float64)
    if x is not None and x.shape[0] - 1 < x.shape[1]:
        a = (x - x.mean(axis=0)).T / np.sqrt(x.shape[0] - 1)  # (d, N): Σ₁ = AAᵀ
        lam = linalg.eigvalsh(a.T @ sigma2 @ a)
    else:
        w, v = linalg.eigh(sigma1)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        lam = linalg.eigvalsh(root @ sigma2 @ root)
    tr_covmean = float(np.sum(np.sqrt(np.clip(lam, 0, None))))
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def compute_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) of (N, d) features in float64: the mean and the unbiased (N − 1) covariance, as pytorch-fid."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N, d) with N >= 2, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Writes ``{mu, sigma}`` (float64) to ``path`` (.npz, the pytorch-fid / clean-fid layout)."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    _check_stats(mu, sigma, os.fspath(path))
    with open(path, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma)


def load_statistics(path: str, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(μ, Σ) in float64 from a ``.npz`` with keys ``mu`` and ``sigma``. With ``dim``, a file of other
    dimension raises a ValueError that names the file (e.g. 768-d statistics for a 2048-d comparison)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"FID statistics file {path!r} not found")
    with np.load(path, allow_pickle=False) as f:
        if "mu" not in f.files or "sigma" not in f.files:
            raise ValueError(f"{path}: FID statistics need the keys 'mu' and 'sigma', found {sorted(f.files)}")
        mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
    _check_stats(mu, sigma, path)
    if dim is not None and mu.shape[0] != dim:
        raise ValueError(f"{path}: holds {mu.shape[0]}-d statistics but this comparison uses {dim}-d features "
                         "(InceptionV3 pool3 is 2048-d): recompute the file with the same feature extractor")
    return mu, sigma


def fid_from_statistics_files(path1: str, path2: str, dim: int | None = 2048) -> float:
    """FID between two statistics files (checked to be ``dim``-dimensional; ``None`` skips the check)."""
    return frechet_distance(*load_statistics(path1, dim), *load_statistics(path2, dim))


# ------------------------------------------------------------------------------------------ feature extraction


def data_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: every device, ``jax.devices()``)."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), ("data",))


@partial(jax.jit, static_argnums=0)
def _features(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(images.astype(jnp.float32) / 255.0)


def _check_image(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.uint8 or a.ndim not in (3, 4) or a.shape[-1] != 3:
        raise ValueError(f"extract_features takes uint8 RGB images (H, W, 3) or batches (n, H, W, 3); got "
                         f"dtype {a.dtype}, shape {a.shape}")
    return a


class _InMemory:
    """An `IndexedImages` view of in-memory images: (H, W, 3) arrays and/or (n, H, W, 3) batches, flattened."""

    def __init__(self, images: Iterable[np.ndarray]):
        self.images = [row for a in images for row in (lambda b: b if b.ndim == 4 else b[None])(
            _check_image(np.asarray(a)))]

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> np.ndarray:
        return self.images[i]

    def name(self, i: int) -> str:
        return f"image {i}"


def as_indexed(images: Any) -> Any:
    """``images`` as an *indexed image source*: an object with ``__len__``, ``load(i)`` (uint8 [H, W, 3], or
    `distributed.UNREADABLE` to skip it) and ``name(i)`` — returned as is when it has ``load`` (e.g.
    `ediffi_jax.eval.folder.ImageFolder`); otherwise a list / array / iterator of images or batches, read into
    memory."""
    return images if hasattr(images, "load") else _InMemory(images)


def extract_features(model: nnx.Module, images: Any, batch_size: int, mesh: Mesh | None = None, *,
                     need: int | None = None, progress: bool = True,
                     result: bool = False) -> np.ndarray | distributed.MapResult:
    """(N, d) float32 features under ``model`` (the FID `InceptionV3`) of uint8 RGB images (see `as_indexed`).

    Each batch goes to the accelerators as uint8, is divided by 255 and runs through ``model`` in one jitted
    call (the model resizes to 299 itself, see the module docstring), sharded over the batch: the parameters are
    replicated and the batch split over every device of ``mesh`` (default: a 1-D ``"data"`` mesh of
    ``jax.devices()``, every device of every process), so ``batch_size`` must be a multiple of the device count.
    On several processes each one loads only the images of its devices' rows and every process returns all the
    features (`ediffi_jax.eval.distributed.map_indexed`); the images must then be the same on every process (the
    same folder, or the same list). The last batch is zero-padded (one compiled shape) and the padding dropped.
    ``need``: the first ``need`` readable images only. A tqdm bar counts images (``progress=False`` hides it).
    ``result=True`` returns the `MapResult` (which images were kept and which were unreadable) instead of the array.
    """
    mesh = data_mesh() if mesh is None else mesh
    source = as_indexed(images)
    if len(source) == 0:
        raise ValueError("extract_features got no images")
    graphdef, state = nnx.split(model)
    out = distributed.map_indexed(
        lambda st, x: _features(graphdef, st, x), lambda i: _load_one(source, i), len(source), batch_size,
        mesh=mesh, need=need, replicated=(state,), progress=progress, desc="FID features", name=source.name)
    out.outputs = out.outputs.astype(np.float32)
    return out if result else out.outputs


def _load_one(source: Any, i: int) -> tuple[np.ndarray] | None:
    image = source.load(i)
    return None if image is None else (image,)
