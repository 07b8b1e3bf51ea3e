"""Tests of the eDiff-I / ADM denoiser U-Net and its attention layers (models/unet.py, attention.py)."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ediffi_jax  # noqa: F401  (sets the flax sharding flag)
from ediffi_jax.models.attention import CrossAttention, SelfAttention, dot_product_attention
from ediffi_jax.models.unet import UNet, param_count, unet_config
from ediffi_jax.tracing import abstract_module

B, RES, L, CTX, POOL = 2, 16, 5, 24, 12
TINY = dict(
    image_size=RES,
    channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(8,),
    cross_attn_resolutions=(16, 8),
    head_dim=16,
    num_groups=8,
    dropout=0.1,
    context_dim=CTX,
    pooled_dim=POOL,
)


def _perturb(state: nnx.State, scale: float = 0.05, seed: int = 0) -> nnx.State:
    """Add host-generated Gaussian noise to every parameter (makes zero-initialised layers non-trivial)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape).astype(np.float32), state)


@pytest.fixture(scope="module")
def tiny():
    """Tiny model at init, its graphdef, init state, perturbed state, inputs and a jitted forward."""
    cfg = unet_config(**TINY)
    # RBG keys: the init's random numbers from XLA's bit generator compile in half the time of threefry's.
    model = nnx.jit(lambda: UNet(cfg, rngs=nnx.Rngs(jax.random.key(0, impl="rbg"))))()
    graphdef, state = nnx.split(model)
    pert = _perturb(state)
    rng = np.random.default_rng(1)
    inputs = dict(
        x=jnp.asarray(rng.standard_normal((B, RES, RES, 3)), jnp.float32),
        c_noise=jnp.asarray([-1.0, 0.7], jnp.float32),
        context=jnp.asarray(rng.standard_normal((B, L, CTX)), jnp.float32),
        context_mask=jnp.asarray([[True, True, True, True, True], [True, True, True, False, False]]),
        pooled=jnp.asarray(rng.standard_normal((B, POOL)), jnp.float32),
    )

    @jax.jit
    def fwd(state, x, c_noise, context, context_mask, pooled):
        return nnx.merge(graphdef, state)(x, c_noise, context, context_mask, pooled)

    return dict(cfg=cfg, graphdef=graphdef, state=state, pert=pert, inputs=inputs, fwd=fwd)


def test_shape_and_zero_output_at_init(tiny):
    y = tiny["fwd"](tiny["state"], **tiny["inputs"])
    assert y.shape == (B, RES, RES, 3) and y.dtype == jnp.float32
    assert bool(jnp.all(y == 0.0)), "zero-initialised output conv must give exactly zero output (ADM)"
    y = tiny["fwd"](tiny["pert"], **tiny["inputs"])
    assert bool(jnp.all(jnp.isfinite(y))) and float(jnp.abs(y).max()) > 0


def test_output_depends_on_context_noise_and_pooled(tiny):
    fwd, pert, inp = tiny["fwd"], tiny["pert"], tiny["inputs"]
    y = fwd(pert, **inp)
    for key, new in [
        ("context", inp["context"] + 1.0),
        ("c_noise", inp["c_noise"] + 0.5),
        ("pooled", inp["pooled"] * -1.0),
    ]:
        y2 = fwd(pert, **{**inp, key: new})
        assert float(jnp.abs(y2 - y).max()) > 1e-4, key


def test_masked_token_equals_removed_token(tiny):
    fwd, pert, inp = tiny["fwd"], tiny["pert"], tiny["inputs"]
    k = 2
    mask = inp["context_mask"].at[:, k].set(False)
    y_masked = fwd(pert, **{**inp, "context_mask": mask})
    keep = [i for i in range(L) if i != k]
    y_removed = fwd(pert, **{**inp, "context": inp["context"][:, keep], "context_mask": mask[:, keep]})
    np.testing.assert_allclose(np.asarray(y_masked), np.asarray(y_removed), atol=1e-5)


def test_all_masked_equals_empty_context(tiny):
    fwd, pert, inp = tiny["fwd"], tiny["pert"], tiny["inputs"]
    y_all_masked = fwd(pert, **{**inp, "context_mask": jnp.zeros((B, L), bool)})
    assert bool(jnp.all(jnp.isfinite(y_all_masked)))
    y_empty = fwd(pert, **{**inp, "context": jnp.zeros((B, 0, CTX)), "context_mask": jnp.zeros((B, 0), bool)})
    np.testing.assert_allclose(np.asarray(y_all_masked), np.asarray(y_empty), atol=1e-5)


