"""The train step on a device mesh: mesh from config, shardings of the whole train state, global batches.

    config.mesh          {data, fsdp, tensor} sizes (-1 = the remaining devices) x {dcn_data, dcn_fsdp, dcn_tensor}
    config.distributed   {initialize, coordinator_address, num_processes, process_id} → jax.distributed

Every Variable of the train state — parameters, EMA and the optimizer's moments (optax keeps the parameters'
`nnx.Variable` wrappers, logical axis names included) — is sharded by the logical-axis rules of
`ediffi_jax.sharding`; everything else (step, optimizer counts, RNG key) is replicated. The batch is split on its
leading axis over ("data", "fsdp"). Each process feeds its own block of every global batch
(`global_batch`, `jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ediffi_jax.sharding import (
    DEFAULT_RULES,
    MESH_AXES,
    Rules,
    batch_sharding,
    logical_to_spec,
    make_mesh,
    resolve_sizes,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Processes and the mesh.
# ----------------------------------------------------------------------------------------------------------
def initialize_distributed(config: ml_collections.ConfigDict) -> bool:
    """`jax.distributed.initialize` when `config.distributed.initialize` (once per process; unset fields are
    auto-detected by JAX on TPU VMs and under SLURM). Must run before anything touches devices. Returns whether
    this process is (now) part of a distributed run."""
    d = config.get("distributed")
    if not d or not d.get("initialize", False):
        return jax.distributed.is_initialized()
    if not jax.distributed.is_initialized():
        jax.distributed.initialize(
            coordinator_address=d.coordinator_address or None,
            num_processes=d.num_processes if d.num_processes > 0 else None,
            process_id=d.process_id if d.process_id >= 0 else None)
        log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return True


def _mesh_entry(cfg: Mapping[str, Any], key: str, default: int) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"config.mesh.{key}={value!r} is not an integer")
    return int(value)


def mesh_from_config(cfg: Mapping[str, Any] | None, devices: Sequence[Any] | None = None) -> Mesh:
    """The ("data", "fsdp", "tensor") mesh of `config.mesh` over `devices` (default: all of them).

    With all `dcn_*` factors 1 it is `ediffi_jax.sharding.make_mesh`. Otherwise the devices are grouped into
    granules — TPU slices, or processes when all devices are on one slice (GPU clusters, CPU) — and the ICI
    sizes lay out each granule while the DCN factors lay out the granules
    (`mesh_utils.create_hybrid_device_mesh`), so collectives over an axis with DCN factor 1 never leave a
    granule. Bad sizes raise one ValueError line.
    """
    cfg = cfg or {}
    devices = list(jax.devices() if devices is None else devices)
    ici = {a: _mesh_entry(cfg, a, -1 if a == "data" else 1) for a in MESH_AXES}
    dcn = {a: _mesh_entry(cfg, f"dcn_{a}", 1) for a in MESH_AXES}
    bad = [f"dcn_{a}={v}" for a, v in dcn.items() if v < 1]
    if bad:
        raise ValueError(f"config.mesh: DCN factors must be >= 1, got {', '.join(bad)}")
    granules = math.prod(dcn.values())
    try:
        if granules == 1:
            return make_mesh(**ici, devices=devices)
        if len(devices) % granules:
            raise ValueError(f"device count {len(devices)} is not divisible by the DCN factors {dcn}")
        ici = resolve_sizes(ici, len(devices) // granules, per_granule=True)
    except ValueError as e:
        raise ValueError(f"config.mesh: {e}") from None
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    processes = len({d.process_index for d in devices})
    by_process = slices == 1  # no multi-slice topology (GPU clusters, CPU): the processes are the granules
    if (processes if by_process else slices) != granules:
        raise ValueError(f"config.mesh: DCN factors {dcn} need {granules} slices or processes; the devices span "
                         f"{slices} slice(s) in {processes} process(es)")
    ici_shape = tuple(ici[a] for a in MESH_AXES)
    grid = mesh_utils.create_hybrid_device_mesh(ici_shape, tuple(dcn[a] for a in MESH_AXES), devices,
                                                process_is_granule=by_process)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh: Mesh | Mapping[str, int]) -> int:
    """Number of batch shards: the product of the "data" and "fsdp" axis sizes."""
    shape = dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)
    return shape.get("data", 1) * shape.get("fsdp", 1)


def check_batch_size(batch_size: int, mesh: Mesh | Mapping[str, int], process_count: int | None = None) -> int:
    """This process's share of a global batch of `batch_size`; one ValueError line when it does not split."""
    n = data_parallel_size(mesh)
    if batch_size % n:
        raise ValueError(f"train.batch_size={batch_size} is not divisible by the data x fsdp mesh size {n}")
    processes = jax.process_count() if process_count is None else process_count
    if batch_size % processes:
        raise ValueError(f"train.batch_size={batch_size} is not divisible by the {processes} processes")
    return batch_size // processes


