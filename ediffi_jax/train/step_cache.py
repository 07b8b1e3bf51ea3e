"""Compiled train steps kept for the life of the process.

Several runs in one process — an expert tree's root and children (`train/expert_tree.py`: the σ interval is an
operand, so every expert runs the same program), a notebook that trains again, the tests — would otherwise trace,
lower and compile (or fetch from XLA's persistent cache) the same step once per run. Tracing alone is seconds for
a small model: JAX stages every per-parameter optimizer, clipping and EMA operation.

The key is everything the compiled program depends on: the config without the fields that only steer the loop
(`LOOP_ONLY`), the device mesh (axis names, shape, device ids), the backend, and the abstract arguments (tree
structure, shapes, dtypes, shardings). A config field not listed in `LOOP_ONLY` is part of the key, so a field
added later errs on the side of a recompile, never of a wrong program.
"""

from __future__ import annotations

import collections
import hashlib
import json
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from ediffi_jax.train.checkpoint import config_to_dict

# Config fields the compiled step does not read (the loop's schedule, where data and checkpoints live, which
# expert node: its σ interval is an operand of the step; which parent it starts from: only the initial state).
LOOP_ONLY = (
    "train.num_steps",
    "train.log_every",
    "train.ckpt_every",
    "train.keep_checkpoints",
    "train.eval_num",
    "expert.node",
    "expert.parent",
    "data.data_dir",
)
MAX_ENTRIES = 4

_CACHE: collections.OrderedDict[str, Any] = collections.OrderedDict()
STATS = {"hits": 0, "misses": 0}


def step_key(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *abstract_args: Any) -> str:
    """A digest of what the step compiled for `config` on `mesh` with arguments like `abstract_args` depends on."""
    cfg = config_to_dict(config)
    for dotted in LOOP_ONLY:
        *parents, leaf = dotted.split(".")
        node = cfg
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    leaves, treedef = jax.tree.flatten(abstract_args)
    args = [str(treedef)] + [
        [list(x.shape), str(x.dtype), str(getattr(x, "sharding", None))] for x in leaves
    ]
    payload = {
        "config": cfg,
        "mesh": [list(mesh.axis_names), list(mesh.devices.shape), [int(d.id) for d in mesh.devices.flat]],
        "backend": jax.default_backend(),
        "args": args,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def cached_compile(key: str, compile_fn: Callable[[], Any]) -> tuple[Any, bool]:
    """(the compiled step for `key`, True) if this process compiled it already, else (compile_fn(), False)."""
    if key in _CACHE:
        _CACHE.move_to_end(key)
        STATS["hits"] += 1
        return _CACHE[key], True
    compiled = compile_fn()
    STATS["misses"] += 1
    _CACHE[key] = compiled
    while len(_CACHE) > MAX_ENTRIES:
        _CACHE.popitem(last=False)
    return compiled, False


def clear() -> None:
    """Forgets every kept step (frees their executables)."""
    _CACHE.clear()
