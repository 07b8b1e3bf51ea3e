"""The analytic FLOP counter of bench/peers.py (bench/flops.py) against XLA's cost_analysis, on tiny ops."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import flops  # noqa: E402

_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, stride=1, padding="VALID", groups=1):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=_DN,
                                        feature_group_count=groups)


def _attention(q, k, v):  # [B, L, H, D]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    return jnp.einsum("bhqk,bkhd->bqhd", logits, v)  # no softmax: XLA would count its elementwise FLOPs


def _net(x, w1, w2, wd, ctx):
    h = _conv(x, w1)                          # 2·(2·6·6·8)·3·3·3
    h = _conv(h, w2, stride=2, groups=2)      # grouped, strided
    b, hh, ww, c = h.shape
    t = h.reshape(b, hh * ww, c) @ wd         # dense
    q = t.reshape(b, hh * ww, 2, c // 2)
    kv = ctx.reshape(b, ctx.shape[1], 2, c // 2)
    return _attention(q, kv, kv)


def _args():
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    return (jax.random.normal(k[0], (2, 8, 8, 3)), jax.random.normal(k[1], (3, 3, 3, 8)),
            jax.random.normal(k[2], (3, 3, 4, 8)), jax.random.normal(k[3], (8, 8)),
            jax.random.normal(k[4], (2, 5, 8)))


def test_counter_matches_xla_on_conv_dense_attention():
    args = _args()
    ops = flops.jax_forward_ops(_net, *args)
    expected = {
        "conv": 2 * (2 * 6 * 6 * 8) * 3 * 3 * 3 + 2 * (2 * 2 * 2 * 8) * 4 * 3 * 3,
        "linear": 2 * (2 * 4) * 8 * 8,
        "attention": 2 * (2 * 2) * 4 * 4 * 5 * 2,  # QKᵀ and AV: batch·heads 4, Lq 4, D 4, Lk 5
    }
    assert flops.breakdown(ops) == pytest.approx(expected)
    assert flops.total(ops) == pytest.approx(flops.xla_flops(jax.jit(_net).lower(*args)), rel=1e-6)


def test_padded_conv_counts_every_tap():
    """The counter charges a padded ("same") conv for every kernel tap, as the frameworks run it; XLA's count
    leaves out the taps that fall on padding, so it is a little lower."""
    x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    f = lambda x, w: _conv(x, w, padding=((1, 1), (1, 1)))  # noqa: E731
    analytic = flops.total(flops.jax_forward_ops(f, x, w))
    assert analytic == 2 * 64 * 4 * 4 * 9
    assert flops.xla_flops(jax.jit(f).lower(x, w)) == 2 * 4 * 4 * (6 * 6 * 9 + 4 * 6 * 6 + 4 * 4)


def test_scan_bodies_are_multiplied_xla_counts_them_once():
    q, k, v = (jnp.ones((2, 16, 2, 4)),) * 3

    def chunked(q, k, v):  # attention over 4 query chunks, the way memory-efficient attention loops
        qs = q.reshape(2, 4, 4, 2, 4).transpose(1, 0, 2, 3, 4)
        return jax.lax.map(lambda qc: _attention(qc, k, v), qs)

    whole = flops.total(flops.jax_forward_ops(_attention, q, k, v))
    assert flops.total(flops.jax_forward_ops(chunked, q, k, v)) == whole
    assert flops.xla_flops(jax.jit(chunked).lower(q, k, v)) == pytest.approx(whole / 4, abs=8)  # + loop counter


def test_torch_recorder():
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(2), torch.nn.Linear(64, 16))
    with flops.TorchOpRecorder(net) as rec:
        net(torch.zeros(2, 3, 8, 8))
    assert flops.breakdown(rec.ops) == {"conv": 2 * (2 * 8 * 8 * 8) * 3 * 9, "linear": 2 * (2 * 8) * 64 * 16}
    assert not rec._handles


def test_cudnn_attention_primitive_counts_like_two_products():
    """jax.nn.dot_product_attention(implementation="cudnn") shows up as one primitive in a GPU jaxpr (not traceable
    on a CPU): a stand-in primitive of the same name must count QKᵀ and AV like the dense einsums."""
    from jax.extend import core

    prim = core.Primitive(flops.CUDNN_ATTENTION_PRIMITIVES[1])
    prim.multiple_results = True
    prim.def_abstract_eval(lambda q, k, v: [jax.core.ShapedArray(q.shape, q.dtype)])
    q, kv = jnp.ones((2, 6, 3, 8)), jnp.ones((2, 10, 3, 8))
    ops = flops.jax_forward_ops(lambda q, k, v: prim.bind(q, k, v)[0], q, kv, kv)
    dense = flops.jax_forward_ops(_attention, q, kv, kv)
    assert flops.breakdown(ops) == pytest.approx(flops.breakdown(dense))
    assert flops.total(ops) == 2 * 2 * (2 * 3) * 6 * 10 * 8
