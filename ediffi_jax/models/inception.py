"""InceptionV3 for FID in Flax NNX (NHWC): the network of pytorch-fid, to compute FID comparable with papers.

This is exactly ``pytorch_fid.inception.InceptionV3(output_blocks=[3], use_fid_inception=True)`` (Seitzer,
https://github.com/mseitzer/pytorch-fid, v0.3.0), which ports the TensorFlow Inception graph
``inception-2015-12-05`` that Heusel et al. (2017, arXiv 1706.08500) used for the original FID. It is
torchvision's ``Inception3`` (Szegedy et al. 2016, arXiv 1512.00567) with the FID patches:

* ``Mixed_5b..5d`` (FIDInceptionA), ``Mixed_6b..6e`` (FIDInceptionC) and ``Mixed_7b`` (FIDInceptionE_1) average-pool
  their pool branch with ``count_include_pad=False`` (TensorFlow's average pool ignores the zero padding);
* ``Mixed_7c`` (FIDInceptionE_2) max-pools its pool branch instead (a quirk of the TF graph, kept for parity);
* every conv is bias-free and followed by BatchNorm (eps 0.001, inference mode: running statistics) and ReLU.

Input: float images in [0, 1], NHWC, any size. As pytorch-fid does (``resize_input=True``,
``normalize_input=True``) the network first resizes them to 299×299 with bilinear interpolation as
``torch.nn.functional.interpolate(mode='bilinear', align_corners=False)`` (no antialiasing, also when shrinking;
`resize_bilinear` reproduces it), then maps [0, 1] to [-1, 1]. Output: the 2048-d ``pool3`` features (global
average of ``Mixed_7c``), shape (B, 2048), float32. The 1008-way ``fc`` layer of the weight file is not used.

Weights: `load_pytorch_fid_weights` reads pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a torch
state dict; needs torch) or an ``.npz`` made from it by `convert_pytorch_fid_weights` (needs only NumPy).
Nothing is downloaded. ``python -m ediffi_jax.models.inception SRC.pth DST.npz`` converts on the command line.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ediffi_jax.models.hf_checkpoint import match_strict
from ediffi_jax.tracing import abstract_module

__all__ = [
    "FID_WEIGHTS_URL", "FID_WEIGHTS_FILE", "FEATURE_DIM", "BasicConv2d", "InceptionV3", "resize_bilinear",
    "abstract_model", "param_table", "load_state_dict", "load_pytorch_fid_weights", "convert_pytorch_fid_weights",
    "read_state_dict",
]

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"
FEATURE_DIM = 2048
INPUT_SIZE = 299
_IGNORED_KEYS = ("fc.weight", "fc.bias")  # the classifier of the weight file; pool3 features do not use it

Pair = int | tuple[int, int]


def _pair(v: Pair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


# ---------------------------------------------------------------------------------------------------- layers


def _interp_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out, in) bilinear weights of ``F.interpolate(..., align_corners=False)`` along one axis, computed in
    float32 as ATen's CPU kernel does (``area_pixel_compute_source_index``: src = (dst + ½)·in/out − ½, clamped
    at 0; the upper neighbour clamped at in − 1)."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5),
                     np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    m = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), np.float32(1) - w1)
    np.add.at(m, (rows, i1), w1)
    return m


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of NHWC ``x`` to ``size`` = (H, W), equal to PyTorch's
    ``F.interpolate(x_nchw, size, mode='bilinear', align_corners=False)`` (antialias off). Unlike
    ``jax.image.resize``, which antialiases when shrinking, this samples the two nearest pixels per axis."""
    (h, w), (oh, ow) = x.shape[1:3], size
    if (h, w) == (oh, ow):
        return x  # the interpolation weights are then exactly the identity
    hi = jnp.asarray(_interp_matrix(oh, h))
    wi = jnp.asarray(_interp_matrix(ow, w))
    x = jnp.einsum("oh,bhwc->bowc", hi, x, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("pw,bowc->bopc", wi, x, precision=jax.lax.Precision.HIGHEST)


def _max_pool(x: jax.Array, stride: int, padding: int) -> jax.Array:
    """3×3 max pool (padding with −inf, as torch's ``max_pool2d``)."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad)


def _avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
    """3×3, stride 1, padding 1 average pool that divides by the number of real pixels in each window
    (``F.avg_pool2d(..., count_include_pad=False)``, TensorFlow's ``SAME`` average pool)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pad)
    return total / count


class BasicConv2d(nnx.Module):
    """Bias-free conv → BatchNorm(eps 0.001, running statistics) → ReLU (torchvision's ``BasicConv2d``)."""

    def __init__(self, cin: int, cout: int, kernel: Pair, stride: Pair = 1, padding: Pair = 0, *,
                 precision: Any = None, rngs: nnx.Rngs):
        ph, pw = _pair(padding)
        self.conv = nnx.Conv(cin, cout, _pair(kernel), _pair(stride), padding=((ph, ph), (pw, pw)),
                             use_bias=False, precision=precision, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=1e-3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


class _Block(nnx.Module):
    """Holds BasicConv2d branches built from ``name: (cin, cout, kernel, stride, padding)`` specs."""

    def _convs(self, specs: Mapping[str, tuple], precision: Any, rngs: nnx.Rngs) -> None:
        for name, (cin, cout, kernel, *rest) in specs.items():
            setattr(self, name, BasicConv2d(cin, cout, kernel, *rest, precision=precision, rngs=rngs))


class FIDInceptionA(_Block):
    """35×35 block: 1×1, 5×5, double 3×3 and (count_include_pad=False) average-pool branches."""

    def __init__(self, cin: int, pool_features: int, *, precision: Any = None, rngs: nnx.Rngs):
        self._convs({"branch1x1": (cin, 64, 1), "branch5x5_1": (cin, 48, 1), "branch5x5_2": (48, 64, 5, 1, 2),
                     "branch3x3dbl_1": (cin, 64, 1), "branch3x3dbl_2": (64, 96, 3, 1, 1),
                     "branch3x3dbl_3": (96, 96, 3, 1, 1), "branch_pool": (cin, pool_features, 1)}, precision, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_exclude_pad(x))], -1)


class InceptionB(_Block):
    """35→17 reduction: strided 3×3, strided double 3×3 and max-pool branches (``Mixed_6a``)."""

    def __init__(self, cin: int, *, precision: Any = None, rngs: nnx.Rngs):
        self._convs({"branch3x3": (cin, 384, 3, 2), "branch3x3dbl_1": (cin, 64, 1),
                     "branch3x3dbl_2": (64, 96, 3, 1, 1), "branch3x3dbl_3": (96, 96, 3, 2)}, precision, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, _max_pool(x, 2, 0)], -1)


