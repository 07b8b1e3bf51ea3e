"""FID core (`ediffi_jax.eval.fid`): Fréchet distance against SciPy references, statistics files, and the
sharded feature extractor on 1 device vs 8 fake CPU devices."""

import json
import os

import numpy as np
import pytest
from multidevice import run_multidevice
from scipy import linalg

from ediffi_jax.eval import fid
from ediffi_jax.models import inception

TESTS = os.path.dirname(os.path.abspath(__file__))


def reference_fd(mu1, s1, mu2, s2, eps=1e-6):
    """The FID formula with scipy.linalg.sqrtm in float64 (eps·I added when the root is not finite)."""
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        covmean = linalg.sqrtm((s1 + eps * np.eye(len(s1))) @ (s2 + eps * np.eye(len(s2))))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def eigen_fd(mu1, s1, mu2, s2):
    """Independent route: Tr((Σ₁Σ₂)^½) = Σ √λ(Σ₁^½ Σ₂ Σ₁^½), a symmetric PSD matrix (eigh, no sqrtm of a
    non-symmetric product)."""
    w, v = linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.clip(linalg.eigvalsh(root @ s2 @ root), 0, None)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(lam)))


def gaussian_features(seed, n, d):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / np.sqrt(d) + rng.standard_normal(d)


@pytest.mark.parametrize("n", [500, 20], ids=["full-rank", "rank-deficient"])
def test_frechet_distance_matches_scipy(n):
    d = 64  # n = 20 < d: rank-19 covariances, a singular product Σ₁Σ₂
    s1, s2 = fid.compute_statistics(gaussian_features(1, n, d)), fid.compute_statistics(gaussian_features(2, n, d))
    ours, ref, eig = fid.frechet_distance(*s1, *s2), reference_fd(*s1, *s2), eigen_fd(*s1, *s2)
    rel, rel_eig = abs(ours - ref) / abs(ref), abs(ours - eig) / abs(eig)
    print(f"n={n}: FD {ours:.6f}; rel. error vs sqrtm reference {rel:.1e}, vs eigh route {rel_eig:.1e}")
    assert rel <= 1e-6 and rel_eig <= 1e-6
    assert abs(fid.frechet_distance(*s1, *s1)) <= 1e-6 * np.trace(s1[1])


def test_frechet_distance_closed_form_and_float64():
    # 1-D Gaussians: (m1 - m2)² + (s1 - s2)²; float32 inputs are computed in float64.
    got = fid.frechet_distance(np.float32([1.0]), np.float32([[4.0]]), np.float32([3.0]), np.float32([[9.0]]))
    assert got == pytest.approx(4.0 + 1.0, rel=1e-12)


def test_singular_product_adds_eps_and_imaginary_parts(monkeypatch):
    s1, s2 = fid.compute_statistics(gaussian_features(3, 50, 8)), fid.compute_statistics(gaussian_features(4, 50, 8))
    calls = []

    def nan_first(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else linalg.sqrtm(a)

    monkeypatch.setattr(fid, "_sqrtm", nan_first)
    got = fid.frechet_distance(*s1, *s2, eps=1e-3)
    offset = 1e-3 * np.eye(8)
    np.testing.assert_allclose(calls[1], (s1[1] + offset) @ (s2[1] + offset))
    covmean = linalg.sqrtm((s1[1] + offset) @ (s2[1] + offset)).real
    want = np.sum((s1[0] - s2[0]) ** 2) + np.trace(s1[1]) + np.trace(s2[1]) - 2 * np.trace(covmean)
    assert got == pytest.approx(want, rel=1e-12)

    small = lambda a: linalg.sqrtm(a) + 1e-9j  # noqa: E731  rounding noise: dropped
    monkeypatch.setattr(fid, "_sqrtm", small)
    assert fid.frechet_distance(*s1, *s2) == pytest.approx(reference_fd(*s1, *s2), rel=1e-9)
    monkeypatch.setattr(fid, "_sqrtm", lambda a: linalg.sqrtm(a) + 0.5j)
    with pytest.raises(ValueError, match="imaginary component 0.5"):
        fid.frechet_distance(*s1, *s2)
    with pytest.raises(ValueError, match="different dimensions: 8 and 4"):
        fid.frechet_distance(*s1, s2[0][:4], s2[1][:4, :4])


def test_statistics_files(tmp_path):
    x = gaussian_features(5, 40, 16)
    mu, sigma = fid.compute_statistics(x.astype(np.float32))
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float32).astype(np.float64), rowvar=False), rtol=1e-12)
    path = str(tmp_path / "stats.npz")
    fid.save_statistics(path, mu, sigma)
    with np.load(path) as f:
        assert sorted(f.files) == ["mu", "sigma"]  # the pytorch-fid / clean-fid layout
    mu2, sigma2 = fid.load_statistics(path, dim=16)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    assert fid.fid_from_statistics_files(path, path, dim=16) == pytest.approx(0.0, abs=1e-8)

    small = str(tmp_path / "clip_768.npz")
    np.savez(small, mu=np.zeros(768), sigma=np.eye(768))
    with pytest.raises(ValueError, match=r"clip_768\.npz: holds 768-d statistics but this comparison uses 2048-d"):
        fid.fid_from_statistics_files(small, path)
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, mean=np.zeros(3))
    with pytest.raises(ValueError, match=r"bad\.npz: FID statistics need the keys 'mu' and 'sigma'"):
        fid.load_statistics(bad)
    with pytest.raises(ValueError, match="not found"):
        fid.load_statistics(str(tmp_path / "none.npz"))


