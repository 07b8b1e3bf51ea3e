"""Sampler cost of an ensemble of experts against the single model, same schedule, same run.

    .venv/bin/python bench/ensemble_sampler.py --config configs/tiny.py [--layout 3-paper] [--batch 8] [--repeats 5]

eDiff-I's claim: an ensemble costs the same per step as one model, because each step runs only the expert that
owns its σ. Both samplers here run the same Heun schedule with guidance on the same prompts; the ensemble's leaves
are distinct parameter states (perturbed copies), so nothing is shared by accident. Prints compile time of each,
seconds per call and per Heun step, and the ratio ensemble ÷ single (≤ 1.02 expected).
"""

from __future__ import annotations

import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from ediffi_jax.data import shapes
from ediffi_jax.encoders import setup_encoders
from ediffi_jax.experts import tree_from_config
from ediffi_jax.sampling import HeunConfig
from ediffi_jax.text_to_image import make_sampler
from ediffi_jax.train.step import build_model, split_model

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
_LAYOUT = flags.DEFINE_string("layout", "3-paper", "Expert layout (preset or leaf paths).")
_BATCH = flags.DEFINE_integer("batch", 8, "Images per sampler call.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls of each sampler (interleaved).")


def main(argv):
    flags.FLAGS(argv)
    c = _CONFIG.value
    c.expert.layout = _LAYOUT.value
    tree = tree_from_config(c)
    r, b = c.model.image_size, _BATCH.value
    captions = [shapes.example(0, i, r)["caption"] for i in range(256)]
    with tempfile.TemporaryDirectory() as tmp:
        encoders = setup_encoders(c, tmp, captions)
    graphdef, params = split_model(build_model(c, 0))
    leaves = tuple(jax.tree.map(lambda p, i=i: p + 0.01 * i, params) for i in range(len(tree.leaf_paths)))
    heun = HeunConfig.from_config(c.sample)
    emb = encoders.encode_prompts(captions[:b])
    noise = jax.random.normal(jax.random.PRNGKey(0), (b, r, r, 3))
    key, s = jax.random.PRNGKey(1), jnp.float32(c.sample.guidance_scale)
    samplers = {"single": (make_sampler(graphdef, heun, c.edm.sigma_data), leaves[0]),
                "ensemble": (make_sampler(graphdef, heun, c.edm.sigma_data, tree=tree), leaves)}
    compile_s, times = {}, {k: [] for k in samplers}
    for name, (fn, p) in samplers.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(p, emb, noise, key, s, s))
        compile_s[name] = time.perf_counter() - t0
    for _ in range(_REPEATS.value):  # interleaved, so drift on a shared machine hits both alike
        for name, (fn, p) in samplers.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(p, emb, noise, key, s, s))
            times[name].append(time.perf_counter() - t0)
    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}); config {r}x{r}, batch {b}, {heun.num_steps} Heun steps "
          f"({2 * heun.num_steps - 1} NFE, guidance batch {2 * b})")
    print(f"layout {_LAYOUT.value!r}: leaves {list(tree.leaf_paths)}, σ boundaries "
          f"{[round(x, 4) for x in tree.boundaries]}")
    for name in samplers:
        med = float(np.median(times[name]))
        print(f"{name:9s}: first call (compile + run) {compile_s[name]:.1f} s; median {med:.3f} s/call, "
              f"{med / heun.num_steps * 1e3:.1f} ms/step")
    ratio = float(np.median(times["ensemble"]) / np.median(times["single"]))
    print(f"ratio ensemble/single per step = {ratio:.3f}")


if __name__ == "__main__":
    main(sys.argv)
