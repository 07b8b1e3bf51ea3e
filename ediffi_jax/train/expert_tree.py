"""Training an ensemble of expert denoisers node by node (eDiff-I §4), then assembling it (`ediffi-expert-tree`).

The root trains on all σ into ROOT_DIR/root, then every node of `tree.training_order()` from the node it starts
from (ROOT_DIR/<node>, parent ROOT_DIR/<init node>), each on its σ interval only; the leaves are assembled into
ROOT_DIR/ensemble. Re-running resumes: finished nodes are no-ops, an interrupted node continues from its last
checkpoint.
"""

from __future__ import annotations

import os

import ml_collections


def train_expert_tree(config: ml_collections.ConfigDict, root_dir: str, child_steps: int | None = None) -> str:
    """Trains every node the layout needs (resuming), assembles ROOT_DIR/ensemble; returns its path."""
    from ediffi_jax.ensemble import ENSEMBLE_JSON, assemble_ensemble
    from ediffi_jax.experts import tree_from_config
    from ediffi_jax.train.loop import train

    tree = tree_from_config(config)
    if child_steps is not None and child_steps < 1:
        raise ValueError(f"--child_steps must be >= 1, got {child_steps}")
    order = [""] + [p for p in tree.training_order() if p != ""]
    dirs = {p: os.path.join(root_dir, p or "root") for p in order}
    for path in order:
        c = config.copy_and_resolve_references()
        with c.unlocked():
            c.expert.node = path
            c.expert.parent = dirs[tree.init_from(path)] if path else ""
            if path and child_steps is not None:
                c.train.num_steps = child_steps
        print(f"expert-tree: node {path or 'root'!r} σ∈{tree.interval(path)} → {dirs[path]}", flush=True)
        train(c, dirs[path])
    out = os.path.join(root_dir, "ensemble")
    if os.path.isfile(os.path.join(out, ENSEMBLE_JSON)):
        print(f"expert-tree: {out} already assembled")
        return out
    return assemble_ensemble(out, {p: dirs[p] for p in tree.leaf_paths})
