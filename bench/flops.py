"""One analytic FLOP counter for every framework in bench/peers.py, from layer shapes.

A model's forward pass is reduced to a list of ops, each a convolution or a (batched) matrix product:

  * ``Op("conv", 2 · out_elems · cin_per_group · kh · kw)``
  * ``Op("linear" | "attention", 2 · batch · m · k · n)`` — a dense layer is batch 1, m rows; attention is QKᵀ
    (batch B·heads, m = Lq, k = head dim, n = Lk) and AV (m = Lq, k = Lk, n = head dim).

Elementwise work (norms, activations, softmax, the optimizer) is not counted: model FLOPs per train step are
3 × the forward's ops (forward + backward ≈ 2 × forward), the usual MFU convention.

The ops come from the layer shapes each framework actually runs:
  * JAX (ours, diffusers' Flax UNet): `jaxpr_ops` walks the forward's jaxpr — every `conv_general_dilated` and
    `dot_general`, loop bodies (`scan`, hence `lax.map`) multiplied by their trip count. A dot with batch
    dimensions is attention; one without is a dense layer.
  * PyTorch (diffusers' UNet): `TorchOpRecorder` hooks `nn.Conv2d`, `nn.Linear` and diffusers' `Attention`
    (QKᵀ and AV from the query / key lengths and head count — torch's own FlopCounterMode counts nothing for
    CPU flash attention).
XLA's `cost_analysis()` agrees with `jaxpr_ops` on loop-free programs (tests/test_bench_flops.py) but counts
a loop body once, so it under-counts chunked (memory-efficient) attention.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, NamedTuple


class Op(NamedTuple):
    kind: str  # "conv" | "linear" | "attention"
    flops: float


def conv_op(out_elems: int, cin_per_group: int, kh: int, kw: int) -> Op:
    return Op("conv", 2.0 * out_elems * cin_per_group * kh * kw)


def dot_op(batch: int, m: int, k: int, n: int, kind: str = "linear") -> Op:
    return Op(kind, 2.0 * batch * m * k * n)


def attention_ops(batch_heads: int, lq: int, lk: int, head_dim: int) -> list[Op]:
    """QKᵀ and AV of one attention call."""
    return [dot_op(batch_heads, lq, head_dim, lk, "attention"), dot_op(batch_heads, lq, lk, head_dim, "attention")]


def total(ops: Iterable[Op]) -> float:
    return float(sum(o.flops for o in ops))


def breakdown(ops: Iterable[Op]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for o in ops:
        out[o.kind] += o.flops
    return dict(out)


# ----------------------------------------------------------------------------------------------------------
# JAX: walk a jaxpr
# ----------------------------------------------------------------------------------------------------------
# jax.nn.dot_product_attention(implementation="cudnn")'s forward, as it appears in a jaxpr traced on a GPU.
CUDNN_ATTENTION_PRIMITIVES = ("dot_product_attention_fwd", "dot_product_attention_fwd_wrapper")


def jaxpr_ops(jaxpr: Any) -> list[Op]:
    """Ops of a (closed) jaxpr, sub-jaxprs included; `scan` bodies × length, `cond` the costliest branch.
    A `while` loop (unknown trip count) raises."""
    from jax.extend import core

    def is_jaxpr(v):
        return isinstance(v, (core.Jaxpr, core.ClosedJaxpr))

    def walk(jp) -> list[Op]:
        jp = jp.jaxpr if isinstance(jp, core.ClosedJaxpr) else jp
        ops: list[Op] = []
        for eqn in jp.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
                ls, rs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
                batch = math.prod(ls[d] for d in lb)
                k = math.prod(ls[d] for d in lc)
                m = math.prod(s for d, s in enumerate(ls) if d not in lc and d not in lb)
                n = math.prod(s for d, s in enumerate(rs) if d not in rc and d not in rb)
                ops.append(dot_op(batch, m, k, n, "attention" if lb else "linear"))
            elif name == "conv_general_dilated":
                dn = eqn.params["dimension_numbers"]
                rhs = eqn.invars[1].aval.shape
                cin = rhs[dn.rhs_spec[1]]
                spatial = [rhs[d] for d in dn.rhs_spec[2:]]
                out = math.prod(eqn.outvars[0].aval.shape)
                ops.append(Op("conv", 2.0 * out * cin * math.prod(spatial)))
            elif name in CUDNN_ATTENTION_PRIMITIVES:  # cuDNN fused attention: q [B, T, N, H], k [B, S, N, H]
                b, t, n, h = eqn.invars[0].aval.shape
                ops += attention_ops(b * n, t, eqn.invars[1].aval.shape[1], h)
            elif name == "while":
                raise ValueError("while loop in the jaxpr: trip count unknown, FLOPs not countable")
            elif name == "scan":
                ops += [Op(o.kind, o.flops * eqn.params["length"]) for o in walk(eqn.params["jaxpr"])]
            elif name == "cond":
                branches = [walk(b) for b in eqn.params["branches"]]
                ops += max(branches, key=total)
            else:
                for v in eqn.params.values():
                    if is_jaxpr(v):
                        ops += walk(v)
                    elif isinstance(v, (tuple, list)) and v and all(is_jaxpr(x) for x in v):
                        ops += max((walk(x) for x in v), key=total)
        return ops

    return walk(jaxpr)


def jax_forward_ops(fn, *args) -> list[Op]:
    import jax

    return jaxpr_ops(jax.make_jaxpr(fn)(*args))


def xla_flops(stage: Any) -> float:
    """XLA's FLOP count of a lowered or compiled computation (loop bodies counted once)."""
    ca = stage.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", 0.0)) if ca else 0.0


# ----------------------------------------------------------------------------------------------------------
# PyTorch: forward hooks
# ----------------------------------------------------------------------------------------------------------
class TorchOpRecorder:
    """Context manager recording the ops of every forward run inside it (hooks removed on exit)."""

    def __init__(self, model: Any):
        self.model, self.ops, self._handles = model, [], []

    def __enter__(self) -> TorchOpRecorder:
        from torch import nn

        try:
            from diffusers.models.attention_processor import Attention
        except ImportError:  # pragma: no cover - diffusers absent: plain torch modules only
            Attention = ()  # noqa: N806

        def conv_hook(mod, inp, out):
            kh, kw = mod.kernel_size
            self.ops.append(conv_op(out.numel(), mod.in_channels // mod.groups, kh, kw))

        def linear_hook(mod, inp, out):
            x = inp[0]
            self.ops.append(dot_op(1, x.numel() // mod.in_features, mod.in_features, mod.out_features))

        def attn_hook(mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            ctx = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            if h.ndim == 4:  # [B, C, H, W] (attention over spatial positions)
                b, lq = h.shape[0], h.shape[2] * h.shape[3]
            else:
                b, lq = h.shape[0], h.shape[1]
            lk = lq if ctx is None else ctx.shape[1]
            self.ops.extend(attention_ops(b * mod.heads, lq, lk, mod.inner_dim // mod.heads))

        for m in self.model.modules():
            if isinstance(m, nn.Conv2d):
                self._handles.append(m.register_forward_hook(conv_hook))
            elif isinstance(m, nn.Linear):
                self._handles.append(m.register_forward_hook(linear_hook))
            elif Attention and isinstance(m, Attention):
                self._handles.append(m.register_forward_pre_hook(attn_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
