"""Sharded training: 8 fake devices (data 4 × fsdp 2) and 2 processes × 4 devices (launch/local_multiprocess.sh,
a hybrid mesh over processes) train like one device; parameters really are sharded; a checkpoint written on 8
devices resumes on 1; a bad mesh, batch size or workdir is one clear line before any compile; ediffi-plan's
bytes per device of the paper-size model on 32 devices."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import write_config_file
from flax import nnx
from multidevice import REPO, Background, multidevice_env, with_devices

from ediffi_jax.cli.common import load_config_file
from ediffi_jax.train.checkpoint import Checkpointer, abstract_like
from ediffi_jax.train.events import read_scalars
from ediffi_jax.train.loop import train
from ediffi_jax.train.step import build_model, init_train_state, make_optimizer, split_model

STEPS = 4

# Run B: 8 devices in one process. First the bad inputs (each must fail before anything is traced or compiled, and
# create nothing), then the run itself, then how its state is laid out on the devices.
_EIGHT_DEVICES = r"""
import json, os
import jax, numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from ediffi_jax.cli.common import load_config_file
from ediffi_jax.train import sharding
from ediffi_jax.train.loop import train
from ediffi_jax.train.step import build_model, init_train_state, make_optimizer, split_model

compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: compiles.append(name) if name.startswith("/jax/core/compile") else None)
config = load_config_file(CFG)
blocker = os.path.join(TMP, "a_file")
open(blocker, "w").close()
errors = {}
for name, workdir, change in [
    ("mesh", os.path.join(TMP, "bad_mesh"), lambda c: c.mesh.update(dict(fsdp=3))),
    ("batch", os.path.join(TMP, "bad_batch"), lambda c: c.train.update(dict(batch_size=12))),
    ("workdir", os.path.join(blocker, "run"), lambda c: None),
]:
    c = config.copy_and_resolve_references()
    change(c)
    before = len(compiles)
    try:
        train(c, workdir)
        errors[name] = None
    except ValueError as e:
        errors[name] = dict(msg=str(e), compiles=len(compiles) - before, created=os.path.exists(workdir))

config.mesh.update(dict(data=4, fsdp=2))
train(config, WORKDIR)

# The saved state records the sharding it was trained with; restored onto the same mesh, each device holds its part.
with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(os.path.join(WORKDIR, "checkpoints", str(STEPS), "state")).item_metadata
leaves = jax.tree_util.tree_leaves_with_path(meta["params"])
path, big = max(leaves, key=lambda pl: int(np.prod(pl[1].shape)))
mesh = sharding.mesh_from_config(config.mesh)
graphdef, params = split_model(nnx.eval_shape(lambda: build_model(config, config.seed)))
tx = make_optimizer(config.optim)
abstract = jax.eval_shape(lambda p: init_train_state(p, tx), params)
from ediffi_jax.train.checkpoint import Checkpointer
ckpt = Checkpointer(WORKDIR, read_only=True)
state, _, _ = ckpt.restore(sharding.with_shardings(abstract, sharding.tree_shardings(abstract, mesh)))
ckpt.close()
arrays = {"params": jax.tree.leaves(state.params), "ema": jax.tree.leaves(state.ema),
          "opt_state": [a for a in jax.tree.leaves(state.opt_state) if a.ndim]}
kernel = max(arrays["params"], key=lambda a: a.size)
print(json.dumps(dict(
    errors=errors,
    saved=dict(name=jax.tree_util.keystr(path), shape=list(big.shape),
               spec=[s if isinstance(s, (str, type(None))) else list(s) for s in big.sharding.partition_spec]),
    kernel=dict(shape=list(kernel.shape), shards={str(s.device.id): list(s.data.shape)
                                                   for s in kernel.addressable_shards}),
    fraction={k: sum(a.addressable_shards[0].data.size for a in v) / sum(a.size for a in v)
              for k, v in arrays.items()},
)))
"""


def _eight_devices(directory: Path) -> Background:
    """Run B (see _EIGHT_DEVICES) on its own copy of the dataset."""
    cfg = write_config_file(directory / "config.py", str(directory / "data"), num_steps=STEPS, ckpt_every=2)
    script = directory / "eight_devices.py"
    script.write_text(f"CFG, TMP, WORKDIR, STEPS = {cfg!r}, {str(directory)!r}, {str(directory / 'B')!r}, "
                      f"{STEPS}\n" + _EIGHT_DEVICES)
    return Background([sys.executable, str(script)], env=multidevice_env(8))


def _two_processes(directory: Path) -> Background:
    """Run C: launch/local_multiprocess.sh, 2 processes x 4 devices, a checkpoint at the end only. Process 1
    compiles everything itself: XLA's persistent cache is written by process 0 only."""
    cfg = write_config_file(directory / "config.py", str(directory / "data"), num_steps=STEPS, ckpt_every=2)
    env = dict(os.environ, PYTHON=sys.executable, LOG_DIR=str(directory / "logs"))
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".jax_cache"))
    return Background([os.path.join(REPO, "launch", "local_multiprocess.sh"), "2", "4", "--", "--config", cfg,
                       "--workdir", str(directory / "C"), "--config.mesh.data=2", "--config.mesh.fsdp=2",
                       "--config.mesh.dcn_data=2", f"--config.train.ckpt_every={STEPS}"], env=env)


