"""Highest-weighted gradient paths: top path, k best paths (signed or magnitude order), and the
branch a best path takes at a node.

Algebra
-------
A path runs from the sink down to a source element; its weight g(p) is the product of its edge
weights. Two orders are offered:

* ``order="signed"`` -- the paper's (max, x) on signed weights (Eq. 5): the most positive g(p)
  first. The value pass runs :data:`~.semirings.MAX_SIGNED`, which keeps per scalar node the pair
  (max, min) of sink-to-node prefix products (a negative weight swaps them).
* ``order="magnitude"`` -- (max, x) on |w| (:data:`~.semirings.MAX_ABS`): the largest |g(p)| first.

Both are answered by one mechanism: a backward max pass gives, per scalar node u, the best prefix
value; the paths themselves are enumerated lazily (Jimenez & Marzal 1999 recursive enumeration,
Huang & Chiang 2005 "Algorithm 3") over per-(scalar node, polarity) lists that are created only for
the nodes the enumerated paths touch. No back-pointers are stored: a node's candidates are
recomputed locally from ``jac.out_edges(j)`` when its list is first needed. All comparisons are made
on (sign, log|.|) keys, so path weights far below float64's range (1e-400) are ordered correctly.
See ``docs/paths.md``.
"""
from __future__ import annotations

import bisect
import collections
import contextlib
import heapq
import math
import numbers
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..errors import QueryError
from .dp import backward, inside_outside
from .groups import labels_along
from .semirings import MAX_ABS, MAX_SIGNED

__all__ = ["Hop", "Path", "Branches", "Order", "top_paths", "branches", "ORDERS"]


# ============================================================================ order
@dataclass(frozen=True)
class Order:
    """What "better" means for path values: the one comparison every path query uses.

    A value is given as its sign (0: no value) and an increasing stand-in of its magnitude (log|.|,
    or an exact (exponent, mantissa) pair). :meth:`key` maps it to an ascending key -- smaller is
    better -- of two parts: a class (0 best, 2 "no value") and a number within the class.

    ``signed`` (the paper's (max, x)): positive values first, largest first; then negative ones,
    smallest magnitude first. ``magnitude``: largest |value| first, whatever the sign.
    ``semiring``: the max semiring whose pass gives the best values in this order.
    """

    name: str
    signed: bool
    semiring: object

    def key(self, sign, mag):
        """Ascending key of one value (see the class docstring)."""
        if sign == 0:
            return (2, 0.0)
        if self.signed and sign < 0:
            return (1, mag)
        return (0, tuple(-m for m in mag) if isinstance(mag, tuple) else -mag)

    def keys(self, sign, log_abs):
        """:meth:`key` elementwise on arrays: (class, number) arrays."""
        sign = np.asarray(sign)
        neg = (sign < 0) & self.signed
        cls = np.where(sign == 0, 2, np.where(neg, 1, 0))
        return cls, np.where(sign == 0, np.inf, np.where(neg, log_abs, -np.asarray(log_abs)))

    def better(self, s1, l1, s2, l2):
        """Elementwise: is value (s1, l1) strictly better than (s2, l2)?"""
        c1, v1 = self.keys(s1, l1)
        c2, v2 = self.keys(s2, l2)
        return (c1 < c2) | ((c1 == c2) & (v1 < v2))


SIGNED = Order("signed", True, MAX_SIGNED)
MAGNITUDE = Order("magnitude", False, MAX_ABS)
_ORDERS = {o.name: o for o in (SIGNED, MAGNITUDE)}
ORDERS = tuple(_ORDERS)


@dataclass(frozen=True)
class Hop:
    """One scalar node on a path: element ``index`` (a tuple, C order) of tensor node ``node``."""

    node: str              # node name (source name for the last hop)
    index: tuple           # element index within the tensor
    op: str                # ATen op that computed the tensor ("input"/"source" for sources)
    module: str            # innermost module path ("" or "<output>" outside the model)
    node_id: int = -1      # position of the tensor node in GradGraph.nodes
    flat_index: int = -1   # flat (C-order) element index


@dataclass
class Path:
    """A sink-to-source path of the scalar gradient graph.

    ``weight`` is the product of the local derivatives along the path (0.0 only if it underflows
    float64: ``log_abs_weight`` and ``sign`` are always exact). ``hops`` runs from the sink to the
    source; transparent view hops are omitted unless the query asked for ``include_views=True``.
    """

    weight: float
    log_abs_weight: float
    sign: int
    source: tuple          # (source name, element index tuple)
    hops: list = field(default_factory=list)
    edge_weights: list = field(default_factory=list)   # local derivative of each hop pair (all hops, views included)
    length: int = 0        # number of non-view hops (edges into non-view nodes)

    def __repr__(self):
        return (f"Path(weight={self.weight:.6g}, source={self.source}, "
                f"hops={len(self.hops)}, length={self.length})")


# ============================================================================ argument checks
def _check_order(order):
    if order not in _ORDERS:
        raise QueryError(f"order must be one of {ORDERS}, got {order!r}")
    return _ORDERS[order]


def _check_k(k):
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise QueryError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


def _element_mask(node, index, what):
    """Boolean flat mask of the elements of ``node`` selected by ``index``.

    ``index`` follows numpy indexing of an array shaped like the node (a full index tuple is one
    element; an int or slice on a multi-dimensional node selects along axis 0; a boolean array shaped
    like the node is a mask), except that a list of tuples names individual elements.
    """
    mask = np.zeros(node.shape, dtype=bool)
    try:
        if isinstance(index, list) and index and all(isinstance(i, tuple) for i in index):
            for i in index:
                if len(i) != len(node.shape):
                    raise IndexError(f"element index {i} has {len(i)} entries, expected {len(node.shape)}")
                mask[i] = True
        else:
            if isinstance(index, np.ndarray) and index.dtype == bool and index.shape != mask.shape:
                raise IndexError(f"mask shape {index.shape} != {mask.shape}")
            mask[index] = True
    except (IndexError, TypeError, ValueError) as exc:
        raise QueryError(f"bad {what} index {index!r} for {node.name!r} of shape {node.shape}: {exc}") from None
    if not mask.any():
        raise QueryError(f"{what} index {index!r} selects no element of {node.name!r}")
    return mask.reshape(-1)


