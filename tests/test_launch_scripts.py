"""launch/*.sh without a cloud: syntax, usage errors, DRY_RUN output, and the real code paths against stub
`gcloud`/`srun`/`sbatch` executables first on PATH (the gcloud stub runs `ssh --command` in a fake worker home)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU_POD, MULTISLICE, SLURM = LAUNCH / "tpu_pod.sh", LAUNCH / "multislice.sh", LAUNCH / "slurm_gpu.sh"
NEW_SCRIPTS = (TPU_POD, MULTISLICE, SLURM)
JAX_PIN = re.search(r'"jax==([^"]+)"', (REPO / "setup.py").read_text()).group(1)
WORKDIR = "/mnt/gcs/runs/my run"  # a space: the workdir must arrive as one word
TRICKY = "--config.data.name=it's \"q\" $HOME"  # quotes and a $ must arrive untouched

# Records its argv as one JSON line in $STUB_LOG. With $STUB_WORKER_HOME set, `gcloud ... scp SRC NAME:DEST` copies
# SRC to that home and `gcloud ... ssh --command C` runs C with bash there, like a worker's login shell would.
STUB = f"""#!{sys.executable}
import json, os, shutil, subprocess, sys
argv = sys.argv
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps([os.path.basename(argv[0])] + argv[1:]) + "\\n")
home = os.environ.get("STUB_WORKER_HOME")
if home and "scp" in argv:
    i = argv.index("scp")
    shutil.copy(argv[i + 1], os.path.join(home, argv[i + 2].split(":", 1)[1]))
if home and "ssh" in argv and "--command" in argv:
    cmd = argv[argv.index("--command") + 1]
    sys.exit(subprocess.run(["bash", "-c", cmd], cwd=home, env=dict(os.environ, HOME=home)).returncode)
"""

# `uv` on the worker: logs its argv to ~/uv.log; `uv venv` makes a .venv whose python only echoes.
FAKE_UV = """#!/usr/bin/env bash
echo "$*" >> "$HOME/uv.log"
if [ "$1" = venv ]; then
  mkdir -p .venv/bin && printf '#!/usr/bin/env bash\\necho fake-python "$@"\\n' > .venv/bin/python
  chmod +x .venv/bin/python
fi
"""

# The worker's `.venv/bin/python`: writes its argv (NUL-separated) and, if ./sleep exists, waits for SIGTERM.
FAKE_PYTHON = """#!/usr/bin/env bash
printf '%s\\0' "$@" > argv.bin
echo "fake train on $(hostname)"
if [ -e sleep ]; then
  sleep 30 & pid=$!
  trap 'kill "$pid"; echo term > terminated; exit 0' TERM
  wait "$pid"