def _bad_mesh_cli(directory: Path) -> Background:
    """ediffi-train with a mesh of 2 devices on this machine's 1."""
    cfg = write_config_file(directory / "config.py", str(directory / "data"), num_steps=STEPS, ckpt_every=2)
    env = with_devices(dict(os.environ, JAX_PLATFORMS="cpu"), None)
    return Background([os.path.join(os.path.dirname(sys.executable), "ediffi-train"), "--config", cfg,
                       "--workdir", str(directory / "w"), "--config.mesh.fsdp=2"], env=env)


def _plan_bad_mesh(directory: Path) -> Background:
    """ediffi-plan with a mesh that does not divide this machine's 1 device."""
    return Background([os.path.join(os.path.dirname(sys.executable), "ediffi-plan"), "--config", "configs/base64.py",
                       "--mesh", "data=-1,fsdp=3"], env=with_devices(os.environ, None))


# Started at the beginning of the session, one after another (tests/conftest.py); each on its own copy of the
# dataset (built by one process: in C, process 0 builds it while process 1 waits).
BACKGROUND = {"sharded_B": _eight_devices, "sharded_C": _two_processes, "sharded_bad_mesh": _bad_mesh_cli,
              "plan_bad_mesh": _plan_bad_mesh}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir, lane):
    """A: 1 device (this process). B: 8 devices, data 4 × fsdp 2. C: 2 processes × 4 devices on a hybrid
    mesh (data 2 per process × 2 processes, fsdp 2). Same config (the one-level micro model; a checkpoint every
    2 steps, no evaluation), same 4 steps. B and C run in the background."""
    tmp = tmp_path_factory.mktemp("sharded")
    cfg = write_config_file(tmp / "config.py", data_dir, num_steps=STEPS, ckpt_every=2)
    t0 = time.perf_counter()
    train(load_config_file(cfg), str(tmp / "A"))
    t_a = time.perf_counter() - t0
    b, c = lane["sharded_B"], lane["sharded_C"]
    pb = b.result(timeout=600)
    assert pb.returncode == 0, f"8-device run exited {pb.returncode}\n{pb.stdout[-3000:]}\n{pb.stderr[-3000:]}"
    pc = c.result(timeout=600)
    logs = {p.name: p.read_text() for p in sorted((c.directory / "logs").iterdir())}
    assert pc.returncode == 0, pc.stderr[-2000:] + "".join(f"\n--- {k}\n{v[-3000:]}" for k, v in logs.items())
    print(f"\nrun A (1 device, in process) {t_a:.1f} s; in the background: B (8 devices) {b.seconds:.1f} s, "
          f"C (2 processes x 4 devices) {c.seconds:.1f} s; waited {time.perf_counter() - t0 - t_a:.1f} s for them")
    dirs = {"A": str(tmp / "A"), "B": str(b.directory / "B"), "C": str(c.directory / "C")}
    return dict(tmp=tmp, cfg=cfg, dirs=dirs, b=json.loads(pb.stdout.strip().splitlines()[-1]), logs=logs)


def _losses(workdir: str) -> np.ndarray:
    scalars = read_scalars(os.path.join(workdir, "tb"))["train/loss"]
    return np.array([v for _, v in scalars]), [s for s, _ in scalars]


def _final_state(cfg: str, workdir: str):
    config = load_config_file(cfg)
    _, params = split_model(nnx.eval_shape(lambda: build_model(config, config.seed)))
    tx = make_optimizer(config.optim)
    ckpt = Checkpointer(workdir, read_only=True)
    state, _, step = ckpt.restore(abstract_like(jax.eval_shape(lambda p: init_train_state(p, tx), params)))
    ckpt.close()
    assert step == STEPS
    return state


