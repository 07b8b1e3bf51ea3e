"""train/step_cache.py: the key of a compiled train step changes with everything the program depends on and with
nothing else. (That a later run reuses the step: tests/test_expert_training.py, whose children train with their
root's. A test that two 2-step runs, the first compiling and the second reusing the step, end bitwise alike
passed when written (2026-11-26) and was left out of the suite for its 22 s: the step is the same executable.)"""

import jax
import numpy as np
from conftest import one_level_config

from ediffi_jax.train import sharding, step_cache


def _mesh():
    return sharding.mesh_from_config(None)


def test_key_ignores_only_the_loop_fields(data_dir):
    config = one_level_config(data_dir, num_steps=2)
    args = (jax.ShapeDtypeStruct((8, 16, 16, 3), np.float32),)
    key = step_cache.step_key(config, _mesh(), *args)
    loop_only = config.copy_and_resolve_references()
    loop_only.train.update(dict(num_steps=99, log_every=7, ckpt_every=5, keep_checkpoints=1, eval_num=0))
    loop_only.expert.node = "01"
    loop_only.expert.parent = "/runs/root"
    loop_only.data.data_dir = "/elsewhere"
    assert step_cache.step_key(loop_only, _mesh(), *args) == key
    for change in (lambda c: c.model.update(dict(channels=24)), lambda c: c.optim.update(dict(lr=1e-3)),
                   lambda c: c.edm.update(dict(sigma_data=0.25)), lambda c: c.train.update(dict(batch_size=16))):
        other = config.copy_and_resolve_references()
        change(other)
        assert step_cache.step_key(other, _mesh(), *args) != key
    assert step_cache.step_key(config, _mesh(), jax.ShapeDtypeStruct((8, 16, 16, 3), np.float16)) != key
    assert step_cache.step_key(config, _mesh(), jax.ShapeDtypeStruct((4, 16, 16, 3), np.float32)) != key
