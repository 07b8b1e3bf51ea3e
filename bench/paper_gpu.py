"""Accelerator bench of a paper-size config: bf16 train-step MFU and sampler latency, one process.

    python bench/paper_gpu.py --config configs/base64.py --batch 64 --steps 10 --sample_batch 4

What it measures, all in the same run:
  * peer: a bf16 8192³ matrix product (the chip's practical peak, FLOP/s);
  * the real jitted train step (EDM loss, AdamW, EMA, donated state) with the UNet computing in bfloat16
    (float32 params, GroupNorm and softmax) on precomputed embeddings — how a pod run trains from `ediffi-embed`
    output, so the frozen T5-XXL / CLIP never run in the step; FLOPs per step are XLA's count of the compiled
    step; MFU = FLOPs / step time / the chip's dense bf16 peak (spec sheet), and also ÷ the measured matmul;
  * the same step in float32 (`--fp32_peer`), ratio bf16 / fp32;
  * sampler latency: one jitted call of `--sample_steps` Heun steps with guidance (2 branches in one batch),
    a single model vs an ensemble of experts (`--experts`, e.g. the paper's 3), ratio ensemble / single.
Every figure is printed as it is measured (and appended to `--out` as JSON lines), so a run cut short keeps them.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from ediffi_jax.encoders import embeddings_from_batch
from ediffi_jax.experts import ExpertTree
from ediffi_jax.sampling import HeunConfig
from ediffi_jax.text_to_image import make_sampler
from ediffi_jax.train.step import build_model, init_train_state, make_optimizer, split_model, step_spec, train_step

_CONFIG = config_flags.DEFINE_config_file("config", "configs/base64.py", "Config file.")
_BATCH = flags.DEFINE_integer("batch", 64, "Train batch (one device).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed train steps.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "UNet compute dtype of the timed step.")
_FP32 = flags.DEFINE_bool("fp32_peer", True, "Also time the float32 step (ratio bf16 / fp32).")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 4, "Prompts per sampler call (0: skip the sampler).")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 32, "Heun steps of the timed sampler.")
_EXPERTS = flags.DEFINE_string("experts", "3-paper", "Expert layout of the ensemble sampler ('' = skip).")
_MATMUL = flags.DEFINE_integer("matmul", 8192, "Size of the peer bf16 matrix product (0: skip).")
_OUT = flags.DEFINE_string("out", "", "Append results as JSON lines to this file.")

# Dense bf16 peak (no sparsity), spec sheets.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
               "TPU v5p": 459.0, "TPU v6 lite": 918.0}


def _peak(kind: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), None)


def _report(name: str, **fig) -> None:
    print(f"[{name}] " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fig.items()),
          flush=True)
    if _OUT.value:
        with open(_OUT.value, "a") as f:
            f.write(json.dumps({"name": name, **fig}) + "\n")


def _time(fn, n: int) -> float:
    jax.block_until_ready(fn())
    t = time.perf_counter()
    out = None
    for _ in range(n):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n


def _flops(stage) -> float:
    """XLA's FLOP count of a lowered or compiled computation. On GPU the compiled count misses the convolutions
    (cuDNN custom calls), so MFU uses the lowered (pre-optimisation, platform-independent) count."""
    ca = stage.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", 0.0)) if ca else 0.0


def synthetic_batch(c, b: int, rng: np.random.Generator) -> dict[str, jax.Array]:
    """Images and precomputed embeddings of the shapes `ediffi-embed` writes (float32 tokens, bool masks)."""
    r, e = c.model.image_size, c.conditioning.embeddings
    lens = {"t5": int(c.encoders.t5.max_length), "clip_text": int(c.encoders.clip.max_length)}
    batch = {"image": rng.uniform(-1, 1, (b, r, r, 3)).astype(np.float32)}
    for n in c.conditioning.order:
        if n == "clip_image":
            batch["clip_image_pooled"] = rng.normal(size=(b, e[n].pooled_dim)).astype(np.float32)
            continue
        batch[f"{n}_tokens"] = rng.normal(size=(b, lens[n], e[n].dim)).astype(np.float32)
        batch[f"{n}_mask"] = np.arange(lens[n])[None] < rng.integers(4, lens[n], (b, 1))
        if e[n].pooled == "given":
            batch[f"{n}_pooled"] = rng.normal(size=(b, e[n].pooled_dim)).astype(np.float32)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def time_train_step(c, b: int, dtype: str, steps: int) -> dict:
    c = c.copy_and_resolve_references()
    c.model.dtype = dtype
    names = tuple(c.conditioning.order)
    batch = synthetic_batch(c, b, np.random.default_rng(0))
    graphdef, params = split_model(build_model(c, 0))
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    tx, spec = make_optimizer(c.optim), step_spec(c)
    step = jax.jit(lambda s, bt, k: train_step(s, bt, None, k, graphdef=graphdef, tx=tx, spec=spec,
                                               encode=lambda _, x: embeddings_from_batch(x, names)),
                   donate_argnums=(0,))
    holder = {"s": init_train_state(params, tx)}
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    lowered = step.lower(holder["s"], batch, key)
    model_flops = _flops(lowered)  # unoptimised HLO: every conv / dot counted (custom calls are not, below)
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp_gib = getattr(mem, "temp_size_in_bytes", 0) / 2**30 if mem is not None else float("nan")

    def one():
        holder["s"], m = compiled(holder["s"], batch, key)
        return m["loss"]

    t = _time(one, steps)
    return {"params": n_params, "batch": b, "dtype": dtype, "compile_s": t_compile, "step_s": t,
            "images_per_s": b / t, "flops": model_flops,
            "compiled_flops": _flops(compiled), "temp_gib": temp_gib}


def time_sampler(c, sb: int, num_steps: int, layout: str) -> list[tuple[float, float]]:
    """(first call s, steady s per call) of a single model, then of an ensemble of `layout` experts."""
    c = c.copy_and_resolve_references()
    heun = HeunConfig.from_config(c.sample)
    heun = HeunConfig(**{**heun.__dict__, "num_steps": num_steps})
    names = tuple(c.conditioning.order)
    batch = synthetic_batch(c, sb, np.random.default_rng(1))
    emb = embeddings_from_batch(batch, names)
    emb.pop("clip_image", None)  # text only: the image embedding is dropped (no style image)
    graphdef, params = split_model(build_model(c, 0))
    noise = jax.random.normal(jax.random.PRNGKey(2), batch["image"].shape)
    key, s = jax.random.PRNGKey(3), jnp.float32(3.0)
    runs = [(None, params)]
    if layout:
        tree = ExpertTree.preset(layout)  # distinct arrays per expert, as a real ensemble has
        runs.append((tree, [jax.tree.map(lambda a, i=i: a + jnp.asarray(i * 1e-3, a.dtype), params)
                            for i in range(len(tree.leaves))]))
    out = []
    for tree, p in runs:
        sampler = make_sampler(graphdef, heun, c.edm.sigma_data, tree=tree)
        t0 = time.perf_counter()
        jax.block_until_ready(sampler(p, emb, noise, key, s, s))
        first = time.perf_counter() - t0
        out.append((first, _time(lambda p=p, sampler=sampler: sampler(p, emb, noise, key, s, s), 2)))
        name = "sampler_single" if tree is None else f"sampler_ensemble_{layout}"
        _report(name, prompts=sb, heun_steps=num_steps, nfe=2 * num_steps - 1, guidance_batch=2 * sb,
                first_call_s=first, latency_s=out[-1][1])
    return out


def main(argv: list[str]) -> None:
    flags.FLAGS(argv)
    c = _CONFIG.value
    dev = jax.devices()[0]
    peak = _peak(dev.device_kind)
    _report("device", platform=dev.platform, kind=dev.device_kind, jax=jax.__version__,
            peak_tflops=peak if peak else "unknown")
    measured = None
    if _MATMUL.value:
        n = _MATMUL.value
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
        mm = jax.jit(lambda x, y: x @ y)
        t = _time(lambda: mm(a, a), 10)
        measured = 2 * n**3 / t
        _report("matmul_bf16", n=n, tflops=measured / 1e12)

    def train(dtype: str) -> dict | None:
        b = _BATCH.value
        while b >= 1:
            try:
                r = time_train_step(c, b, dtype, _STEPS.value)
            except Exception as e:  # noqa: BLE001 (an out-of-memory compile: halve the batch)
                if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                    raise
                _report("oom", dtype=dtype, batch=b)
                b //= 2
                continue
            fig = dict(r)
            fs = r["flops"] / r["step_s"]
            fig["tflops"] = fs / 1e12
            if peak:
                fig["mfu_spec"] = fs / (peak * 1e12)
            if measured:
                fig["mfu_vs_matmul"] = fs / measured
            _report(f"train_{dtype}", **fig)
            return r
        return None

    rb = train(_DTYPE.value)
    if _SAMPLE_BATCH.value:
        cs = c.copy_and_resolve_references()
        cs.model.dtype = _DTYPE.value
        res = time_sampler(cs, _SAMPLE_BATCH.value, _SAMPLE_STEPS.value, _EXPERTS.value)
        if len(res) > 1:
            _report("ratio", ensemble_over_single_latency=res[1][1] / res[0][1])
    if _FP32.value and rb is not None:
        rf = train("float32")
        if rf is not None and rf["batch"] == rb["batch"]:
            _report("ratio", bf16_over_fp32_images_per_s=rb["images_per_s"] / rf["images_per_s"])


if __name__ == "__main__":
    main(sys.argv)
