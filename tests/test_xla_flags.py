"""ediffi_jax.xla_flags: the XLA:CPU flag the package adds to XLA_FLAGS, and when it leaves XLA_FLAGS alone."""

import os

from ediffi_jax.xla_flags import CPU_FLAGS, apply_cpu_flags

FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def test_added_once_after_existing_flags():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert apply_cpu_flags(env, "0.10.2") == [FLAG]
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}"
    assert apply_cpu_flags(env, "0.10.2") == []  # idempotent
    assert env["XLA_FLAGS"].count("ynn_fusion_type") == 1


def test_user_setting_opt_out_and_other_jaxlib_leave_it_alone():
    user = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=+dot"}
    assert apply_cpu_flags(user, "0.10.2") == [] and user["XLA_FLAGS"].endswith("=+dot")
    off = {"EDIFFI_XLA_FLAGS": "0"}
    assert apply_cpu_flags(off, "0.10.2") == [] and "XLA_FLAGS" not in off
    newer = {}
    assert apply_cpu_flags(newer, "0.11.0") == [] and "XLA_FLAGS" not in newer


def test_this_process_has_it():
    """`import ediffi_jax` (conftest) added it unless the environment said otherwise."""
    if os.environ.get("EDIFFI_XLA_FLAGS") != "0":
        assert all(f"--{k}" in os.environ.get("XLA_FLAGS", "") for k in CPU_FLAGS)