def test_jit_equals_eager(tiny):
    model = nnx.merge(tiny["graphdef"], tiny["pert"])
    y_eager = model(**tiny["inputs"])
    y_jit = tiny["fwd"](tiny["pert"], **tiny["inputs"])
    np.testing.assert_allclose(np.asarray(y_eager), np.asarray(y_jit), atol=1e-5, rtol=1e-5)


def test_dropout(tiny):
    graphdef, pert, inp = tiny["graphdef"], tiny["pert"], tiny["inputs"]

    @jax.jit
    def fwd_drop(state, key):
        return nnx.merge(graphdef, state)(**inp, rngs=nnx.Rngs(dropout=key))

    y1, y1b = fwd_drop(pert, jax.random.key(1)), fwd_drop(pert, jax.random.key(1))
    y2 = fwd_drop(pert, jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y1b))
    assert float(jnp.abs(y1 - y2).max()) > 1e-4, "different dropout keys must give different outputs"
    y_det, y_det2 = tiny["fwd"](pert, **inp), tiny["fwd"](pert, **inp)
    np.testing.assert_array_equal(np.asarray(y_det), np.asarray(y_det2))
    assert float(jnp.abs(y1 - y_det).max()) > 1e-4, "rngs=None must switch dropout off"


def test_bfloat16_close_to_float32(tiny):
    cfg_bf16 = unet_config(**{**TINY, "dtype": "bfloat16"})
    graphdef = nnx.graphdef(abstract_module(lambda: UNet(cfg_bf16, rngs=nnx.Rngs(0))))
    model = nnx.merge(graphdef, tiny["pert"])
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    inp = tiny["inputs"]
    y16 = jax.jit(lambda s: nnx.merge(graphdef, s)(**inp))(tiny["pert"])
    y32 = tiny["fwd"](tiny["pert"], **inp)
    assert y16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(y16)))
    rel = float(jnp.linalg.norm(y16 - y32) / jnp.linalg.norm(y32))
    assert rel < 0.05, rel


def test_attn_bias_hook(tiny):
    graphdef, pert, inp = tiny["graphdef"], tiny["pert"], tiny["inputs"]
    calls = []

    def hook(logits, hw):
        calls.append((logits.shape, hw))
        return 0.5 * jnp.max(logits, axis=(-2, -1), keepdims=True) * jnp.ones(logits.shape[-1]).at[0].set(3.0)

    y = jax.jit(lambda s: nnx.merge(graphdef, s)(**inp, attn_bias_fn=hook))(pert)
    # cross-attention at 16 (enc 1 + dec 2) and 8 (enc 1 + mid 1 + dec 2): 7 layers, heads = C / 16.
    expected = sorted([((B, 2, 256, L), (16, 16))] * 3 + [((B, 4, 64, L), (8, 8))] * 4)
    assert sorted(calls) == expected
    assert float(jnp.abs(y - tiny["fwd"](pert, **inp)).max()) > 1e-4


def test_sr_variant_cross_only_plain_updown_and_crops():
    """SR-style net: x_cond channels, extra_cond embedding, cross-attention without self-attention,
    plain conv down / nearest+conv up; runs on a spatial size other than image_size (random crops)."""
    cfg = unet_config(
        **{
            **TINY,
            "attn_resolutions": (),
            "cross_attn_resolutions": (8,),
            "resblock_updown": False,
            "pooled_dim": 0,
        },
        extra_cond_dim=1,
        in_cond_channels=3,
    )
    model = abstract_module(lambda: UNet(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), state)
    state = _perturb(state, seed=3)
    rng = np.random.default_rng(2)
    size = 2 * RES
    x = jnp.asarray(rng.standard_normal((B, size, size, 3)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((B, 3, CTX)), jnp.float32)

    @jax.jit
    def fwd(state, aug):
        return nnx.merge(graphdef, state)(
            x, jnp.zeros(B), ctx, None, None, extra_cond=aug, x_cond=0.5 * x, attn_bias_fn=None
        )

    y0, y1 = fwd(state, jnp.zeros((B, 1))), fwd(state, jnp.ones((B, 1)))
    assert y0.shape == (B, size, size, 3) and bool(jnp.all(jnp.isfinite(y0)))
    assert float(jnp.abs(y0 - y1).max()) > 1e-4, "augmentation level must change the output"
    kinds = [type(node) for _, node in nnx.iter_graph(model)]
    assert CrossAttention in kinds and SelfAttention not in kinds
    with pytest.raises(ValueError, match="extra_cond"):
        nnx.merge(graphdef, state)(x, jnp.zeros(B), ctx, None, x_cond=x)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(attn_resolutions=(4,)), "never reached"),
        (dict(cross_attn_resolutions=(32,)), "never reached"),
        (dict(head_dim=24), "head_dim"),
        (dict(image_size=15), "divisible"),
        (dict(num_groups=5), "groups"),
        (dict(dtype="float16"), "dtype"),
        (dict(cross_attn_resolutions=(8,), context_dim=0), "context_dim"),
    ],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        UNet(unet_config(**{**TINY, **overrides}), rngs=nnx.Rngs(0))


