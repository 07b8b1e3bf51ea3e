"""train/step_cache.py: a second run in the same process reuses the compiled train step, only when the step
would be the same program, and trains exactly as a freshly compiled step does."""

import jax
import numpy as np
from conftest import one_level_config

from ediffi_jax.tracing import abstract_module
from ediffi_jax.train import sharding, step_cache
from ediffi_jax.train.checkpoint import Checkpointer, abstract_like
from ediffi_jax.train.loop import train
from ediffi_jax.train.step import build_model, init_train_state, make_optimizer, split_model


def _mesh():
    return sharding.mesh_from_config(None)


def test_key_ignores_only_the_loop_fields(data_dir):
    config = one_level_config(data_dir, num_steps=2)
    args = (jax.ShapeDtypeStruct((8, 16, 16, 3), np.float32),)
    key = step_cache.step_key(config, _mesh(), *args)
    loop_only = config.copy_and_resolve_references()
    loop_only.train.update(dict(num_steps=99, log_every=7, ckpt_every=5, keep_checkpoints=1, eval_num=0))
    loop_only.expert.node = "01"
    loop_only.data.data_dir = "/elsewhere"
    assert step_cache.step_key(loop_only, _mesh(), *args) == key
    for change in (lambda c: c.model.update(dict(channels=24)), lambda c: c.optim.update(dict(lr=1e-3)),
                   lambda c: c.edm.update(dict(sigma_data=0.25)), lambda c: c.train.update(dict(batch_size=16))):
        other = config.copy_and_resolve_references()
        change(other)
        assert step_cache.step_key(other, _mesh(), *args) != key
    assert step_cache.step_key(config, _mesh(), jax.ShapeDtypeStruct((8, 16, 16, 3), np.float16)) != key
    assert step_cache.step_key(config, _mesh(), jax.ShapeDtypeStruct((4, 16, 16, 3), np.float32)) != key


def _final_state(config, workdir):
    _, params = split_model(abstract_module(lambda: build_model(config, config.seed)))
    tx = make_optimizer(config.optim)
    ckpt = Checkpointer(workdir, read_only=True)
    state, _, step = ckpt.restore(abstract_like(jax.eval_shape(lambda p: init_train_state(p, tx), params)),
                                  config.train.num_steps)
    ckpt.close()
    assert step == config.train.num_steps
    return state


def test_second_run_reuses_the_step_and_trains_bitwise_alike(data_dir, tmp_path):
    config = one_level_config(data_dir, num_steps=2, ckpt_every=2, log_every=1)
    step_cache.clear()
    before = dict(step_cache.STATS)
    train(config, str(tmp_path / "fresh"))
    assert step_cache.STATS["misses"] == before["misses"] + 1
    train(config, str(tmp_path / "reused"))
    assert step_cache.STATS == {"hits": before["hits"] + 1, "misses": before["misses"] + 1}
    fresh, reused = _final_state(config, str(tmp_path / "fresh")), _final_state(config, str(tmp_path / "reused"))
    leaves = jax.tree.leaves(fresh)
    assert len(leaves) > 10
    for a, b in zip(leaves, jax.tree.leaves(reused)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(fresh.step) == int(reused.step) == 2
