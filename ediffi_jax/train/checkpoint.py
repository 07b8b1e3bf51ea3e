"""Orbax checkpoints of a run: train state (params, EMA, optimizer, step), data-iterator state, config.

Orbax writes from every process of a multi-host run (each its own shards; JSON items from process 0) and restores
each array straight into the sharding its target asks for, whatever the mesh it was saved from.

Layout of a workdir:
    config.json          the full config of the run (written once; a re-run must match its model shape)
    checkpoints/<step>/  state (StandardSave), data (JSON iterator state), config (JSON)
    checkpoints/<step>.corrupt/  a checkpoint that failed to restore, moved aside on resume (never deleted)
    encoders/            the frozen encoders and tokenizers, when random (see encoders.py)
    tb/                  TensorBoard event files
"""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ediffi_jax.train.step import TrainState

log = logging.getLogger(__name__)

# Orbax writes this file into a step directory as the last part of a save (before its atomic rename on local
# disks; as the commit itself on GCS): a step directory without it is an unfinished write.
COMMIT_MARKER = "commit_success.txt"
_LEGACY_FIELDS = ("step", "params", "ema", "opt_state")  # TrainState before `skips`
# Config subtrees that fix the shapes of what a checkpoint holds: a workdir's checkpoint can only be resumed
# by a config that agrees on all of them.
SHAPE_KEYS = ("model", "conditioning", "encoders")
# Fields under SHAPE_KEYS that may change between runs on one workdir (rates, paths to the same weights).
FREE_FIELDS = ("drop_prob", "pretrained_dir", "tokenizer_dir", "remat", "attention")


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
    """Raises one clear line when the workdir holds a run of another model shape. Fields added since the stored
    run was made count with their defaults (`ediffi_jax.config.run_config`)."""
    from ediffi_jax.config import run_config

    stored = config_to_dict(run_config(stored))
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
        self.read_only = read_only
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
        # Checkpoints written before TrainState counted skipped updates have no `skips`: restore the rest.
        saved = self._saved_state_keys(step) if isinstance(abstract_state, TrainState) else set()
        legacy = bool(saved) and "skips" not in saved
        target = {k: getattr(abstract_state, k) for k in _LEGACY_FIELDS} if legacy else abstract_state
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data=ocp.args.JsonRestore(),
        ))
        state = restored["state"]
        if legacy:
            skips = abstract_state.skips
            state = TrainState(**state, skips=jax.device_put(np.zeros(skips.shape, skips.dtype), skips.sharding))
        return state, dict(restored["data"] or {}), step

    def _saved_state_keys(self, step: int) -> set[str]:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.metadata(os.path.join(self.directory, str(step), "state")).item_metadata
        return set(tree.keys()) if hasattr(tree, "keys") else set()

    def restore_latest(self, abstract_state: TrainState) -> tuple[TrainState, dict, int] | None:
        """The newest checkpoint that restores, as `restore` returns it; None when the workdir holds none.

        A step directory without Orbax's commit marker, or whose files fail to restore (truncated, corrupted,
        missing), is reported with a warning naming its step, and the previous step is tried. Once one restores,
        the bad newer ones are moved aside to `checkpoints/<step>.corrupt` — kept for inspection, never deleted,
        and out of Orbax's sight so the resumed run can write those steps again. When none restores (e.g. a
        train state of another structure), nothing is moved and one ValueError line says why each failed.
        Multi-host: every process tries the same step, and they agree on whether it worked.
        """
        unfinished = sorted(glob.glob(os.path.join(glob.escape(self.directory), "*.orbax-checkpoint-tmp*")))
        if unfinished:
            log.info("ignoring unfinished checkpoint writes: %s", ", ".join(map(os.path.basename, unfinished)))
        bad: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            result, problem = None, self._unfinalized(step)
            if problem is None:
                try:
                    result = self.restore(abstract_state, step)
                except Exception as e:  # whatever Orbax / TensorStore raise for files they cannot read
                    problem = _first_line(e)
            problem = _agree(problem)
            if problem is None:
                if bad:
                    self._set_aside([s for s, _ in bad])
                return result
            log.warning("checkpoint at step %d in %s is unreadable (%s); trying the previous one",
                        step, self.directory, problem)
            bad.append((step, problem))
        if bad:
            raise ValueError(f"no readable checkpoint in {self.directory} (all left in place): "
                             + "; ".join(f"step {s}: {p}" for s, p in bad))
        return None

    def _unfinalized(self, step: int) -> str | None:
        if not os.path.exists(os.path.join(self.directory, str(step), COMMIT_MARKER)):
            return f"no {COMMIT_MARKER}: an unfinished write"
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Moves bad step directories to `<step>.corrupt` (process 0; the workdir is shared)."""
        if self.read_only:  # e.g. an expert's parent run: report, never touch
            log.warning("read-only checkpoints: unreadable step(s) %s left in place", steps)
            return
        if jax.process_index() == 0:
            for step in steps:
                src = os.path.join(self.directory, str(step))
                dst, n = src + ".corrupt", 1
                while os.path.exists(dst):
                    dst, n = f"{src}.corrupt.{n}", n + 1
                os.rename(src, dst)
                log.warning("moved the unreadable checkpoint of step %d to %s", step, dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("ediffi_jax:checkpoints_set_aside")
        self.manager.reload()

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


def _first_line(e: BaseException) -> str:
    """The first line of the innermost cause (TensorStore's own words, not Orbax's wrapper around them)."""
    seen = {id(e)}
    while (inner := e.__cause__ or e.__context__) is not None and id(inner) not in seen:
        e = inner
        seen.add(id(e))
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _agree(problem: str | None) -> str | None:
    """Multi-host: a checkpoint counts as readable only when every process read it."""
    if jax.process_count() == 1:
        return problem
    failed = multihost_utils.process_allgather(np.int32(problem is not None))
    if problem is None and np.any(failed):
        problem = f"unreadable on process(es) {np.flatnonzero(failed).tolist()}"
    return problem
