"""The one generic dynamic program (the paper's Algorithm 2) and its forward twin.

``backward``: reverse topological order, ``B[sink] = 1``, ``B[u] (+)= w(u->v) (x) B[v]``.
``forward`` (inside pass): topological order from the sources, ``D[v] (+)= w(u->v) (x) D[u]``.

Each tensor's values are held as :class:`Scaled` (mantissa array, log scale): once a tensor is
complete its array is renormalised to a largest finite magnitude of 1 (if that has drifted beyond
[2^-10, 2^10]), so path weights far below float64's range (1e-400 and beyond) remain exact up to
rounding. Ties and zero-weight edges are handled by the kernels (zero weights are not edges).

The engine touches values only through the semiring (:class:`.semirings.Semiring`): ``sr.seed``
for 1-bar, ``sr.normalize`` once a tensor is complete, ``sr.carry`` across an edge and ``sr.add``
into a node -- so a semiring may keep more than the array and the scale (LENGTH's values keep a
channel offset) or no scale at all (log-space values), and the engine knows nothing of it.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from ..jacobians import WEIGHT_CACHE
from ..threads import query_threads
from ..jacobians._elementwise import div_scalar, mul_scalar, on_torch
from .kernels import max_finite_abs

__all__ = ["Scaled", "backward", "forward"]

_NEAR_ONE = (2.0 ** -10, 2.0 ** 10)


class Scaled:
    """values = arr * exp(log_scale), arr of shape (C, n).

    ``owned``: the array is the engine's own (a product's result, or a sum of them) and no one
    else holds it, so further contributions to the same node may be added into it in place. Only
    a node still being accumulated has such a value: the passes clear the flag once the node is
    complete (before it is normalised, visited, kept or carried on)."""

    __slots__ = ("arr", "log_scale", "owned", "normalized")

    def __init__(self, arr, log_scale=0.0, owned=False):
        self.arr, self.log_scale, self.owned = arr, float(log_scale), owned
        self.normalized = False

    def normalize(self):
        """Rescale so that the largest finite magnitude is 1 -- unless it is already within
        [2^-10, 2^10]: such values are as safe for every kernel (float32 ones included) as
        rescaled ones, and most tensors of a pass are, so the copy is skipped. A value normalised
        once is not scanned again (an identity edge -- a reshape, a residual add -- hands the
        same value object to the next node, and no one writes into a complete value)."""
        if self.normalized:
            return self
        m = max_finite_abs(self.arr)
        if m > 0 and not _NEAR_ONE[0] <= m <= _NEAR_ONE[1]:
            self.arr = div_scalar(self.arr, m)
            self.log_scale += math.log(m)
        self.normalized = not self.owned
        return self

    def real(self):
        """The plain float64 values (may under/overflow), also of a float32 pass's mantissas."""
        arr = self.arr.astype(np.float64, copy=False)
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            return arr * math.exp(self.log_scale) if self.log_scale < 700 else arr * np.exp(self.log_scale)

    def log_abs(self):
        """log|values| per entry (-inf where 0)."""
        with np.errstate(divide="ignore"):
            return np.log(np.abs(self.arr)) + self.log_scale


def _rescaled(arr, log_factor):
    """arr * e^log_factor (log_factor <= 0) for moving a value to a larger common scale. When the
    factor underflows to 0, finite entries become 0 and infinite ones stay: a max semiring's
    "no path" (-inf, +inf) must not turn into NaN (inf * 0)."""
    if log_factor == 0:
        return arr
    f = math.exp(log_factor)
    if f > 0:
        return mul_scalar(arr, f)
    return np.where(np.isinf(arr), arr, 0.0)


