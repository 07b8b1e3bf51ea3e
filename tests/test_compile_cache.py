"""XLA's persistent compilation cache of the training commands (ediffi_jax/compile_cache.py): which directory each
`--compile_cache` setting picks, and that a compile served from the cache is counted (the train loop logs it; the
end-to-end restart that loads its step from the cache is tests/test_fault_tolerance.py's SIGKILL test)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as cc

from ediffi_jax import compile_cache


def test_settings_pick_the_directory(tmp_path):
    run = str(tmp_path / "run")
    assert compile_cache.resolve("auto", run, None) == os.path.join(run, "compile_cache")
    assert compile_cache.resolve("auto", "relative/run", None) == os.path.abspath("relative/run/compile_cache")
    assert compile_cache.resolve("auto", run, "/shared/jax") == "/shared/jax"  # the process's own cache wins
    assert compile_cache.resolve("auto", "gs://bucket/run/", None) == "gs://bucket/run/compile_cache"  # pods
    assert compile_cache.resolve("none", run, "/shared/jax") is None
    assert compile_cache.resolve("cache", run, "/shared/jax") == os.path.abspath("cache")
    assert compile_cache.resolve("gs://b/cache", run, None) == "gs://b/cache"
    with pytest.raises(ValueError, match="--compile_cache is empty"):
        compile_cache.resolve("", run, None)


@pytest.fixture
def restore_cache_config():
    names = ("jax_compilation_cache_dir", "jax_enable_compilation_cache", "jax_persistent_cache_min_compile_time_secs")
    saved = {n: getattr(jax.config, n) for n in names}
    yield
    for n, v in saved.items():
        jax.config.update(n, v)
    cc.reset_cache()


def test_a_compile_served_from_the_cache_is_counted(tmp_path, restore_cache_config):
    directory = compile_cache.enable(str(tmp_path / "cache"), str(tmp_path))
    assert directory == str(tmp_path / "cache") and jax.config.jax_compilation_cache_dir == directory
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cc.reset_cache()  # this test process initialised its cache already; a CLI calls enable before any compile

    def program():  # a new function object each time, as in a new process: no in-memory cache applies
        def f(x):
            return jnp.tanh(x @ x.T + 0.123456)  # a program no other test compiles
        return jax.jit(f)

    x = jnp.ones((8, 8))
    before = compile_cache.hits()
    first = program().lower(x).compile()
    assert compile_cache.hits() == before and os.listdir(directory)  # compiled, then written
    second = program().lower(x).compile()
    assert compile_cache.hits() == before + 1
    np.testing.assert_array_equal(np.asarray(first(x)), np.asarray(second(x)))

    assert compile_cache.enable("none", str(tmp_path)) is None
    assert not jax.config.jax_enable_compilation_cache
