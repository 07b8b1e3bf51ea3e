"""Training: loss goes down, checkpoints round-trip exactly, reruns are safe (resume after a kill or SIGTERM
equals an uninterrupted run bit for bit: tests/test_fault_tolerance.py)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import micro_config

from ediffi_jax.train.checkpoint import Checkpointer, abstract_like
from ediffi_jax.train.events import read_scalars
from ediffi_jax.train.loop import train
from ediffi_jax.train.step import build_model, init_train_state, make_optimizer, split_model


def test_training_lowers_the_loss(trained_run):
    config, workdir, metrics = trained_run
    losses = [v for _, v in read_scalars(os.path.join(workdir, "tb"))["train/loss"]]
    assert len(losses) == config.train.num_steps // config.train.log_every
    first, last = np.mean(losses[:2]), np.mean(losses[-2:])
    print(f"loss over the first 2 log windows {first:.4f}, last 2 {last:.4f}")
    assert last < 0.7 * first
    assert np.isfinite(metrics["eval_overall"]) and 0.0 <= metrics["eval_overall"] <= 1.0
    assert os.path.isfile(os.path.join(workdir, "samples", f"step_{config.train.num_steps:08d}.png"))


def test_checkpoint_round_trip_is_exact(tmp_path):
    config = micro_config(str(tmp_path))
    tx = make_optimizer(config.optim)
    abstract = jax.eval_shape(lambda: init_train_state(split_model(build_model(config, 0))[1], tx))
    # Every leaf random and distinct from any initial value (incl. optimizer moments and step), made on the host:
    # no compile per parameter shape.
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(a.dtype) if a.dtype.kind == "f"
                                               else rng.integers(1, 1000, a.shape).astype(a.dtype)), abstract)
    ckpt = Checkpointer(str(tmp_path / "w"))
    ckpt.save(7, state, {"iterator": "state-7"}, config, force=True)
    ckpt.wait()
    restored, data_state, step = ckpt.restore(abstract_like(abstract))
    ckpt.close()
    assert step == 7 and data_state == {"iterator": "state-7"}
    a, b = jax.tree.leaves(state), jax.tree.leaves(restored)
    assert len(a) == len(b) > 10
    for x, y in zip(a, b):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert jax.tree.structure(state) == jax.tree.structure(restored)


def test_workdir_of_another_model_shape_is_refused(trained_run):
    config, workdir, _ = trained_run
    other = config.copy_and_resolve_references()
    other.model.channels = 24
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    config_before = open(os.path.join(workdir, "config.json")).read()
    with pytest.raises(ValueError, match=r"another model: model.channels=16 there, 24 in this config"):
        train(other, workdir)
    assert before and sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before  # nothing lost
    assert open(os.path.join(workdir, "config.json")).read() == config_before


def test_rerun_of_a_finished_run_changes_nothing(trained_run):
    config, workdir, _ = trained_run
    ckpt_dir = os.path.join(workdir, "checkpoints")
    before = {d: os.path.getmtime(os.path.join(ckpt_dir, d)) for d in os.listdir(ckpt_dir)}
    assert train(config, workdir) == {}
    assert {d: os.path.getmtime(os.path.join(ckpt_dir, d)) for d in os.listdir(ckpt_dir)} == before
