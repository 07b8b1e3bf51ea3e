"""Starting an expert of the eDiff-I ensemble from its parent's checkpoint (eDiff-I §4).

A run with `config.expert.node = PATH` trains the expert that owns PATH's σ interval: its σ are drawn only from
the training distribution truncated to that interval, and on a fresh start its parameters are the parent run's
(EMA by default) with a fresh optimizer and step 0. The parent's workdir is opened read-only; the child copies
the parent's frozen encoders so both condition on exactly the same embeddings.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import ml_collections
from flax import nnx

from ediffi_jax.edm import LogNormalSigma
from ediffi_jax.experts import ExpertTree, tree_from_config
from ediffi_jax.train.checkpoint import Checkpointer, abstract_like, check_compatible
from ediffi_jax.train.step import init_train_state, make_optimizer

log = logging.getLogger(__name__)

INIT = ("ema", "params")


def expert_sigma_dist(config: ml_collections.ConfigDict) -> tuple[ExpertTree, LogNormalSigma]:
    """(tree, training σ distribution of `config.expert.node`), validating the node and its parent setting."""
    tree = tree_from_config(config)
    node = str(config.expert.node)
    try:
        dist = tree.sigma_dist(node)
    except KeyError:
        names = ", ".join(repr(n.path) for n in tree.nodes)
        raise ValueError(f"expert.node={node!r} is not a node of expert.layout={config.expert.layout!r} "
                         f"(nodes: {names})") from None
    if node and not config.expert.parent:
        raise ValueError(f"expert.node={node!r} needs expert.parent (the workdir of node "
                         f"{tree.init_from(node)!r} to start from)")
    if config.expert.init not in INIT:
        raise ValueError(f"expert.init={config.expert.init!r} is not one of {INIT}")
    return tree, dist


def _parent_config(parent: str) -> dict:
    path = os.path.join(parent, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"expert.parent={parent!r} has no config.json: not a training run")
    with open(path) as f:
        return json.load(f)


def check_parent(config: ml_collections.ConfigDict, tree: ExpertTree) -> str:
    """The parent workdir, after checking it trained `tree.init_from(node)` with this model shape."""
    parent = os.path.expanduser(str(config.expert.parent))
    stored = _parent_config(parent)
    check_compatible(stored, config, parent)  # one line naming the first differing model field
    want = tree.init_from(str(config.expert.node))
    have = stored.get("expert", {}).get("node", "")
    if have != want:
        raise ValueError(f"expert.parent={parent!r} trained node {have!r}, but node {config.expert.node!r} "
                         f"starts from node {want!r}")
    return parent


def copy_parent_encoders(parent: str, encoder_dir: str) -> None:
    """The child uses its parent's frozen encoders (copied once; the parent keeps its own)."""
    src = os.path.join(parent, "encoders")
    if os.path.isdir(src) and not os.path.isdir(encoder_dir) and jax.process_index() == 0:
        shutil.copytree(src, encoder_dir)


def params_from_parent(config: ml_collections.ConfigDict, parent: str, params: nnx.State,
                       mesh: jax.sharding.Mesh | None = None) -> nnx.State:
    """The parent's latest EMA (or raw) parameters, restored into the structure of `params` (concrete or
    abstract) — with a `mesh`, straight into the train state's shardings on it, whatever mesh the parent used."""
    tx = make_optimizer(ml_collections.ConfigDict(_parent_config(parent)["optim"]))
    abstract = jax.eval_shape(lambda p: init_train_state(p, tx), params)
    if mesh is not None:
        from ediffi_jax.train.sharding import tree_shardings, with_shardings

        target = with_shardings(abstract, tree_shardings(abstract, mesh))
    else:
        target = abstract_like(abstract)
    ckpt = Checkpointer(parent, read_only=True)
    try:
        if ckpt.latest_step() is None:
            raise ValueError(f"expert.parent={parent!r} has no checkpoint yet: train it first")
        state, _, step = ckpt.restore(target)
    finally:
        ckpt.close()
    log.info("expert %r starts from %s params of %s (step %d)", config.expert.node, config.expert.init, parent,
             step)
    return state.ema if config.expert.init == "ema" else state.params
