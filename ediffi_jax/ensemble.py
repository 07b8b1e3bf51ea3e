"""Ensembles of expert denoisers on disk (eDiff-I §4): one directory that sampling and evaluation load in one call.

    DIR/config.json      the shared config (model shape, encoders); `expert.layout` is the ensemble's tree
    DIR/encoders/        the frozen encoders all experts were trained with
    DIR/ensemble.json    {"tree": ExpertTree.to_dict(), "leaves": [{"path", "step", "source"}, …]} (low σ → high σ)
    DIR/leaves/<i>/      the parameters of leaf i (EMA of its run unless assembled otherwise)

`assemble_ensemble(out, {leaf path: run dir})` builds it from the experts' training runs (checking that each run
trained that leaf, that all share one model shape and one set of encoders). `load_ensemble(DIR)` returns a
`TextToImage` whose sampler runs, at each Heun evaluation, only the expert owning that σ. Any single-model run
or export loads as a one-leaf ensemble, so evaluation code needs one path for both.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ediffi_jax.encoders import FrozenEncoders, save_encoders, setup_encoders
from ediffi_jax.experts import ExpertTree, tree_from_config
from ediffi_jax.text_to_image import ENCODERS, TextToImage
from ediffi_jax.tracing import abstract_module
from ediffi_jax.train.checkpoint import abstract_like, check_compatible, config_to_dict
from ediffi_jax.train.step import build_model, split_model

ENSEMBLE_JSON = "ensemble.json"
LEAVES = "leaves"


def save_ensemble(
    out_dir: str,
    config: ml_collections.ConfigDict,
    encoders: FrozenEncoders,
    tree: ExpertTree,
    leaf_params: Sequence[nnx.State],
    steps: Sequence[int],
    sources: Sequence[str],
) -> str:
    """Writes the ensemble layout (refuses a non-empty `out_dir`)."""
    if len(leaf_params) != len(tree.leaf_paths):
        raise ValueError(f"{len(leaf_params)} parameter states for {len(tree.leaf_paths)} leaves {tree.leaf_paths}")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ValueError(f"ensemble directory {out_dir!r} exists and is not empty; refusing to overwrite it")
    os.makedirs(out_dir, exist_ok=True)
    cfg = config_to_dict(config)
    cfg["expert"].update(node="", parent="")
    for enc in cfg["encoders"].values():
        if not enc["pretrained_dir"]:
            enc["tokenizer_dir"] = ""
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_encoders(encoders, config, os.path.join(out_dir, ENCODERS))
    with ocp.StandardCheckpointer() as ckptr:
        for i, params in enumerate(leaf_params):
            ckptr.save(os.path.abspath(os.path.join(out_dir, LEAVES, str(i))), params)
    leaves = [{"path": p, "step": int(s), "source": str(src)} for p, s, src in zip(tree.leaf_paths, steps, sources)]
    with open(os.path.join(out_dir, ENSEMBLE_JSON), "w") as f:
        json.dump({"tree": tree.to_dict(), "leaves": leaves}, f, indent=2)
    return out_dir


def assemble_ensemble(out_dir: str, runs: Mapping[str, str], layout: str | None = None) -> str:
    """Builds an ensemble from its experts' runs: `runs` maps every leaf path of the tree to the workdir (or
    export) that trained it. `layout` defaults to the runs' `config.expert.layout`."""
    if not runs:
        raise ValueError("no expert runs given")
    pipes = {path: TextToImage.from_workdir(d) for path, d in runs.items()}
    first = next(iter(pipes.values()))
    config = ml_collections.ConfigDict(config_to_dict(first.config))
    if layout is not None:
        config.expert.layout = layout
    tree = tree_from_config(config)
    missing = [p for p in tree.leaf_paths if p not in runs]
    extra = [p for p in runs if p not in tree.leaf_paths]
    if missing or extra:
        raise ValueError(f"expert.layout={config.expert.layout!r} has leaves {list(tree.leaf_paths)}; "
                         f"runs are missing {missing} and name unknown leaves {extra}")
    for path, pipe in pipes.items():
        check_compatible(config_to_dict(pipe.config), config, runs[path])
        trained = str(pipe.config.expert.node)
        if trained != path and not (len(tree.leaf_paths) == 1 and trained == ""):
            raise ValueError(f"run {runs[path]!r} trained expert node {trained!r}, not leaf {path!r}")
        for a, b in zip(jax.tree.leaves(pipe.encoders.params), jax.tree.leaves(first.encoders.params)):
            if a.shape != b.shape or not np.array_equal(np.asarray(a), np.asarray(b)):
                raise ValueError(f"run {runs[path]!r} has other frozen encoders than {runs[next(iter(runs))]!r}")
    ordered = [pipes[p] for p in tree.leaf_paths]
    return save_ensemble(out_dir, config, first.encoders, tree, [p.params for p in ordered],
                         [p.step for p in ordered], [os.path.abspath(runs[p]) for p in tree.leaf_paths])


def load_ensemble(path: str) -> TextToImage:
    """An ensemble directory, or any single-model run / export as a one-leaf ensemble (layout "A")."""
    manifest = os.path.join(path, ENSEMBLE_JSON)
    if not os.path.isfile(manifest):
        pipe = TextToImage.from_workdir(path)
        tree = ExpertTree.preset("A", tree_from_config(pipe.config).dist)
        return dataclasses.replace(pipe, tree=tree, experts=(pipe.params,), _samplers={})
    with open(manifest) as f:
        info = json.load(f)
    with open(os.path.join(path, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    tree = ExpertTree.from_dict(info["tree"])
    if [leaf["path"] for leaf in info["leaves"]] != list(tree.leaf_paths):
        raise ValueError(f"{manifest}: leaves {[leaf['path'] for leaf in info['leaves']]} do not match the tree's "
                         f"{list(tree.leaf_paths)}")
    encoders = setup_encoders(config, os.path.join(path, ENCODERS))
    graphdef, abstract = split_model(abstract_module(lambda: build_model(config, config.seed)))
    with ocp.StandardCheckpointer() as ckptr:
        experts = tuple(ckptr.restore(os.path.abspath(os.path.join(path, LEAVES, str(i))), abstract_like(abstract))
                        for i in range(len(tree.leaf_paths)))
    step = max(int(leaf["step"]) for leaf in info["leaves"])
    return TextToImage(config, encoders, graphdef, experts[0], step, tree=tree, experts=experts)
