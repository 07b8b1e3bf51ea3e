"""Logical-axis sharding: spec mapping, memory planning on simulated meshes, sharded = unsharded forward."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P
from multidevice import Background, multidevice_env

from ediffi_jax import sharding
from ediffi_jax.models.clip import CLIPTextConfig, CLIPTextEncoder, CLIPVisionConfig, CLIPVisionEncoder
from ediffi_jax.models.t5 import T5Config, T5Encoder
from ediffi_jax.sharding import DEFAULT_RULES, bytes_per_device, logical_to_spec

MESH = {"data": 1, "fsdp": 4, "tensor": 2}


def test_logical_to_spec_maps_names():
    assert logical_to_spec(("embed", "mlp"), (64, 128), MESH) == P("fsdp", "tensor")
    assert logical_to_spec(("vocab", "embed"), (32128, 4096), MESH) == P("tensor", "fsdp")
    assert logical_to_spec(("heads", "embed"), (64, 64), MESH) == P("tensor", "fsdp")
    conv = logical_to_spec((None, None, "conv_in", "conv_out"), (3, 3, 64, 128), MESH)
    assert conv == P(None, None, "tensor", "fsdp")
    assert logical_to_spec(("batch", None), (8, 5), MESH) == P(("data", "fsdp"))
    assert logical_to_spec(("norm",), (64,), MESH) == P()
    assert logical_to_spec(("rel_buckets", None), (32, 8), MESH) == P()
    assert logical_to_spec(None, (4, 4), MESH) == P()
    # An AbstractMesh works like a dict of axis sizes; axes the mesh lacks are ignored.
    assert logical_to_spec(("embed", "mlp"), (64, 128), AbstractMesh((8,), ("fsdp",))) == P("fsdp")
    with pytest.raises(ValueError, match="do not match shape"):
        logical_to_spec(("embed",), (4, 4), MESH)


def test_logical_to_spec_non_divisible_stays_replicated():
    assert logical_to_spec((None, "embed"), (77, 6), MESH) == P()  # 6 % 4 != 0
    assert logical_to_spec(("embed", "mlp"), (64, 3), MESH) == P("fsdp")  # 3 % 2 != 0
    assert logical_to_spec((None, None, "conv_in", "conv_out"), (3, 3, 256, 3), MESH) == P(None, None, "tensor")
    assert logical_to_spec(("batch",), (6,), MESH) == P()
    # A later rule for the same name is the fallback when the first does not divide.
    rules = (("embed", ("fsdp", "tensor")), ("embed", "fsdp"))
    assert logical_to_spec(("embed",), (8,), MESH, rules) == P(("fsdp", "tensor"))
    assert logical_to_spec(("embed",), (4,), MESH, rules) == P("fsdp")
    assert logical_to_spec(("embed",), (8,), MESH, (("embed", None), ("embed", "fsdp"))) == P()
    assert logical_to_spec(("no_such_name",), (8,), MESH) == P()


def test_logical_to_spec_never_repeats_a_mesh_axis():
    # "embed" and "context" both map to fsdp: the first dimension takes it, the second stays replicated.
    assert logical_to_spec(("embed", "context"), (64, 64), MESH) == P("fsdp")
    assert logical_to_spec(("mlp", "heads"), (64, 64), MESH) == P("tensor")
    assert logical_to_spec(("batch", "embed"), (8, 64), MESH) == P(("data", "fsdp"))
    for names in [("embed", "embed"), ("vocab", "mlp"), ("batch", "context")]:
        spec = logical_to_spec(names, (64, 64), MESH)
        axes = [a for entry in spec for a in ((entry,) if isinstance(entry, str) else entry or ())]
        assert len(axes) == len(set(axes)), (names, spec)


def test_make_mesh_errors_name_bad_value():
    with pytest.raises(ValueError, match=r"needs 8 devices, have 1"):
        sharding.make_mesh(data=1, fsdp=8)
    with pytest.raises(ValueError, match="fsdp=0"):
        sharding.make_mesh(fsdp=0)
    mesh = sharding.make_mesh()
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}


def test_param_specs_reads_variable_metadata():
    state = nnx.state(nnx.eval_shape(lambda: T5Encoder(T5Config.tiny(), rngs=nnx.Rngs(0))))
    specs = sharding.param_specs(state, MESH)
    assert jax.tree.structure(specs) == jax.tree.structure(state)
    assert specs["shared"]["embedding"].get_value() == P("tensor", "fsdp")
    assert specs["blocks"][0]["ffn"]["wo"]["kernel"].get_value() == P("tensor", "fsdp")
    assert specs["relative_attention_bias"].get_value() == P()
    shardings = sharding.param_shardings(state, AbstractMesh((1, 4, 2), sharding.MESH_AXES))
    assert shardings["blocks"][0]["attn"]["q"]["kernel"].get_value().spec == P("fsdp", "tensor")


def _abstract_state(build) -> nnx.State:
    return nnx.state(nnx.eval_shape(build))


@pytest.mark.parametrize("name,build,params", [
    ("T5-XXL", lambda: T5Encoder(T5Config.xxl(), rngs=nnx.Rngs(0)), T5Config.xxl().num_params),
    ("CLIP-L text", lambda: CLIPTextEncoder(CLIPTextConfig.large(), rngs=nnx.Rngs(0)), CLIPTextConfig().num_params),
    ("CLIP-L vision", lambda: CLIPVisionEncoder(CLIPVisionConfig.large(), rngs=nnx.Rngs(0)),
     CLIPVisionConfig().num_params),
])
def test_bytes_per_device_fsdp8(name, build, params):
    state = _abstract_state(build)
    b = bytes_per_device(state, AbstractMesh((1, 8, 1), sharding.MESH_AXES))
    assert b["total"] == 4 * params()  # float32
    ratio = b["per_device_max"] / b["total"]
    print(f"{name}: {params() / 1e9:.3f}B params, total {b['total'] / 2**30:.3f} GiB, "
          f"per device {b['per_device_max'] / 2**30:.4f} GiB on fsdp=8 (ratio {ratio:.4f})")
    assert b["per_device_max"] == b["per_device_mean"]
    assert b["total"] / 8 <= b["per_device_max"] <= b["total"] / 8 * (1.01 if name == "T5-XXL" else 1.02)
    # The same on a 256-way pod, from a plain dict of axis sizes.
    b256 = bytes_per_device(state, {"fsdp": 256}, DEFAULT_RULES)
    assert b["total"] / 256 <= b256["per_device_max"] <= b["total"] / 256 * 1.3


def test_t5_xxl_param_count():
    assert abs(T5Config.xxl().num_params() - 4.76e9) / 4.76e9 < 0.005


_MULTIDEVICE = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from ediffi_jax import sharding
from ediffi_jax.models.clip import CLIPTextConfig, CLIPTextEncoder, CLIPVisionConfig, CLIPVisionEncoder
from ediffi_jax.models.t5 import T5Config, T5Encoder
from ediffi_jax.models.unet import UNet, unet_config

assert jax.device_count() == 8, jax.devices()
B = 8
small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, projection_dim=32)
ids = jax.random.randint(jax.random.key(1), (B, 12), 3, 64)
mask = jnp.ones((B, 12), jnp.int32).at[:, 9:].set(0)
pixels = jax.random.normal(jax.random.key(2), (B, 28, 28, 3))


def init(build):
    # Random weights straight from NumPy into the abstract state: eager init compiles every op on a cold
    # cache (~20 s for the U-Net here), and zero-initialised output convs would make outputs trivially equal.
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    rng = np.random.default_rng(0)

    def fill(a):
        if len(a.shape) == 1:
            return (1 + 0.1 * rng.standard_normal(a.shape)).astype(a.dtype)
        return (rng.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[:-1]))).astype(a.dtype)
    return graphdef, jax.tree.map(lambda a: jnp.asarray(fill(a)), abstract)


unet = unet_config(image_size=8, channels=16, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                   cross_attn_resolutions=(8,), head_dim=16, num_groups=4, context_dim=32, pooled_dim=32)
t5 = T5Config.tiny(d_model=64, d_kv=8, d_ff=128, num_heads=8)
models = {
    "t5": (lambda: T5Encoder(t5, rngs=nnx.Rngs(0)), lambda m, ids, mask: m(ids, mask), (ids, mask)),
    "clip_text": (lambda: CLIPTextEncoder(CLIPTextConfig(vocab_size=64, max_position_embeddings=16, **small),
                                          rngs=nnx.Rngs(0)),
                  lambda m, ids, mask: m(ids, mask), (ids, mask)),
    "clip_vision": (lambda: CLIPVisionEncoder(CLIPVisionConfig(image_size=28, patch_size=14, **small),
                                              rngs=nnx.Rngs(0)),
                    lambda m, px: m(px), (pixels,)),
    "unet": (lambda: UNet(unet, rngs=nnx.Rngs(0)), lambda m, x, c, ctx, pooled: m(x, c, ctx, None, pooled),
             (jax.random.normal(jax.random.key(3), (B, 8, 8, 3)), jnp.linspace(-1, 1, B),
              jax.random.normal(jax.random.key(4), (B, 6, 32)), jax.random.normal(jax.random.key(5), (B, 32)))),
}
results = {}
for name, (build, call, inputs) in models.items():
    graphdef, state = init(build)
    fwd = lambda s, *xs: call(nnx.merge(graphdef, s), *xs)
    ref = jax.tree.leaves(jax.jit(fwd)(state, *inputs))
    # The U-Net (compiles slowest) on fsdp x tensor only, which exercises both of its conv-kernel rules.
    for axes in ({"fsdp": 4, "tensor": 2},) if name == "unet" else ({"fsdp": 4, "tensor": 2}, {"fsdp": 8}):
        mesh = sharding.make_mesh(data=1, **axes)
        shardings = sharding.param_shardings(state, mesh)
        sharded = sharding.shard_state(state, mesh)
        xs = [jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)) for x in inputs]
        step = jax.jit(fwd, in_shardings=(shardings, *[x.sharding for x in xs]))
        out = jax.tree.leaves(step(sharded, *xs))
        arrays = jax.tree.leaves(sharded)
        split = [a for a in arrays if a.addressable_shards[0].data.shape != a.shape]
        results[f"{name} " + ",".join(f"{k}={v}" for k, v in axes.items())] = dict(
            diff=max(float(jnp.max(jnp.abs(o - r))) for o, r in zip(out, ref)),
            scale=max(float(jnp.max(jnp.abs(r))) for r in ref),
            split=len(split), params=len(arrays),
            fraction=sum(a.addressable_shards[0].data.size for a in arrays) / sum(a.size for a in arrays),
        )
print(json.dumps(results))
"""


