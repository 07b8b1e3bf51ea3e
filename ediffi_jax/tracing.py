"""Tracing module construction (``nnx.eval_shape``, ``jax.jit`` of an init) in time linear in the model size.

Flax NNX draws each parameter's key with ``RngStream.__call__``, which advances the stream's counter with
``count[...] += 1``. ``Variable.set_value`` then compares the old and new values' ``sharding``; under a trace
both are tracers, and a tracer's ``sharding`` raises an ``AttributeError`` whose message JAX builds by walking the
trace back to the value's origin (``DynamicJaxprTracer._origin_msg``). NNX catches the error and goes on, so the
only effect is time: one walk of the whole trace per random draw, quadratic in the number of layers. Building the
paper's base64 U-Net abstractly took 8.0 s, 7.2 s of them in those messages (jax 0.10.2, flax 0.12.8;
``bench/abstract_init.py``).

`fast_tracing()` makes those messages skip the origin walk while it is active (the error is still raised, with
its first sentence); `abstract_module(make)` is ``nnx.eval_shape(make)`` under it. Every shape-only build of a
model in this package goes through them. If a JAX release drops the private hook, both fall back to the plain
behaviour (same results, the old speed).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from flax import nnx

M = TypeVar("M")

_lock = threading.Lock()
_depth = 0
_saved: object = None


def _tracer_class():
    try:
        from jax._src.interpreters import partial_eval
    except ImportError:  # pragma: no cover - a JAX without this module: nothing to patch
        return None
    cls = getattr(partial_eval, "DynamicJaxprTracer", None)
    return cls if cls is not None and "_origin_msg" in vars(cls) else None


def _no_origin(self) -> str:
    return ""


@contextlib.contextmanager
def fast_tracing() -> Iterator[None]:
    """Within it, tracer error messages leave out where the value came from (no walk of the trace).

    Re-entrant and thread-safe; restores JAX's method when the outermost use ends. Results are unchanged: only the
    text of errors raised (and, in NNX's case, caught) while tracing differs.
    """
    global _depth, _saved
    cls = _tracer_class()
    if cls is None:
        yield
        return
    with _lock:
        if _depth == 0:
            _saved = vars(cls)["_origin_msg"]
            cls._origin_msg = _no_origin
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                cls._origin_msg = _saved
                _saved = None


def abstract_module(make: Callable[[], M]) -> M:
    """``nnx.eval_shape(make)`` under `fast_tracing`: the module with ``jax.ShapeDtypeStruct`` values, no memory."""
    with fast_tracing():
        return nnx.eval_shape(make)


__all__ = ["abstract_module", "fast_tracing"]
