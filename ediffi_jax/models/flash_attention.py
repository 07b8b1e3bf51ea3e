"""Memory-efficient exact attention for long sequences: query blocks, saved log-sum-exp, recomputing backward.

References:
  * Rabe & Staats 2021, "Self-attention Does Not Need O(n²) Memory" (arXiv 2112.05682): process the queries in
    chunks so only one chunk's logits exist at a time.
  * Dao et al. 2022, "FlashAttention" (arXiv 2205.14135), Alg. 1–2: keep only the output O and the row
    log-sum-exp ℓ = m + log Σ exp(s − m) of the forward; the backward recomputes P = exp(S − ℓ) block by block:
        dV = Pᵀ dO,   dP = dO Vᵀ,   Δ = rowsum(dO ∘ O),   dS = P ∘ (dP − Δ),   dQ = dS K·τ,   dK = dSᵀ Q·τ
    (τ = 1/√D, S = τ·QKᵀ).

Why here: the U-Net's self-attention at 32² and 64² has 8–64-dim heads, so its logits [B, H, L, L] in float32
dwarf everything else the train step keeps (edm64: 512 MiB per 32² layer, more than all activations together).
Materialised, they cost memory *and* time: on CPU every pass over them streams from DRAM and XLA re-faults the
freed pages each step. Here each (head group × query block) of logits is small enough to stay in cache, only
O and ℓ are saved for the backward, and the result equals `attention.dot_product_attention` to float rounding.

Keys are never blocked (every query block sees all keys, so the softmax of a block is exact in one pass); a block
holds ``group`` heads × ``block_q`` queries × all keys, sized by `block_shape` to about ``block_bytes``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# Logits per block (float32 bytes); chosen on a 2-core Xeon with 2 MiB L2 per core (docs/benchmarks.md).
DEFAULT_BLOCK_BYTES = 16 << 20
_NEG = float(jnp.finfo(jnp.float32).min)


def block_shape(
    heads: int, lq: int, lk: int, block_bytes: int = DEFAULT_BLOCK_BYTES, max_group: int | None = None
) -> tuple[int, int]:
    """(group, block_q): ``group`` divides ``heads`` (= batch × heads), ``group·block_q·lk·4 ≈ block_bytes``.

    Queries are padded up to a multiple of ``block_q``; a block of whole rows is preferred to a group of heads;
    ``max_group`` caps the group (1 on CPU, see `flash_attention`).
    """
    rows = max(1, block_bytes // (4 * max(lk, 1)))  # query rows × heads per block
    block_q = min(lq, rows)
    if block_q < lq:  # a power of two at most `rows`: aligned blocks
        block_q = 1 << (block_q.bit_length() - 1)
    group = 1
    for g in range(1, (max_group or heads) + 1):
        if heads % g == 0 and g * block_q <= rows:
            group = g
    return group, block_q


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array | None = None,
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> jax.Array:
    """``softmax(QKᵀ/√D) V`` like `attention.dot_product_attention` (same layouts, masking and dtypes).

    Args:
      q: ``[B, Lq, H, D]``; k, v: ``[B, Lk, H, D]``.
      key_mask: optional bool ``[B, Lk]``: False keys get zero weight (an all-masked row attends uniformly).
      block_bytes: float32 logits per block (see `block_shape`).

    Returns:
      ``[B, Lq, H, D]`` in ``v``'s dtype.
    """
    b, lq, h, d = q.shape
    lk = k.shape[1]
    masked = key_mask is not None
    if key_mask is None:
        key_mask = jnp.ones((b, lk), bool)  # not read (masked=False)
    # CPU: one head per block, so every dot is 2-D and runs on XLA:CPU's fast GEMM path (batched dots with a
    # contraction over a major dimension do not); accelerators: batched blocks (fewer loop iterations).
    max_group = 1 if jax.default_backend() == "cpu" else None
    group, block_q = block_shape(b * h, lq, lk, block_bytes, max_group)
    pad = -lq % block_q

    def heads_first(x: jax.Array) -> jax.Array:  # [B, L, H, D] -> [B·H, L, D]
        return x.transpose(0, 2, 1, 3).reshape(b * h, x.shape[1], d)

    qh = heads_first(q)
    if pad:
        qh = jnp.pad(qh, ((0, 0), (0, pad), (0, 0)))
    mask = jnp.broadcast_to(key_mask[:, None, :], (b, h, lk)).reshape(b * h, lk)
    o = _flash(qh, heads_first(k), heads_first(v), mask, group, block_q, masked)
    return o[:, :lq].reshape(b, h, lq, d).transpose(0, 2, 1, 3)


# ----------------------------------------------------------------------------------------------------------
# [B·H, L, D] core with a custom VJP; blocks are (group heads) × (block_q queries) × (all keys)
# ----------------------------------------------------------------------------------------------------------
def _split(x: jax.Array, group: int, block_q: int) -> jax.Array:
    """[N, L, D] -> [N/group, L/block_q, group, block_q, D]."""
    n, length, d = x.shape
    return x.reshape(n // group, group, length // block_q, block_q, d).transpose(0, 2, 1, 3, 4)


def _merge(x: jax.Array) -> jax.Array:
    """Inverse of `_split`."""
    ng, nq, group, block_q, d = x.shape
    return x.transpose(0, 2, 1, 3, 4).reshape(ng * group, nq * block_q, d)


def _logits(qs: jax.Array, kg: jax.Array, mg: jax.Array | None, post: float) -> jax.Array:
    """S = τ·QKᵀ of one block in float32 (``qs`` = Q pre-scaled, or ``post`` = τ), masked keys at the float32
    minimum: [group, block_q, Lk]."""
    s = jnp.einsum("gqd,gkd->gqk", qs, kg, preferred_element_type=jnp.float32)
    s = s if post == 1.0 else s * post
    return s if mg is None else jnp.where(mg[:, None, :], s, _NEG)


def _prescale(q: jax.Array) -> tuple[jax.Array, float, float]:
    """(Q for the logits, factor left for the logits, τ). Scaling the small Q instead of the large S saves a pass
    over the logits; done where it is exact or Q is float32 (bf16·τ would round Q once more than S·τ does)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if q.dtype == jnp.float32 or math.log2(scale).is_integer():
        return q * jnp.asarray(scale, q.dtype), 1.0, scale
    return q, scale, scale