def _assert_same_params(a, b) -> float:
    """Parameters and EMA equal to 1e-5 relative per array. A zero-initialised array that barely moved (output
    convs; attention key biases, whose gradient is 0 in exact arithmetic, so Adam turns float noise into a
    1e-11 step) is measured against 0.01 instead of its own tiny scale. Returns the worst ratio."""
    worst = 0.0
    for part in ("params", "ema"):
        pairs = zip(jax.tree_util.tree_leaves_with_path(getattr(a, part)), jax.tree.leaves(getattr(b, part)))
        for (path, x), y in pairs:
            x, y = np.asarray(x), np.asarray(y)
            ratio = np.abs(x - y).max() / (1e-5 * max(np.abs(x).max(), 1e-2))
            assert ratio <= 1.0, (part, jax.tree_util.keystr(path), np.abs(x - y).max(), np.abs(x).max())
            worst = max(worst, float(ratio))
    return worst


def test_eight_devices_train_like_one(runs):
    (la, sa), (lb, sb) = _losses(runs["dirs"]["A"]), _losses(runs["dirs"]["B"])
    assert sa == sb == list(range(1, STEPS + 1))
    rel = np.abs(la - lb) / np.abs(la)
    print(f"losses 1 device {np.round(la, 6)}, 8 devices max rel diff {rel.max():.1e}")
    assert rel.max() <= 1e-5
    worst = _assert_same_params(_final_state(runs["cfg"], runs["dirs"]["A"]),
                                _final_state(runs["cfg"], runs["dirs"]["B"]))
    print(f"params/EMA after {STEPS} steps: worst |diff| / tolerance {worst:.3f}")


def test_state_is_really_sharded(runs):
    b = runs["b"]
    # The checkpoint records how the run held its state: the largest kernel split over fsdp.
    assert "fsdp" in json.dumps(b["saved"]["spec"]), b["saved"]
    shape, shards = b["kernel"]["shape"], b["kernel"]["shards"]
    assert len(shards) == 8
    for dev_shape in shards.values():  # halved on one axis by fsdp = 2, replicated over data
        assert np.prod(dev_shape) * 2 == np.prod(shape), (shape, dev_shape)
    print(f"largest kernel {b['saved']['name']} {shape} → {shards['0']} per device; device 0 holds "
          + ", ".join(f"{k} {v:.3f}" for k, v in b["fraction"].items()) + " of the state")
    for part, fraction in b["fraction"].items():
        assert 0.5 <= fraction < 0.6, (part, fraction)  # 1/2 by fsdp, plus small replicated norms and biases


def test_two_processes_train_like_one_process(runs):
    (lb, _), (lc, sc) = _losses(runs["dirs"]["B"]), _losses(runs["dirs"]["C"])
    assert sc == list(range(1, STEPS + 1))
    rel = np.abs(lb - lc) / np.abs(lb)
    print(f"2 processes x 4 devices vs 1 process x 8 devices: max rel loss diff {rel.max():.1e}")
    assert rel.max() <= 1e-5
    logs = runs["logs"]
    assert set(logs) == {"process_0.log", "process_1.log"}
    assert "process 1 of 2" in logs["process_1.log"] and "batch 4 per process" in logs["process_1.log"]
    assert "train step compiled" in logs["process_1.log"]
    # Only process 0 writes TensorBoard; both took part in the checkpoints.
    assert len(os.listdir(os.path.join(runs["dirs"]["C"], "tb"))) == 1
    assert sorted(os.listdir(os.path.join(runs["dirs"]["C"], "checkpoints"))) == [str(STEPS)]


def test_checkpoint_from_eight_devices_resumes_on_one(runs):
    """B's step-2 checkpoint (8 devices) restored on this process's one device: steps 3-4 equal run A's."""
    resumed = str(runs["tmp"] / "D")
    shutil.copytree(runs["dirs"]["B"], resumed, ignore=shutil.ignore_patterns("tb"))
    shutil.rmtree(os.path.join(resumed, "checkpoints", str(STEPS)))
    assert jax.device_count() == 1
    train(load_config_file(runs["cfg"]), resumed)
    (la, _), (ld, sd) = _losses(runs["dirs"]["A"]), _losses(resumed)
    assert sd == [3, 4]
    rel = np.abs(la[2:] - ld) / np.abs(la[2:])
    print(f"resumed on 1 device from the 8-device checkpoint: max rel loss diff {rel.max():.1e}")
    assert rel.max() <= 1e-5
    _assert_same_params(_final_state(runs["cfg"], runs["dirs"]["A"]), _final_state(runs["cfg"], resumed))