class FIDInceptionC(_Block):
    """17×17 block with factorised 7×7 convolutions and a (count_include_pad=False) average-pool branch."""

    def __init__(self, cin: int, channels_7x7: int, *, precision: Any = None, rngs: nnx.Rngs):
        c = channels_7x7
        row, col = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
        self._convs({"branch1x1": (cin, 192, 1),
                     "branch7x7_1": (cin, c, 1), "branch7x7_2": (c, c, *row), "branch7x7_3": (c, 192, *col),
                     "branch7x7dbl_1": (cin, c, 1), "branch7x7dbl_2": (c, c, *col), "branch7x7dbl_3": (c, c, *row),
                     "branch7x7dbl_4": (c, c, *col), "branch7x7dbl_5": (c, 192, *row),
                     "branch_pool": (cin, 192, 1)}, precision, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = conv(d)
        return jnp.concatenate([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_exclude_pad(x))], -1)


class InceptionD(_Block):
    """17→8 reduction: strided 3×3, 7×7-then-strided-3×3 and max-pool branches (``Mixed_7a``)."""

    def __init__(self, cin: int, *, precision: Any = None, rngs: nnx.Rngs):
        self._convs({"branch3x3_1": (cin, 192, 1), "branch3x3_2": (192, 320, 3, 2),
                     "branch7x7x3_1": (cin, 192, 1), "branch7x7x3_2": (192, 192, (1, 7), 1, (0, 3)),
                     "branch7x7x3_3": (192, 192, (7, 1), 1, (3, 0)), "branch7x7x3_4": (192, 192, 3, 2)},
                    precision, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, _max_pool(x, 2, 0)], -1)


