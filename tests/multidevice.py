"""Run code in a fresh Python with N fake CPU devices (JAX fixes its device count when the backend starts)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def run_multidevice(code: str, devices: int = 8, timeout: int = 300) -> str:
    """Runs ``code`` as a script with ``devices`` host-platform devices and returns its stdout.

    The child shares the tests' persistent compilation cache and gets ``NPROC=16`` so the CPU client's thread
    pool outnumbers the devices (see ENVIRONMENT.md, "the 2-core deadlock"). Raises RuntimeError with the
    child's stdout and stderr when it fails or times out.
    """
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["NPROC"] = "16"
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".jax_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
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
