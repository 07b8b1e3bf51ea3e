"""Run code in a fresh Python with N fake CPU devices (JAX fixes its device count when the backend starts), and
subprocesses that run in the background while the tests go on.

The suite is bound by XLA compiles, which use one core; the machine has more. So the long subprocess runs whose
results tests only read (the documented training command, multi-device runs) start at the beginning of the
session, one after another, in a `Lane` (tests/conftest.py), and each test waits for its run's result.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# The suite is bound by XLA:CPU compiles of tiny programs, mostly LLVM's optimisation: at LLVM -O0 the whole suite
# took 615 s instead of 705–840 s from a cold cache (and tests/test_precision_remat.py + test_unet.py 45 s instead
# of 64). XLA's HLO passes are unchanged, but the bits of some results are not (random initialisation, for one):
# every child a test starts inherits the flag (`with_devices` keeps it), so in-process and subprocess results
# compare bit for bit, and a child that must reproduce what the package computes (a committed artifact) runs with
# `package_env`. Benchmarks (bench/) and the package itself run at full optimisation; EDIFFI_TEST_FULL_OPT=1 runs
# the tests so too.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0",)


def apply_test_xla_flags(environ) -> None:
    """Adds `TEST_XLA_FLAGS` to ``environ["XLA_FLAGS"]`` unless EDIFFI_TEST_FULL_OPT=1 (or they are there)."""
    if environ.get("EDIFFI_TEST_FULL_OPT") == "1":
        return
    flags = environ.get("XLA_FLAGS", "").split()
    environ["XLA_FLAGS"] = " ".join([*flags, *(f for f in TEST_XLA_FLAGS if f not in flags)])


def package_env(env=None) -> dict[str, str]:
    """``env`` (default os.environ, copied) without `TEST_XLA_FLAGS`: a child computing as the package does."""
    env = dict(os.environ if env is None else env)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if f not in TEST_XLA_FLAGS)
    return env


def with_devices(env: dict[str, str], devices: int | None) -> dict[str, str]:
    """``env`` (a copy) whose XLA_FLAGS ask for ``devices`` host-platform devices (None: the default one), the
    suite's other XLA flags (tests/conftest.py) kept, so a child compiles what this process compiles."""
    env = dict(env)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def multidevice_env(devices: int) -> dict[str, str]:
    """The environment of a child with ``devices`` host-platform devices (see `run_multidevice`)."""
    env = with_devices(os.environ, devices)
    env["NPROC"] = "16"
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".jax_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


class Background:
    """A subprocess started now and collected later with `result()`, so that it runs while this process works
    on (the machine has spare cores while a test compiles). Output goes to files: a full pipe never blocks it."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, cwd: str = REPO):
        self._out = tempfile.TemporaryFile("w+")
        self._err = tempfile.TemporaryFile("w+")
        self.args = args
        # Its own process group: `kill` ends the children of a launcher script too.
        self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=self._out, stderr=self._err, text=True,
                                     start_new_session=True)
        self.started = time.perf_counter()
        self.seconds: float | None = None
        self.directory: Path | None = None  # set by `Lane`

    def result(self, timeout: float = 600) -> subprocess.CompletedProcess:
        """Waits for the process (killing it after `timeout` s) and returns its status, stdout and stderr."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        if self.seconds is None:
            self.seconds = time.perf_counter() - self.started
        outputs = []
        for f in (self._out, self._err):
            f.seek(0)
            outputs.append(f.read())
        return subprocess.CompletedProcess(self.args, self.proc.returncode, *outputs)

    def kill(self) -> None:
        """Ends the process and everything it started (no-op once it has ended)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def run_multidevice(code: str, devices: int = 8, timeout: int = 300) -> str:
    """Runs ``code`` as a script with ``devices`` host-platform devices and returns its stdout.

    The child shares the tests' persistent compilation cache and gets ``NPROC=16`` so the CPU client's thread
    pool outnumbers the devices (see ENVIRONMENT.md, "the 2-core deadlock"). Raises RuntimeError with the
    child's stdout and stderr when it fails or times out.
    """
    env = multidevice_env(devices)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(code)
        script = f.name
    try:
        proc = subprocess.run([sys.executable, script], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"multi-device script timed out after {timeout} s\n"
                           f"--- stdout ---\n{err.stdout}\n--- stderr ---\n{err.stderr}") from err
    finally:
        os.unlink(script)
    if proc.returncode:
        raise RuntimeError(f"multi-device script exited {proc.returncode}\n"
                           f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    return proc.stdout


class Lane:
    """Named background runs, started one after another by a thread (at most one run of the lane at a time).

    `add(name, start)`: `start(directory)` launches the run in a fresh directory of its own (made when added) and
    returns its `Background`, which keeps that `directory`. `lane[name]` is the run, started at once if the lane
    has not reached it yet; `lane[name].result()` waits for it.
    """

    def __init__(self, make_dir: Callable[[str], Path]):
        self._make_dir = make_dir
        self._pending: dict[str, tuple[Callable[[Path], Background], Path]] = {}
        self._runs: dict[str, Background | BaseException] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="background-lane", daemon=True)

    def add(self, name: str, start: Callable[[Path], Background]) -> None:
        self._pending[name] = (start, self._make_dir(name))

    def start(self) -> None:
        self._thread.start()

    def _launch(self, name: str) -> Background | BaseException:
        start, directory = self._pending.pop(name)
        try:
            run = start(directory)
            run.directory = directory
        except Exception as e:  # raised to the test that asks for the run
            run = e
        self._runs[name] = run
        return run

    def _work(self) -> None:
        while True:
            with self._lock:
                if self._closed or not self._pending:
                    return
                run = self._launch(next(iter(self._pending)))
            if isinstance(run, Background):
                run.proc.wait()

    def __getitem__(self, name: str) -> Background:
        with self._lock:
            run = self._runs[name] if name in self._runs else self._launch(name)
        if isinstance(run, BaseException):
            raise RuntimeError(f"background run {name!r} did not start") from run
        return run

    def close(self) -> None:
        with self._lock:
            self._closed = True
            runs = [r for r in self._runs.values() if isinstance(r, Background)]
        for run in runs:
            run.kill()