class FIDInceptionE(_Block):
    """8×8 block with split 1×3 / 3×1 branches. ``pool="avg"``: FIDInceptionE_1 (``Mixed_7b``, average pool
    without the padding); ``pool="max"``: FIDInceptionE_2 (``Mixed_7c``, 3×3 stride-1 max pool)."""

    def __init__(self, cin: int, pool: str, *, precision: Any = None, rngs: nnx.Rngs):
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        row, col = ((1, 3), 1, (0, 1)), ((3, 1), 1, (1, 0))
        self._convs({"branch1x1": (cin, 320, 1), "branch3x3_1": (cin, 384, 1), "branch3x3_2a": (384, 384, *row),
                     "branch3x3_2b": (384, 384, *col), "branch3x3dbl_1": (cin, 448, 1),
                     "branch3x3dbl_2": (448, 384, 3, 1, 1), "branch3x3dbl_3a": (384, 384, *row),
                     "branch3x3dbl_3b": (384, 384, *col), "branch_pool": (cin, 192, 1)}, precision, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool_exclude_pad(x) if self.pool == "avg" else _max_pool(x, 1, 1)
        return jnp.concatenate([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                                self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], -1)


class InceptionV3(nnx.Module):
    """pytorch-fid's FID InceptionV3 up to ``pool3``: float NHWC images in [0, 1] → (B, 2048) features.

    Attribute names follow torchvision's ``Inception3`` (``Conv2d_1a_3x3``, ``Mixed_5b``, ... ``Mixed_7c``), so
    a state-dict key ``Mixed_6b.branch7x7_2.conv.weight`` is the variable ``model.Mixed_6b.branch7x7_2.conv
    .kernel``. ``resize_input`` / ``normalize_input`` are pytorch-fid's flags (both on for FID). ``precision``
    is the conv precision (default ``HIGHEST``: float32 convolutions also on GPUs/TPUs, no TF32/bf16 passes).
    """

    def __init__(self, *, resize_input: bool = True, normalize_input: bool = True,
                 precision: Any = jax.lax.Precision.HIGHEST, rngs: nnx.Rngs):
        self.resize_input = resize_input
        self.normalize_input = normalize_input
        kw = dict(precision=precision, rngs=rngs)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, 2, **kw)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, 1, 1, **kw)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
        self.Mixed_5b = FIDInceptionA(192, 32, **kw)
        self.Mixed_5c = FIDInceptionA(256, 64, **kw)
        self.Mixed_5d = FIDInceptionA(288, 64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = FIDInceptionC(768, 128, **kw)
        self.Mixed_6c = FIDInceptionC(768, 160, **kw)
        self.Mixed_6d = FIDInceptionC(768, 160, **kw)
        self.Mixed_6e = FIDInceptionC(768, 192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = FIDInceptionE(1280, "avg", **kw)
        self.Mixed_7c = FIDInceptionE(2048, "max", **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"InceptionV3 expects NHWC RGB images, got shape {x.shape}")
        x = x.astype(jnp.float32)
        if self.resize_input:
            x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
        if self.normalize_input:
            x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(_max_pool(x, 2, 0)))
        x = _max_pool(x, 2, 0)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return jnp.mean(x, axis=(1, 2))  # adaptive average pool to 1×1: pool3


# ---------------------------------------------------------------------------------------------------- weights


def param_table(model: InceptionV3) -> dict[str, tuple[nnx.Variable, bool]]:
    """pytorch-fid state-dict key → (our variable, whether it is a conv kernel stored OIHW in torch)."""
    table: dict[str, tuple[nnx.Variable, bool]] = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, BasicConv2d):
            prefix = ".".join(str(p) for p in path)
            table[f"{prefix}.conv.weight"] = (module.conv.kernel, True)
            for torch_name, ours in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"),
                                     ("running_var", "var")):
                table[f"{prefix}.bn.{torch_name}"] = (getattr(module.bn, ours), False)
    return table


