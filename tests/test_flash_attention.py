"""Query-blocked attention (models/flash_attention.py) against the dense path and PyTorch's SDPA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ediffi_jax.models.attention import dot_product_attention, select_attention
from ediffi_jax.models.flash_attention import block_shape, flash_attention


def _qkv(b, lq, lk, h, d, seed=0, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(b, lq, h, d)), dtype)
    k = jnp.asarray(r.normal(size=(b, lk, h, d)), dtype)
    v = jnp.asarray(r.normal(size=(b, lk, h, d)), dtype)
    return q, k, v


def _value_and_grads(fn, q, k, v, g):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * g)

    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


def test_block_shape_fits_the_budget():
    assert block_shape(128, 1024, 1024, 16 << 20) == (4, 1024)  # 4 heads × all 1024 rows × 1024 keys × 4 B
    assert block_shape(128, 4096, 4096, 16 << 20) == (1, 1024)  # rows first, then heads
    assert block_shape(6, 100, 7, 1 << 20) == (6, 100)  # everything in one block
    assert block_shape(128, 1024, 1024, 16 << 20, max_group=1) == (1, 1024)  # CPU: one head per block
    g, bq = block_shape(12, 1000, 333, 1 << 16)
    assert 12 % g == 0 and bq & (bq - 1) == 0 and g * bq * 333 * 4 <= 1 << 16


@pytest.mark.parametrize("lq,block_bytes", [(64, 1 << 12), (50, 1 << 12), (64, 1 << 30)])
def test_flash_equals_dense_values_and_gradients(lq, block_bytes):
    """Several blocks (and padded queries when lq=50), masked keys and an all-masked row; values and grads."""
    b, lk, h, d = 2, 24, 3, 8
    q, k, v = _qkv(b, lq, lk, h, d)
    mask = np.random.default_rng(1).uniform(size=(b, lk)) > 0.3
    mask[1] = False  # example 1 attends uniformly (no key left), like the dense path
    mask = jnp.asarray(mask)
    g = jnp.asarray(np.random.default_rng(2).normal(size=(b, lq, h, d)), jnp.float32)
    ref = _value_and_grads(lambda q, k, v: dot_product_attention(q, k, v, key_mask=mask, impl="dense"), q, k, v, g)
    got = _value_and_grads(lambda q, k, v: flash_attention(q, k, v, mask, block_bytes=block_bytes), q, k, v, g)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    for a, r in zip(got[1], ref[1]):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(r))))


def test_flash_matches_torch_sdpa():
    """Parity with torch.nn.functional.scaled_dot_product_attention (output and all three gradients)."""
    b, lq, lk, h, d = 2, 96, 40, 4, 8
    q, k, v = _qkv(b, lq, lk, h, d, seed=3)
    mask = jnp.asarray(np.random.default_rng(4).uniform(size=(b, lk)) > 0.25)
    g = jnp.asarray(np.random.default_rng(5).normal(size=(b, lq, h, d)), jnp.float32)
    out, grads = _value_and_grads(lambda q, k, v: flash_attention(q, k, v, mask, block_bytes=1 << 13), q, k, v, g)

    tq, tk, tv = (torch.tensor(np.asarray(x)).transpose(1, 2).requires_grad_(True) for x in (q, k, v))
    tmask = torch.tensor(np.asarray(mask))[:, None, None, :]
    to = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask)
    tl = (to * torch.tensor(np.asarray(g)).transpose(1, 2)).sum()
    tl.backward()
    np.testing.assert_allclose(float(out), float(tl.detach()), rtol=1e-5)
    for a, t in zip(grads, (tq, tk, tv)):
        np.testing.assert_allclose(a, t.grad.transpose(1, 2).numpy(), rtol=1e-4, atol=1e-5)


def test_flash_bfloat16_follows_the_dense_policy():
    """bf16 q/k/v: float32 logits and softmax in both; output bf16; close to the float32 result."""
    q, k, v = _qkv(2, 64, 64, 2, 16, seed=6, dtype=jnp.bfloat16)
    dense = dot_product_attention(q, k, v, impl="dense")
    flash = flash_attention(q, k, v, block_bytes=1 << 12)
    exact = dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), impl="dense")
    assert flash.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(flash, np.float32), np.asarray(dense, np.float32), atol=2e-2)
    np.testing.assert_allclose(np.asarray(flash, np.float32), exact, atol=2e-2)
    # 8-dim heads: τ = 1/√8 is not a power of two, so bf16 Q is not pre-scaled (τ applied to the float32 logits
    # and to dQ / dK instead); gradients follow the dense bf16 path
    q, k, v = _qkv(2, 64, 32, 2, 8, seed=10, dtype=jnp.bfloat16)
    g = jnp.asarray(np.random.default_rng(11).normal(size=(2, 64, 2, 8)), jnp.float32)
    ref = _value_and_grads(lambda q, k, v: dot_product_attention(q, k, v, impl="dense"), q, k, v, g)
    got = _value_and_grads(lambda q, k, v: flash_attention(q, k, v, block_bytes=1 << 12), q, k, v, g)
    for a, r in zip(got[1], ref[1]):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(r, np.float32), atol=3e-2, rtol=3e-2)


def test_flash_keeps_a_fraction_of_the_dense_memory():
    """The compiled value-and-grad of a 32²-like self-attention: temporaries ≥ 10× smaller than dense."""
    q, k, v = _qkv(2, 1024, 1024, 4, 8, seed=7)

    def temp(fn):
        f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2)))
        return f.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    dense = temp(lambda q, k, v: dot_product_attention(q, k, v, impl="dense"))
    flash = temp(lambda q, k, v: flash_attention(q, k, v, block_bytes=1 << 20))
    logits = 2 * 4 * 1024 * 1024 * 4
    assert dense >= logits  # the dense backward keeps at least the softmax weights
    assert flash * 10 <= dense, (flash, dense)


def test_auto_picks_flash_only_for_large_logits_and_never_with_a_bias_hook():
    q, k, v = _qkv(1, 64, 64, 2, 8, seed=8)
    seen = []

    def hook(logits):
        seen.append(logits.shape)
        return jnp.zeros_like(logits)

    out = dot_product_attention(q, k, v, bias_fn=hook, impl="flash")  # a hook needs the whole logit tensor
    assert seen == [(1, 2, 64, 64)]
    np.testing.assert_allclose(out, dot_product_attention(q, k, v, impl="dense"), rtol=1e-6)
    # auto: blocked above the backend's threshold (CPU 1 MiB of float32 logits), dense below it
    big = _qkv(2, 512, 512, 2, 8, seed=9)  # 2 × 2 × 512² × 4 B = 2 MiB
    assert "custom_vjp" in str(jax.make_jaxpr(lambda *a: dot_product_attention(*a, impl="auto"))(*big))
    assert "custom_vjp" not in str(jax.make_jaxpr(lambda *a: dot_product_attention(*a, impl="auto"))(q, k, v))
    assert "custom_vjp" not in str(jax.make_jaxpr(lambda *a: dot_product_attention(*a, bias_fn=hook))(*big))
    with pytest.raises(ValueError, match="'fast'"):
        dot_product_attention(q, k, v, impl="fast")


def test_auto_picks_cudnn_on_gpu_only_for_unmasked_low_precision_layers():
    bf16, f32 = jnp.bfloat16, jnp.float32
    self_32 = ((8, 1024, 8, 8), (8, 1024, 8, 8))  # edm64's self-attention at 32²: 8 heads of 8
    pick = lambda *shapes, **kw: select_attention(*shapes, **{"masked": False, "has_bias": False, **kw})  # noqa: E731
    assert pick(*self_32, bf16, backend="gpu") == "cudnn"
    assert pick(*self_32, jnp.float16, backend="gpu") == "cudnn"
    assert pick(*self_32, f32, backend="gpu") == "flash"  # cuDNN's fused kernel is half precision only
    assert pick(*self_32, bf16, backend="gpu", masked=True) == "flash"  # cross-attention keeps its key mask
    assert pick(*self_32, bf16, backend="gpu", has_bias=True) == "dense"  # paint-with-words sees the logits
    assert pick((8, 1024, 2, 12), (8, 1024, 2, 12), bf16, backend="gpu") == "flash"  # head size not a multiple of 8
    assert pick((8, 1024, 1, 256), (8, 1024, 1, 256), bf16, backend="gpu") == "flash"  # head size over 128
    assert pick(*self_32, bf16, backend="cpu") == "flash"
    assert pick(*self_32, bf16, backend="gpu", impl="dense") == "dense"
    assert pick(*self_32, bf16, backend="gpu", impl="flash") == "flash"
    assert pick((1, 16, 2, 8), (1, 16, 2, 8), f32, backend="gpu") == "dense"  # small logits stay dense