fi
"""


def _exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def env(tmp_path):
    """A clean environment with stub gcloud/srun/sbatch first on PATH; STUB_LOG collects their argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gcloud", "srun", "sbatch"):
        _exe(bin_dir / name, STUB)
    _exe(bin_dir / "uv", FAKE_UV)
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SBATCH_", "EDIFFI_"))
            and k not in ("DRY_RUN", "FOREGROUND", "GCLOUD_FLAGS", "FORWARD_ENV", "REMOTE_DIR", "PIP_EXTRA_ARGS",
                          "JAX_LOCAL_DEVICE_IDS", "PYTHON", "LOG_DIR")}
    return dict(keep, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", STUB_LOG=str(tmp_path / "stub.log"))


def _run(script: Path, *args: str, env: dict, cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=dict(env, **extra), cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def _calls(env: dict) -> list[list[str]]:
    log = Path(env["STUB_LOG"])
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _assert_train_args(words: list[str], config: str, *overrides: str) -> None:
    """`-m ediffi_jax.cli.train --config C --workdir W --config.distributed.initialize=True OVERRIDES` in order."""
    i = next(i for i in range(1, len(words)) if words[i - 1:i + 1] == ["-m", "ediffi_jax.cli.train"])
    assert words[i + 1:i + 6 + len(overrides)] == [
        "--config", config, "--workdir", WORKDIR, "--config.distributed.initialize=True", *overrides]


@pytest.mark.parametrize("script", sorted(LAUNCH.glob("*.sh")), ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("script,args", [
    (TPU_POD, ()), (TPU_POD, ("tpu", "zone", "cfg")), (TPU_POD, ("setup", "tpu")),
    (TPU_POD, ("logs", "t", "z", "0", "1")),
    (MULTISLICE, ()), (MULTISLICE, ("qr", "zone", "2", "cfg")), (MULTISLICE, ("train", "qr", "z", "two", "c", "w")),
    (SLURM, ()), (SLURM, ("cfg",)),
], ids=lambda a: a.name if isinstance(a, Path) else " ".join(a) or "no-args")
def test_missing_or_bad_args_exit_2_with_usage(script, args, env, tmp_path):
    r = _run(script, *args, env=env, cwd=tmp_path, DRY_RUN="1")
    assert r.returncode == 2, r.stderr
    assert r.stderr.lstrip().startswith(("usage:", str(script))) and "usage:" in r.stderr
    assert _calls(env) == []


def test_tpu_pod_dry_run_prints_setup_and_train(env, tmp_path):
    r = _run(TPU_POD, "my-tpu", "us-central2-b", "configs/base64.py", WORKDIR, "--config.train.batch_size=256",
             TRICKY, env=env, cwd=tmp_path, DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    assert _calls(env) == []  # nothing ran, not even the stubs
    pack, scp, setup, train = [shlex.split(line) for line in r.stdout.splitlines()]
    assert pack[:2] == ["git", "-C"] and "tar" in pack
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "my-tpu:ediffi_jax.tar.gz" in scp
    for cmd in (scp, setup, train):
        assert "--worker=all" in cmd and _option(cmd, "--zone") == "us-central2-b"
    assert setup[:6] == train[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert f"jax[tpu]=={JAX_PIN}" in shlex.split(_option(setup, "--command"))
    remote = _option(train, "--command")
    _assert_train_args(shlex.split(remote), "configs/base64.py", "--config.train.batch_size=256", TRICKY)
    assert "nohup setsid" in remote and "logs/train-$(hostname).log" in remote  # detached, one log per worker


def test_tpu_pod_setup_ships_the_tree_and_installs_on_a_fake_worker(env, tmp_path):
    home, tmp = tmp_path / "worker", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = dict(env, STUB_WORKER_HOME=str(home), TMPDIR=str(tmp))
    r = _run(TPU_POD, "setup", "my-tpu", "zone-a", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    tree = home / "ediffi_jax"
    assert (tree / "launch" / "tpu_pod.sh").is_file() and (tree / "setup.py").is_file()
    assert (tree / ".venv" / "bin" / "python").is_file() and not (tree / ".venv" / "pyvenv.cfg").exists()
    assert not (home / "ediffi_jax.tar.gz").exists() and list(tmp.iterdir()) == []  # both tarballs cleaned up
    assert (home / "uv.log").read_text().splitlines() == [
        "venv -q --python 3.11 .venv", f"pip install -q --python .venv/bin/python jax[tpu]=={JAX_PIN} -e ."]
    assert "fake-python -c import jax" in r.stdout
    # Again: stale files go, .venv (not recreated) and logs stay.
    (tree / "stale.py").touch()
    (tree / "logs").mkdir()
    (tree / "logs" / "keep.log").touch()
    assert _run(TPU_POD, "setup", "my-tpu", "zone-a", env=env, cwd=tmp_path).returncode == 0
    assert not (tree / "stale.py").exists() and (tree / "logs" / "keep.log").exists()
    assert sum(line.startswith("venv") for line in (home / "uv.log").read_text().splitlines()) == 1
    # A directory that no setup made is never wiped.
    (home / "mine").mkdir()
    (home / "mine" / "precious").touch()
    r = _run(TPU_POD, "setup", "my-tpu", "zone-a", env=env, cwd=tmp_path, REMOTE_DIR="mine")
    assert r.returncode != 0 and "no setup made it" in r.stderr and (home / "mine" / "precious").exists()


def test_tpu_pod_train_detached_then_stop_on_a_fake_worker(env, tmp_path):
    """The real path: the gcloud stub runs the remote command in a worker home; it detaches; `stop` SIGTERMs it."""
    home = tmp_path / "worker"
    (home / "ediffi_jax" / ".venv" / "bin").mkdir(parents=True)
    tree = home / "ediffi_jax"
    _exe(tree / ".venv" / "bin" / "python", FAKE_PYTHON)
    (tree / "sleep").touch()
    env = dict(env, STUB_WORKER_HOME=str(home))
    r = _run(TPU_POD, "train", "my-tpu", "zone-a", str(REPO / "configs" / "tiny.py"), WORKDIR, TRICKY, env=env,
             cwd=tmp_path)
    pid = None
    try:
        assert r.returncode == 0, r.stderr
        assert "started pid" in r.stdout and "logs my-tpu zone-a" in r.stdout
        pid = int((tree / "logs" / "train.pid").read_text())
        for _ in range(100):
            if (tree / "argv.bin").exists():
                break
            time.sleep(0.05)
        argv = (tree / "argv.bin").read_bytes().decode().split("\0")[:-1]
        _assert_train_args(argv, "configs/tiny.py", TRICKY)  # the local config path, as the worker names it
        again = _run(TPU_POD, "train", "my-tpu", "zone-a", "configs/tiny.py", WORKDIR, env=env, cwd=tmp_path)
        assert again.returncode == 1 and "a run is going" in again.stderr
        stop = _run(TPU_POD, "stop", "my-tpu", "zone-a", env=env, cwd=tmp_path)
        assert stop.returncode == 0 and "SIGTERM sent" in stop.stdout, stop.stderr
        for _ in range(100):
            if (tree / "terminated").exists():
                break
            time.sleep(0.05)
        assert (tree / "terminated").exists()
        logs = list((tree / "logs").glob("train-*.log"))
        assert len(logs) == 1 and "fake train on" in logs[0].read_text()
        ssh = [c for c in _calls(env) if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
        assert len(ssh) == 3 and all("--worker=all" in c for c in ssh)
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_tpu_pod_foreground_streams_and_logs(env, tmp_path):
    home = tmp_path / "worker"
    tree = home / "ediffi_jax"
    (tree / ".venv" / "bin").mkdir(parents=True)
    _exe(tree / ".venv" / "bin" / "python", FAKE_PYTHON)
    r = _run(TPU_POD, "train", "t", "z", "configs/tiny.py", WORKDIR, "--config.mesh.fsdp=2", env=env, cwd=tmp_path,
             STUB_WORKER_HOME=str(home), FOREGROUND="1", FORWARD_ENV="XLA_MARK", XLA_MARK="a b")
    assert r.returncode == 0, r.stderr
    assert "fake train on" in r.stdout
    argv = (tree / "argv.bin").read_bytes().decode().split("\0")[:-1]
    _assert_train_args(argv, "configs/tiny.py", "--config.mesh.fsdp=2")
    assert "env 'XLA_MARK=a b' .venv/bin/python" in _option(_calls(env)[0], "--command")


def test_multislice_targets_every_node_and_sets_dcn_data(env, tmp_path):
    r = _run(MULTISLICE, "my-qr", "us-east5-a", "4", "configs/base64.py", WORKDIR, "--config.mesh.fsdp=16",
             env=env, cwd=tmp_path, DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    _, scp, setup, train = [shlex.split(line) for line in r.stdout.splitlines()]
    assert scp[:5] == ["gcloud", "compute", "tpus", "queued-resources", "scp"]
    for cmd in (scp, setup, train):
        assert "--node=all" in cmd and "--worker=all" in cmd and _option(cmd, "--zone") == "us-east5-a"
    assert train[:6] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "my-qr"]
    _assert_train_args(shlex.split(_option(train, "--command")), "configs/base64.py", "--config.mesh.dcn_data=4",
                       "--config.mesh.fsdp=16")
    fg = _run(MULTISLICE, "train", "my-qr", "z", "2", "c.py", WORKDIR, env=env, cwd=tmp_path, DRY_RUN="1",
              FOREGROUND="1")
    assert "--batch-size=all" in shlex.split(fg.stdout)  # every worker must join jax.distributed at once
    logs = _run(MULTISLICE, "logs", "my-qr", "z", "1", "3", env=env, cwd=tmp_path, DRY_RUN="1")
    assert ["--node=1", "--worker=3"] == [w for w in shlex.split(logs.stdout) if w.startswith(("--node", "--worker"))]


def test_slurm_header_and_self_submission(env, tmp_path):
    header = [line for line in SLURM.read_text().splitlines() if line.startswith("#SBATCH")]
    for flag in ("--nodes=", "--gpus-per-node=", "--ntasks-per-node=1", "--signal=TERM@"):
        assert any(flag in line for line in header), flag
    r = _run(SLURM, "configs/base64.py", WORKDIR, "--config.mesh.fsdp=8", env=env, cwd=tmp_path,
             SBATCH_FLAGS="--nodes=4 --account=acct")
    assert r.returncode == 0, r.stderr
    (sbatch,) = _calls(env)
    assert sbatch == ["sbatch", "--nodes=4", "--account=acct", str(SLURM), "configs/base64.py", WORKDIR,
                      "--config.mesh.fsdp=8"]


def test_slurm_job_sruns_one_process_per_node(env, tmp_path):
    job = dict(SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(REPO), SLURM_GPUS_ON_NODE="4", SLURM_JOB_NUM_NODES="2")
    dry = _run(SLURM, "configs/base64.py", WORKDIR, TRICKY, env=env, cwd=tmp_path, DRY_RUN="1", **job)
    assert dry.returncode == 0, dry.stderr
    assert "srun --ntasks-per-node=1" in dry.stdout and _calls(env) == []
    r = _run(SLURM, "configs/base64.py", WORKDIR, TRICKY, env=env, cwd=tmp_path, **job)
    assert r.returncode == 0, r.stderr
    (srun,) = _calls(env)
    assert srun[0] == "srun" and "--ntasks-per-node=1" in srun and "--kill-on-bad-exit=1" in srun
    assert _option(srun, "--output") == "logs/train-%j-%t.log" and (tmp_path / "logs").is_dir()
    assert srun[srun.index("env") + 1:srun.index("env") + 3] == [
        "JAX_LOCAL_DEVICE_IDS=0,1,2,3", str(REPO / ".venv" / "bin" / "python")]
    _assert_train_args(srun, "configs/base64.py", TRICKY)
