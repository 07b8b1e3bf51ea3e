"""FID InceptionV3 (`ediffi_jax.models.inception`) against a PyTorch reference of pytorch-fid's network.

The pytorch-fid package itself is the reference in test_pytorch_fid_parity.py (it reuses this module's fixtures). The
reference below is an independent one, written here from pytorch-fid's published architecture (torchvision
``Inception3`` with the FIDInceptionA/C/E_1/E_2 patches, ``resize_input`` and ``normalize_input``), with torchvision's
module names so its state dict has the same keys as ``pt_inception-2015-12-05-6726825d.pth``. It uses torch's own
pooling / interpolation kernels, so it checks our hand-written pooling (count_include_pad=False, -inf padding) and
bilinear resize independently.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

import jax.numpy as jnp  # noqa: E402

from ediffi_jax.eval.fid import extract_features  # noqa: E402
from ediffi_jax.models import inception  # noqa: E402


class TorchConv(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg(x):  # TF-style average pool of the FID blocks
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class TorchA(nn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.branch1x1 = TorchConv(cin, 64, kernel_size=1)
        self.branch5x5_1, self.branch5x5_2 = TorchConv(cin, 48, kernel_size=1), TorchConv(48, 64, kernel_size=5,
                                                                                           padding=2)
        self.branch3x3dbl_1 = TorchConv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = TorchConv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = TorchConv(96, 96, kernel_size=3, padding=1)
        self.branch_pool = TorchConv(cin, pool, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg(x))], 1)


class TorchB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = TorchConv(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = TorchConv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = TorchConv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = TorchConv(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class TorchC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        h, v = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = TorchConv(cin, 192, kernel_size=1)
        self.branch7x7_1, self.branch7x7_2 = TorchConv(cin, c7, kernel_size=1), TorchConv(c7, c7, **h)
        self.branch7x7_3 = TorchConv(c7, 192, **v)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = TorchConv(cin, c7, kernel_size=1), TorchConv(c7, c7, **v)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = TorchConv(c7, c7, **h), TorchConv(c7, c7, **v)
        self.branch7x7dbl_5 = TorchConv(c7, 192, **h)
        self.branch_pool = TorchConv(cin, 192, kernel_size=1)

    def forward(self, x):
        a = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b = self.branch7x7dbl_1(x)
        for i in range(2, 6):
            b = getattr(self, f"branch7x7dbl_{i}")(b)
        return torch.cat([self.branch1x1(x), a, b, self.branch_pool(_avg(x))], 1)


class TorchD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = TorchConv(cin, 192, kernel_size=1), TorchConv(192, 320, kernel_size=3,
                                                                                            stride=2)
        self.branch7x7x3_1 = TorchConv(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = TorchConv(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = TorchConv(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = TorchConv(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, 3, stride=2)], 1)


class TorchE(nn.Module):
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool  # FIDInceptionE_2 (Mixed_7c) max-pools, FIDInceptionE_1 averages
        h, v = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        self.branch1x1 = TorchConv(cin, 320, kernel_size=1)
        self.branch3x3_1 = TorchConv(cin, 384, kernel_size=1)
        self.branch3x3_2a, self.branch3x3_2b = TorchConv(384, 384, **h), TorchConv(384, 384, **v)
        self.branch3x3dbl_1 = TorchConv(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = TorchConv(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = TorchConv(384, 384, **h), TorchConv(384, 384, **v)
        self.branch_pool = TorchConv(cin, 192, kernel_size=1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a), self.branch3x3dbl_3a(b),
                          self.branch3x3dbl_3b(b), self.branch_pool(pooled)], 1)


class TorchFIDInception(nn.Module):
    """pytorch-fid's ``InceptionV3([3])`` (FID variant) forward; NCHW images in [0, 1] → (B, 2048)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = TorchConv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = TorchConv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = TorchConv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = TorchConv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = TorchConv(80, 192, kernel_size=3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = TorchA(192, 32), TorchA(256, 64), TorchA(288, 64)
        self.Mixed_6a = TorchB(288)
        self.Mixed_6b, self.Mixed_6c = TorchC(768, 128), TorchC(768, 160)
        self.Mixed_6d, self.Mixed_6e = TorchC(768, 160), TorchC(768, 192)
        self.Mixed_7a = TorchD(768)
        self.Mixed_7b, self.Mixed_7c = TorchE(1280, max_pool=False), TorchE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # in the weight file, unused by pool3

    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2))), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def randomize_(net: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded random weights with O(1) activations throughout (He-scaled convs) and random BN statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
            elif isinstance(m, nn.Linear):
                m.weight.copy_(0.01 * torch.randn(m.weight.shape, generator=g))
                m.bias.zero_()
    return net.eval()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(torch reference with random weights, path of its state dict saved as a .pth)."""
    torch.manual_seed(0)
    net = randomize_(TorchFIDInception())
    path = tmp_path_factory.mktemp("fid") / inception.FID_WEIGHTS_FILE
    torch.save(net.state_dict(), path)  # includes bn.num_batches_tracked and fc.*, as the real file
    return net, str(path)


@pytest.fixture(scope="module")
def model(reference):
    return inception.load_pytorch_fid_weights(reference[1])


@pytest.mark.parametrize("shape", [(2, 3, 32, 48), (1, 3, 517, 400), (1, 3, 299, 299), (1, 3, 300, 7)])
def test_resize_matches_torch_bilinear(shape):
    x = np.random.default_rng(1).random(shape, dtype=np.float32)
    ref = F.interpolate(torch.from_numpy(x), size=(299, 299), mode="bilinear", align_corners=False).numpy()
    ours = np.asarray(inception.resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), (299, 299)))
    np.testing.assert_allclose(ours.transpose(0, 3, 1, 2), ref, rtol=0, atol=2e-6)


def test_pool3_features_match_pytorch_fid_reference(reference, model):
    net, _ = reference
    images = np.random.default_rng(2).integers(0, 256, (2, 80, 96, 3), dtype=np.uint8)
    with torch.no_grad():
        ref = net(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).numpy()
    ours = extract_features(model, iter(images), batch_size=2, progress=False)
    assert ours.shape == ref.shape == (2, 2048)
    rel = float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
    print(f"pool3 parity: max|ours - torch| / max|torch| = {rel:.2e} (max|torch| {np.max(np.abs(ref)):.3f}, "
          f"mean {ref.mean():.3f})")
    assert np.std(ref) > 1e-2  # features that differ between images and channels, not a degenerate net
    assert rel <= 1e-4


def test_npz_conversion_loads_the_same_weights(reference, model, tmp_path):
    npz = inception.convert_pytorch_fid_weights(reference[1], str(tmp_path / "fid_inception.npz"))
    again = inception.load_pytorch_fid_weights(npz)
    ours, theirs = inception.param_table(model), inception.param_table(again)
    assert ours.keys() == theirs.keys() and len(ours) == 94 * 5
    for key, (variable, _) in ours.items():
        np.testing.assert_array_equal(np.asarray(variable[...]), np.asarray(theirs[key][0][...]), err_msg=key)
    kernel = reference[0].state_dict()["Mixed_6b.branch7x7_2.conv.weight"].numpy()  # OIHW (128, 128, 1, 7)
    np.testing.assert_array_equal(np.asarray(model.Mixed_6b.branch7x7_2.conv.kernel[...]),
                                  kernel.transpose(2, 3, 1, 0))


def test_strict_loading_names_every_problem(reference):
    state = inception.read_state_dict(reference[1])
    del state["Mixed_7c.branch_pool.bn.running_var"]
    state["Mixed_7c.branch_pool.bn.extra"] = np.zeros(3, np.float32)
    state["Conv2d_1a_3x3.conv.weight"] = np.zeros((32, 3, 5, 5), np.float32)
    with pytest.raises(ValueError) as err:
        inception.load_state_dict(inception.abstract_model(), state, "bad.pth")
    msg = str(err.value)
    assert "bad.pth" in msg and "missing keys (1): ['Mixed_7c.branch_pool.bn.running_var']" in msg
    assert "unexpected keys (1): ['Mixed_7c.branch_pool.bn.extra']" in msg
    assert "Conv2d_1a_3x3.conv.weight: got (32, 3, 5, 5), expected (32, 3, 3, 3)" in msg


def test_missing_weights_file_is_a_one_line_error(tmp_path):
    path = str(tmp_path / "nope.pth")
    with pytest.raises(ValueError) as err:
        inception.load_pytorch_fid_weights(path)
    msg = str(err.value)
    assert "\n" not in msg and path in msg and inception.FID_WEIGHTS_URL in msg
    assert "pt_inception-2015-12-05-6726825d.pth" in msg and "load_pytorch_fid_weights" in msg


def test_pth_without_torch_says_how_to_install(reference, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError, match="pip install torch.*convert"):
        inception.read_state_dict(reference[1])