def _forward(q, k, v, mask, group, block_q, masked):
    q, post, _ = _prescale(q)
    kg = k.reshape(-1, group, *k.shape[1:])
    # V with a column of ones: the P·V dot also yields Σ_k exp(s − m), saving a reduction pass over the block
    ones = jnp.ones((*v.shape[:2], 1), v.dtype)
    vg = jnp.concatenate([v, ones], axis=-1).reshape(-1, group, v.shape[1], v.shape[2] + 1)
    mg = mask.reshape(-1, group, mask.shape[-1])

    def per_group(args):
        qg, kk, vv, mm = args
        mm = mm if masked else None

        def per_block(qb):
            s = _logits(qb, kk, mm, post)
            m = jnp.max(s, axis=-1, keepdims=True)
            e = jnp.exp(s - m)
            ov = jnp.einsum("gqk,gkd->gqd", e.astype(vv.dtype), vv, preferred_element_type=jnp.float32)
            total = ov[..., -1:]
            o = ov[..., :-1] / total
            # ℓ = m + log Σ kept as (m, log Σ): for an all-masked row m is the float32 minimum and m + log Σ
            # would round to m, losing the 1/Lk of its uniform weights
            return o.astype(vv.dtype), jnp.stack([m[..., 0], jnp.log(total[..., 0])])

        return jax.lax.map(per_block, qg)

    o, lse = jax.lax.map(per_group, (_split(q, group, block_q), kg, vg, mg))
    return _merge(o), lse  # lse: [ng, nq, 2, group, block_q]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, mask, group, block_q, masked):
    return _forward(q, k, v, mask, group, block_q, masked)[0]


def _flash_fwd(q, k, v, mask, group, block_q, masked):
    o, lse = _forward(q, k, v, mask, group, block_q, masked)
    return o, (q, k, v, mask, o, lse)


def _flash_bwd(group, block_q, masked, res, do):
    q, k, v, mask, o, lse = res
    qs, post, scale = _prescale(q)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # Δ = rowsum(dO ∘ O): [N, Lq]
    delta = delta.reshape(delta.shape[0] // group, group, -1, block_q).transpose(0, 2, 1, 3)
    kg = k.reshape(-1, group, *k.shape[1:])
    vg = v.reshape(-1, group, *v.shape[1:])
    mg = mask.reshape(-1, group, mask.shape[-1])

    def per_group(args):
        qg, dog, lg, dg, kk, vv, mm = args
        mm = mm if masked else None

        def per_block(carry, xs):
            dk, dv = carry
            qb, dob, lb, db = xs
            p = jnp.exp(_logits(qb, kk, mm, post) - lb[0, ..., None] - lb[1, ..., None])  # P = exp(S − ℓ)
            # dVᵀ = dOᵀ P and dKᵀ = τ·Qᵀ dS, accumulated transposed ([group, D, Lk]): with group = 1 these are
            # plain 2-D dots that XLA:CPU hands to its fast GEMM (P contracted over its major dimension in the
            # [.., Lk, D] form took a generic path ~3× slower single-threaded; docs/benchmarks.md)
            dob_t = jnp.swapaxes(dob, 1, 2)
            dv = dv + jnp.einsum("gdq,gqk->gdk", dob_t, p, preferred_element_type=jnp.float32)
            dp = jnp.einsum("gqd,gkd->gqk", dob, vv, preferred_element_type=jnp.float32)
            ds = p * (dp - db[..., None])  # dS/τ: τ goes on the small dQ, dK
            if mm is not None:  # masked logits are constants (an all-masked row's uniform P has no gradient)
                ds = jnp.where(mm[:, None, :], ds, 0.0)
            dq = jnp.einsum("gqk,gkd->gqd", ds, kk, preferred_element_type=jnp.float32) * scale
            qb_t = jnp.swapaxes(qb, 1, 2)  # pre-scaled unless post = τ
            dk = dk + jnp.einsum("gdq,gqk->gdk", qb_t, ds, preferred_element_type=jnp.float32) * post
            return (dk, dv), dq.astype(qb.dtype)

        zeros = jnp.zeros(jnp.swapaxes(kk, 1, 2).shape, jnp.float32)
        (dk, dv), dq = jax.lax.scan(per_block, (zeros, zeros), (qg, dog, lg, dg))
        return dq, jnp.swapaxes(dk, 1, 2).astype(kk.dtype), jnp.swapaxes(dv, 1, 2).astype(vv.dtype)

    dq, dk, dv = jax.lax.map(
        per_group, (_split(qs, group, block_q), _split(do, group, block_q), lse, delta, kg, vg, mg))
    return _merge(dq), dk.reshape(k.shape), dv.reshape(v.shape), None


_flash.defvjp(_flash_fwd, _flash_bwd)

__all__ = ["DEFAULT_BLOCK_BYTES", "block_shape", "flash_attention"]
