"""networkx views of a gradient graph: the tensor DAG, or (for small graphs) the scalar graph.

``level="tensor"``: one node per tensor, one edge per structured Jacobian (``src -> dst``, the
forward direction of the computation). ``level="scalar"``: the paper's gradient graph itself, one
node per scalar element ``(tensor index, flat index)`` and one edge per non-zero Jacobian entry
``J[i, j]``, weighted ``w = d dst[i] / d src[j]``. Summing the products of ``w`` over all paths
from a source element to the sink gives the gradient, which makes the scalar view an independent
oracle for the semiring engine on small models.
"""
from __future__ import annotations

import numpy as np

from ..errors import QueryError

__all__ = ["to_networkx", "SCALAR_EDGE_CAP"]

#: Largest number of scalar edges ``level="scalar"`` will build (a networkx edge costs ~1 kB).
SCALAR_EDGE_CAP = 200_000


def _tensor_view(g):
    import networkx as nx    # imported on use: it costs every command-line start ~0.4 s otherwise
    G = nx.MultiDiGraph(sink=g.sink, sources=dict(g.sources), granularity=g.granularity)
    for i, n in enumerate(g.nodes):
        G.add_node(i, name=n.name, op=n.op, shape=tuple(n.shape), dtype=n.dtype, module=n.module,
                   role=n.role, numel=n.numel)
    for k, e in enumerate(g.edges):
        dst = g.nodes[e.dst]
        G.add_edge(e.src, e.dst, key=k, kind=e.jac.kind, op=dst.op, module=dst.module,
                   nnz=_nnz(e.jac), arg=e.arg)
    return G


def _nnz(jac):
    """Scalar edge count of one Jacobian without enumerating a contraction's entries."""
    if jac.kind == "matmul":
        # canonical out = X @ M with X (B, I, T): input (b, i, t) meets every non-zero M[b, t, :]
        rows = (jac.in_shape if len(jac.in_shape) == 3 else (1,) + jac.in_shape)[1 if jac.wrt == "left" else 2]
        return int(rows * np.count_nonzero(jac._M))
    return int(jac.nnz())


def _count_scalar_edges(g, cap):
    """Number of scalar edges, or ``None`` as soon as it exceeds ``cap`` (never scans much past it)."""
    total = 0
    for e in g.edges:
        jac = e.jac
        if jac.kind == "sparse":
            total += int(jac.nnz())
        else:
            # structured kinds have no stored entry count: count input columns until over the cap
            for j in range(jac.in_numel):
                total += len(jac.out_edges(j)[0])
                if total > cap:
                    return None
        if total > cap:
            return None
    return total


def _scalar_view(g, cap):
    if _count_scalar_edges(g, cap) is None:
        raise QueryError(
            f"the scalar gradient graph has more than {cap:,} edges, too many for a networkx view; "
            f"use level='tensor', or the semiring queries (top_paths, entropy, flow), which never "
            f"expand Jacobians")
    import networkx as nx
    G = nx.MultiDiGraph(sink=(g.sink, 0), sources=dict(g.sources), granularity=g.granularity)
    for i, n in enumerate(g.nodes):
        vals = None if n.value is None else np.asarray(n.value).reshape(-1)
        for f, idx in enumerate(np.ndindex(*n.shape) if n.shape else [()]):
            G.add_node((i, f), node=n.name, index=tuple(int(x) for x in idx), op=n.op,
                       module=n.module, role=n.role,
                       value=None if vals is None else float(vals[f]))
    for k, e in enumerate(g.edges):
        for j in range(e.jac.in_numel):
            rows, w = e.jac.out_edges(j)
            for r, wr in zip(rows.tolist(), w.tolist()):
                G.add_edge((e.src, j), (e.dst, r), w=wr, edge=k)
    return G


def to_networkx(g, level="tensor", *, max_edges=SCALAR_EDGE_CAP):
    """A :class:`networkx.MultiDiGraph` view of ``g``.

    Parameters
    ----------
    g : GradGraph
    level : {"tensor", "scalar"}
        ``"tensor"``: nodes are tensor indices (attributes ``name, op, shape, dtype, module, role,
        numel``); edge ``src -> dst`` keyed by its index in ``g.edges``, with attributes ``kind``
        (Jacobian kind), ``op`` and ``module`` (of the op computing ``dst``), ``nnz`` (scalar edge
        count), ``arg``.
        ``"scalar"``: nodes ``(tensor index, flat index)`` (attributes ``node, index, op, module,
        role, value``); one edge per non-zero entry ``J[i, j]`` from ``(src, j)`` to ``(dst, i)``
        with weight ``w``. The sink is ``(g.sink, 0)``. Then the gradient wrt a source element
        is the sum over its paths to the sink of the product of ``w``.
    max_edges : int
        Cap on scalar edges (default :data:`SCALAR_EDGE_CAP`, 200,000).

    Raises
    ------
    QueryError
        Unknown ``level``, or a scalar graph over the cap.

    Examples
    --------
    >>> G = g.to_networkx()                    # doctest: +SKIP
    >>> [G.nodes[i]["op"] for i in nx.topological_sort(G)][:3]   # doctest: +SKIP
    """
    if level == "tensor":
        return _tensor_view(g)
    if level == "scalar":
        return _scalar_view(g, max_edges)
    raise QueryError(f"unknown level {level!r}; use level='tensor' or level='scalar'")