def one_query(fn):
    """Run ``fn`` as one query of the weight cache (``WEIGHT_CACHE.query()``): weights do not
    change while it runs, so each kept weight transform is checked against its weight once."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with WEIGHT_CACHE.query():
            return fn(*args, **kwargs)
    return run


@one_query
@query_threads
def backward(g, sr, seed=None, stop_at_sources=True, keep=None, visit=None):
    """Run Algorithm 2 over graph ``g`` in semiring ``sr``.

    Parameters
    ----------
    seed : Scaled, optional
        The sink's value (default 1-bar).
    keep : collection of int, optional
        Node indices whose values to return; the others are dropped as soon as they have been
        propagated, so memory follows the frontier of the pass rather than the whole graph.
        Default: keep every node.
    visit : callable, optional
        ``visit(v, B[v])`` is called once per node as soon as its value is complete (in reverse
        topological order), e.g. to keep a reduced form of it when it is not kept.

    Returns
    -------
    list[Scaled | None]
        B[u] for every tensor node (None where no path from the sink arrives, or not kept).
    """
    with on_torch(sr.torch_elementwise):
        return _backward(g, sr, seed, stop_at_sources, keep, visit)


def _backward(g, sr, seed, stop_at_sources, keep, visit):
    B = [None] * len(g.nodes)
    B[g.sink] = seed if seed is not None else sr.seed(g.nodes[g.sink].numel)
    source_nodes = set(g.sources.values())
    keep = None if keep is None else set(keep)
    for v in range(len(g.nodes) - 1, -1, -1):
        bv = B[v]
        if bv is None:
            continue
        bv.owned = False           # complete: from now on shared (kept, visited, carried)
        sr.normalize(bv)
        if visit is not None:
            visit(v, bv)
        if stop_at_sources and v in source_nodes:
            continue
        for k in g.in_edges[v]:
            e = g.edges[k]
            B[e.src] = sr.add(B[e.src], sr.carry(e.jac, bv, True, g.nodes[v].is_view))
        if keep is not None and v not in keep:
            B[v] = None
    return B


@one_query
@query_threads
def forward(g, sr, seeds=None, keep=None, visit=None, carry=None):
    """Inside pass: values from the sources (seed 1-bar each) up to the sink.

    Parameters
    ----------
    keep : collection of int, optional
        Node indices whose values to return; the others are dropped once their last consumer has
        been computed. Default: keep every node.
    visit : callable, optional
        ``visit(v, D[v])`` is called once per node as soon as its value is complete (in
        topological order), e.g. to reduce it on the fly when it is not kept.
    carry : callable, optional
        ``carry(e, x)``: the values carried across edge ``e`` from the values ``x`` (an array) of
        its source, replacing the default ``sr``-product through the edge's Jacobian; e.g. to
        compute only some elements of a node (for semirings whose values are plain
        :class:`Scaled`). Default: every element.

    Returns
    -------
    list[Scaled | None]
        D[v] = (+) over source-to-v path suffixes of their weight.
    """
    with on_torch(sr.torch_elementwise):
        return _forward(g, sr, seeds, keep, visit, carry)


def _forward(g, sr, seeds, keep, visit, carry):
    D = [None] * len(g.nodes)
    for name, i in g.sources.items():
        D[i] = seeds[name] if seeds is not None else sr.seed(g.nodes[i].numel)
    keep = None if keep is None else set(keep)
    last_use = {}
    if keep is not None:
        for e in g.edges:
            last_use[e.src] = max(last_use.get(e.src, -1), e.dst)
    for v in range(len(g.nodes)):
        if D[v] is not None:
            sr.normalize(D[v])
        for k in g.in_edges[v]:
            e = g.edges[k]
            du = D[e.src]
            if du is None:
                continue
            y = (sr.carry(e.jac, du, False, g.nodes[v].is_view) if carry is None
                 else Scaled(carry(e, du.arr), du.log_scale))
            D[v] = sr.add(D[v], y)
        if D[v] is not None:
            D[v].owned = False     # complete: from now on shared (kept, visited, carried)
            sr.normalize(D[v])
            if visit is not None:
                visit(v, D[v])
        if keep is not None:
            for k in g.in_edges[v]:
                u = g.edges[k].src
                if last_use.get(u) == v and u not in keep:
                    D[u] = None
            if v not in last_use and v not in keep:
                D[v] = None
    return D


def outside(g, sr, store=None, seed=None):
    """The outside pass (:func:`backward` from the sink, ``seed`` its value there, default 1-bar)
    kept per node: ``store(v, B[v])`` (default the value itself; e.g. a compact form), None where
    no path from the sink arrives. Values are released from the pass as soon as they are complete
    and stored."""
    kept = [None] * len(g.nodes)

    def keep(v, b):
        kept[v] = b if store is None else store(v, b)
    backward(g, sr, seed=seed, keep=(), visit=keep)
    return kept


def inside_outside(g, sr, kept, visit, seeds=None, carry=None):
    """The inside pass (:func:`forward`) met with outside values ``kept`` (from :func:`outside`):
    ``visit(v, kept[v], D[v])`` once per node that has both, in topological order, as soon as
    D[v] is complete; each outside value is released once visited, and each inside value once its
    consumers have it. ``seeds`` and ``carry`` are :func:`forward`'s. The one inside-outside
    computation of the library (flow, branches)."""
    def meet(v, d):
        if kept[v] is not None:
            visit(v, kept[v], d)
            kept[v] = None
    forward(g, sr, seeds=seeds, keep=(), visit=meet, carry=carry)
