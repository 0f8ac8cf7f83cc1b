"""Gradient flow through nodes (inside-outside) and the distribution of path lengths.

Flow
    For a scalar node u, flow(u) = O(u) * I(u), where the *outside* value O(u) = sum over sink -> u
    path prefixes of |g| is a backward pass and the *inside* value I(u) = sum over u -> source
    suffixes of |g| is a forward pass, both in the MAGNITUDE semiring (R>=0, +, x, 0, 1) on |w|.
    Since the graph is a DAG a path visits u at most once, so flow(u) is the total |g(path)| of the
    paths through u. flow(sink) = Z = sum over all paths of |g|; at a source element, flow is the
    mass of the paths ending there.
    A tensor's flow is the sum over its elements, a module's the sum over the tensors computed
    inside it (its module path equals the module or lies below it): a path counts once per element
    it visits, so a module's flow can exceed Z (a path through three of its tensors counts three
    times).
    Memory: the outside pass is kept for every node until the inside pass reaches it, then each
    node is reduced at once and both values are released. A node whose outside value is non-zero
    at a few elements only (a vocabulary-sized logit tensor below a logit-difference sink) is kept,
    and computed by the inside pass, at those elements alone.

Path lengths
    The LENGTH semiring carries a polynomial in x: an edge u -> v multiplies by |w| x, or by |w|
    alone when v (the consumer, computed by the op) is pure data movement (``Node.is_view``). At the
    sources, the coefficient of x^l is m[l] = sum of |g| over paths with l non-view hops; sum(m) = Z.
    Each tensor's polynomial is held from its lowest possible non-zero power on
    (:class:`.semirings.Polynomial`),
    so a deep tensor does not carry a channel for every length shorter than its shortest path.
    The windows widen along the paths, so the distribution is not one backward pass from the sink
    but two passes met at a cut node, a tensor every path passes through (:func:`length_cuts`,
    :func:`lengths_through`): an inside pass of the polynomials from the sources to the cut, an
    outside pass from the sink down to it, each over about half the lengths; their per-element
    products summed over the cut's elements give the distribution.

Numerics: both passes keep per-tensor scales, so the products are exact up to rounding, but values
returned as plain float64 underflow to 0 below ~1e-308; ``log=True`` returns natural logs instead
(-inf where there is no path), which are exact at any depth.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from numba import njit

from ..errors import QueryError
from .dp import Scaled, backward, forward, inside_outside, one_query, outside
from .kernels import nonzero_upto
from .paths import pass_dtype
from .semirings import LENGTH, MAGNITUDE

__all__ = ["flow", "path_lengths", "total_flow", "FLOW_LEVELS"]

FLOW_LEVELS = ("element", "node", "module")


def _finish(mantissa, log_scale, log):
    """mantissa * e^log_scale as float64, or its natural log."""
    m = np.asarray(mantissa, dtype=np.float64)
    if log:
        with np.errstate(divide="ignore"):
            return np.log(m) + log_scale
    with np.errstate(over="ignore", under="ignore"):
        return m * np.exp(log_scale)


def _sum_scaled(items):
    """Sum of values given as (mantissa sum, log scale) pairs: (mantissa, log scale). A NaN
    mantissa (a NaN derivative on some path) makes the sum NaN, as it makes the gradient NaN."""
    items = [(float(m), s) for m, s in items]
    if any(math.isnan(m) for m, _ in items):
        return math.nan, 0.0
    items = [(m, s) for m, s in items if m > 0]
    if not items:
        return 0.0, 0.0
    top = max(s for _, s in items)
    return sum(m * math.exp(s - top) for m, s in items), top


#: An outside value that is non-zero at no more than this many elements of its node (and not at
#: all of them) is kept at those elements only, and the inside pass computes the node there only.
FEW = 16
#: Elements per one-hot block when rows of a Jacobian are extracted (bounds the block's size).
_BLOCK = 1 << 17


def _outside(g):
    """The outside pass, kept per node as (support, Scaled). support None: the values of every
    element. Otherwise the indices of the few non-zero elements, and the values there alone: a
    backward pass from one logit reaches a vocabulary-sized tensor at a handful of elements."""
    def store(v, b):
        nnz, S = nonzero_upto(b.arr[0], FEW)      # magnitude values: one channel
        if nnz <= FEW and nnz < b.arr.shape[1]:
            return S, Scaled(b.arr[:, S], b.log_scale)
        return None, b
    return outside(g, MAGNITUDE, store, seed=_seed(g, g.nodes[g.sink].numel))


def _seed(g, n):
    """1-bar of n elements in the precision of the flow's passes: float32 for a float32 (or
    narrower) model, as its Jacobians' factors are (:func:`.paths.pass_dtype`), else float64."""
    return Scaled(MAGNITUDE.one(n).astype(pass_dtype(g), copy=False))