# -------------------------------------------------------------------------------------------- extraction

N_IMAGES, SIZE, BATCH = 10, 75, 8  # 75×75 is InceptionV3's smallest input; two batches, the last one padded


def random_fid_model(seed: int = 0) -> inception.InceptionV3:
    """The FID InceptionV3 without the resize (75×75 inputs: the test is about batching and sharding, and the
    resize has its own parity test), with seeded random He-scaled weights (the same in every process)."""
    model = inception.abstract_model(resize_input=False)
    rng = np.random.default_rng(seed)
    state = {}
    for key, (variable, is_kernel) in inception.param_table(model).items():
        h, w, cin, cout = variable.shape if is_kernel else (1, 1, 1, 1)
        if is_kernel:
            state[key] = rng.standard_normal((cout, cin, h, w)).astype(np.float32) * np.sqrt(2 / (cin * h * w))
        else:
            lo, hi = (0.5, 1.5) if key.endswith(("weight", "running_var")) else (-0.1, 0.1)
            state[key] = rng.uniform(lo, hi, variable.shape).astype(np.float32)
    return inception.load_state_dict(model, state)


def image_stream(seed: int = 0):
    """10 uint8 images as 3 singles, a (4, H, W, 3) batch and 3 singles (regrouped into batches of 8)."""
    images = np.random.default_rng(seed).integers(0, 256, (N_IMAGES, SIZE, SIZE, 3), dtype=np.uint8)
    return [*images[:3], images[3:7], *images[7:]], images


_MULTIDEVICE = f"""
import json, sys
import jax, numpy as np, pytest
sys.path.insert(0, {TESTS!r})
from test_fid import random_fid_model, image_stream, BATCH
from ediffi_jax.eval import fid
assert len(jax.devices()) == 8
model = random_fid_model()
with pytest.raises(ValueError, match="multiple of the 8 devices"):
    fid.extract_features(model, image_stream()[0], batch_size=4)
feats = fid.extract_features(model, iter(image_stream()[0]), batch_size=BATCH, progress=False)
np.save({{out!r}}, feats)
print(json.dumps(dict(devices=len(jax.devices()), shape=feats.shape)))
"""


def test_extract_features_one_device_equals_eight(tmp_path):
    import jax

    out = str(tmp_path / "eight.npy")
    model = random_fid_model()
    stream, images = image_stream()
    one = fid.extract_features(model, stream, batch_size=BATCH, mesh=fid.data_mesh(jax.devices()[:1]),
                               progress=False)
    assert one.shape == (N_IMAGES, 2048) and one.dtype == np.float32 and np.std(one) > 1e-3
    result = json.loads(run_multidevice(_MULTIDEVICE.format(out=out), devices=8).strip().splitlines()[-1])
    assert result == {"devices": 8, "shape": [N_IMAGES, 2048]}
    eight = np.load(out)
    diff = float(np.max(np.abs(eight - one)) / np.max(np.abs(one)))
    print(f"1 device vs 8 devices: max rel. difference {diff:.1e}")
    assert diff <= 1e-5  # per-example convolutions: only the reduction order may differ

    # Batch regrouping and padding do not change any image's features: each one alone gives the same.
    alone = fid.extract_features(model, [images[9]], batch_size=BATCH, progress=False)
    np.testing.assert_allclose(alone[0], one[9], rtol=0, atol=1e-5 * np.max(np.abs(one)))


def test_extract_features_rejects_bad_input():
    model = random_fid_model()
    with pytest.raises(ValueError, match="uint8 RGB"):
        fid.extract_features(model, [np.zeros((8, 8, 3), np.float32)], 4, progress=False)
    with pytest.raises(ValueError, match="uint8 RGB"):
        fid.extract_features(model, [np.zeros((8, 8), np.uint8)], 4, progress=False)
    with pytest.raises(ValueError, match=r"image 1 does not have the shape of image 0 .*must share a size"):
        fid.extract_features(model, [np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)], 4,
                             progress=False)
    with pytest.raises(ValueError, match="got no images"):
        fid.extract_features(model, [], 4, progress=False)
    # (n, H, W, 3) batches and single images flatten into one indexed source
    src = fid.as_indexed([np.zeros((5, 4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8)])
    assert len(src) == 6 and src.load(5).shape == (4, 4, 3)