def test_unknown_config_key():
    with pytest.raises(ValueError, match="unknown"):
        unet_config(chanels=3)


def test_paper_config_abstract_and_annotated():
    """configs/base64.py builds abstractly (no memory); prints its parameter count; every Param is annotated."""
    from ediffi_jax.cli.common import load_config_file
    from ediffi_jax.models.conditioning import ConditionedUNet

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config_file(os.path.join(root, "configs", "base64.py"))
    assert config.model == unet_config(image_size=64)  # the paper defaults
    model = abstract_module(lambda: ConditionedUNet(config, rngs=nnx.Rngs(0)))
    n_unet, n_cond = param_count(model.unet), param_count(model.conditioner)
    print(f"\neDiff-I base64 (configs/base64.py: 256 ch, [1,2,4,4], 3 res blocks, attention at 32/16/8): "
          f"U-Net {n_unet:,} + conditioning projections {n_cond:,} = {n_unet + n_cond:,} parameters")
    assert 3e8 < n_unet < 1.5e9
    params = nnx.state(model, nnx.Param)
    specs = nnx.get_partition_spec(params)
    flat_specs = dict(nnx.to_flat_state(specs))
    for path, var in nnx.to_flat_state(params):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.get_value().ndim, path
        spec = flat_specs[path].get_value()
        assert isinstance(spec, jax.sharding.PartitionSpec) and len(spec) == var.get_value().ndim, (
            path,
            spec,
        )
    assert flat_specs[("unet", "null_token")].get_value() == jax.sharding.PartitionSpec(None, "context")


# ---------------------------------------------------------------------------------------------------------
# attention core
# ---------------------------------------------------------------------------------------------------------
def test_attention_matches_torch_sdpa():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    b, lq, lk, h, d = 2, 7, 9, 3, 16
    q, k, v = (rng.standard_normal((b, n, h, d)).astype(np.float32) for n in (lq, lk, lk))
    mask = rng.random((b, lk)) > 0.4
    mask[:, 0] = True
    ours = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), key_mask=jnp.asarray(mask))
    add = np.where(mask, 0.0, -np.inf).astype(np.float32)[:, None, None, :]
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(t).permute(0, 2, 1, 3) for t in (q, k, v)), attn_mask=torch.from_numpy(add)
    ).permute(0, 2, 1, 3)
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=1e-5, rtol=1e-5)


def test_attention_bias_added_before_scaling():
    rng = np.random.default_rng(1)
    b, lq, lk, h, d = 1, 4, 6, 2, 8
    q, k, v = (rng.standard_normal((b, n, h, d)).astype(np.float32) for n in (lq, lk, lk))
    bias = rng.standard_normal((b, h, lq, lk)).astype(np.float32) * 3
    logits = np.einsum("bqhd,bkhd->bhqk", q, k)
    s = (logits + bias) / math.sqrt(d)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    ref = np.einsum("bhqk,bkhd->bqhd", w, v)
    qj, kj, vj = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    np.testing.assert_allclose(
        np.asarray(dot_product_attention(qj, kj, vj, bias=jnp.asarray(bias))), ref, atol=1e-5
    )
    # bias_fn sees the unscaled logits: returning them doubles QKᵀ before the 1/√d scaling.
    s2 = 2 * logits / math.sqrt(d)
    w2 = np.exp(s2 - s2.max(-1, keepdims=True))
    ref2 = np.einsum("bhqk,bkhd->bqhd", w2 / w2.sum(-1, keepdims=True), v)
    out2 = dot_product_attention(qj, kj, vj, bias_fn=lambda lg: lg)
    np.testing.assert_allclose(np.asarray(out2), ref2, atol=1e-5)
