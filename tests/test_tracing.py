"""ediffi_jax/tracing.py: shape-only and jitted construction give the same modules as plain NNX, and the JAX
method it swaps out is back afterwards (no timing here: bench/abstract_init.py)."""

import jax
import numpy as np
import pytest
from conftest import micro_config
from flax import nnx
from jax._src.interpreters import partial_eval

from ediffi_jax.tracing import abstract_module, fast_tracing
from ediffi_jax.train.step import build_model, split_model

ORIGINAL = vars(partial_eval.DynamicJaxprTracer)["_origin_msg"]


def _describe(state):
    return [(path, type(v).__name__, v.get_value().shape, v.get_value().dtype, v.get_metadata().get("out_sharding"))
            for path, v in nnx.to_flat_state(state)]


def test_abstract_module_equals_nnx_eval_shape(tmp_path):
    c = micro_config(str(tmp_path))
    ours = abstract_module(lambda: build_model(c, 0))
    plain = nnx.eval_shape(lambda: build_model(c, 0))
    assert nnx.graphdef(ours) == nnx.graphdef(plain)
    a, b = _describe(nnx.state(ours)), _describe(nnx.state(plain))
    assert a == b and len(a) > 50
    assert all(isinstance(v.get_value(), jax.ShapeDtypeStruct) for _, v in nnx.to_flat_state(nnx.state(ours)))
    assert vars(partial_eval.DynamicJaxprTracer)["_origin_msg"] is ORIGINAL


def test_jitted_init_under_fast_tracing_is_the_plain_jitted_init(tmp_path):
    c = micro_config(str(tmp_path))
    with fast_tracing():
        fast = jax.jit(lambda: split_model(build_model(c, 3))[1])()
    plain = jax.jit(lambda: split_model(build_model(c, 3))[1])()
    for x, y in zip(jax.tree.leaves(fast), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_tracer_errors_keep_their_type_and_the_method_is_restored():
    seen = []

    def f(x):
        y = jax.numpy.zeros(x.shape) + 1  # a value made inside the trace: its origin is a line of this file
        with pytest.raises(AttributeError, match="The 'sharding' attribute is not available") as e:
            y.sharding  # noqa: B018
        seen.append(str(e.value))
        return y

    with fast_tracing():
        with fast_tracing():  # re-entrant
            jax.jit(f)(np.float32(1))
        assert vars(partial_eval.DynamicJaxprTracer)["_origin_msg"] is not ORIGINAL
        with pytest.raises(RuntimeError, match="boom"):
            with fast_tracing():
                raise RuntimeError("boom")
        assert vars(partial_eval.DynamicJaxprTracer)["_origin_msg"] is not ORIGINAL  # outer one still active
    assert vars(partial_eval.DynamicJaxprTracer)["_origin_msg"] is ORIGINAL
    jax.jit(f)(np.zeros(2, np.float32))  # another shape: traced again
    assert len(seen) == 2 and seen[0].replace("float32[]", "float32[2]") == seen[1]  # the same message here