def _source_masks(g, source):
    """{source node index: flat boolean mask} of the source elements paths may end at."""
    if source is None:
        return {i: None for i in g.sources.values()}
    if isinstance(source, str):
        return {g.source_index(source): None}
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], str):
        s = g.source_index(source[0])
        return {s: _element_mask(g.nodes[s], source[1], "source")}
    raise QueryError(f"source must be a source name or (name, index), got {source!r}; "
                     f"valid sources: {sorted(g.sources)}")


# ============================================================================ NaN
def _nan_edges(g):
    """Indices of the edges whose Jacobian holds a NaN (cached on the graph: one scan of the
    Jacobians' arrays, which is cheap next to a value pass)."""
    found = g._cache.get("paths.nan_edges")
    if found is None:
        found = []
        for k, e in enumerate(g.edges):
            try:
                arrays = e.jac.state()[1].values()    # the arrays the Jacobian is computed from
            except (AttributeError, NotImplementedError):
                arrays = [e.jac.to_dense()]            # a kind without a saved form: its entries
            if any(np.issubdtype(np.asarray(a).dtype, np.floating) and np.isnan(a).any() for a in arrays):
                found.append(k)
        g._cache["paths.nan_edges"] = found
    return found


def _refuse_nan(g, reached):
    """QueryError if a NaN local derivative lies between two tensors on sink-to-source paths.

    A path through a NaN entry has weight NaN, which no order can rank, so "the k best paths" are
    undefined (the sum queries -- gradient, flow, entropy -- report NaN instead). The check is per
    tensor: a NaN on an edge whose consumer is reached from the sink (``reached[v]``: the value
    pass gave it a value) and whose input reaches a source counts, even if the NaN entry itself
    sits on no path.
    """
    bad = [k for k in _nan_edges(g) if reached[g.edges[k].dst]]
    if not bad:
        return
    reaches = _reaches_source(g)
    bad = [k for k in bad if reaches[g.edges[k].src]]
    if bad:
        names = ", ".join(f"{g.nodes[g.edges[k].dst].name!r} <- {g.nodes[g.edges[k].src].name!r}"
                          for k in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise QueryError(
            f"the gradient graph has NaN local derivatives on paths to the sink (Jacobian {names}{more}): "
            f"path weights through them are NaN and cannot be ranked. g.gradient() and g.flow() show "
            f"where the NaN goes; capture with inputs and parameters whose forward values are finite")


def _reaches_source(g):
    """Per tensor node: does some edge chain lead from it to a source (it lies below the sink
    on a path)?"""
    reach = [False] * len(g.nodes)
    for i in g.sources.values():
        reach[i] = True
    for v in range(len(g.nodes)):          # topological order: inputs come first
        if not reach[v]:
            reach[v] = any(reach[g.edges[k].src] for k in g.in_edges[v])
    return reach


# ============================================================================ value pass
class _Values:
    """The backward max pass, read as per-element (sign, log|.|) scores of one polarity.

    Polarity 0 scores a node by its best (max) prefix; polarity 1 by minus its min prefix, so that
    for both polarities "larger score is better" and a child's score is carried by |w|.

    Not every node's values are kept: those of a *derived* node (:func:`_derived_nodes`: few
    edges leave each of its elements) are dropped once the pass has carried them on, and a score
    of it is recomputed when read, from its consumers' scores -- the pass's own recurrence,
    ``score(u) = max over edges u -> v of |w| score(v)``, per element read.
    """

    def __init__(self, g, order, dtype):
        self.g, self.order, self.signed = g, order, order.signed
        self.sources = set(g.sources.values())
        # a block of shared_max_passes keeps every value for the other queries that share it
        shared = g._cache.get("paths.max_passes") is not None
        derive = not shared and _kept_bytes(g, order, dtype) > DERIVE_ABOVE_BYTES
        self.derived = _derived_nodes(g) if derive else frozenset()
        reached = np.zeros(len(g.nodes), dtype=bool)

        def visit(v, _):
            reached[v] = True
        keep = None if not self.derived else [v for v in range(len(g.nodes)) if v not in self.derived]
        self.B = _max_backward(g, order.semiring, dtype, keep=keep, visit=visit if keep is not None else None)
        #: per node: did the pass reach it (does it hold values, kept or derived)
        self.reached = reached if keep is not None else np.array([b is not None for b in self.B], dtype=bool)
        _refuse_nan(g, self.reached)
        self._memo = collections.OrderedDict()
        #: the pass's values are exact to float64 rounding (the search may rely on exact ties)
        self.exact = dtype == np.float64
        #: bound on |score - log|true value|| of any element (see _rounding_bound)
        self.error = _rounding_bound(g, dtype)

    def scores(self, t, idx, p):
        """(valid, sign, log|score|) of elements ``idx`` of tensor ``t`` for polarity ``p`` (one
        polarity for all, or an array of one per element)."""
        if t in self.derived:
            return self._derived_memo(t, np.asarray(idx, dtype=np.int64), p)
        b = self.B[t]
        if b is None:
            z = np.zeros(len(idx), dtype=bool)
            return z, np.zeros(len(idx)), np.zeros(len(idx))
        hi = b.arr[0][idx]              # each channel gathered once
        if self.signed:
            lo = b.arr[1][idx]
            x = np.where(p == 0, hi, -lo) if np.ndim(p) else (hi if p == 0 else -lo)
            # (max, min) = (-inf, +inf) is "no prefix"; a max of -inf with a min of -inf is a
            # prefix of weight -inf, which the list of polarity 0 ranks last
            valid = (hi > -np.inf) | (lo < np.inf)
        else:
            x = hi
            valid = x > 0
        # a mantissa that underflowed inside its tensor is a real but tiny path: order it last
        # of its sign (an underflowed negative product is -0.0)
        sgn = np.where(np.signbit(x), -1.0, 1.0)
        with np.errstate(divide="ignore"):
            la = np.log(np.abs(x).astype(np.float64, copy=False)) + b.log_scale
        return valid, sgn, la

    def _derived_memo(self, t, idx, p):
        """:meth:`_derived_scores` of both polarities, remembered for the last ``_MEMO`` reads:
        the lists of one row's elements read the same elements of their consumers (a row of a
        contraction's output), each with its own polarities."""
        key = (t, idx.tobytes())
        both = self._memo.get(key)
        if both is None:
            both = self._memo[key] = [self._derived_scores(t, idx, q) for q in ((0, 1) if self.signed else (0,))]
            if len(self._memo) > _MEMO:
                self._memo.popitem(last=False)
        else:
            self._memo.move_to_end(key)
        if not self.signed or not np.ndim(p):
            return both[int(p) if self.signed else 0]
        (valid, s0, l0), (_, s1, l1) = both
        return valid, np.where(p == 0, s0, s1), np.where(p == 0, l0, l1)

    def _derived_scores(self, t, idx, p):
        """:meth:`scores` of a derived node: per element, the best over its edges u -> v of
        |w| score(v), the child's polarity flipped by a negative w -- exactly how a candidate
        of the enumeration is scored, so a derived score is its node's best candidate's
        (computed in float64 from the consumers' values: no rounding of its own)."""
        n = len(idx)
        p = np.broadcast_to(np.asarray(p), (n,)) if self.signed else None
        best_cls, best_val = np.full(n, 3), np.full(n, np.inf)      # class 3: no edge yet
        sgn, la = np.ones(n), np.full(n, -np.inf)
        for k in self.g.out_edges[t]:
            e = self.g.edges[k]
            v = e.dst
            if not self.reached[v] or v in self.sources:      # the pass carried nothing from v
                continue
            which, o, w = e.jac.out_edges_of(idx)
            if not len(which):
                continue
            cp = np.where(w > 0, p[which], 1 - p[which]) if self.signed else 0
            valid, s, l = self.scores(v, o, cp)
            with np.errstate(divide="ignore"):
                l = l + np.log(np.abs(w))
            cls, val = self.order.keys(s, l)
            cls = np.where(valid, cls, 3)
            # the best edge of each element: sorted by element, then key; the first of each run
            order = np.lexsort((val, cls, which))
            first = order[np.r_[True, which[order][1:] != which[order][:-1]]]
            at = which[first]
            better = (cls[first] < best_cls[at]) | ((cls[first] == best_cls[at]) & (val[first] < best_val[at]))
            at, first = at[better], first[better]
            best_cls[at], best_val[at], sgn[at], la[at] = cls[first], val[first], s[first], l[first]
        return best_cls < 3, sgn, la


#: Reads of derived scores remembered (see _Values._derived_memo).
_MEMO = 256


#: Largest number of kept values read to derive one element's score (:func:`_derived_nodes`):
#: GPT-2's tanh GELU (eight elementwise nodes, the input read three times) derives its input
#: from about a dozen; an attention's probabilities, whose one consumer is the product with the
#: values (64 edges per element), from a few hundred.
_DERIVE_READS = 512


#: Values of a max pass are derived (:func:`_derived_nodes`) only when keeping every node's would
#: take more than this many bytes: below it the pass keeps them all, which is faster (a derived
#: read is per-element work on one core -- about 15% of a top path at a 6-layer BERT of 32
#: tokens, whose values would take 48 MB) and small next to the model; above it deriving keeps
#: the query's memory near torch's backward (GPT-2 small at 64 tokens: 515 MB of values, capture +
#: top path 1.6x torch's forward + backward derived against 3.1x kept, at the same speed of the
#: top path) and at 1,024 tokens is what lets it run at all (17.7 GB of values). Either way the
#: paths, weights and hops are the same.
DERIVE_ABOVE_BYTES = 64 << 20


def _kept_bytes(g, order, dtype):
    """Bytes of a max pass that keeps every node's values: one channel per polarity."""
    channels = 2 if order.signed else 1
    return sum(n.numel for n in g.nodes) * channels * np.dtype(dtype).itemsize


def _derived_nodes(g):
    """Nodes whose max-pass values :class:`_Values` derives instead of keeping (cached on the
    graph): every Jacobian leaving the node lists the edges of many elements at once
    (``out_degree``: elementwise ops, reshapes, slices, reductions -- one edge per element --
    and contractions), and deriving one element reads at most ``_DERIVE_READS`` kept values,
    counted through consumers that are derived in turn: an edge into a consumer that reads r
    values counts 1 + r. Sources and the sink are kept. In reverse topological order, so a
    node's consumers are decided first."""
    found = g._cache.get("paths.derived_nodes")
    if found is not None:
        return found
    sources = set(g.sources.values())
    reads = [0] * len(g.nodes)
    derived = set()
    for u in range(len(g.nodes) - 1, -1, -1):
        if u == g.sink or u in sources:
            continue
        edges = [g.edges[k] for k in g.out_edges[u] if g.edges[k].dst not in sources]
        if not edges or any(e.jac.out_degree is None for e in edges):
            continue
        r = sum(e.jac.out_degree * (1 + reads[e.dst]) for e in edges)
        if r <= _DERIVE_READS:
            derived.add(u)
            reads[u] = r
    found = g._cache["paths.derived_nodes"] = frozenset(derived)
    return found


#: Roundings per hop the float32 values of a max pass may carry, relative: the local derivative
#: rounded to float32 or computed from float32 factors (a layer norm's gamma s (1 + xh_i xh_j) / d:
#: up to six), the product, the renormalisation and a rescaling to a common scale -- with room
#: to spare.
_ROUNDINGS_PER_HOP = 16


#: Sink dtypes of models whose max passes run in float32 (float16 / bfloat16 values are held in
#: float32 by capture); graphs name them with or without the "torch." prefix.
_NARROW = ("torch.float32", "torch.float16", "torch.bfloat16", "float32", "float16", "bfloat16")


def pass_dtype(g):
    """The dtype of the max passes' values over ``g``: float32 for a float32 (or narrower) model,
    as its kernels compute; float64 otherwise."""
    return np.float32 if str(g.nodes[g.sink].dtype) in _NARROW else np.float64


def _longest_chain(g):
    """The largest number of non-identity Jacobians on a chain of edges from the sink (cached):
    how many products a value of the backward pass has been through, at most."""
    h = g._cache.get("paths.longest_chain")
    if h is None:
        depth = [-1] * len(g.nodes)
        depth[g.sink] = 0
        for v in range(len(g.nodes) - 1, -1, -1):      # reverse topological order
            if depth[v] < 0:
                continue
            for k in g.in_edges[v]:
                e = g.edges[k]
                d = depth[v] + (0 if e.jac.is_identity else 1)
                if d > depth[e.src]:
                    depth[e.src] = d
        h = g._cache["paths.longest_chain"] = max(depth)
    return h


def _rounding_bound(g, dtype):
    """Bound on the error, in log space, of a score read from a pass in ``dtype``: each product
    on the way from the sink adds at most ``_ROUNDINGS_PER_HOP`` roundings of relative size
    eps / 2 (a max is exact: the max of values each within a relative error is within it of the
    true max). float64: 0 (its rounding is covered by the search's own float64 allowance)."""
    if dtype == np.float64:
        return 0.0
    unit = float(np.finfo(dtype).eps) / 2
    return _ROUNDINGS_PER_HOP * unit * (_longest_chain(g) + 1)


@contextlib.contextmanager
def shared_max_passes(g):
    """Within the block, :func:`top_paths` and :func:`branches` on ``g`` in one order share one
    backward max pass (the report asks both), kept until the block ends."""
    g._cache["paths.max_passes"] = {}
    try:
        yield
    finally:
        g._cache.pop("paths.max_passes", None)


def _max_backward(g, sr, dtype, keep=None, visit=None):
    """The backward pass of ``sr`` over ``g`` with values in ``dtype`` (the sink's 1-bar in it;
    the kernels keep float32 values float32), the values of the nodes ``keep`` kept (default:
    all; ``visit`` as :func:`.dp.backward`'s): from the block of :func:`shared_max_passes` when
    one is open, which keeps every value."""
    passes = g._cache.get("paths.max_passes")
    if passes is None:
        return backward(g, sr, seed=_seed(sr, g.nodes[g.sink].numel, dtype), keep=keep, visit=visit)

    def run():
        return backward(g, sr, seed=_seed(sr, g.nodes[g.sink].numel, dtype))
    key = (sr.name, np.dtype(dtype).name)
    if key not in passes:
        passes[key] = run()
    return passes[key]


def _seed(sr, n, dtype):
    """1-bar of n elements in ``dtype``, as the engine holds it."""
    value = sr.seed(n)
    value.arr = value.arr.astype(dtype, copy=False)
    return value


# ============================================================================ lazy k-best
_ROOT = (-1, 0, 0)


class Derivation(NamedTuple):
    """One entry of a k-best list: a path suffix from a (scalar node, polarity) down to a source.

    Compared as a tuple: the first six fields order derivations (the :class:`Order` key of the
    score, then the tie-break on the next hop); the child is derivation ``child_rank`` of list
    ``(child_t, child_i, child_p)``."""

    rank_class: int        # Order.key of (sign, log_abs): class ...
    rank_value: float      # ... and number within it
    child_t: int           # tensor node of the next hop (-1: none, the sink's empty derivation)
    child_i: int           # its flat element index
    edge: int              # the edge taken (-1: none)
    child_rank: int
    child_p: int           # the child's polarity
    sign: float            # score of this derivation: sign ...
    log_abs: float         # ... and log|.|
    w: float               # the edge's local derivative


class _List:
    """The lazily extended k-best list of one (scalar node, polarity).

    ``D`` holds the derivations found so far, best first (:class:`Derivation`).
    Candidates whose child is that list's first derivation are read best first from ``c``
    (:class:`_Candidates`, with the cursor ``pos``); successors (child rank >= 1) go through the
    heap ``heap``.
    """

    __slots__ = ("c", "pos", "heap", "D", "pending", "done")

    def __init__(self, cand=None, D=None):
        self.c = cand
        self.pos = 0
        self.heap = []
        self.D = D if D is not None else []
        self.pending = None
        self.done = D is not None

    def head(self):
        row = None if self.c is None else self.c.row(self.pos)
        if row is None:
            return None
        c, v, s, la, t, i, k, p, w = row
        return Derivation(int(c), float(v), int(t), int(i), int(k), 0, int(p), float(s), float(la), float(w))


#: Candidates of a list sorted at once when there are at most this many; of a longer list (the
#: root's, one per source element) only the best this many at first, then twice as many each
#: time the enumeration reads past them: a few paths read a few hundred thousand candidates'
#: keys, not a sort of all of them.
_SORTED_PREFIX = 4096


class _Candidates:
    """The first-derivation candidates of one list, read best first: by the order's key, then
    next-hop node, flat index and edge (a strict order: no two candidates share all three).

    Only a best prefix is sorted (:data:`_SORTED_PREFIX`): the candidates whose key is at most
    the m-th smallest, found by a partition, and sorted among themselves -- exactly the first
    entries of the whole sorted list, since every candidate outside them is worse.
    """

    __slots__ = ("keys", "cols", "n", "sorted")

    def __init__(self, order, sgn, la, t, i, k, p, w):
        self.keys = order.keys(sgn, la)
        self.cols = (sgn, la, t, i, k, p, w)
        self.n = len(sgn)
        self.sorted = ()
        self._sort(_SORTED_PREFIX)

    def _sort(self, m):
        """Sort the best ``m`` (and their ties in key) or, for ``m >= n``, all."""
        (cls, val), (sgn, la, t, i, k, p, w) = self.keys, self.cols
        if m < self.n and not np.isnan(val).any():
            sel = _best_keys(cls, val, m)
            cls, val, sgn, la, t, i, k, p, w = (a[sel] for a in (cls, val, sgn, la, t, i, k, p, w))
        idx = np.lexsort((k, i, t, val, cls))
        self.sorted = tuple(a[idx] for a in (cls, val, sgn, la, t, i, k, p, w))
        if len(idx) == self.n:            # all sorted: the unsorted arrays are no longer needed
            self.keys = self.cols = None

    def row(self, pos):
        """The candidate at rank ``pos`` as (class, value, sign, log|.|, node, index, edge,
        polarity, w), or None past the last."""
        if pos >= len(self.sorted[0]):
            if self.keys is None:
                return None
            self._sort(2 * max(pos + 1, len(self.sorted[0])))
            if pos >= len(self.sorted[0]):
                return None
        return tuple(a[pos] for a in self.sorted)


def _best_keys(cls, val, m):
    """Indices of the entries whose key (class, value) is at most the m-th smallest (1 <= m <=
    len): those of the better classes and of the m-th's class up to its value, ties included."""
    before = np.cumsum(np.bincount(cls))
    c = int(np.searchsorted(before, m))             # the class of the m-th smallest key
    rank = m - 1 - (int(before[c - 1]) if c else 0)   # its rank within the class
    within = val[cls == c]
    threshold = np.partition(within, rank)[rank]
    return np.flatnonzero((cls < c) | ((cls == c) & (val <= threshold)))


class _Enumerator:
    """Recursive enumeration of sink-to-source paths in decreasing score.

    Lists are keyed by (tensor index, flat index, polarity); the virtual root (tensor -1) merges the
    allowed source elements. A derivation of (u, p) through edge u -> v of weight w has score
    |w| * score(child) with child list (v, p * sign(w)) (signed order) or (v, p) (magnitude order).
    """

    def __init__(self, g, order, masks, dtype):
        self.g, self.order, self.signed = g, order, order.signed
        self.values = _Values(g, order, dtype)
        self.sources = set(g.sources.values())
        self.lists = {}
        # the sink's only prefix is the empty one, value 1: score +1 for "+", -1 for "-"
        self.lists[(g.sink, 0, 0)] = _List(D=[self._derivation(1.0, 0.0, -1, -1, -1, 0, 0, 1.0)])
        if self.signed:
            self.lists[(g.sink, 0, 1)] = _List(D=[self._derivation(-1.0, 0.0, -1, -1, -1, 0, 1, 1.0)])
        self.lists[_ROOT] = _List(self._root_candidates(masks))

    def _derivation(self, sign, log_abs, t, i, k, rank, p, w):
        return Derivation(*self.order.key(sign, log_abs), t, i, k, rank, p, sign, log_abs, w)

    # ---------------------------------------------------------------- candidates
    def _root_candidates(self, masks):
        parts = []
        for s, mask in sorted(masks.items()):
            idx = np.arange(self.g.nodes[s].numel) if mask is None else np.flatnonzero(mask)
            valid, sgn, la = self.values.scores(s, idx, 0)
            parts.append((sgn[valid], la[valid], idx[valid], s))
        sgn, la, idx = (np.concatenate(c) for c in zip(*[q[:3] for q in parts]))
        t = np.repeat([q[3] for q in parts], [len(q[2]) for q in parts])
        n = len(idx)
        # no edge, polarity 0, weight 1 for all: constant columns, not arrays of every source element
        k, p, w = (np.broadcast_to(np.array(c), (n,)) for c in (-1, 0, 1.0))
        return _Candidates(self.order, sgn, la, t, idx, k, p, w)

    def _candidates(self, t, i, p):
        """All first-derivation candidates of (t, i, p): one per scalar edge leaving element i."""
        g = self.g
        parts = []
        for k in g.out_edges[t]:
            e = g.edges[k]
            v = e.dst
            if not self.values.reached[v] or v in self.sources:
                continue
            o, w = e.jac.out_edges(i)
            if len(o) == 0:
                continue
            cp = np.where(w > 0, p, 1 - p) if self.signed else np.zeros(len(o), int)
            valid, sgn, la = self.values.scores(v, o, cp if self.signed else 0)
            if not valid.any():
                continue
            o, w, cp, sgn, la = o[valid], w[valid], cp[valid], sgn[valid], la[valid]
            parts.append((sgn, la + np.log(np.abs(w)), np.full(len(o), v), o, np.full(len(o), k), cp, w))
        if not parts:
            return None
        if len(parts) == 1:             # one consumer edge (most lists): nothing to join
            return _Candidates(self.order, *parts[0])
        return _Candidates(self.order, *(np.concatenate(c) for c in zip(*parts)))

    def _list(self, key):
        L = self.lists.get(key)
        if L is None:
            L = self.lists[key] = _List(self._candidates(*key))
        return L

    # ---------------------------------------------------------------- enumeration
    def get(self, key, r):
        """Derivation ``r`` of list ``key`` (None if it has fewer), extending lists as needed.

        Iterative (an explicit stack) because paths through deep networks are thousands of hops long.
        """
        stack = [(key, r)]
        while stack:
            nkey, nr = stack[-1]
            L = self._list(nkey)
            if len(L.D) > nr or L.done:
                stack.pop()
                continue
            if L.pending is not None:
                # before the next derivation, the last one's successor (child rank + 1) must be known
                ckey, crank, w = L.pending
                C = self._list(ckey)
                if len(C.D) <= crank + 1 and not C.done:
                    stack.append((ckey, crank + 1))
                    continue
                if len(C.D) > crank + 1:
                    d = C.D[crank + 1]
                    last = L.D[-1]
                    heapq.heappush(L.heap, self._derivation(d.sign, d.log_abs + math.log(abs(w)), last.child_t,
                                                            last.child_i, last.edge, crank + 1, last.child_p, last.w))
                L.pending = None
            h0 = L.head()
            if h0 is None and not L.heap:
                L.done = True
                continue
            if h0 is not None and (not L.heap or h0 < L.heap[0]):
                best = h0
                L.pos += 1
            else:
                best = heapq.heappop(L.heap)
            L.D.append(best)
            L.pending = ((best.child_t, best.child_i, best.child_p), best.child_rank, best.w)
        L = self.lists[key]
        return L.D[r] if len(L.D) > r else None

    def path(self, r):
        """The r-th enumerated path as (hops source -> sink [(t, i)], edges [(edge, w)])."""
        d = self.get(_ROOT, r)
        hops, edges = [], []
        key, rank = (d.child_t, d.child_i, d.child_p), d.child_rank
        while True:
            hops.append(key[:2])
            d = self.get(key, rank)
            if d.child_t < 0:       # the sink's empty derivation
                return hops, edges
            edges.append((d.edge, d.w))
            key, rank = (d.child_t, d.child_i, d.child_p), d.child_rank


# ============================================================================ results
def _exact_product(ws):
    """sign, mantissa, binary exponent of prod(ws), multiplied sink to source without underflow
    or overflow. An infinite weight makes the exponent ``inf`` (mantissa 1): such a path is
    larger in magnitude than every finite one, and its infinite peers tie."""
    sign, m, e = 1, 1.0, 0
    for w in ws:
        if w < 0:
            sign = -sign
        if math.isinf(w):
            e = math.inf
            continue
        fm, fe = math.frexp(abs(w))
        m, de = math.frexp(m * fm)
        e += fe + de
    return (sign, 1.0, math.inf) if e == math.inf else (sign, m, e)


def _to_float(sign, m, e):
    """sign * m * 2**e as float64: +-inf beyond its range, 0.0 below it."""
    if e > 1024:                  # m in [0.5, 1): 2**1024 * m overflows
        return sign * math.inf
    return sign * math.ldexp(m, e)


def _view_flags(g):
    flags = g._cache.get("paths.views")
    if flags is None or len(flags) != len(g.nodes):
        flags = g._cache["paths.views"] = [n.is_view for n in g.nodes]
    return flags


def _unravel(i, shape):
    out = []
    for s in reversed(shape):
        out.append(int(i % s))
        i //= s
    return tuple(reversed(out))


def _make_path(g, hops, edges, include_views):
    """Path from hops (source -> sink) and their edges; weights recomputed as an exact product."""
    hops, ws = hops[::-1], [w for _, w in edges][::-1]
    sign, m, e = _exact_product(ws)
    weight = _to_float(sign, m, e)
    log_abs = math.log(m) + e * math.log(2.0)
    nodes, views = g.nodes, _view_flags(g)
    length = sum(1 for t, _ in hops[:-1] if not views[t])
    out = []
    last = len(hops) - 1
    for n, (t, i) in enumerate(hops):
        if views[t] and not include_views and 0 < n < last:
            continue
        node = nodes[t]
        out.append(Hop(node.name, _unravel(i, node.shape), node.op, node.module, t, int(i)))
    src = out[-1]
    return Path(weight, log_abs, sign, (src.node, src.index), out, ws, length), (sign, m, e)


def top_paths(g, k=1, order="signed", source=None, include_views=False, progress=None):
    """The k highest-weighted sink-to-source paths of ``g``, best first.

    Parameters
    ----------
    g : GradGraph
    k : int
        Number of paths, >= 1. If the graph has fewer paths, all are returned.
    order : {"signed", "magnitude"}
        ``"signed"``: (max, x) on signed weights (paper Eq. 5), most positive g(p) first (negative
        paths follow once the positive ones are exhausted). ``"magnitude"``: largest |g(p)| first.
    source : str or (str, index), optional
        Only paths ending at this source, or at the selected elements of it: ``index`` is a full
        element index tuple, any numpy index of an array shaped like the source (an int selects along
        axis 0), a boolean mask shaped like the source, or a list of element tuples. A group of
        elements acts as one aggregated node (paper Eq. 3); its paths are still listed one by one.
    include_views : bool
        Also report hops into pure data-movement nodes (they carry weight 1 and are omitted by default).
    progress : bool, optional
        Show a tqdm progress bar (default: for k >= 100, and only on a terminal).

    Returns
    -------
    list[Path]
        Best first. Paths of exactly equal weight are ordered by their hop sequence read from the
        source towards the sink, as (node index, flat index, edge index) triples, smallest first.
        An infinite local derivative gives ``weight = +-inf`` (the largest magnitude); a weight
        beyond float64's range is reported as ``+-inf`` with its exact ``log_abs_weight``.

    Raises
    ------
    QueryError
        For bad arguments, and when a NaN local derivative lies on the graph's paths (NaN weights
        cannot be ranked; ``docs/paths.md``).

    Examples
    --------
    >>> import torch, gradgraph as gg
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    >>> g = gg.capture(m, (torch.randn(2, 3, dtype=torch.double),), output=lambda y: y.sum())
    >>> best = g.top_paths(k=3, order="magnitude")
    >>> len(best), best[0].source[0]
    (3, 'input')
    """
    k = _check_k(k)
    order = _check_order(order)
    masks = _source_masks(g, source)
    bar = None
    if progress or (progress is None and k >= 100):
        from tqdm.auto import tqdm
        bar = tqdm(total=k, desc="top paths", unit="path", disable=None if progress is None else False)
    try:
        dtype = pass_dtype(g)
        best = _search(g, order, masks, k, dtype, bar)
        if best is None:
            # more paths within the float32 pass's rounding of the k-th than it is worth ranking
            # one by one (e.g. a run of exact ties): the float64 pass decides, whose exact ties
            # come out in tie order
            if bar is not None:
                bar.reset(total=k)
            best = _search(g, order, masks, k, np.float64, bar)
    finally:
        if bar is not None:
            bar.close()
    return [_make_path(g, hops, edges, include_views)[0] for _, _, hops, edges in best[:k]]


#: Paths past the k-th that a float32 pass ranks exactly before handing the search to a float64
#: pass (whose exact ties end the search).
_CROWD = 64


def _search(g, order, masks, k, dtype, bar):
    """The k best paths as (exact order key, tie key, hops, edges), best first, from the max pass
    in ``dtype``; None when a float32 pass meets more than ``k + _CROWD`` paths within its
    rounding of the k-th.

    The search enumerates paths by their scores (from the pass's values) and ranks each one by
    its exact weight. Scores are within ``err`` of the exact log weights (``_Values.error``: 0
    for float64 beyond float64's own rounding), so past the k-th path it goes on while a score is
    within ``4 err`` (and float64 rounding) of the k-th's: twice for the two scores compared, twice
    for the enumeration's own order, which those errors can perturb by as much. On a float64 pass
    the first exact tie of the k-th path ends the search (exact ties come out in tie order); a
    float32 pass's scores of exactly tied paths may differ in their last bits, so it ranks every
    path in the band."""
    en = _Enumerator(g, order, masks, dtype)
    tol = 4 * en.values.error
    best = []         # (exact order key, tie key, hops, edges): the best k so far, and near ties
    r, kth, extra = 0, None, 0  # kth: the search key of the k-th path enumerated
    while True:
        d = en.get(_ROOT, r)
        if d is None:
            break
        if kth is not None and not _near(d, kth, tol):
            break
        hops, edges = en.path(r)
        entry = _ranked(order, hops, edges)
        r += 1
        if kth is not None:
            # past the k-th path the search only looks for paths its rounded keys may have
            # misplaced. On a float64 pass, paths of one exact weight come out of the search in
            # tie order, so the first exact tie of the k-th best path (after it) ends the search:
            # it and everything after it rank below.
            kbest = best[-1]
            if en.values.exact and entry[0] == kbest[0] and entry[1] > kbest[1]:
                break
            if entry[:2] < kbest[:2]:
                bisect.insort(best, entry, key=_rank)
                best.pop()
            extra += 1
            if extra > k + _CROWD and not en.values.exact:
                return None
            continue
        best.append(entry)
        if bar is not None:
            bar.update(1)
        if len(best) == k:
            kth = (d[7], d[8])
            best.sort(key=_rank)
    best.sort(key=_rank)
    return best


def _near(d, kth, tol=0.0):
    """Is derivation ``d``'s search key within ``tol`` (the pass's rounding, in log space) and
    float64 rounding of the k-th path's? Rounded float64 log keys agree to ~1e-12 relative; an
    infinite key is near only an equal one."""
    s, la = kth
    if d.sign != s:
        return False
    if math.isinf(la) or math.isinf(d.log_abs):
        return d.log_abs == la
    return abs(d.log_abs - la) <= tol + 1e-9 * (1.0 + abs(la))


def _rank(entry):
    return entry[:2]


def _ranked(order, hops, edges):
    """(exact order key, tie key, hops, edges) of an enumerated path (ascending = best first)."""
    sign, m, e = _exact_product([w for _, w in edges][::-1])
    tie = tuple((t, i, kk) for (t, i), kk in zip(hops, [-1] + [kk for kk, _ in edges]))
    return order.key(sign, (e, m)), tie, hops, edges   # exact: (exponent, mantissa)


# ============================================================================ branches
@dataclass
class Branches:
    """The best path value through each element (or group) of one tensor, per consumer branch.

    Attributes
    ----------
    node : str
        The tensor node asked about.
    order : str
        ``"signed"`` (most positive g(p)) or ``"magnitude"`` (largest |g(p)|).
    labels : list[str]
        One per branch: ``"op @ module"`` of the consumer, found by looking through views (e.g.
        ``"addmm @ bert.encoder.layer.0.attention.self.query"`` or
        ``"add @ bert.encoder.layer.0.attention.output"`` for the residual).
    consumers : list[list[str]]
        The consumer node names grouped into each branch.
    log_abs : ndarray, shape (G, nb)
        log |best path value| through element/group g and branch b (-inf: no such path).
    sign : ndarray, shape (G, nb)
        Sign of that value (0: no such path; always +1 in magnitude order).
    best : ndarray, shape (G,)
        Index of the branch carrying the best path through each element/group (-1: none; exact
        ties go to the lower branch index).
    group_of : ndarray
        Group id of every element, shaped like the node (``G`` = number of groups).
    """

    node: str
    order: str
    labels: list
    consumers: list
    log_abs: np.ndarray
    sign: np.ndarray
    best: np.ndarray
    group_of: np.ndarray

    @property
    def values(self):
        """sign * exp(log_abs) as float64 (underflows to 0 for very small values)."""
        with np.errstate(under="ignore", over="ignore"):
            return self.sign * np.exp(self.log_abs)

    def best_labels(self):
        """Label of the best branch per element/group (None where no path passes)."""
        return [self.labels[b] if b >= 0 else None for b in self.best]


def _branch_chains(g, t, B, sources):
    """The consumer edges of tensor t, looking through views: a list of edge chains
    ``[k_view, ..., k_last]`` from t to a non-view consumer (or to a view with no consumer, such as a
    view sink), so that ``dropout(clone) -> view -> addmm`` counts as the linear layer's branch."""
    chains, stack = [], [[k] for k in reversed(g.out_edges[t])]
    while stack:
        chain = stack.pop()
        v = g.edges[chain[-1]].dst
        if B[v] is None or v in sources:
            continue
        nxt = [k for k in g.out_edges[v] if B[g.edges[k].dst] is not None]
        if g.nodes[v].is_view and nxt and v != g.sink:
            stack.extend(chain + [k] for k in reversed(nxt))
        else:
            chains.append(chain)
    return chains


def _signed_pairs(scaled, signed):
    """(hi, lo) as (sign, log|.|) arrays from a Scaled max-pass value (lo None if unsigned).
    An infinite value is a path (log|.| = inf); only the pair (-inf, +inf) means "no path"."""
    reached = ((scaled.arr[0] > -np.inf) | (scaled.arr[1] < np.inf)) if signed else scaled.arr[0] > 0

    def split(x):
        ok = reached & (x != 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            la = np.log(np.abs(x).astype(np.float64, copy=False)) + scaled.log_scale
            return np.where(ok, np.sign(x), 0.0), np.where(ok, la, -np.inf)
    hi = split(scaled.arr[0])
    lo = split(scaled.arr[1]) if signed else None
    return hi, lo


def branches(g, node, order="signed", groups=None):
    """Which consumer branch of tensor ``node`` carries the best path through each element.

    For element j of ``node`` and consumer branch b (the non-view consumers reached from ``node``,
    through views if need be, grouped by op and module), the
    best path through j via b has value ``max over edges j->o in b of [prefix(o) * w] (x) suffix(j)``,
    where prefix is the backward max pass (sink -> o) and suffix the forward max pass
    (j -> sources). In signed order the (max, min) pairs of both passes are combined (a negative
    times a negative can be the most positive). A group's value is the max over its elements.

    Parameters
    ----------
    node : str or list[str]
        A tensor node name (or source name); a list gives one :class:`Branches` per node, all from
        one backward and one forward pass.
    order : {"signed", "magnitude"}
    groups : None, int or array
        None: one row per element (flat C order). An int ``axis``: one row per index along that axis
        (e.g. ``groups=1`` on a (batch, tokens, hidden) tensor gives one row per token). An integer
        array shaped like the node: the group id of every element (ids 0..G-1).

    Returns
    -------
    Branches (a list of them for a list of nodes)
    """
    rank = _check_order(order)
    nodes = list(node) if isinstance(node, (list, tuple)) else [node]
    prepared = [_branch_groups(g, v, groups) for v in nodes]      # bad input fails before the passes
    sr = rank.semiring
    dtype = pass_dtype(g)
    B = _max_backward(g, sr, dtype)   # the outside values of every node (the meeting below releases a copy's)
    _refuse_nan(g, [b is not None for b in B])
    queries = [_branches_at(g, t, group_of, B, sr, rank, order) for t, group_of in prepared]
    visitors = {}
    for t, (visit, _) in zip((t for t, _ in prepared), queries):
        visitors.setdefault(t, []).append(visit)

    def at_node(v, _, Dt):
        for visit in visitors.get(v, ()):
            visit(Dt)

    # one inside pass, met with B at every queried node, its values in the same dtype
    seeds = {name: _seed(sr, g.nodes[i].numel, dtype) for name, i in g.sources.items()}
    inside_outside(g, sr, list(B), at_node, seeds=seeds)
    found = [finish() for _, finish in queries]
    return found if isinstance(node, (list, tuple)) else found[0]


def _branch_groups(g, node, groups):
    """(node index, group id of every element) of one :func:`branches` query."""
    t = g.node_index(node)
    nd = g.nodes[t]
    n = nd.numel
    if groups is None:
        group_of = np.arange(n).reshape(nd.shape)
    elif isinstance(groups, numbers.Integral) and not isinstance(groups, bool):
        group_of = labels_along(nd.shape, int(groups), repr(nd.name))
    else:
        group_of = np.asarray(groups)
        if group_of.shape != tuple(nd.shape) or not np.issubdtype(group_of.dtype, np.integer) \
                or (group_of.size and group_of.min() < 0):
            raise QueryError(f"groups must be None, an axis, or non-negative integer ids shaped "
                             f"{nd.shape}; got {getattr(groups, 'shape', groups)!r}")
    return t, group_of


def _branches_at(g, t, group_of, B, sr, rank, order):
    """:func:`branches` at tensor ``t``: (visit, finish). ``B`` holds the outside (backward max)
    values; ``visit(Dt)`` takes t's inside (forward max) value from the shared inside pass, and
    ``finish()`` then gives the :class:`Branches`."""
    signed = rank.signed
    nd = g.nodes[t]
    n = nd.numel
    gflat = np.ascontiguousarray(group_of).reshape(-1)
    G = int(gflat.max()) + 1 if n else 0
    sources = set(g.sources.values())
    # branches: the (non-view) consumers reached from t, grouped by (op, module)
    labels, consumers, members = [], [], []
    for chain in _branch_chains(g, t, B, sources):
        v = g.edges[chain[-1]].dst
        lab = (g.nodes[v].op_name, g.nodes[v].module)
        if lab not in labels:
            labels.append(lab)
            consumers.append([])
            members.append([])
        b = labels.index(lab)
        if g.nodes[v].name not in consumers[b]:
            consumers[b].append(g.nodes[v].name)
        members[b].append(chain)

    nb = len(labels)
    log_abs = np.full((G, nb), -np.inf)
    sign = np.zeros((G, nb), dtype=np.int8)

    def visit(Dt):
        if not nb:
            return
        (fs_hi, fl_hi), lo = _signed_pairs(Dt, signed)
        for b, chains in enumerate(members):
            # prefix through branch b: (+)-combine, over its chains, w (x) B[o] carried back to t
            acc = None
            for chain in chains:
                e = g.edges[chain[-1]]
                y = sr.carry(e.jac, B[e.dst], True, g.nodes[e.dst].is_view)
                for k in reversed(chain[:-1]):
                    y = sr.carry(g.edges[k].jac, y, True, True)
                acc = sr.add(acc, y)
            (ps_hi, pl_hi), plo = _signed_pairs(acc, signed)
            combos = [((ps_hi, pl_hi), (fs_hi, fl_hi))]
            if signed:
                combos += [((ps_hi, pl_hi), lo), (plo, (fs_hi, fl_hi)), (plo, lo)]
            best_s = np.zeros(n)
            best_l = np.full(n, -np.inf)
            for (a_s, a_l), (c_s, c_l) in combos:
                s = a_s * c_s
                ok = s != 0
                la = np.where(ok, a_l + c_l, -np.inf)
                better = ok & rank.better(s, la, best_s, best_l)
                best_s = np.where(better, s, best_s)
                best_l = np.where(better, la, best_l)
            # group max: order elements by (group, value best first), keep each group's first
            cls, val = rank.keys(best_s, best_l)
            by_group = np.lexsort((np.arange(n), val, cls, gflat))
            grp, first = np.unique(gflat[by_group], return_index=True)
            pick = by_group[first]
            sign[grp, b] = best_s[pick].astype(np.int8)
            log_abs[grp, b] = np.where(best_s[pick] != 0, best_l[pick], -np.inf)

    return visit, lambda: _branches_result(nd, order, labels, consumers, log_abs, sign, group_of, rank)


def _branches_result(nd, order, labels, consumers, log_abs, sign, group_of, rank):
    G, nb = log_abs.shape
    best = np.full(G, -1)
    bs, bl = np.zeros(G), np.full(G, -np.inf)
    for b in range(nb):            # strict improvement only: ties keep the lower branch index
        better = (sign[:, b] != 0) & rank.better(sign[:, b].astype(float), log_abs[:, b], bs, bl)
        best = np.where(better, b, best)
        bs = np.where(better, sign[:, b], bs)
        bl = np.where(better, log_abs[:, b], bl)
    return Branches(nd.name, order, [f"{op} @ {mod}" for op, mod in labels], consumers, log_abs,
                    sign, best, np.asarray(group_of))
