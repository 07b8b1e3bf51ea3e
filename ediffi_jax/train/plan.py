"""Memory of a run per device on a simulated mesh (`ediffi-plan`, see cli/plan.py): no devices needed.

The whole train state is built abstractly (`nnx.eval_shape`: parameters, EMA, AdamW moments and counts) and
the frozen encoders at their configured sizes with the vocabularies of the released tokenizers (T5 32,128; CLIP
49,408: what a run with `pretrained_dir` holds); every array goes through the logical-axis rules of
`ediffi_jax/sharding.py` onto the mesh sizes, so a 256-chip pod plans on a laptop. Activations are not included
(ediffi-train logs the compiled step's memory analysis on the real mesh).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

AXES = ("data", "fsdp", "tensor")
GIB = 2.0**30


def parse_mesh(text: str) -> dict[str, int]:
    """"data=8,fsdp=4" → {"data": 8, "fsdp": 4, "tensor": 1}; one ValueError line for anything else."""
    sizes: dict[str, int] = {}
    for item in text.split(","):
        key, eq, value = (s.strip() for s in item.partition("="))
        try:
            n = int(value)
        except ValueError:
            n = 0
        if not eq or key not in AXES or key in sizes or (n < 1 and n != -1):
            raise ValueError(f"--mesh entry {item!r}: expected AXIS=N with AXIS one of {AXES} (each once) and "
                             "N >= 1 or -1")
        sizes[key] = n
    return {a: sizes.get(a, 1) for a in AXES}


def resolve_mesh(sizes: Mapping[str, int], num_devices: int | None) -> dict[str, int]:
    """Fills a -1 size from `num_devices` and checks that the sizes cover exactly that many devices."""
    sizes = dict(sizes)
    free = [a for a, n in sizes.items() if n == -1]
    fixed = math.prod(n for n in sizes.values() if n != -1)
    if len(free) > 1:
        raise ValueError(f"mesh {sizes}: at most one size may be -1")
    if free and num_devices is None:
        raise ValueError(f"mesh {sizes} has a -1 size: give the device count to fill it")
    if num_devices is not None:
        if num_devices < 1 or num_devices % fixed:
            raise ValueError(f"device count {num_devices} is not divisible by the fixed mesh sizes {sizes}")
        if free:
            sizes[free[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise ValueError(f"mesh {sizes} needs {fixed} devices, --num_devices is {num_devices}")
    return sizes


def mesh_from_config(cfg: Mapping[str, Any], num_devices: int | None) -> dict[str, int]:
    """The axis sizes of `config.mesh` (ICI size x DCN factor per axis)."""
    dcn = {a: int(cfg.get(f"dcn_{a}", 1)) for a in AXES}
    ici = {a: int(cfg.get(a, 1)) for a in AXES}
    if num_devices is not None and num_devices % math.prod(dcn.values()):
        raise ValueError(f"device count {num_devices} is not divisible by the DCN factors {dcn}")
    per_granule = None if num_devices is None else num_devices // math.prod(dcn.values())
    ici = resolve_mesh(ici, per_granule)
    return {a: ici[a] * dcn[a] for a in AXES}


def abstract_encoders(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{name: abstract parameter state} of the frozen encoders the run's `conditioning.order` uses."""
    from flax import nnx

    from ediffi_jax.encoders import t5_config
    from ediffi_jax.models import clip, t5
    from ediffi_jax.tracing import abstract_module

    names = tuple(config.conditioning.order)
    out: dict[str, Any] = {}
    if config.data.precomputed:  # the step reads precomputed embeddings: no encoder on the devices
        return out
    if "t5" in names:
        cfg = t5_config(config.encoders.t5, t5.T5Config.xxl().vocab_size)
        out["t5"] = nnx.state(abstract_module(lambda: t5.T5Encoder(cfg, rngs=nnx.Rngs(0))))
    c = config.encoders.clip
    if "clip_text" in names:
        text = clip.CLIPTextConfig(**dict(c.text), vocab_size=clip.CLIPTextConfig.large().vocab_size,
                                   max_position_embeddings=c.max_length, dtype=c.dtype)
        out["clip_text"] = nnx.state(abstract_module(lambda: clip.CLIPTextEncoder(text, rngs=nnx.Rngs(0))))
    if "clip_image" in names:
        vision = clip.CLIPVisionConfig(**dict(c.vision), dtype=c.dtype)
        out["clip_image"] = nnx.state(abstract_module(lambda: clip.CLIPVisionEncoder(vision, rngs=nnx.Rngs(0))))
    return out


def plan(config: ml_collections.ConfigDict, sizes: Mapping[str, int]) -> dict[str, Any]:
    """Bytes per device of every part of a run on a mesh of `sizes`: {"parts": {part: bytes_per_device dict},
    "total": ..., "params": count, "batch_per_device": n}."""
    from ediffi_jax.sharding import bytes_per_device
    from ediffi_jax.tracing import abstract_module
    from ediffi_jax.train.step import build_model, init_train_state, make_optimizer, split_model

    n_shards = sizes["data"] * sizes["fsdp"]
    if config.train.batch_size % n_shards:
        raise ValueError(f"train.batch_size={config.train.batch_size} is not divisible by the data x fsdp mesh "
                         f"size {n_shards}")
    _, params = split_model(abstract_module(lambda: build_model(config, config.seed)))
    tx = make_optimizer(config.optim)
    state = jax.eval_shape(lambda p: init_train_state(p, tx), params)
    parts = {"params": state.params, "ema": state.ema, "optimizer": (state.opt_state, state.step)}
    parts.update({f"encoder {k}": v for k, v in abstract_encoders(config).items()})
    report = {k: bytes_per_device(v, sizes) for k, v in parts.items()}
    keys = ("total", "per_device_max", "replicated")
    total = {k: sum(r[k] for r in report.values()) for k in keys}
    count = sum(math.prod(a.shape) for a in jax.tree.leaves(params))
    return dict(parts=report, total=total, params=count, batch_per_device=config.train.batch_size // n_shards)


def format_plan(result: Mapping[str, Any], sizes: Mapping[str, int], config_path: str) -> str:
    n = math.prod(sizes.values())
    mesh = " x ".join(f"{a} {sizes[a]}" for a in AXES)
    lines = [f"config {config_path}   mesh {mesh} = {n} devices   batch per device {result['batch_per_device']}",
             f"denoiser parameters {result['params']:,}",
             f"{'part':<22}{'total GiB':>12}{'per device GiB':>16}{'replicated GiB':>16}"]
    for name, r in [*result["parts"].items(), ("total", result["total"])]:
        lines.append(f"{name:<22}{r['total'] / GIB:>12.3f}{r['per_device_max'] / GIB:>16.3f}"
                     f"{r['replicated'] / GIB:>16.4f}")
    lines.append("(parameters and optimizer state only; activations come on top)")
    return "\n".join(lines)
