"""Reading Hugging Face `save_pretrained` directories into our NNX encoders (shared by T5 and CLIP).

A model's importer supplies a *param table*: HF state-dict key → (attribute path in the NNX module, layout
transform). This module does the rest the same way for every encoder: find the local directory (hub names are
never downloaded), read `config.json` and the weights (`model.safetensors`, a sharded
`model.safetensors.index.json`, or `pytorch_model.bin`), and copy tensors strictly — one `ValueError` that lists
every missing key, unexpected key and shape mismatch, with shapes in the HF layout, and nothing written unless
everything fits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

# key -> (path in the module, transform: None | "T" (Linear [out, in] → [in, out]) | "conv" (OIHW → HWIO))
ParamTable = dict[str, tuple[tuple[str | int, ...], str | None]]

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def require_local_dir(local_dir: str, what: str) -> None:
    if not os.path.isdir(local_dir):
        raise ValueError(f"{what} checkpoint directory {local_dir!r} does not exist "
                         "(hub names are not downloaded; pass a local directory)")


def read_config_json(local_dir: str, what: str) -> tuple[str, dict[str, Any]]:
    """(path, parsed config.json) of a checkpoint directory."""
    path = os.path.join(local_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: config.json not found in {what} checkpoint directory {local_dir!r}")
    with open(path) as f:
        return path, json.load(f)


def read_weights(local_dir: str, what: str) -> tuple[str, dict[str, Any]]:
    """(path of the weight file read, name → numpy array) from a `save_pretrained` directory."""
    single, index, torch_bin = (os.path.join(local_dir, f) for f in WEIGHT_FILES)
    if os.path.isfile(single) or os.path.isfile(index):
        from safetensors.numpy import load_file

        if os.path.isfile(single):
            return single, dict(load_file(single))
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state: dict[str, Any] = {}
        for shard in shards:
            state.update(load_file(os.path.join(local_dir, shard)))
        return index, state
    if os.path.isfile(torch_bin):
        try:
            import torch
        except ImportError as e:
            raise ValueError(f"{torch_bin}: reading pytorch_model.bin needs torch, which is not installed") from e
        loaded = torch.load(torch_bin, map_location="cpu", weights_only=True)
        # numpy has no bfloat16: widen such tensors to float32 (the loader casts to the param dtype anyway).
        return torch_bin, {
            k: (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().numpy() for k, v in loaded.items()
        }
    raise ValueError(f"no {what} weights in {local_dir!r}: looked for {', '.join(WEIGHT_FILES)}")


def get_variable(model: nnx.Module, path: tuple[str | int, ...]) -> nnx.Variable:
    node: Any = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    if not isinstance(node, nnx.Variable):
        raise TypeError(f"path {path} does not lead to an nnx.Variable (got {type(node).__name__})")
    return node


def _to_ours(value: np.ndarray, how: str | None) -> np.ndarray:
    if how == "T":
        return value.T
    if how == "conv":  # torch [out, in, kh, kw] -> flax [kh, kw, in, out]
        return np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value
    return value


def _hf_shape(ours: tuple[int, ...], how: str | None) -> tuple[int, ...]:
    """Our variable's shape written in the HF layout (for error messages)."""
    if how == "T":
        return ours[::-1]
    if how == "conv" and len(ours) == 4:
        return (ours[3], ours[2], ours[0], ours[1])
    return ours


Target = tuple[nnx.Variable, Callable[[np.ndarray], np.ndarray], tuple[int, ...]]


def match_strict(arrays: Mapping[str, Any], targets: Mapping[str, Target], error: str
                 ) -> list[tuple[nnx.Variable, np.ndarray]]:
    """(variable, value in our layout) for every key of ``targets`` (key → (variable, convert from the source
    layout, the variable's shape in the source layout)), or one ValueError ``"{error}: missing keys (n): [...];
    unexpected keys ...; shape mismatches ..."`` naming every problem at once (``arrays`` already stripped of the
    keys to ignore)."""
    missing = sorted(k for k in targets if k not in arrays)
    unexpected = sorted(k for k in arrays if k not in targets)
    mismatched, converted = [], []
    for key, (variable, convert, source_shape) in targets.items():
        if key not in arrays:
            continue
        raw = np.asarray(arrays[key])
        value = convert(raw)
        if tuple(value.shape) != tuple(variable.shape):
            mismatched.append(f"{key}: got {tuple(raw.shape)}, expected {source_shape}")
            continue
        converted.append((variable, value))
    kinds = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
    problems = [f"{kind} ({len(keys)}): {keys}" for kind, keys in kinds if keys]
    if problems:
        raise ValueError(f"{error}: " + "; ".join(problems))
    return converted


def load_strict(model: nnx.Module, table: ParamTable, arrays: Mapping[str, Any], what: str) -> None:
    """Copies `arrays` (already stripped of keys to ignore) into `model` through `table`, strictly."""
    targets = {}
    for key, (path, how) in table.items():
        variable = get_variable(model, path)
        targets[key] = (variable, lambda raw, how=how: _to_ours(raw, how), _hf_shape(tuple(variable.shape), how))
    for variable, value in match_strict(arrays, targets, f"cannot load HF {what} state dict"):
        variable.set_value(jnp.asarray(value, dtype=variable.dtype))
