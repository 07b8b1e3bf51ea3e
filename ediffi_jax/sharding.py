"""Logical axis names → a ("data", "fsdp", "tensor") device mesh.

Every parameter carries logical axis names in its ``out_sharding`` metadata (e.g. ("embed", "mlp")). A rule
table maps each logical name to mesh axes; :func:`logical_to_spec` turns one variable's names into a
``PartitionSpec``, leaving a dimension replicated when its size does not divide the mesh axes (tiny configs,
77 text positions, 3 RGB channels) and never using a mesh axis twice in one spec. Works on a real ``Mesh``,
a ``jax.sharding.AbstractMesh`` or a plain ``{"fsdp": 8}`` dict, so memory per device can be planned for a
256-chip pod on one CPU (``python -m ediffi_jax.sharding --model t5-xxl --mesh fsdp=256``).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ediffi_jax.tracing import abstract_module

MESH_AXES = ("data", "fsdp", "tensor")
MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]
MeshLike = Mesh | AbstractMesh | Mapping[str, int]

# FSDP (ZeRO-3) shards every weight on its model-width ("embed") dimension over "fsdp" and gathers it just
# before use, so the fsdp axis divides parameter and optimizer memory while also splitting the batch.
# Tensor parallelism (Megatron) splits the wide inner dimensions over "tensor": q/k/v are column-parallel
# and the output projection row-parallel on "heads", likewise the MLP on "mlp", and the vocabulary rows of
# the token embedding. "context" is the input width of cross-attention k/v (an embed-like axis) → fsdp.
# Convolution kernels put output channels on "fsdp" and input channels on "tensor", so both axes divide
# the U-Net's (conv-dominated) memory; under jit XLA gathers such a kernel before use, as FSDP does. Norm
# scales/biases and the T5 relative-position table are tiny and stay replicated. The first rule for a name
# whose mesh axes are unused in that spec and divide the dimension wins; otherwise it is replicated.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("context", "fsdp"),
    ("conv_out", "fsdp"),
    ("conv_in", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("rel_buckets", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over ``devices`` (default all); ``-1`` takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_sizes({"data": data, "fsdp": fsdp, "tensor": tensor}, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def resolve_sizes(sizes: Mapping[str, int], n: int, per_granule: bool = False) -> dict[str, int]:
    """Axis sizes over `n` devices, at most one -1 taking the rest; one-line errors naming the bad sizes.
    `per_granule`: `n` counts the devices of one slice/process of a hybrid mesh (said so in the messages)."""
    sizes = dict(sizes)
    free = [k for k, v in sizes.items() if v == -1]
    bad = [f"{k}={v}" for k, v in sizes.items() if v == 0 or v < -1]
    if bad or len(free) > 1:
        raise ValueError(f"mesh sizes must be positive (at most one -1), got {', '.join(bad or free)}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n % fixed:
            prefix = "per-granule device" if per_granule else "device"
            raise ValueError(f"{prefix} count {n} is not divisible by the fixed mesh sizes {sizes}")
        sizes[free[0]] = n // fixed
    if math.prod(sizes.values()) != n:
        suffix = "devices per granule" if per_granule else "devices"
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} {suffix}, have {n}")
    return sizes


def _axis_sizes(mesh: MeshLike) -> dict[str, int]:
    return dict(mesh.shape) if isinstance(mesh, Mesh | AbstractMesh) else {k: int(v) for k, v in mesh.items()}


def logical_to_spec(
    names: Sequence[str | None] | None, shape: Sequence[int], mesh: MeshLike, rules: Rules = DEFAULT_RULES
) -> P:
    """``PartitionSpec`` for an array of ``shape`` whose dimensions have logical ``names`` (None = replicated).

    Rules are tried in order: the first for a name whose mesh axes (those present in ``mesh``) are unused so
    far in this spec and whose size product divides the dimension wins. A ``None`` rule, a name with no
    rule, or no fitting rule leaves the dimension replicated.
    """
    if names is None:
        return P()
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
    sizes, used, spec = _axis_sizes(mesh), set(), []
    for name, dim in zip(names, shape):
        chosen = None
        for logical, axes in rules:
            if name is None or logical != name:
                continue
            if axes is None:  # an explicit "replicate" rule ends the search
                break
            axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a in sizes)
            if axes and not used & set(axes) and dim % math.prod(sizes[a] for a in axes) == 0:
                chosen = axes
                break
        if chosen:
            used.update(chosen)
            spec.append(chosen[0] if len(chosen) == 1 else chosen)
        else:
            spec.append(None)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _var_spec(v: nnx.Variable, mesh: MeshLike, rules: Rules) -> P:
    value = v.get_value()
    return logical_to_spec(v.get_metadata().get("out_sharding"), np.shape(value), mesh, rules)


def param_specs(state: nnx.State, mesh: MeshLike, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """``state`` (concrete or from ``nnx.eval_shape``) with each Variable's value replaced by its spec."""
    return jax.tree.map(lambda v: v.replace(_var_spec(v, mesh, rules)), state, is_leaf=_is_var)


