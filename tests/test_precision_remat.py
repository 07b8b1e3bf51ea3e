"""`model.remat` and `model.dtype="bfloat16"` (issue 11): what they change, and what they must not.

One tiny conditioned U-Net (conftest's one-level model: cross-attention at 16², dropout on, so the dropout keys
pass through the rematerialised layers), one batch at four σ. The loss is the train step's: EDM preconditioning
around the conditioned net, λ(σ)-weighted denoising loss. No timing: memory is read from XLA's buffer assignment.

Memory of a backward pass = what the forward pass keeps for it (the residuals) + the backward's own temporaries.
The forward of ``jax.vjp`` is compiled on its own, so its output size *is* the residual memory, whatever order
the scheduler picks. (Compiled as one function, forward and backward together, XLA:CPU schedules each
rematerialised layer's recomputation right after its forward pass, so the temp size of the fused grad on CPU shows
no saving (jax 0.10.2); whether a GPU / TPU build keeps the recomputation in the backward is not checked here.)
"""

from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import one_level_config
from flax import nnx

from ediffi_jax import edm
from ediffi_jax.models.unet import REMAT_POLICIES, UNet, unet_config
from ediffi_jax.train import step as step_mod

B, R = 4, 16


def _config(remat: str = "none", dtype: str = "float32"):
    c = one_level_config("/nonexistent")
    c.model.update(dict(remat=remat, dtype=dtype, dropout=0.1))
    return c


def _graphdef(config) -> nnx.GraphDef:
    return nnx.split(nnx.eval_shape(lambda: step_mod.build_model(config, 0)), nnx.Param, ...)[0]


@functools.cache
def _setup():
    """Random float32 params drawn in NumPy (no init to compile; no zero-initialised output layer to hide the
    net: kernels ~ N(0, 1/fan_in), biases and norm offsets small) and a batch."""
    c = _config()
    shapes = nnx.split(nnx.eval_shape(lambda: step_mod.build_model(c, 0)), nnx.Param, ...)[1]
    rng = np.random.default_rng(1)

    def draw(path, p: jax.ShapeDtypeStruct) -> jax.Array:
        scale = 1 / np.sqrt(np.prod(p.shape[:-1])) if len(p.shape) > 1 else 0.1
        mean = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0  # norm scales around 1
        return jnp.asarray(mean + scale * rng.standard_normal(p.shape), jnp.float32)

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    ks = jax.random.split(jax.random.PRNGKey(2), 4)
    emb = {"t5": {"tokens": jax.random.normal(ks[0], (B, 6, c.conditioning.embeddings.t5.dim)),
                  "mask": jnp.array([[True] * 6, [True] * 3 + [False] * 3, [True] * 6, [False] * 6])}}
    batch = dict(image=0.5 * jax.random.normal(ks[1], (B, R, R, 3)), noise=jax.random.normal(ks[2], (B, R, R, 3)),
                 sigma=jnp.array([0.02, 0.4, 2.0, 30.0]), emb=emb)
    return params, batch


def _loss(params, batch, *, graphdef):
    """The train step's loss (step.train_step's loss_fn) with fixed σ, noise, keep flags and dropout key."""
    model = nnx.merge(graphdef, params)
    rngs = nnx.Rngs(dropout=jax.random.PRNGKey(5))
    keep = {"t5": jnp.array([True, True, False, True])}

    def denoiser(x, s):
        return edm.precondition(lambda xi, cn: model(xi, cn, batch["emb"], keep, rngs=rngs), x, s)

    return jnp.mean(edm.denoising_loss(denoiser, batch["image"], batch["sigma"], batch["noise"]))


@functools.cache
def _compiled(remat: str):
    """(forward-with-residuals, backward) compiled separately; their results and memory analyses."""
    params, batch = _setup()
    loss = functools.partial(_loss, batch=batch, graphdef=_graphdef(_config(remat)))
    fwd = jax.jit(lambda p: jax.vjp(loss, p)).lower(params).compile()
    value, vjp_fn = fwd(params)
    bwd = jax.jit(lambda f: f(jnp.ones((), jnp.float32))[0]).lower(vjp_fn).compile()
    return dict(loss=value, grads=bwd(vjp_fn), residual_bytes=fwd.memory_analysis().output_size_in_bytes,
                bwd_temp=bwd.memory_analysis().temp_size_in_bytes, bwd_hlo=bwd.as_text())