def test_bad_inputs_fail_before_compiling(runs, lane):
    errors = runs["b"]["errors"]
    expected = {
        "mesh": "config.mesh: device count 8 is not divisible by the fixed mesh sizes",
        "batch": "train.batch_size=12 is not divisible by the data x fsdp mesh size 8",
        "workdir": "cannot create workdir",
    }
    for name, start in expected.items():
        e = errors[name]
        assert e is not None and e["msg"].startswith(start) and "\n" not in e["msg"], (name, e)
        assert e["compiles"] == 0 and not e["created"], (name, e)
    assert "Not a directory" in errors["workdir"]["msg"]
    from ediffi_jax.train.sharding import mesh_from_config

    for cfg, msg in [({"dcn_data": 2}, "config.mesh: device count 1 is not divisible by the DCN factors"),
                     ({"data": 1, "fsdp": 2}, r"config.mesh: mesh \{'data': 1, 'fsdp': 2, 'tensor': 1\} needs 2"),
                     ({"fsdp": "2"}, "config.mesh.fsdp='2' is not an integer")]:
        with pytest.raises(ValueError, match=msg):
            mesh_from_config(cfg)
    assert dict(mesh_from_config({}).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    # Through the command line (in the background): exit status 2 and one line.
    run = lane["sharded_bad_mesh"]
    p = run.result(timeout=300)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, p.stderr[-2000:]
    assert lines[-1] == ("ediffi-train: error: config.mesh: device count 1 is not divisible by the fixed mesh "
                         "sizes {'data': -1, 'fsdp': 2, 'tensor': 1}"), lines
    assert not (run.directory / "w").exists()


def test_plan_of_the_paper_model_on_32_devices(lane):
    """base64 + T5-XXL + CLIP-L text/vision on data 8 × fsdp 4 (the figures quoted in docs/scaling.md)."""
    from ediffi_jax.models.t5 import T5Config
    from ediffi_jax.train.plan import format_plan, parse_mesh, plan, resolve_mesh

    sizes = parse_mesh("data=8,fsdp=4")
    assert sizes == {"data": 8, "fsdp": 4, "tensor": 1}
    r = plan(load_config_file(os.path.join(REPO, "configs", "base64.py")), sizes)
    print("\n" + format_plan(r, sizes, "configs/base64.py"))
    parts = r["parts"]
    assert r["params"] == 715_895_555 and r["batch_per_device"] == 2048 // 32
    assert parts["params"]["total"] == 4 * r["params"] and parts["ema"] == parts["params"]
    assert parts["optimizer"]["total"] == 2 * parts["params"]["total"] + 12  # AdamW moments + 3 int32 counts
    assert parts["encoder t5"]["total"] == 4 * T5Config.xxl().num_params()
    assert set(parts) == {"params", "ema", "optimizer", "encoder t5", "encoder clip_text", "encoder clip_image"}
    for name, p in parts.items():  # fsdp 4 divides each part by 4, up to small replicated norms and biases
        assert p["total"] / 4 <= p["per_device_max"] <= p["total"] / 4 * 1.003, name
    assert r["total"]["per_device_max"] == sum(p["per_device_max"] for p in parts.values())
    assert 7.5 < r["total"]["per_device_max"] / 2**30 < 7.51  # of 30.0 GiB in all
    # Bad meshes: one line each (the CLI prints it and exits 2).
    for text, msg in [("data=8,fsdp=x", "--mesh entry 'fsdp=x'"), ("pipe=2", "--mesh entry 'pipe=2'"),
                      ("data=-1,data=2", "--mesh entry 'data=2'")]:
        with pytest.raises(ValueError, match=msg):
            parse_mesh(text)
    with pytest.raises(ValueError, match=r"device count 32 is not divisible by the fixed mesh sizes"):
        resolve_mesh(parse_mesh("data=-1,fsdp=3"), 32)
    with pytest.raises(ValueError, match="not divisible by the data x fsdp mesh size 3"):
        plan(load_config_file(os.path.join(REPO, "configs", "base64.py")), parse_mesh("fsdp=3"))
    p = lane["plan_bad_mesh"].result(timeout=300)
    assert p.returncode == 2 and p.stdout == "", p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == [
        "ediffi-plan: error: device count 1 is not divisible by the fixed mesh sizes "
        "{'data': -1, 'fsdp': 3, 'tensor': 1}"]
