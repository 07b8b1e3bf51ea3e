"""XLA's persistent compilation cache for the training commands: a restarted run loads its compiled steps from disk.

A preempted or resumed `ediffi-train` compiles the same train step and sampler again; on a GPU that took 127–132 s
for the edm64 step and 200 s for the paper-size base model (docs/benchmarks.md), on every restart. With the cache,
JAX writes each executable that took over `jax_persistent_cache_min_compile_time_secs` (1 s) to compile to a
directory and, on a GPU, XLA's per-fusion autotuning results too (`jax_persistent_cache_enable_xla_caches`); the
next process looks there before compiling. A cached executable is the same program, so a resumed run stays
bitwise the uninterrupted one.

`--compile_cache` of `ediffi-train` and `ediffi-expert-tree`:
    auto   (default) keep a cache the process already has (JAX_COMPILATION_CACHE_DIR, jax.config), else
           RUN_DIR/compile_cache (a gs://… run dir too: JAX reaches a remote cache through etils' epath,
           as Orbax reaches the run's checkpoints there; a TPU pod's hosts then share one cache, as JAX's
           docs advise; a cache that cannot be read or written is a warning, never a failed run)
    none   no persistent cache, also not one named by JAX_COMPILATION_CACHE_DIR
    DIR    this directory (shared by the runs that name it; a cache is trusted code: keep it private)

Set before the first compilation of the process (the CLIs call `enable` before `train`).
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

SUBDIR = "compile_cache"
FLAG_HELP = ("XLA's persistent compilation cache: auto (default: the one the process has, else "
             "RUN_DIR/compile_cache), none, or a directory (ediffi_jax/compile_cache.py)")
_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_hits = 0


def _on_event(event: str, **_kwargs) -> None:
    global _hits
    if event == _HIT_EVENT:
        _hits += 1


jax.monitoring.register_event_listener(_on_event)


def hits() -> int:
    """Executables this process loaded from the persistent cache so far (compare before/after a compile)."""
    return _hits


def resolve(setting: str, run_dir: str, current: str | None) -> str | None:
    """The cache directory for `setting` (see the module doc), given the one the process has now (`current`);
    None = no persistent cache."""
    if setting == "none":
        return None
    if setting == "auto":
        if current:
            return current
        return _join(run_dir, SUBDIR)
    if not setting:
        raise ValueError("--compile_cache is empty: give auto, none or a directory")
    return _join(setting)


def _join(path: str, *parts: str) -> str:
    """An absolute local path, or a remote URL (gs://…) joined with '/'."""
    if "://" in path:
        return "/".join([path.rstrip("/"), *parts])
    return os.path.join(os.path.abspath(path), *parts)


def enable(setting: str, run_dir: str) -> str | None:
    """Points JAX's persistent compilation cache at `resolve(setting, run_dir, …)`; returns it (None: off)."""
    directory = resolve(setting, run_dir, jax.config.jax_compilation_cache_dir)
    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
        log.info("persistent compilation cache: off")
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    log.info("persistent compilation cache: %s", directory)
    return directory
