"""Pool3 features of our FID InceptionV3 vs the pytorch-fid package itself (0.3.0, with torchvision 0.28.0).

The weights are random (no FID weights file ships with any package): the state dict saved by
tests/test_inception.py's reference fixture is what pytorch-fid's ``fid_inception_v3`` loads (its download is
replaced by reading that file) and what our importer converts, so both networks hold the same numbers.

torchvision's PyPI wheels are CUDA builds: their C extension (NMS, RoI ops) does not load next to the CPU torch of
this venv, and importing torchvision then fails in ``torchvision._meta_registrations`` (meta kernels for those
missing ops). The Inception modules pytorch-fid uses are pure PyTorch, so the test imports torchvision with that
one submodule stubbed out; nothing else of torchvision is replaced.
"""

import importlib
import sys
import types

import numpy as np
import pytest
from test_inception import model, reference  # noqa: F401  (its module-scoped fixtures, reused)

from ediffi_jax.eval.fid import extract_features
from ediffi_jax.models import inception

torch = pytest.importorskip("torch")


def import_pytorch_fid() -> types.ModuleType:
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:  # "operator torchvision::nms does not exist": the CUDA wheel's C ops are missing
        assert "torchvision::" in str(e), e
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision  # noqa: F401
    return importlib.import_module("pytorch_fid.inception")


@pytest.fixture(scope="module")
def pytorch_fid_net(reference, monkeypatch_module):  # noqa: F811
    pfi = import_pytorch_fid()
    _, path = reference
    monkeypatch_module.setattr(pfi, "load_state_dict_from_url",
                               lambda url, **_: torch.load(path, map_location="cpu", weights_only=True))
    # InceptionV3's defaults are those of pytorch-fid's FID computation: pool3 block, resize to 299, [0,1]→[-1,1].
    return pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.mark.parametrize("hw", [(80, 96), (299, 299)])
def test_pool3_features_match_the_pytorch_fid_package(pytorch_fid_net, model, hw):  # noqa: F811
    images = np.random.default_rng(3).integers(0, 256, (2, *hw, 3), dtype=np.uint8)
    with torch.no_grad():
        ref = pytorch_fid_net(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)[0]
    ref = ref.squeeze(-1).squeeze(-1).numpy()
    ours = extract_features(model, iter(images), batch_size=2, progress=False)
    assert ours.shape == ref.shape == (2, 2048)
    rel = float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
    print(f"pytorch-fid package parity at {hw}: max|ours - pytorch_fid| / max|pytorch_fid| = {rel:.2e}")
    assert np.std(ref) > 1e-2
    assert rel <= 1e-4


def test_the_state_dict_is_the_one_pytorch_fid_loads(pytorch_fid_net, reference):  # noqa: F811
    """The random file has exactly the keys and shapes of pytorch-fid's network (so the real weights file, which
    pytorch-fid loads strictly into this network, converts with our importer too)."""
    theirs = {k: tuple(v.shape) for k, v in pytorch_fid_net.blocks.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in torch.load(reference[1], weights_only=True).items()}
    assert len(ours) > 300
    assert inception.FID_WEIGHTS_FILE.endswith(".pth")
    # pytorch-fid splits the torchvision network into 4 nn.Sequential blocks; its state dict is the file's minus fc.
    assert sorted(theirs.values()) == sorted(v for k, v in ours.items() if not k.startswith("fc."))