@njit(cache=True, error_model="numpy", fastmath={"reassoc"})
def _dot64(a, b):
    """sum a * b accumulated in float64 (float32 values of a float32 model's passes: a float32
    dot product would round every partial sum)."""
    acc = 0.0
    for k in range(a.shape[0]):
        acc += np.float64(a[k]) * np.float64(b[k])
    return acc


def _restricted_carry(g, support):
    """Inside values carried across an edge u -> v when a node with a support S holds its values
    at S only (the magnitude semiring's ``carry`` for :func:`.dp.forward`).

    Flow needs D[v] only where B[v] != 0, and those elements are reached from elements of u where
    B[u] != 0 (an element with an edge into an element on a path to the sink is on such a path
    too): so D[v] at S_v = rows S_v of |J| times D[u], which reads D[u] at S_u alone; elsewhere
    D[u] may be anything (0 when u is held at S_u only). The rows are extracted by the
    transposed product with one-hot rows, which costs what the backward pass paid there (a few
    columns of a vocabulary-sized weight) instead of a full forward product.
    """
    def carry(e, x):
        u, v = e.src, e.dst
        Su, Sv = support[u], support[v]
        is_view = g.nodes[v].is_view
        if Sv is None:
            if Su is not None:
                full = np.zeros((x.shape[0], g.nodes[u].numel))
                full[:, Su] = x
                x = full
            return MAGNITUDE.carry(e.jac, Scaled(x), False, is_view).arr
        n = g.nodes[v].numel
        out = np.empty((1, len(Sv)))
        step = max(1, _BLOCK // n)
        for a in range(0, len(Sv), step):
            rows = Sv[a:a + step]
            E = np.zeros((len(rows), n))
            E[np.arange(len(rows)), rows] = 1.0
            R = MAGNITUDE.carry(e.jac, Scaled(E), True, is_view).arr   # rows of |J|: (len(rows), numel u)
            out[0, a:a + len(rows)] = (R if Su is None else R[:, Su]) @ x[0]
        return out
    return carry


@one_query          # both passes: each weight's |W| is checked once
def _flows(g, reduce, empty):
    """``reduce(support, B[v], D[v])`` per tensor node (``empty`` where no path passes): the outside
    pass is kept (compactly, see :func:`_outside`), the inside pass is consumed node by node and
    each outside value is released once used."""
    kept = _outside(g)
    support = [None if k is None else k[0] for k in kept]
    out = [empty] * len(g.nodes)

    def visit(v, kept_v, d):
        S, b = kept_v
        out[v] = reduce(S, b, d)
    seeds = {name: _seed(g, g.nodes[i].numel if support[i] is None else len(support[i]))
             for name, i in g.sources.items()}
    inside_outside(g, MAGNITUDE, kept, visit, seeds=seeds, carry=_restricted_carry(g, support))
    return out


def _dot(a, b):
    """sum a * b as a float: BLAS for float64 values, accumulated in float64 for float32 ones."""
    if a.dtype == b.dtype == np.float64:
        return float(np.dot(a, b))
    return float(_dot64(np.ascontiguousarray(a), np.ascontiguousarray(b)))


def flow(g, by="element", log=False):
    """Total |gradient| through each scalar node, tensor or module (see the module docstring).

    Parameters
    ----------
    g : GradGraph
    by : {"element", "node", "module"}
        ``"element"``: ``{node name: float64 array shaped like the node}``; ``"node"``:
        ``{node name: float}`` (sum over the elements); ``"module"``: ``{module path: float}``,
        the sum over every node whose module path is the module or lies inside it (a path counts
        once per element it visits). Nodes outside any submodule are reported under ``""`` (ops
        of the model's top-level ``forward``) or ``"<output>"`` (the ``output`` callable); ``""``
        is not an ancestor of other modules.
    log : bool
        Return natural logs (exact for path weights beyond float64's range).

    Returns
    -------
    dict

    Examples
    --------
    >>> import torch, gradgraph as gg
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    >>> g = gg.capture(m, (torch.randn(2, 3, dtype=torch.double),), output=lambda y: y.sum())
    >>> f = g.flow(by="module")
    >>> sorted(f)
    ['', '0', '1', '2', '<output>']
    """
    if by not in FLOW_LEVELS:
        raise QueryError(f"by must be one of {', '.join(repr(v) for v in FLOW_LEVELS)}; got {by!r}")
    if by == "element":
        # the product in float64: two float32 mantissas' product may leave float32's range
        per = _flows(g, lambda S, b, d: (S, b.arr[0].astype(np.float64) * d.arr[0], b.log_scale + d.log_scale), None)
        res = {}
        for n, p in zip(g.nodes, per):
            S, m, s = (None, np.zeros(n.numel), 0.0) if p is None else p
            if S is not None:
                full = np.zeros(n.numel)
                full[S] = m
                m = full
            res[n.name] = _finish(m, s, log).reshape(n.shape)
        return res
    # by node: sum B[v] D[v] without a product array
    sums = _flows(g, lambda S, b, d: (_dot(b.arr[0], d.arr[0]), b.log_scale + d.log_scale), (0.0, 0.0))
    if by == "node":
        return {n.name: float(_finish(*_sum_scaled([ms]), log)) for n, ms in zip(g.nodes, sums)}
    groups = {}
    for n, ms in zip(g.nodes, sums):
        for key in _module_keys(n.module):
            groups.setdefault(key, []).append(ms)
    return {key: float(_finish(*_sum_scaled(items), log)) for key, items in groups.items()}


def _module_keys(module):
    """The module and every ancestor: "a.b.c" -> ["a", "a.b", "a.b.c"]; "" -> [""]."""
    if not module or module.startswith("<"):
        return [module]
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def total_flow(g, log=False):
    """Z = sum over all sink-to-source paths of |g(path)| (the MAGNITUDE semiring), or log Z."""
    B = backward(g, MAGNITUDE, keep=g.sources.values())
    items = [(float(B[i].arr[0].sum()), B[i].log_scale) for i in g.sources.values() if B[i] is not None]
    return float(_finish(*_sum_scaled(items), log))


def path_lengths(g, log=False):
    """Path-weight mass by length: ``m[l]`` = sum of |g(path)| over paths with ``l`` non-view hops.

    A hop counts when its consumer node (the tensor computed by the op) is not pure data movement
    (see ``docs/semirings.md``). ``m.sum() == total_flow(g)``. Computed by meeting an inside and an
    outside pass of the length polynomials at a cut node (see the module docstring).

    Returns
    -------
    numpy.ndarray
        float64, index = length (``log=True``: natural logs, -inf where no path has that length).
    """
    cuts = length_cuts(g)
    if not cuts:                 # no source reaches the sink: no path of any length
        return np.array([float(_finish(0.0, 0.0, log))])
    return lengths_through(g, min(cuts, key=cuts.get), log)


def _on_paths(g):
    """Per tensor node: does it lie on a source -> sink path? Paths end at the first source they
    reach from the sink (as :func:`.dp.backward` stops there), so edges into sources are no part
    of any path."""
    n, sources = len(g.nodes), set(g.sources.values())
    from_source = [i in sources for i in range(n)]
    for v in range(n):                     # topological order: inputs come first
        if not from_source[v]:
            from_source[v] = any(from_source[g.edges[k].src] for k in g.in_edges[v])
    to_sink = [False] * n
    to_sink[g.sink] = True
    for v in range(n - 1, -1, -1):
        if to_sink[v] and v not in sources:
            for k in g.in_edges[v]:
                to_sink[g.edges[k].src] = True
    return [a and b for a, b in zip(from_source, to_sink)]


def _path_edges(g, on):
    """The edges of the source -> sink paths (both ends on a path, not into a source)."""
    sources = set(g.sources.values())
    return [e for e in g.edges if on[e.src] and on[e.dst] and e.dst not in sources]


def length_cuts(g):
    """The cut nodes of the path-length pass, with an estimate of the pass's cost at each.

    A cut node is a tensor that every source -> sink path passes through (the sink always is one).
    With nodes in topological order, node c is one exactly when it lies on a path, no source comes
    after it and no path edge u -> v jumps over it (u < c < v): such an edge would lie on a path
    from a source before c to the sink that avoids c.

    The cost estimate: the inside pass carries to each node v below the cut a polynomial over the
    lengths its paths from the sources can have, the outside pass to each node above it one over
    its lengths to the sink; the estimate sums (number of possible lengths) x numel over the nodes.
    Lengths grow along the paths, so a cut near the middle of a deep graph about halves the
    channels one backward pass from the sink alone would carry.

    Returns
    -------
    dict[int, float]
        cut node index -> estimated cost (empty when no source reaches the sink).
    """
    on = _on_paths(g)
    if not on[g.sink]:
        return {}
    n, edges = len(g.nodes), _path_edges(g, on)
    hop = [0 if g.nodes[e.dst].is_view else 1 for e in edges]
    big = np.iinfo(np.int64).max // 4
    # the range of path lengths [lo, hi] from the sources to each node and from each node to the sink
    f_lo, f_hi = np.full(n, big), np.full(n, -1)
    b_lo, b_hi = np.full(n, big), np.full(n, -1)
    for i in g.sources.values():
        f_lo[i] = f_hi[i] = 0
    b_lo[g.sink] = b_hi[g.sink] = 0
    for e, h in zip(edges, hop):           # g.edges are in topological order of their consumer
        f_lo[e.dst] = min(f_lo[e.dst], f_lo[e.src] + h)
        f_hi[e.dst] = max(f_hi[e.dst], f_hi[e.src] + h)
    for e, h in zip(reversed(edges), reversed(hop)):
        b_lo[e.src] = min(b_lo[e.src], b_lo[e.dst] + h)
        b_hi[e.src] = max(b_hi[e.src], b_hi[e.dst] + h)
    onv = np.array(on)
    numel = np.array([nd.numel for nd in g.nodes], dtype=np.float64)
    inside = np.cumsum(np.where(onv, (f_hi - f_lo + 1) * numel, 0.0))              # nodes <= c
    outside = np.cumsum(np.where(onv, (b_hi - b_lo + 1) * numel, 0.0)[::-1])[::-1]  # nodes >= c
    jumps = np.zeros(n + 1, dtype=np.int64)
    for e in edges:
        jumps[e.src + 1] += 1
        jumps[e.dst] -= 1
    over = np.cumsum(jumps)[:n]
    last_source = max(i for i in g.sources.values() if on[i])
    return {c: float(inside[c] + outside[c]) for c in range(last_source, n) if on[c] and over[c] == 0}


def _subgraph(g, keep, sources, sink, edges):
    """The graph of the nodes ``keep`` (ascending indices of ``g``) and the ``edges`` between them,
    made with ``g``'s own classes (the algorithms never import the graph module: it imports them)."""
    index = {old: new for new, old in enumerate(keep)}
    sub = [dataclasses.replace(e, src=index[e.src], dst=index[e.dst]) for e in edges
           if e.src in index and e.dst in index]
    return type(g)([g.nodes[i] for i in keep], sub, {name: index[i] for name, i in sources.items()},
                   index[sink], g.granularity, g.meta)


def lengths_through(g, cut, log=False):
    """:func:`path_lengths` computed at the cut node ``cut`` (one of :func:`length_cuts`).

    Every path is a source -> cut part and a cut -> sink part, and its length the sum of theirs:
    an inside pass of the length polynomials from the sources to the cut gives per cut element
    F_e(x) = sum over the first parts ending at e of |g| x^length, an outside pass from the sink
    the same B_e(x) of the second parts, and the distribution is sum_e F_e(x) B_e(x). Each pass
    runs on the nodes between its end and the cut alone."""
    on = _on_paths(g)
    edges = _path_edges(g, on)
    sources = {name: i for name, i in g.sources.items() if on[i]}
    lower = _subgraph(g, [v for v in range(cut + 1) if on[v]], sources, cut, edges)
    upper = _subgraph(g, [v for v in range(cut, len(g.nodes)) if on[v]], {"cut": cut}, g.sink, edges)
    F = forward(lower, LENGTH, keep=[lower.sink])[lower.sink]
    B = backward(upper, LENGTH, keep=[0])[0]
    m, log_scale = _polynomial_dot(F.arr, B.arr), F.log_scale + B.log_scale
    nonzero = np.flatnonzero(m != 0)      # (NaN too) trailing lengths without a path are dropped
    m = m[:nonzero[-1] + 1] if len(nonzero) else m[:1]
    out = np.zeros(F.shift + B.shift + len(m))
    out[F.shift + B.shift:] = m
    return _finish(out, log_scale, log)


def _polynomial_dot(f, b):
    """Coefficients of sum_e f_e(x) b_e(x) for polynomials given as columns of ``f`` (Lf, n) and
    ``b`` (Lb, n): the anti-diagonal sums of f @ b.T. A zero coefficient is "no path of that
    length" and stays so next to a NaN or infinite one (no 0 * NaN): elements holding such values
    are multiplied out on their own."""
    bad = ~(np.isfinite(f).all(axis=0) & np.isfinite(b).all(axis=0))
    ok = np.flatnonzero(~bad)
    G = f[:, ok] @ b[:, ok].T if len(ok) < f.shape[1] else f @ b.T
    for e in np.flatnonzero(bad):
        with np.errstate(invalid="ignore"):
            G = G + np.where(np.outer(f[:, e] != 0, b[:, e] != 0), np.outer(f[:, e], b[:, e]), 0.0)
    m = np.zeros(f.shape[0] + b.shape[0] - 1)
    for i in range(f.shape[0]):
        m[i:i + b.shape[0]] += G[i]
    return m
