"""`ediffi-plan --config configs/base64.py --mesh data=8,fsdp=4 [--config.x=y ...]`: memory per device of a run.

Builds the whole train state abstractly (`nnx.eval_shape`: parameters, EMA, AdamW moments and counts) and the
frozen encoders at their configured sizes with the vocabularies of the released tokenizers (T5 32,128; CLIP
49,408: what a run with `pretrained_dir` holds), maps every array through the logical-axis rules of
`ediffi_jax/sharding.py` onto a simulated mesh (no devices needed: a 256-chip pod plans on a laptop), and prints
the bytes each device holds, part by part. Activations are not included: compile the step on the real mesh
(ediffi-train logs its memory analysis) for those.

`--mesh` takes axis sizes (`data`, `fsdp`, `tensor`; -1 = the remaining devices); without it, `config.mesh`
(ICI size x DCN factor per axis). `--num_devices N` checks that the mesh covers exactly N devices and fills a -1;
without it a -1 is filled from this machine's real devices (`jax.device_count()`). A malformed `--mesh` or sizes
that do not divide the device count are one error line, exit status 2.
"""

from __future__ import annotations

import sys

import jax
from absl import flags
from ml_collections import config_flags

from ediffi_jax.cli.common import quiet_logs, run_main
from ediffi_jax.train.plan import AXES, format_plan, mesh_from_config, parse_mesh, plan, resolve_mesh

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file (get_config()).",
                                          lock_config=True)
_MESH = flags.DEFINE_string("mesh", None, "Simulated mesh, e.g. data=8,fsdp=4 or fsdp=256 (default: config.mesh).")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "Device count the mesh must cover (fills a -1 size).")

def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}")
    config = _CONFIG.value
    requested = parse_mesh(_MESH.value) if _MESH.value is not None else {a: int(config.mesh[a]) for a in AXES}
    num_devices = _NUM_DEVICES.value
    if num_devices is None and -1 in requested.values():
        num_devices = jax.device_count()  # fill the -1 from this machine's real devices
    if _MESH.value is not None:
        sizes = resolve_mesh(requested, num_devices)
    else:
        sizes = mesh_from_config(config.mesh, num_devices)
    print(format_plan(plan(config, sizes), sizes, getattr(flags.FLAGS["config"], "config_filename", "?")))


def main(argv: list[str] | None = None) -> None:
    quiet_logs()
    run_main(_main, argv or sys.argv, required=("config",))


if __name__ == "__main__":
    main()