def test_remat_config_is_validated():
    assert unet_config().remat == "none" and set(REMAT_POLICIES) == {"none", "blocks", "dots_saveable"}
    with pytest.raises(ValueError, match="remat must be one of .*'everything'"):
        UNet(unet_config(remat="everything"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("remat", ["blocks", "dots_saveable"])
def test_remat_same_loss_and_grads_less_memory(remat):
    ref, got = _compiled("none"), _compiled(remat)
    assert float(ref["loss"]) > 0
    np.testing.assert_allclose(float(got["loss"]), float(ref["loss"]), rtol=1e-6)
    g_ref, g_got = jax.tree.leaves(ref["grads"]), jax.tree.leaves(got["grads"])
    scale = float(jnp.sqrt(sum(jnp.sum(g**2) for g in g_ref)))
    assert scale > 0
    err = float(jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in zip(g_got, g_ref))))
    assert err <= 1e-6 * scale, (remat, err / scale)

    # The forward keeps less for the backward: "blocks" only each layer's input, "dots_saveable" also conv /
    # matmul outputs (so in between).
    assert got["residual_bytes"] < 0.5 * ref["residual_bytes"], (got["residual_bytes"], ref["residual_bytes"])
    if remat == "dots_saveable":
        assert _compiled("blocks")["residual_bytes"] < got["residual_bytes"]
    # ... and the compiled backward recomputes: "blocks" re-runs the layers' convolutions, "dots_saveable" does
    # not (it kept their outputs) but recomputes the GroupNorm statistics (extra reductions).
    n_conv = {k: _compiled(k)["bwd_hlo"].count(" convolution(") for k in ("none", remat)}
    if remat == "blocks":
        assert n_conv[remat] > n_conv["none"], n_conv
    else:
        n_reduce = {k: _compiled(k)["bwd_hlo"].count(" reduce(") for k in ("none", remat)}
        assert n_conv[remat] == n_conv["none"] and n_reduce[remat] > n_reduce["none"], (n_conv, n_reduce)
    # Peak of the forward-then-backward: the residuals plus the backward's temporaries (recomputed activations
    # included) — smaller too, although XLA:CPU schedules every recomputation at the start of the backward.
    peak = {k: _compiled(k)["residual_bytes"] + _compiled(k)["bwd_temp"] for k in ("none", remat)}
    assert peak[remat] < 0.9 * peak["none"], peak


def _eqns(jaxpr):
    """Every equation of a (closed) jaxpr, sub-jaxprs (jit, custom_jvp, checkpoint) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _eqns(sub)


def test_bfloat16_computes_in_bf16_with_float32_master_weights():
    params, batch = _setup()
    c16 = _config(dtype="bfloat16")
    gd16 = _graphdef(c16)
    loss16 = jax.jit(functools.partial(_loss, graphdef=gd16))
    l16, l32 = float(loss16(params, batch)), float(_compiled("none")["loss"])
    assert l16 != l32  # the option really does something ...
    assert abs(l16 - l32) <= 2e-2 * l32, (l16, l32)  # ... and keeps the loss close

    # Inside: every convolution and every projection / attention matmul has bfloat16 operands; GroupNorm
    # statistics and the softmax (exp) are float32; the loss is float32.
    jaxpr = jax.make_jaxpr(functools.partial(_loss, graphdef=gd16))(params, batch)
    eqns = list(_eqns(jaxpr.jaxpr))
    convs = [e for e in eqns if e.primitive.name == "conv_general_dilated"]
    assert convs and all(v.aval.dtype == jnp.bfloat16 for e in convs for v in e.invars)
    unet_dots = [e for e in eqns if e.primitive.name == "dot_general"
                 and any(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
    assert len(unet_dots) >= 5  # q, k, v, out projections and QKᵀ, PV of the cross-attention, the emb projections
    exps = [e for e in eqns if e.primitive.name == "exp" and e.outvars[0].aval.ndim == 4]  # softmax
    assert exps and all(e.outvars[0].aval.dtype == jnp.float32 for e in exps)
    means = [e for e in eqns if e.primitive.name == "reduce_sum" and e.invars[0].aval.ndim == 5]  # GroupNorm
    assert means and all(e.invars[0].aval.dtype == jnp.float32 for e in means)
    assert jaxpr.out_avals[0].dtype == jnp.float32

    # One real train step: params, EMA and the AdamW moments stay float32 (types of the compiled step's outputs).
    tx = step_mod.make_optimizer(c16.optim)
    state = step_mod.init_train_state(params, tx)
    new, metrics = jax.eval_shape(
        lambda s: step_mod.train_step(s, {"image": batch["image"]}, None, jax.random.PRNGKey(0), graphdef=gd16,
                                      encode=lambda _, __: batch["emb"], tx=tx, spec=step_mod.step_spec(c16)),
        state)
    floats = jax.tree.leaves((new.params, new.ema, new.opt_state))
    floats = [a for a in floats if jnp.issubdtype(a.dtype, jnp.floating)]
    assert len(floats) > 3 * len(jax.tree.leaves(params)) and all(a.dtype == jnp.float32 for a in floats)
    assert metrics["loss"].dtype == jnp.float32 and metrics["grad_norm"].dtype == jnp.float32

