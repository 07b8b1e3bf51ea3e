"""Orbax checkpoints of a run: train state (params, EMA, optimizer, step), data-iterator state, config.

Orbax writes from every process of a multi-host run (each its own shards; JSON items from process 0) and restores
each array straight into the sharding its target asks for, whatever the mesh it was saved from.

Layout of a workdir:
    config.json          the full config of the run (written once; a re-run must match its model shape)
    checkpoints/<step>/  state (StandardSave), data (JSON iterator state), config (JSON)
    encoders/            the frozen encoders and tokenizers, when random (see encoders.py)
    tb/                  TensorBoard event files
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from ediffi_jax.train.step import TrainState

# Config subtrees that fix the shapes of what a checkpoint holds: a workdir's checkpoint can only be resumed
# by a config that agrees on all of them.
SHAPE_KEYS = ("model", "conditioning", "encoders")
# Fields under SHAPE_KEYS that may change between runs on one workdir (rates, paths to the same weights).
FREE_FIELDS = ("drop_prob", "pretrained_dir", "tokenizer_dir")


def _lookup(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d[part]
    return d


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: list(d) if isinstance(d, tuple) else d}


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def check_compatible(stored: dict, config: ml_collections.ConfigDict, workdir: str) -> None:
    """Raises one clear line when the workdir holds a run of another model shape."""
    current = config_to_dict(config)
    for key in SHAPE_KEYS:
        try:
            a = _flatten(_lookup(stored, key), key)
        except (KeyError, TypeError):
            raise ValueError(f"workdir {workdir!r} holds a run without config.{key} (an older format); "
                             "use a new --workdir") from None
        b = _flatten(_lookup(current, key), key)
        for k in sorted(set(a) | set(b)):
            if k.rsplit(".", 1)[-1] in FREE_FIELDS:
                continue
            if a.get(k) != b.get(k):
                raise ValueError(
                    f"workdir {workdir!r} holds a checkpoint of another model: {k}={a.get(k)!r} there, "
                    f"{b.get(k)!r} in this config (use a new --workdir)")


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with the items of a training run."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, save_interval_steps: int = 1, read_only: bool = False):
        """`read_only`: open another run's checkpoints (e.g. an expert's parent) without ever writing there."""
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep, save_interval_steps=save_interval_steps,
            create=not read_only, read_only=read_only, enable_async_checkpointing=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict | None, config: ml_collections.ConfigDict,
             *, force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            config=ocp.args.JsonSave(config_to_dict(config)),
        ), force=force)

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict, int]:
        """Restores into the shapes and shardings of `abstract_state` (ShapeDtypeStructs, e.g. `abstract_like` or
        `train.sharding.with_shardings`): a checkpoint saved on one mesh restores onto another."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
        ))
        return restored["state"], dict(restored["data"] or {}), step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
    """ShapeDtypeStructs of `tree`, keeping each array's sharding. Leaves without one (from `jax.eval_shape`) get
    `sharding`, by default this process's first device, so a checkpoint saved on any mesh restores here."""
    default = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def one(x: Any) -> jax.ShapeDtypeStruct:
        s = ocp.utils.to_shape_dtype_struct(x)
        return s if s.sharding is not None else jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=default)

    return jax.tree.map(one, tree)
