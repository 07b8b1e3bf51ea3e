"""`ediffi-expert-tree`: train an ensemble of expert denoisers (eDiff-I §4) node by node, then assemble it.

    ediffi-expert-tree --config configs/tiny.py --root_dir /runs/experts --config.expert.layout=3-paper \
        [--child_steps 2000] [--config.x=y ...]

Trains the root on all σ into ROOT_DIR/root, then every node of `tree.training_order()` from the node it starts
from (ROOT_DIR/<node>, parent ROOT_DIR/<init node>), each on its σ interval only, and finally writes the ensemble
to ROOT_DIR/ensemble (load it with `TextToImage.from_workdir` / `ensemble.load_ensemble`). Re-running resumes:
finished nodes are no-ops, an interrupted node continues from its last checkpoint. Exit status 75 = stopped on
SIGTERM with a complete checkpoint (as `ediffi-train`).
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from ediffi_jax import compile_cache
from ediffi_jax.cli.common import quiet_logs, run_main
from ediffi_jax.train.expert_tree import train_expert_tree

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file (get_config()).",
                                          lock_config=True)
_ROOT = flags.DEFINE_string("root_dir", None, "Directory holding one workdir per node and the ensemble.")
_CHILD_STEPS = flags.DEFINE_integer("child_steps", None,
                                    "Training steps of every non-root node (default: config.train.num_steps).")
_COMPILE_CACHE = flags.DEFINE_string("compile_cache", "auto", compile_cache.FLAG_HELP + "; one for all nodes")


def _main(argv: list[str]) -> None:
    del argv
    if _ROOT.value is None:
        raise ValueError("--root_dir is required")
    from ediffi_jax.cli.train import EXIT_PREEMPTED
    from ediffi_jax.train.loop import Preempted
    from ediffi_jax.train.sharding import initialize_distributed

    initialize_distributed(_CONFIG.value)  # before anything touches devices
    compile_cache.enable(_COMPILE_CACHE.value, _ROOT.value)  # ROOT_DIR/compile_cache: every node's steps
    try:
        out = train_expert_tree(_CONFIG.value, _ROOT.value, _CHILD_STEPS.value)
    except Preempted:  # a node stopped on SIGTERM with a checkpoint: re-running resumes it
        sys.stdout.flush()
        sys.exit(EXIT_PREEMPTED)
    print(f"expert-tree: ensemble → {out}")


def main(argv: list[str] | None = None) -> None:
    quiet_logs()
    run_main(_main, argv or sys.argv, required=("config",))


if __name__ == "__main__":
    main()
