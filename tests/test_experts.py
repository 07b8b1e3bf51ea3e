"""Expert tree: equal-mass boundaries vs closed-form log-normal quantiles, the paper's layout, routing, validation."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from ediffi_jax.edm import LogNormalSigma
from ediffi_jax.experts import COMPLEMENT, PRESETS, ExpertNode, ExpertTree

DIST = LogNormalSigma(-1.2, 1.2)
INF = math.inf


def quantile(q: float) -> float:
    """Closed form: σ_q = exp(P_mean + P_std·Φ⁻¹(q))."""
    return math.exp(-1.2 + 1.2 * norm.ppf(q))


def test_root_split_is_the_median():
    tree = ExpertTree.from_paths(DIST, ["0", "1"])
    assert tree.boundaries == pytest.approx((math.exp(-1.2),), rel=1e-12)
    assert tree == ExpertTree.preset("2")


def test_depth_3_boundaries_are_the_eighths():
    tree = ExpertTree.from_paths(DIST, [format(k, "03b") for k in range(8)])
    assert tree.leaf_paths == tuple(format(k, "03b") for k in range(8))
    np.testing.assert_allclose(tree.boundaries, [quantile(k / 8) for k in range(1, 8)], rtol=1e-9)
    for p in tree.leaf_paths:
        assert tree.mass(p) == pytest.approx(1 / 8, rel=1e-9)


def test_leaf_mass_is_two_to_minus_depth_on_a_lopsided_tree():
    leaves = ["0", "10", "110", "1110", "11110", "111110", "1111110", "11111110", "111111110", "111111111"]
    tree = ExpertTree.from_paths(DIST, leaves)
    for p in leaves:
        assert tree.mass(p) == pytest.approx(2.0 ** -len(p), rel=1e-9), p
    k = np.cumsum([2.0 ** -len(p) for p in leaves[:-1]])  # boundaries at the cumulative masses
    np.testing.assert_allclose(tree.boundaries, [quantile(q) for q in k], rtol=1e-9)


def test_paper_three_expert_preset():
    tree = ExpertTree.preset("3-paper")
    assert PRESETS["3-paper"] == ("000", COMPLEMENT, "111111111")
    assert tree.leaf_paths == ("000", "rest", "111111111")
    lo, hi = tree.boundaries
    assert (round(lo, 3), round(hi, 2)) == (0.076, 9.61)  # ANCHORS.md: σ ≈ 0.076 and σ ≈ 9.61
    assert lo == pytest.approx(quantile(1 / 8), rel=1e-9) and hi == pytest.approx(quantile(1 - 1 / 512), rel=1e-9)
    masses = [tree.mass(p) for p in tree.leaf_paths]
    np.testing.assert_allclose(masses, [1 / 8, 1 - 1 / 8 - 1 / 512, 1 / 512], rtol=1e-9)
    assert tree.sigma_dist("rest") == LogNormalSigma(-1.2, 1.2, lo, hi)
    assert tree.sigma_dist("000").hi == lo and tree.sigma_dist("111111111").lo == hi
    assert tree.sigma_dist() == DIST
    # Initialisation: tree nodes from their parent, the complement from the root (unconfirmed), the root from scratch.
    assert [tree.init_from(p) for p in tree.leaf_paths] == ["00", "", "11111111"]
    assert tree.init_from("") is None and tree.parent("0") == ""
    order = tree.training_order()
    assert order[0] == "" and set(order) == {"", "0", "00", "000", "rest"} | {"1" * d for d in range(1, 10)}
    assert all(order.index(tree.init_from(p)) < order.index(p) for p in order if p)


def test_single_model_preset():
    tree = ExpertTree.preset("A")
    assert tree.leaf_paths == ("",) and tree.boundaries == () and tree.init_from("") is None
    np.testing.assert_array_equal(tree.route(jnp.array([0.0, 1.0, INF])), [0, 0, 0])


def _probe_sigmas(boundaries: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """σ at, just below and just above each boundary (float32), and 0, tiny, huge; with the expected leaf."""
    s, want = [0.0, np.finfo(np.float32).smallest_subnormal, 1e-30, 1e30, np.finfo(np.float32).max, INF], [0, 0, 0]
    want += [len(boundaries)] * 3
    for k, b in enumerate(np.asarray(boundaries, np.float32)):
        s += [b, np.nextafter(b, np.float32(0)), np.nextafter(b, np.float32(INF))]
        want += [k + 1, k, k + 1]
    return np.asarray(s, np.float32), np.asarray(want)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_routing_at_boundaries_jitted_and_host_agree(name):
    tree = ExpertTree.preset(name)
    sigma, want = _probe_sigmas(tree.boundaries)
    jitted = jax.jit(ExpertTree.route, static_argnums=0)(tree, jnp.asarray(sigma))
    assert jitted.dtype == jnp.int32
    np.testing.assert_array_equal(jitted, want)
    np.testing.assert_array_equal(tree.route_host(sigma), want)
    np.testing.assert_array_equal(tree.route(sigma.reshape(-1, 3)), want.reshape(-1, 3))  # shape kept
    # Host routing of float64 σ compares with the float64 boundaries.
    for k, b in enumerate(tree.boundaries):
        assert tree.route_host(b) == k + 1 and tree.route_host(np.nextafter(b, 0.0)) == k


def test_training_samples_route_to_their_own_expert():
    tree = ExpertTree.preset("3-paper")
    for k, p in enumerate(tree.leaf_paths):
        s = tree.sigma_dist(p).sample(jax.random.PRNGKey(k), (4096,))
        np.testing.assert_array_equal(tree.route(s), k)


def test_from_boundaries():
    tree = ExpertTree.from_boundaries(DIST, [0.1, 3.0])
    assert tree.leaf_paths == ("i0", "i1", "i2") and tree.boundaries == (0.1, 3.0)
    assert tree.interval("i1") == (0.1, 3.0) and tree.interval("i2") == (3.0, INF)
    assert [tree.init_from(p) for p in tree.leaf_paths] == ["", "", ""]
    assert tree.training_order() == ("", "i0", "i1", "i2")
    np.testing.assert_array_equal(tree.route(jnp.array([0.0, 0.1, 2.9, 3.0, 80.0])), [0, 1, 1, 2, 2])
    assert ExpertTree.from_boundaries(DIST, []) == ExpertTree.preset("A")


def test_explicit_split_and_equal_mass_below_it():
    tree = ExpertTree.from_paths(DIST, ["0", "10", "11"], splits={"": 1.0})
    q = (DIST.cdf(1.0) + 1.0) / 2
    np.testing.assert_allclose(tree.boundaries, [1.0, quantile(q)], rtol=1e-9)
    assert tree.mass("10") == pytest.approx(tree.mass("11"), rel=1e-9)


@pytest.mark.parametrize(
    "boundaries, match",
    [([1.0, 0.5], "strictly increasing"), ([1.0, 1.0], "strictly increasing"), ([0.0, 1.0], "positive"),
     ([-1.0], "positive"), ([INF], "finite"), ([math.nan], "finite")],
)
def test_bad_boundaries_are_rejected(boundaries, match):
    with pytest.raises(ValueError, match=match):
        ExpertTree.from_boundaries(DIST, boundaries)


def test_validation_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"overlap: '0' .* and '01'"):
        ExpertTree.from_paths(DIST, ["0", "01", "1"])
    with pytest.raises(ValueError, match=r"gap \[0.0757422, 0.301194\)"):
        ExpertTree.from_paths(DIST, ["000", "1"])
    with pytest.raises(ValueError, match=r"gap \[9.60959, inf\)"):
        ExpertTree.from_paths(DIST, ["0", "10", "110", "1110", "11110", "111110", "1111110", "11111110", "111111110"])
    root = ExpertNode("", 0.0, INF)
    with pytest.raises(ValueError, match=r"overlap: 'a' \[0, 2\) and 'b' \[1, inf\)"):
        ExpertTree(DIST, (root, ExpertNode("a", 0.0, 2.0), ExpertNode("b", 1.0, INF)), ("a", "b"))
    with pytest.raises(ValueError, match=r"siblings '0' \[0, 1\) and '1' \[2, inf\) do not meet"):
        ExpertTree(DIST, (root, ExpertNode("0", 0.0, 1.0), ExpertNode("1", 2.0, INF)), ("0", "1"))
    with pytest.raises(ValueError, match=r"'0' \[0.5, 1\) is not the low part of its parent 'root'"):
        ExpertTree(DIST, (root, ExpertNode("0", 0.5, 1.0), ExpertNode("1", 1.0, INF)), ("0", "1"))
    with pytest.raises(ValueError, match="no parent '0'"):
        ExpertTree(DIST, (root, ExpertNode("00", 0.0, 1.0), ExpertNode("z", 1.0, INF)), ("00", "z"))
    with pytest.raises(ValueError, match="unknown: \\['q'\\]"):
        ExpertTree(DIST, (root,), ("q",))
    with pytest.raises(ValueError, match="0/1 strings"):
        ExpertTree.from_paths(DIST, ["012"])
    with pytest.raises(ValueError, match="exactly one gap"):
        ExpertTree.from_paths(DIST, ["0", "1", COMPLEMENT])
    with pytest.raises(ValueError, match="exactly one gap"):
        ExpertTree.from_paths(DIST, ["01", "11", COMPLEMENT])
    with pytest.raises(ValueError, match="lies outside"):
        ExpertTree.from_paths(DIST, ["0", "1"], splits={"": 0.0})
    with pytest.raises(ValueError, match=r"explicit splits \['1'\]"):
        ExpertTree.from_paths(DIST, ["0", "1"], splits={"1": 5.0})
    with pytest.raises(ValueError, match="unknown expert preset 'B'"):
        ExpertTree.preset("B")
    with pytest.raises(ValueError, match="untruncated"):
        ExpertTree.from_paths(LogNormalSigma(lo=0.1), ["0", "1"])


def test_unknown_path_lookup_names_it():
    tree = ExpertTree.preset("3-paper")
    for call in (tree.node, tree.parent, tree.interval, tree.sigma_dist, tree.init_from):
        with pytest.raises(KeyError, match="'0101' is not in the tree"):
            call("0101")


@pytest.mark.parametrize("tree", [ExpertTree.preset(n) for n in sorted(PRESETS)]
                         + [ExpertTree.from_boundaries(DIST, [0.1, 3.0])])
def test_json_round_trip(tree):
    text = json.dumps(tree.to_dict(), allow_nan=False)
    back = ExpertTree.from_dict(json.loads(text))
    assert back == tree and hash(back) == hash(tree) and back.boundaries == tree.boundaries
    with pytest.raises(ValueError, match="format"):
        ExpertTree.from_dict({**json.loads(text), "format": 99})


def test_hashable_static_jit_argument():
    a, b = ExpertTree.preset("3-paper"), ExpertTree.from_paths(DIST, ["111111111", "rest", "000"])
    assert a is not b and a == b and hash(a) == hash(b) and a.leaf_paths == b.leaf_paths
    assert a != ExpertTree.preset("2") and a != ExpertTree.preset("3-paper", LogNormalSigma(-1.0, 1.2))
    traces = []

    f = jax.jit(lambda tree, sigma: traces.append(tree) or tree.route(sigma), static_argnums=0)
    x = jnp.array([0.01, 1.0, 50.0])
    np.testing.assert_array_equal(f(a, x), [0, 1, 2])
    np.testing.assert_array_equal(f(b, x), [0, 1, 2])
    assert len(traces) == 1  # equal trees hit the same compiled function
    np.testing.assert_array_equal(f(ExpertTree.preset("2"), x), [0, 1, 1])
    assert len(traces) == 2


def test_one_compiled_sampler_draws_every_interval_bitwise():
    """The train step takes a node's σ interval as an operand (`edm.SigmaInterval`): traced, it draws bit for bit
    what the node's own distribution draws compiled with its bounds as constants, and one compile serves every
    node of the tree."""
    tree = ExpertTree.preset("3-paper")
    full = tree.sigma_dist()
    sample = jax.jit(lambda key, interval: full.sample(key, (4096,), interval))
    key = jax.random.PRNGKey(5)
    for path in ("", "0", *tree.leaf_paths):  # all σ; a tree node; the three experts (the top one mirrored)
        dist = tree.sigma_dist(path)
        s = sample(key, dist.interval())
        np.testing.assert_array_equal(s, jax.jit(lambda k, d=dist: d.sample(k, (4096,)))(key))
        s = np.asarray(s)
        assert np.all(s >= np.float32(dist.lo)) and np.all(s < np.float32(dist.hi)), path  # inside the node
    assert sample._cache_size() == 1