def _match(model: InceptionV3, state: Mapping[str, Any], source: str) -> list[tuple[nnx.Variable, np.ndarray]]:
    """(variable, value in our layout) for every entry of `param_table`, or one ValueError listing every
    missing key, unexpected key and shape mismatch (shapes in the torch layout)."""

    def convert(raw: np.ndarray, is_kernel: bool) -> np.ndarray:
        raw = raw.astype(np.float32)
        return np.transpose(raw, (2, 3, 1, 0)) if is_kernel and raw.ndim == 4 else raw

    targets = {}
    for key, (variable, is_kernel) in param_table(model).items():
        shape = tuple(variable.shape)
        targets[key] = (variable, lambda raw, k=is_kernel: convert(raw, k),
                        (shape[3], shape[2], shape[0], shape[1]) if is_kernel else shape)
    arrays = {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked") and k not in _IGNORED_KEYS}
    return match_strict(arrays, targets, f"cannot load the FID InceptionV3 weights from {source}")


def abstract_model(**kwargs: Any) -> InceptionV3:
    """The model with shapes only (``nnx.eval_shape``, no random init, which costs tens of seconds eagerly):
    `load_state_dict` then fills every variable. ``kwargs`` are `InceptionV3`'s."""
    return abstract_module(lambda: InceptionV3(**kwargs, rngs=nnx.Rngs(0)))


def load_state_dict(model: InceptionV3, state: Mapping[str, Any], source: str = "state dict") -> InceptionV3:
    """Copies a pytorch-fid / torchvision ``Inception3`` state dict (name → array, torch layout) into
    ``model`` strictly: one ValueError lists every missing key, unexpected key and shape mismatch, and nothing
    is written unless everything fits. ``*.num_batches_tracked`` and the unused ``fc.*`` classifier are
    accepted and ignored. Returns ``model``."""
    for variable, value in _match(model, state, source):
        variable.set_value(jnp.asarray(value, dtype=variable.dtype))
    return model


def _missing_file_message(path: str) -> str:
    return (f"FID Inception weights file {path!r} not found: download {FID_WEIGHTS_FILE} from {FID_WEIGHTS_URL} "
            f"(pytorch-fid's release) and pass its path (or an .npz made by convert_pytorch_fid_weights) to "
            f"load_pytorch_fid_weights")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """name → float32 NumPy array (torch layout) from pytorch-fid's ``.pth`` (needs torch, read with
    ``weights_only=True``) or from an ``.npz`` written by `convert_pytorch_fid_weights` (NumPy only)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(_missing_file_message(path))
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"reading {path} (a PyTorch state dict) needs torch: `pip install torch --index-url "
            "https://download.pytorch.org/whl/cpu` (the CPU build is enough), or convert it once with "
            "`python -m ediffi_jax.models.inception SRC.pth DST.npz` where torch is installed and pass the .npz"
        ) from err
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict (name → tensor), got {type(state).__name__}")
    return {k: v.detach().float().cpu().numpy() for k, v in state.items()
            if isinstance(v, torch.Tensor) and not k.endswith(".num_batches_tracked")}


def convert_pytorch_fid_weights(src: str, dst: str) -> str:
    """Writes pytorch-fid's ``.pth`` weights (``src``) as an ``.npz`` of float32 arrays under the same names
    (``dst``), which `load_pytorch_fid_weights` reads without torch. Returns ``dst``."""
    state = read_state_dict(src)
    _match(abstract_model(), state, src)  # the same strict check as loading: never write a file that won't load
    with open(dst, "wb") as f:
        np.savez(f, **state)
    return dst


def load_pytorch_fid_weights(path: str, *, resize_input: bool = True, normalize_input: bool = True,
                             precision: Any = jax.lax.Precision.HIGHEST) -> InceptionV3:
    """The FID InceptionV3 with pytorch-fid's weights read from ``path``: ``pt_inception-2015-12-05-6726825d
    .pth`` (from `FID_WEIGHTS_URL`; reading it needs torch) or its `convert_pytorch_fid_weights` ``.npz``.
    Never downloads. Raises ValueError for a missing file or a state dict that does not fit exactly."""
    state = read_state_dict(path)
    model = abstract_model(resize_input=resize_input, normalize_input=normalize_input, precision=precision)
    return load_state_dict(model, state, os.fspath(path))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert pytorch-fid's Inception weights (.pth) to .npz.")
    parser.add_argument("src", help=f"path of {FID_WEIGHTS_FILE} (from {FID_WEIGHTS_URL})")
    parser.add_argument("dst", help="output .npz")
    args = parser.parse_args(argv)
    print(convert_pytorch_fid_weights(args.src, args.dst))


if __name__ == "__main__":
    main()
