"""The ensemble of expert denoisers (eDiff-I §4) as data: σ intervals, the expert tree, routing.

eDiff-I trains one model on the full training distribution p(σ) (ln σ ~ N(P_mean, P_std²), `edm.LogNormalSigma`),
then splits p(σ) into two intervals of equal probability mass; each child is initialised from its parent and
fine-tuned on its interval only; repeat. A node is named by its path from the root: "" is the root, "0" its
low-σ child, "1" its high-σ child, "01" the high child of the low child, … With equal-mass splits the node with
path p of depth d owns the quantiles [k/2^d, (k+1)/2^d) of p(σ), k = int(p, 2).

The paper's base model (Table 1, config D) has 3 experts: the lowest 1/8 of the mass ("000"), the highest 1/512
("111111111"), and one model for everything in between. That middle expert is not a tree node but the union of
the nodes between the two extreme leaves; it is an *interval leaf* named `COMPLEMENT` ("rest"), trained on p(σ)
truncated to [σ_{1/8}, σ_{511/512}) ≈ [0.0757, 9.61). Which checkpoint it starts from is not stated in the
paper (unconfirmed): we initialise it from the smallest tree node that contains it, the root for the paper's
layout. The two extreme leaves need their ancestors trained first ("0" → "00" → "000", "1" → … → "11111111").

Intervals are half-open [lo, hi): a σ exactly on a boundary belongs to the upper expert. Routing compares σ
with the boundaries in σ's own dtype (float32 in the sampler), which is what `LogNormalSigma.sample` clips to.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ediffi_jax.edm import LogNormalSigma

COMPLEMENT = "rest"
# Base-model layouts of eDiff-I Table 1 (leaf specs, low σ → high σ).
PRESETS: dict[str, tuple[str, ...]] = {
    "A": ("",),  # config A/B: a single model on all of p(σ)
    "2": ("0", "1"),  # config C: the two children of the root, split at the median σ = exp(P_mean)
    "3-paper": ("000", COMPLEMENT, "111111111"),  # config D: lowest 1/8, the rest, highest 1/512
}

_TREE_PATH = re.compile(r"[01]*")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")  # interval leaves: cannot be confused with a tree path
_N = NormalDist()
_FORMAT = 1


def _fmt(sigma: float) -> str:
    return f"{sigma:.6g}"


@dataclasses.dataclass(frozen=True)
class ExpertNode:
    """One σ interval [lo, hi): a node of the binary tree (path of 0/1 digits) or an interval leaf (a name)."""

    path: str
    lo: float
    hi: float

    @property
    def is_tree_node(self) -> bool:
        return _TREE_PATH.fullmatch(self.path) is not None

    @property
    def name(self) -> str:
        """A non-empty, filesystem-safe name (checkpoint directories): "root" for the root, else the path."""
        return self.path or "root"

    def contains(self, other: ExpertNode) -> bool:
        return self.lo <= other.lo and other.hi <= self.hi

    def __str__(self) -> str:
        return f"{self.name!r} [{_fmt(self.lo)}, {_fmt(self.hi)})"


def _z(dist: LogNormalSigma, sigma: float) -> float:
    if sigma <= 0.0:
        return -math.inf
    return math.inf if math.isinf(sigma) else (math.log(sigma) - dist.p_mean) / dist.p_std


def interval_mass(dist: LogNormalSigma, lo: float, hi: float) -> float:
    """P(lo ≤ σ < hi) under the untruncated `dist`, float64; upper half via Φ(−z) so tails keep their precision."""
    z_lo, z_hi = _z(dist, lo), _z(dist, hi)
    return _N.cdf(-z_lo) - _N.cdf(-z_hi) if z_lo >= 0 else _N.cdf(z_hi) - _N.cdf(z_lo)


def equal_mass_split(dist: LogNormalSigma, lo: float, hi: float) -> float:
    """σ* with P(lo ≤ σ < σ*) = P(σ* ≤ σ < hi) (float64): σ* = exp(μ + s·Φ⁻¹((Φ(z_lo) + Φ(z_hi))/2)).

    Intervals in the upper half halve the survival mass Φ(−z) instead: 1 − Φ(z) would cancel in the tail.
    """
    z_lo, z_hi = _z(dist, lo), _z(dist, hi)
    if z_lo >= 0:
        z = -_N.inv_cdf(0.5 * (_N.cdf(-z_lo) + _N.cdf(-z_hi)))
    else:
        z = _N.inv_cdf(0.5 * (_N.cdf(z_lo) + _N.cdf(z_hi)))
    mid = math.exp(dist.p_mean + dist.p_std * z)
    if not lo < mid < hi:
        raise ValueError(f"cannot split [{_fmt(lo)}, {_fmt(hi)}) at equal mass: float64 precision exhausted")
    return mid


def _walk(ordered: Sequence[ExpertNode]) -> list[tuple[float, float]]:
    """Gaps [a, b) left in [0, ∞) by intervals sorted by σ; raises on the first overlap."""
    gaps, cursor, prev = [], 0.0, None
    for n in ordered:
        if n.lo < cursor:
            raise ValueError(f"expert intervals overlap: {prev} and {n}")
        if n.lo > cursor:
            gaps.append((cursor, n.lo))
        cursor, prev = n.hi, n
    if cursor < math.inf:
        gaps.append((cursor, math.inf))
    return gaps


@dataclasses.dataclass(frozen=True)
class ExpertTree:
    """The experts of one model: every trained node (root, ancestors, leaves) and the leaves used at inference.

    Frozen and hashable (a static `jax.jit` argument); `leaf_paths` is kept sorted by σ, `nodes` canonically.
    Construct with `from_paths`, `from_boundaries`, `preset` or `from_dict`; the constructor validates.
    """

    dist: LogNormalSigma
    nodes: tuple[ExpertNode, ...]
    leaf_paths: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(sorted(self.nodes, key=lambda n: (not n.is_tree_node, n.path))))
        object.__setattr__(self, "leaf_paths", tuple(self.leaf_paths))
        self.validate()
        by_path = {n.path: n for n in self.nodes}
        object.__setattr__(self, "leaf_paths", tuple(sorted(self.leaf_paths, key=lambda p: by_path[p].lo)))

    def validate(self) -> None:
        """Raises a one-line ValueError unless the nodes form a tree and the leaves tile [0, ∞) exactly."""
        if (self.dist.lo, self.dist.hi) != (0.0, math.inf):
            raise ValueError(f"the tree's sigma distribution must be untruncated, got [{self.dist.lo}, {self.dist.hi})")
        by_path: dict[str, ExpertNode] = {}
        for n in self.nodes:
            if not (n.is_tree_node or (_NAME.fullmatch(n.path) and n.path != "root")):
                raise ValueError(f"bad expert path {n.path!r}: want 0/1 digits or a name starting with a letter")
            if n.path in by_path:
                raise ValueError(f"duplicate expert node {n.path!r}")
            if not (0.0 <= n.lo < n.hi) or math.isinf(n.lo):
                raise ValueError(f"expert {n} needs 0 <= lo < hi, lo finite")
            by_path[n.path] = n
        if by_path.get("") != ExpertNode("", 0.0, math.inf):
            raise ValueError("an expert tree needs the root '' on [0, inf)")
        unknown = [p for p in self.leaf_paths if p not in by_path]
        if unknown or len(set(self.leaf_paths)) != len(self.leaf_paths) or not self.leaf_paths:
            raise ValueError(f"leaves {list(self.leaf_paths)} must be distinct nodes of the tree (unknown: {unknown})")
        tree_leaves = [p for p in self.leaf_paths if _TREE_PATH.fullmatch(p)]
        for n in self.nodes:
            if not n.is_tree_node and n.path not in self.leaf_paths:
                raise ValueError(f"interval expert {n} must be a leaf")
            if not (n.is_tree_node and n.path):
                continue
            if not any(p.startswith(n.path) for p in tree_leaves):
                raise ValueError(f"tree node {n} is neither a leaf nor an ancestor of one")
            if (parent := by_path.get(n.path[:-1])) is None:
                raise ValueError(f"tree node {n} has no parent {n.path[:-1]!r} in the tree")
            low = n.path[-1] == "0"
            if not (n.lo == parent.lo and n.hi < parent.hi if low else n.hi == parent.hi and n.lo > parent.lo):
                raise ValueError(f"tree node {n} is not the {'low' if low else 'high'} part of its parent {parent}")
            if low and (sibling := by_path.get(n.path[:-1] + "1")) is not None and n.hi != sibling.lo:
                raise ValueError(f"siblings {n} and {sibling} do not meet")
        leaves = sorted((by_path[p] for p in self.leaf_paths), key=lambda n: (n.lo, n.hi))
        gaps = _walk(leaves)
        if gaps:
            a, b = gaps[0]
            raise ValueError(f"expert leaves {[str(n) for n in leaves]} leave the gap [{_fmt(a)}, {_fmt(b)}) uncovered")
        for n in leaves:
            if not interval_mass(self.dist, n.lo, n.hi) > 0.0:
                raise ValueError(f"expert {n} has no probability mass under the training distribution")

    @classmethod
    def from_paths(
        cls, dist: LogNormalSigma, leaves: Sequence[str], splits: Mapping[str, float] | None = None
    ) -> ExpertTree:
        """The tree whose leaves are `leaves` (tree paths, plus at most one `COMPLEMENT` filling the one gap).

        Each internal node is split at equal mass (`equal_mass_split`) unless `splits[path]` gives its σ.
        """
        leaves = list(leaves)
        bad = [p for p in leaves if not (_TREE_PATH.fullmatch(p) or p == COMPLEMENT)]
        if bad or len(set(leaves)) != len(leaves) or not leaves:
            raise ValueError(f"leaf paths must be distinct 0/1 strings or {COMPLEMENT!r}, got {leaves}")
        splits = {str(k): float(v) for k, v in (splits or {}).items()}
        intervals: dict[str, tuple[float, float]] = {"": (0.0, math.inf)}

        def interval(p: str) -> tuple[float, float]:
            if p not in intervals:
                lo, hi = interval(p[:-1])
                m = splits.get(p[:-1])
                if m is None:
                    m = splits[p[:-1]] = equal_mass_split(dist, lo, hi)
                elif not lo < m < hi:
                    raise ValueError(f"split {m} of node {p[:-1]!r} lies outside its interval [{lo}, {hi})")
                intervals[p] = (lo, m) if p[-1] == "0" else (m, hi)
            return intervals[p]

        tree_leaves = [p for p in leaves if p != COMPLEMENT]
        paths = {p[:i] for p in tree_leaves for i in range(len(p) + 1)} | {""}
        nodes = [ExpertNode(p, *interval(p)) for p in sorted(paths)]
        unused = sorted(set(splits) - {p[:-1] for p in paths if p})
        if unused:
            raise ValueError(f"explicit splits {unused} are not internal nodes of the tree {leaves}")
        if COMPLEMENT in leaves:
            gaps = _walk(sorted((n for n in nodes if n.path in tree_leaves), key=lambda n: (n.lo, n.hi)))
            if len(gaps) != 1:
                raise ValueError(f"{COMPLEMENT!r} must fill exactly one gap between {tree_leaves}, found {gaps}")
            nodes.append(ExpertNode(COMPLEMENT, *gaps[0]))
        return cls(dist, tuple(nodes), tuple(leaves))

    @classmethod
    def from_boundaries(cls, dist: LogNormalSigma, boundaries: Sequence[float]) -> ExpertTree:
        """Experts "i0" … "iK" on [0, b_1), [b_1, b_2), …, [b_K, ∞), each an interval leaf fine-tuned from the root."""
        bs = [float(b) for b in boundaries]
        for b in bs:
            if not (math.isfinite(b) and b > 0.0):
                raise ValueError(f"sigma boundaries must be positive and finite, got {b} in {bs}")
        for a, b in zip(bs, bs[1:]):
            if not a < b:
                raise ValueError(f"sigma boundaries must be strictly increasing, got {a} then {b} in {bs}")
        root = ExpertNode("", 0.0, math.inf)
        if not bs:
            return cls(dist, (root,), ("",))
        edges = [0.0, *bs, math.inf]
        leaves = [ExpertNode(f"i{k}", lo, hi) for k, (lo, hi) in enumerate(zip(edges, edges[1:]))]
        return cls(dist, (root, *leaves), tuple(n.path for n in leaves))

    @classmethod
    def preset(cls, name: str, dist: LogNormalSigma | None = None) -> ExpertTree:
        """A named layout of `PRESETS` over `dist` (default ln σ ~ N(−1.2, 1.2²))."""
        if name not in PRESETS:
            raise ValueError(f"unknown expert preset {name!r}; known: {sorted(PRESETS)}")
        return cls.from_paths(LogNormalSigma() if dist is None else dist, PRESETS[name])

    @property
    def leaves(self) -> tuple[ExpertNode, ...]:
        """The experts used at inference, sorted by σ (low → high); `route` returns indices into this."""
        return tuple(self.node(p) for p in self.leaf_paths)

    @property
    def boundaries(self) -> tuple[float, ...]:
        """The inner σ cut points between consecutive leaves, ascending (len = number of leaves − 1)."""
        return tuple(n.hi for n in self.leaves[:-1])

    def node(self, path: str) -> ExpertNode:
        for n in self.nodes:
            if n.path == path:
                return n
        raise KeyError(f"expert path {path!r} is not in the tree; nodes: {[n.path for n in self.nodes]}")

    def interval(self, path: str) -> tuple[float, float]:
        return self.node(path).lo, self.node(path).hi

    def parent(self, path: str) -> str | None:
        """path[:-1] for a tree node; for an interval leaf the smallest tree node containing it; None for the root."""
        n = self.node(path)
        if n.is_tree_node:
            return n.path[:-1] if n.path else None
        return max((m for m in self.nodes if m.is_tree_node and m.contains(n)), key=lambda m: len(m.path)).path

    def init_from(self, path: str) -> str | None:
        """The node whose checkpoint `path`'s training starts from (None: from scratch, the root).

        Tree nodes are fine-tuned from their parent (eDiff-I §4); interval leaves (the complement, explicit
        boundaries) from the smallest tree node containing them, the root in the paper's layout (unconfirmed).
        """
        return self.parent(path)

    def training_order(self) -> tuple[str, ...]:
        """Every node to train, each after the node it is initialised from."""
        return tuple(n.path for n in sorted(self.nodes, key=lambda n: (not n.is_tree_node, len(n.path), n.path)))

    def sigma_dist(self, path: str = "") -> LogNormalSigma:
        """The training σ distribution of a node: `dist` truncated to its interval."""
        lo, hi = self.interval(path)
        return dataclasses.replace(self.dist, lo=lo, hi=hi)

    def mass(self, path: str) -> float:
        return interval_mass(self.dist, *self.interval(path))

    def route(self, sigma: jax.Array | float) -> jax.Array:
        """int32 leaf index of each σ (traceable): the number of boundaries ≤ σ, compared in σ's dtype."""
        sigma = jnp.asarray(sigma)
        if not jnp.issubdtype(sigma.dtype, jnp.floating):
            sigma = sigma.astype(jnp.float32)
        b = jnp.asarray(self.boundaries, sigma.dtype)
        return jnp.searchsorted(b, sigma, side="right", method="compare_all").astype(jnp.int32)

    def route_host(self, sigma: np.ndarray | float) -> np.ndarray:
        """NumPy twin of `route` (host side, e.g. the sampler's trace-time schedule); agrees for equal dtypes."""
        sigma = np.asarray(sigma)
        if not np.issubdtype(sigma.dtype, np.floating):
            sigma = sigma.astype(np.float64)
        return np.searchsorted(np.asarray(self.boundaries, sigma.dtype), sigma, side="right").astype(np.int32)

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON-safe description (hi = ∞ stored as null); floats round-trip exactly."""
        nodes = [{"path": n.path, "lo": n.lo, "hi": None if math.isinf(n.hi) else n.hi} for n in self.nodes]
        return {"format": _FORMAT, "p_mean": self.dist.p_mean, "p_std": self.dist.p_std, "nodes": nodes,
                "leaves": list(self.leaf_paths)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExpertTree:
        if d.get("format") != _FORMAT:
            raise ValueError(f"unsupported expert tree format {d.get('format')!r}, want {_FORMAT}")
        nodes = tuple(ExpertNode(str(n["path"]), float(n["lo"]), math.inf if n["hi"] is None else float(n["hi"]))
                      for n in d["nodes"])
        return cls(LogNormalSigma(float(d["p_mean"]), float(d["p_std"])), nodes, tuple(d["leaves"]))


def tree_from_config(config: Any) -> ExpertTree:
    """The expert tree of a run: `config.expert.layout` (a PRESETS name or comma-separated leaf specs) over the
    training distribution ln σ ~ N(config.edm.p_mean, config.edm.p_std²)."""
    dist = LogNormalSigma(float(config.edm.p_mean), float(config.edm.p_std))
    expert = config.get("expert") or {}
    layout = str(expert.get("layout", "A"))  # runs from before the expert section: a single model
    if layout in PRESETS:
        return ExpertTree.preset(layout, dist)
    try:
        return ExpertTree.from_paths(dist, [p.strip() for p in layout.split(",")])
    except ValueError as e:
        raise ValueError(f"expert.layout={layout!r} is neither a preset {sorted(PRESETS)} nor a valid list of "
                         f"leaf paths like '0,10,11': {e}") from None