def _sharded_forward(directory: Path) -> Background:
    script = directory / "sharded_forward.py"
    script.write_text(_MULTIDEVICE)
    return Background([sys.executable, str(script)], env=multidevice_env(8))


BACKGROUND = {"sharded_forward": _sharded_forward}  # started at the beginning of the session (tests/conftest.py)


def test_sharded_forward_matches_unsharded(lane):
    p = lane["sharded_forward"].result(timeout=300)
    assert p.returncode == 0, f"--- stdout ---\n{p.stdout[-3000:]}\n--- stderr ---\n{p.stderr[-3000:]}"
    results = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(results) == 7
    for key, r in results.items():
        print(f"{key}: max|diff| {r['diff']:.2e} (max|out| {r['scale']:.2f}), {r['split']}/{r['params']} params "
              f"split, device 0 holds {r['fraction']:.3f} of the parameters")
        # float32 reductions in another order: 1e-5 absolute for unit-scale outputs (T5's reach |3.6|).
        assert r["diff"] <= 1e-5 * max(1.0, r["scale"]), key
        assert r["split"] >= 1, key
        assert r["fraction"] < 0.25, key


def test_cli(capsys):
    sharding.main(["--model", "clip-text-l14", "--mesh", "fsdp=8"])
    out = capsys.readouterr().out
    assert "123,650,304" in out and "per_device/total  0.12" in out
    for argv in (["--model", "t5-xxl", "--mesh", "fsdp=0"], ["--model", "t5-xxl", "--mesh", "pipe=2"],
                 ["--model", "nope"], []):
        with pytest.raises(SystemExit) as err:
            sharding.main(argv)
        assert err.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "error:" in lines[0], lines
