"""Pool3 features of our FID InceptionV3 vs the pytorch-fid package itself (0.3.0, with torchvision 0.28.0).

The weights are random (no FID weights file ships with any package): the state dict saved by
tests/test_inception.py's reference fixture is what pytorch-fid's ``fid_inception_v3`` loads (its download is
replaced by reading that file) and what our importer converts, so both networks hold the same numbers.

pytorch-fid runs in a subprocess with ``.venv/reference`` on its path (tests/reference-requirements.txt, installed
by `make test`), never in the suite's process: torchvision's PyPI wheels are CUDA builds whose C extension (NMS,
RoI ops) does not load next to the CPU torch, so importing torchvision fails in ``torchvision._meta_registrations``
(meta kernels for those missing ops) and, were it importable from the suite, transformers' torch CLIP would fail
with it. The Inception modules pytorch-fid uses are pure PyTorch, so the subprocess imports torchvision with that
one submodule stubbed out; nothing else of torchvision is replaced.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from multidevice import REPO
from test_inception import model, reference  # noqa: F401  (its module-scoped fixtures, reused)

from ediffi_jax.eval.fid import extract_features

torch = pytest.importorskip("torch")

REFERENCE_SITE = os.path.join(REPO, ".venv", "reference")

_PYTORCH_FID = """
import json, sys, types
import numpy as np, torch
sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
import pytorch_fid, torchvision
from pytorch_fid import inception as pfi
weights, images, out = sys.argv[1:4]
pfi.load_state_dict_from_url = lambda url, **_: torch.load(weights, map_location="cpu", weights_only=True)
# InceptionV3's defaults are those of pytorch-fid's FID computation: pool3 block, resize to 299, [0,1] -> [-1,1].
net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
keys = {k: list(v.shape) for k, v in net.blocks.state_dict().items()}
x = np.load(images)
with torch.no_grad():
    feats = net(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)[0].squeeze(-1).squeeze(-1).numpy()
np.save(out, feats)
print(json.dumps({"pytorch_fid": pytorch_fid.__version__, "torchvision": torchvision.__version__, "keys": keys}))
"""


@pytest.fixture(scope="module")
def pytorch_fid_run(reference, tmp_path_factory):  # noqa: F811
    if not os.path.isdir(os.path.join(REFERENCE_SITE, "pytorch_fid")):
        pytest.fail(f"{REFERENCE_SITE} lacks pytorch-fid: run `make test`, or `.venv/bin/pip install --no-deps "
                    f"--target {REFERENCE_SITE} -r tests/reference-requirements.txt`")
    d = tmp_path_factory.mktemp("pytorch_fid")
    rng = np.random.default_rng(3)
    images = {hw: rng.integers(0, 256, (2, *hw, 3), dtype=np.uint8) for hw in [(80, 96), (299, 299)]}
    env = {**os.environ, "PYTHONPATH": REFERENCE_SITE}
    feats, info = {}, None
    for hw, x in images.items():
        np.save(d / f"images_{hw[0]}.npy", x)
        proc = subprocess.run([sys.executable, "-c", _PYTORCH_FID, reference[1], str(d / f"images_{hw[0]}.npy"),
                               str(d / f"feats_{hw[0]}.npy")], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        feats[hw] = np.load(d / f"feats_{hw[0]}.npy")
    return images, feats, info


@pytest.mark.parametrize("hw", [(80, 96), (299, 299)])
def test_pool3_features_match_the_pytorch_fid_package(pytorch_fid_run, model, hw):  # noqa: F811
    images, feats, info = pytorch_fid_run
    assert (info["pytorch_fid"], info["torchvision"].split("+")[0]) == ("0.3.0", "0.28.0")
    ref = feats[hw]
    ours = extract_features(model, images[hw], batch_size=2, progress=False)
    assert ours.shape == ref.shape == (2, 2048)
    rel = float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
    print(f"pytorch-fid package parity at {hw}: max|ours - pytorch_fid| / max|pytorch_fid| = {rel:.2e}")
    assert np.std(ref) > 1e-2
    assert rel <= 1e-4


def test_the_state_dict_is_the_one_pytorch_fid_loads(pytorch_fid_run, reference):  # noqa: F811
    """The random file has the shapes of pytorch-fid's network (pytorch-fid loads it strictly into torchvision's
    Inception3, then splits that into 4 nn.Sequential blocks whose state dict is the file's minus ``fc.*``), so the
    real weights file converts with our importer too."""
    theirs = pytorch_fid_run[2]["keys"]
    ours = {k: list(v.shape) for k, v in torch.load(reference[1], weights_only=True).items()}
    assert len(ours) > 300
    assert sorted(theirs.values()) == sorted(v for k, v in ours.items() if not k.startswith("fc."))