def param_shardings(state: nnx.State, mesh: Mesh | AbstractMesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """Like :func:`param_specs`, with ``NamedSharding`` values (usable as ``jax.jit`` in/out_shardings)."""
    return jax.tree.map(lambda v: v.replace(NamedSharding(mesh, _var_spec(v, mesh, rules))), state, is_leaf=_is_var)


def shard_state(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """``state`` with every array ``jax.device_put`` onto its ``NamedSharding`` on ``mesh``."""
    return jax.device_put(state, param_shardings(state, mesh, rules))


def batch_sharding(mesh: Mesh | AbstractMesh, ndim: int) -> NamedSharding:
    """Shards the leading (batch) dimension of an ``ndim``-array over ("data", "fsdp"); the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def bytes_per_device(state: nnx.State, mesh: MeshLike, rules: Rules = DEFAULT_RULES) -> dict[str, int]:
    """Bytes of ``state`` in total and per device under ``rules``, from shapes and dtypes only.

    Returns ``total``, ``per_device_max``, ``per_device_mean`` and ``replicated`` (bytes of arrays kept
    whole on every device). Each array is either replicated or split evenly, so all devices hold the same
    bytes and max == mean; both are kept so callers need not rely on it.
    """
    sizes = _axis_sizes(mesh)
    total = per_device = replicated = 0
    for v in jax.tree.leaves(state, is_leaf=_is_var):
        value = v.get_value() if _is_var(v) else v
        shape, itemsize = np.shape(value), value.dtype.itemsize  # also for RNG-key dtypes
        spec = _var_spec(v, sizes, rules) if _is_var(v) else P()
        shard = list(shape)
        for i, axes in enumerate(spec):
            for a in (axes,) if isinstance(axes, str) else axes or ():
                shard[i] //= sizes[a]
        full, part = math.prod(shape) * itemsize, math.prod(shard) * itemsize
        total, per_device = total + full, per_device + part
        replicated += full if part == full else 0
    return dict(total=total, per_device_max=per_device, per_device_mean=per_device, replicated=replicated)


# ----------------------------------------------------------------------------------------------------------
# CLI: plan parameter memory per device for a model on a simulated mesh.
# ----------------------------------------------------------------------------------------------------------
def _abstract_model(model: str, config: str | None) -> nnx.Module:
    from ediffi_jax.models import clip, t5, unet

    builders = {
        "t5-xxl": lambda: t5.T5Encoder(t5.T5Config.xxl(), rngs=nnx.Rngs(0)),
        "clip-text-l14": lambda: clip.CLIPTextEncoder(clip.CLIPTextConfig.large(), rngs=nnx.Rngs(0)),
        "clip-vision-l14": lambda: clip.CLIPVisionEncoder(clip.CLIPVisionConfig.large(), rngs=nnx.Rngs(0)),
        "unet-base": lambda: unet.UNet(unet.unet_config(), rngs=nnx.Rngs(0)),
    }
    if config is not None:
        from ediffi_jax.cli.common import load_config_file
        from ediffi_jax.models.conditioning import ConditionedUNet

        cfg = load_config_file(config)
        return abstract_module(lambda: ConditionedUNet(cfg, rngs=nnx.Rngs(0)))
    return abstract_module(builders[model])


def _parse_mesh(text: str) -> dict[str, int]:
    sizes = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in MESH_AXES or key in sizes or not value.isdigit() or int(value) < 1:
            raise ValueError(f"bad --mesh entry {item!r}: expected AXIS=N, AXIS one of {MESH_AXES} once, N >= 1")
        sizes[key] = int(value)
    return sizes


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        """One line on stderr, exit status 2 (no usage block)."""
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ediffi_jax.sharding --model t5-xxl --mesh fsdp=8``: parameter bytes per device."""
    parser = _Parser(prog="python -m ediffi_jax.sharding", description=main.__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--model", choices=("t5-xxl", "clip-text-l14", "clip-vision-l14", "unet-base"))
    group.add_argument("--config", help="experiment config file (configs/*.py): its ConditionedUNet")
    parser.add_argument("--mesh", default="fsdp=8", help="simulated mesh, e.g. fsdp=8 or data=2,fsdp=4,tensor=2")
    args = parser.parse_args(argv)
    try:
        sizes = _parse_mesh(args.mesh)
        abstract = _abstract_model(args.model, args.config)
    except ValueError as err:
        parser.error(str(err))
    params = jax.tree.leaves(nnx.state(abstract, nnx.Param), is_leaf=_is_var)
    count = sum(math.prod(np.shape(v.get_value())) for v in params)
    b = bytes_per_device(nnx.state(abstract), sizes)
    gib = 2.0**30
    print(f"model {args.model or args.config}  mesh {sizes} ({math.prod(sizes.values())} devices)")
    print(f"parameters        {count:,}")
    print(f"total bytes       {b['total'] / gib:.3f} GiB")
    print(f"per device (max)  {b['per_device_max'] / gib:.3f} GiB  (mean {b['per_device_mean'] / gib:.3f} GiB)")
    print(f"replicated        {b['replicated'] / gib:.4f} GiB")
    print(f"per_device/total  {b['per_device_max'] / b['total']:.4f}")


if __name__ == "__main__":
    main()