# ----------------------------------------------------------------------------------------------------------
# Shardings of the train state.
# ----------------------------------------------------------------------------------------------------------
def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """`tree` (concrete or abstract) with every leaf replaced by its `NamedSharding` on `mesh`: a Variable's
    from its logical axis names (`out_sharding` metadata) through `rules`; any other leaf replicated.

    Works on a whole `TrainState`: optax states hold the parameters' Variables (with their metadata), so the
    AdamW moments get the parameters' shardings and the step counts are replicated.
    """
    def one(x: Any) -> Any:
        if _is_var(x):
            names = x.get_metadata().get("out_sharding")
            return x.replace(NamedSharding(mesh, logical_to_spec(names, np.shape(x.get_value()), mesh, rules)))
        return replicated(mesh)

    return jax.tree.map(one, tree, is_leaf=_is_var)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `abstract` (arrays or structs) carrying `shardings` (same tree): the target of a
    sharded Orbax restore and the arguments of an ahead-of-time `lower`."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s), abstract, shardings)


def shard_params(params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """`params` placed on `mesh` by the rules (frozen encoders: every process passes the same values)."""
    if jax.process_count() > 1:  # device_put onto other processes' devices takes host values, not local arrays
        params = jax.device_get(params)
    return jax.device_put(params, tree_shardings(params, mesh, rules))


# ----------------------------------------------------------------------------------------------------------
# Global batches.
# ----------------------------------------------------------------------------------------------------------
def batch_shardings(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, NamedSharding]:
    return {k: batch_sharding(mesh, np.ndim(v)) for k, v in local.items()}


def abstract_batch(local: Mapping[str, np.ndarray], mesh: Mesh, process_count: int | None = None) -> dict:
    """ShapeDtypeStructs of the global batch built from this process's `local` block (for `lower`)."""
    n = jax.process_count() if process_count is None else process_count
    return {k: jax.ShapeDtypeStruct((np.shape(v)[0] * n, *np.shape(v)[1:]), np.asarray(v).dtype,
                                    sharding=batch_sharding(mesh, np.ndim(v))) for k, v in local.items()}


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from each process's block of the batch (process i holds rows i*b .. (i+1)*b - 1)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in local.items()}


# ----------------------------------------------------------------------------------------------------------
# Compiled-step diagnostics.
# ----------------------------------------------------------------------------------------------------------
def memory_summary(compiled: Any) -> dict[str, int] | None:
    """Per-device bytes of a compiled step (arguments, outputs, temporaries, aliased), or None when the backend
    reports none."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, AttributeError):
        return None
    if stats is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes")
    out = {f.removesuffix("_size_in_bytes"): int(getattr(stats, f, 0) or 0) for f in fields}
    # Donated inputs alias their outputs: the live peak is arguments + outputs - aliased + temporaries.
    out["peak_estimate"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def log_memory(compiled: Any, what: str = "train step") -> dict[str, int] | None:
    m = memory_summary(compiled)
    if m is None:
        log.info("%s: the backend reports no memory analysis", what)
        return None
    gib = 2.0**30
    log.info("%s memory per device: arguments %.3f GiB, outputs %.3f GiB (aliased %.3f GiB), temporaries "
             "%.3f GiB, peak ~%.3f GiB", what, m["argument"] / gib, m["output"] / gib, m["alias"] / gib,
             m["temp"] / gib, m["peak_estimate"] / gib)
    return m


def describe_mesh(mesh: Mesh) -> str:
    return " x ".join(f"{a} {n}" for a, n in mesh.shape.items()) + f" ({mesh.size} devices)"
