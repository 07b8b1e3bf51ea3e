"""Fault tolerance: a run killed with SIGKILL or stopped with SIGTERM resumes onto the uninterrupted loss curve
(bitwise, CPU); SIGTERM writes a checkpoint at the step it stopped at and exits with status 75; an unreadable or
unfinished latest checkpoint falls back to the previous one and is moved aside; non-finite updates are skipped
(state unchanged, counted) and stop the run after train.max_consecutive_skips in a row.

One uninterrupted run A (8 steps, a checkpoint every 3) is the reference. Subprocesses use the test hook
EDIFFI_TEST_SIGNAL=STEP:NAME (train/loop.py) to be interrupted at a known step.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import write_config_file
from flax import nnx
from multidevice import Background, with_devices

from ediffi_jax.cli.common import load_config_file
from ediffi_jax.train import loop
from ediffi_jax.train.checkpoint import COMMIT_MARKER, Checkpointer, abstract_like
from ediffi_jax.train.events import read_scalars
from ediffi_jax.train.loop import NonFiniteUpdates, train
from ediffi_jax.train.step import build_model, init_train_state, make_optimizer, split_model

STEPS, CKPT_EVERY = 8, 3


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, data_dir):
    """Run A in this process (it compiles the step, or finds it in the persistent cache), then the interrupted
    ediffi-train runs B (SIGKILL after step 5) and C (SIGTERM after step 4) in the background, side by side, while
    the tests go on in this process."""
    tmp = tmp_path_factory.mktemp("fault")
    cfg = write_config_file(tmp / "config.py", data_dir, num_steps=STEPS, ckpt_every=CKPT_EVERY, keep_checkpoints=10)
    t0 = time.perf_counter()
    # A writes its step to the persistent cache however fast it compiled: B's restart must find it there.
    before = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        train(load_config_file(cfg), str(tmp / "A"))
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before)
    print(f"\nrun A ({STEPS} steps, in process): {time.perf_counter() - t0:.1f} s")
    env = with_devices(dict(os.environ, JAX_PLATFORMS="cpu"), None)
    cli = {name: Background([sys.executable, "-m", "ediffi_jax.cli.train", "--config", cfg, "--workdir",
                             str(tmp / name)], env=dict(env, EDIFFI_TEST_SIGNAL=spec))
           for name, spec in (("B", "5:KILL"), ("C", "4:TERM"))}
    yield dict(tmp=tmp, cfg=cfg, A=str(tmp / "A"), cli=cli)
    for run in cli.values():
        run.kill()


def _cli(run_a, name: str) -> subprocess.CompletedProcess:
    """ediffi-train run `name` of the fixture, once it has ended."""
    run = run_a["cli"][name]
    p = run.result(timeout=300)
    print(f"ediffi-train run {name} (in the background): {run.seconds:.1f} s, status {p.returncode}")
    return p


def _steps(workdir: str) -> list[str]:
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def _scalars(workdir: str, tag: str) -> dict[int, float]:
    """{step: value}; a step logged twice (by a killed run and again after its restart) must agree bitwise."""
    out: dict[int, float] = {}
    for step, v in read_scalars(os.path.join(workdir, "tb"))[f"train/{tag}"]:
        assert step not in out or np.array_equal(out[step], v, equal_nan=True), (tag, step, out[step], v)
        out[step] = v
    return out


@functools.cache
def _abstract(cfg: str):
    config = load_config_file(cfg)
    _, params = split_model(nnx.eval_shape(lambda: build_model(config, config.seed)))
    tx = make_optimizer(config.optim)
    return abstract_like(jax.eval_shape(lambda p: init_train_state(p, tx), params))


def _state(cfg: str, workdir: str, step: int):
    ckpt = Checkpointer(workdir, read_only=True)
    state, _, got = ckpt.restore(_abstract(cfg), step)
    ckpt.close()
    assert got == step
    return state


def _assert_same(a, b, parts=("params", "ema", "opt_state")) -> None:
    for part in parts:
        x, y = jax.tree.leaves(getattr(a, part)), jax.tree.leaves(getattr(b, part))
        assert len(x) == len(y) > 10
        for u, v in zip(x, y):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=part)


def _assert_resumed_onto_a(run_a, workdir: str, resumed_from: int) -> None:
    a, b = _scalars(run_a["A"], "loss"), _scalars(workdir, "loss")
    assert sorted(a) == list(range(1, STEPS + 1))
    after = list(range(resumed_from + 1, STEPS + 1))
    assert set(after) <= set(b)
    for step in sorted(b):
        assert b[step] == a[step], (step, b[step], a[step])  # bitwise, every step either run logged
    print(f"losses after the restart at {resumed_from}: {[round(b[s], 6) for s in after]} (= run A)")
    _assert_same(_state(run_a["cfg"], run_a["A"], STEPS), _state(run_a["cfg"], workdir, STEPS))


def test_resume_after_sigkill_is_bitwise_the_uninterrupted_run(run_a, caplog):
    b = str(run_a["tmp"] / "B")
    p = _cli(run_a, "B")  # killed after step 5, between the checkpoints at 3 and 6
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    # The restart found run A's step in XLA's persistent cache (ediffi_jax/compile_cache.py) instead of compiling it.
    assert "INFO train step loaded from the persistent compilation cache in" in p.stderr, p.stderr[-3000:]
    assert _steps(b) == ["3"]
    with caplog.at_level(logging.INFO, logger="ediffi_jax"):
        train(load_config_file(run_a["cfg"]), b)
    assert "resumed from step 3" in caplog.messages
    _assert_resumed_onto_a(run_a, b, 3)


def test_sigterm_checkpoints_the_current_step_and_exits_75(run_a, caplog):
    c = str(run_a["tmp"] / "C")
    p = _cli(run_a, "C")  # SIGTERM after step 4, mid-interval
    assert p.returncode == 75, p.stderr[-3000:]
    stops = [line for line in p.stderr.splitlines() if "SIGTERM" in line]
    assert len(stops) == 1 and stops[0].endswith(
        "SIGTERM: stopped after step 4 and wrote a checkpoint there; run the same command to resume"), stops
    assert _steps(c) == ["3", "4"]
    assert os.path.isfile(os.path.join(c, "checkpoints", "4", COMMIT_MARKER))
    assert int(_state(run_a["cfg"], c, 4).step) == 4
    with caplog.at_level(logging.INFO, logger="ediffi_jax"):
        train(load_config_file(run_a["cfg"]), c)
    assert "resumed from step 4" in caplog.messages
    _assert_resumed_onto_a(run_a, c, 4)


def test_unreadable_latest_checkpoints_fall_back_and_are_moved_aside(run_a, caplog):
    d = str(run_a["tmp"] / "D")
    shutil.copytree(run_a["A"], d, ignore=shutil.ignore_patterns("tb"))
    ckpts = os.path.join(d, "checkpoints")
    assert _steps(d) == ["3", "6", "8"]
    # Step 8: an array file truncated to half. Step 6: no commit marker (a write that never finished).
    data = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(ckpts, "8", "state")) for f in fs
            if os.sep + "d" + os.sep in os.path.join(r, f)]
    biggest = max(data, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    os.remove(os.path.join(ckpts, "6", COMMIT_MARKER))

    # None readable: one error line naming each step, nothing moved.
    e = str(run_a["tmp"] / "E")
    shutil.copytree(d, e)
    os.remove(os.path.join(e, "checkpoints", "3", COMMIT_MARKER))
    ckpt = Checkpointer(e)
    with pytest.raises(ValueError, match=r"no readable checkpoint in .* \(all left in place\): step 8: .*; "
                                         r"step 6: no commit_success.txt: an unfinished write; step 3: no "):
        ckpt.restore_latest(_abstract(run_a["cfg"]))
    ckpt.close()
    assert _steps(e) == ["3", "6", "8"]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ediffi_jax"):
        train(load_config_file(run_a["cfg"]), d)  # falls back to step 3, then trains 4..8 and writes 6 and 8 again
    msgs = caplog.messages
    bad8 = [m for m in msgs if m.startswith(f"checkpoint at step 8 in {ckpts} is unreadable (")]
    assert len(bad8) == 1 and bad8[0].endswith("); trying the previous one"), msgs
    print("log:", bad8[0])
    assert (f"checkpoint at step 6 in {ckpts} is unreadable (no commit_success.txt: an unfinished write); trying "
            "the previous one") in msgs
    assert f"moved the unreadable checkpoint of step 8 to {ckpts}/8.corrupt" in msgs
    assert f"moved the unreadable checkpoint of step 6 to {ckpts}/6.corrupt" in msgs
    assert "resumed from step 3" in msgs
    assert _steps(d) == ["3", "6", "6.corrupt", "8", "8.corrupt"]
    assert os.path.getsize(biggest.replace(os.sep + "8" + os.sep, os.sep + "8.corrupt" + os.sep)) > 0  # kept
    _assert_resumed_onto_a(run_a, d, 3)


def test_non_finite_updates_are_skipped_then_stop_the_run(run_a, monkeypatch, caplog):
    f = str(run_a["tmp"] / "F")
    shutil.copytree(run_a["A"], f, ignore=shutil.ignore_patterns("tb"))
    config = load_config_file(run_a["cfg"])
    config.train.update(dict(num_steps=16, ckpt_every=1, max_consecutive_skips=3))
    nan_steps = {9, 11, 12, 13}  # resumed at 8: one skip, an applied step, then three skips in a row
    calls = []
    real = loop._device_batch

    def device_batch(batch, keys):  # called once per step, in order, from step 9 on
        out = real(batch, keys)
        calls.append(len(calls) + 9)
        if calls[-1] in nan_steps:
            out = dict(out, image=np.full_like(out["image"], np.nan))
        return out

    monkeypatch.setattr(loop, "_device_batch", device_batch)
    with caplog.at_level(logging.INFO, logger="ediffi_jax"), pytest.raises(NonFiniteUpdates) as err:
        train(config, f)
    print("error:", err.value)
    assert str(err.value) == ("3 consecutive updates skipped for a non-finite loss or gradient "
                              "(train.max_consecutive_skips=3): stopped at step 13; the last checkpoint (step 12) "
                              "is kept")
    assert calls == [9, 10, 11, 12, 13]
    assert _steps(f) == ["10", "11", "12", "3", "6", "8", "9"]  # nothing past the limit
    assert "step 9: 1 of the last 1 updates skipped (non-finite loss or gradient), up to 1 in a row" in caplog.messages

    skipped, consecutive = _scalars(f, "skipped_steps"), _scalars(f, "consecutive_skips")
    loss = _scalars(f, "loss")
    assert [skipped[s] for s in range(9, 14)] == [1, 0, 1, 1, 1]
    assert [consecutive[s] for s in range(9, 14)] == [1, 0, 1, 2, 3]
    assert np.isnan(loss[9]) and np.isfinite(loss[10]) and loss[10] > 0  # means over applied updates only

    cfg = run_a["cfg"]
    s8, s9, s10, s12 = (_state(cfg, f, s) for s in (8, 9, 10, 12))
    _assert_same(s8, s9)  # the skipped update changed nothing: params, EMA, optimizer state (its count too)
    _assert_same(s10, s12)
    assert [int(s.step) for s in (s8, s9, s10, s12)] == [8, 9, 10, 12]  # skipped steps still count
    assert [int(s.skips) for s in (s8, s9, s10, s12)] == [0, 1, 0, 2]
    p8, p10 = jax.tree.leaves(s8.params), jax.tree.leaves(s10.params)
    assert any(not np.array_equal(x, y) for x, y in zip(p8, p10))  # step 10 was applied


def test_checkpoint_without_skip_count_still_restores(run_a, tmp_path):
    """Checkpoints written before TrainState counted skipped updates resume with a count of 0."""
    state = _state(run_a["cfg"], run_a["A"], STEPS)
    old = {k: getattr(state, k) for k in ("step", "params", "ema", "opt_state")}
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(STEPS, old, {"position": 1}, load_config_file(run_a["cfg"]), force=True)
    ckpt.close()
    ckpt = Checkpointer(str(tmp_path))
    restored, data, step = ckpt.restore_latest(_abstract(run_a["cfg"]))
    ckpt.close()
    assert (step, data, int(restored.step), int(restored.skips)) == (STEPS, {"position": 1}, STEPS, 0)
    _assert_same(state, restored)
