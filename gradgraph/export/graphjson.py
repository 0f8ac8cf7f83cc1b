"""A pruned scalar gradient graph as JSON that other viewers and notebooks can read.

:func:`to_json` keeps the scalar nodes (tensor element) of the top paths, or of the elements whose
gradient flow is at least a fraction of all paths' |gradient|, and the scalar edges between them,
as ``{"directed", "multigraph", "metadata", "nodes", "links"}``: the node-link layout of networkx,
so ``networkx.node_link_graph(data, edges="links")`` reads it back as a ``MultiDiGraph`` (keyed by
Jacobian index: an op reading one tensor twice, ``x * x``, joins two elements by two edges). See ``docs/file-format.md``.
"""
from __future__ import annotations

import json
import math

import numpy as np

from ..errors import QueryError

__all__ = ["to_json", "write_json", "JSON_FORMAT", "JSON_VERSION", "MAX_JSON_NODES"]

JSON_FORMAT = "gradgraph-json"
JSON_VERSION = 1
#: Most scalar nodes a flow-threshold selection may keep (a JSON node costs ~300 bytes).
MAX_JSON_NODES = 200_000


def _finite(x):
    x = float(x)
    return x if math.isfinite(x) else None


def _node_id(node, index):
    return f"{node.name}{list(index)}"


def _layer(module):
    """The first numbered part of a module path (``bert.encoder.layer.3.output`` -> 3), or None."""
    for part in (module or "").split("."):
        if part.isdigit():
            return int(part)
    return None


def _position_axis(g):
    """(leading shape, token count) of the first token input, or None: elements of tensors whose
    shape starts with the same (batch, tokens) get a token position."""
    from .report import token_sources
    for name, axis in token_sources(g).items():
        shape = tuple(g.nodes[g.sources[name]].shape)
        return shape[:axis + 1], shape[axis]
    return None


def _position(node, index, lead):
    if lead is None:
        return None
    shape, count = lead
    s = tuple(node.shape)
    if s[:len(shape)] == shape and len(s) > len(shape) - 1:
        return int(index[len(shape) - 1])
    # a (batch * tokens, features) matrix, as linear layers see the hidden states
    if len(s) == 2 and s[0] == int(np.prod(shape)) and len(shape) >= 1:
        return int(index[0]) % count
    return None


def _check_selection(paths, k, flow_threshold):
    if flow_threshold is not None:
        if paths is not None:
            raise QueryError("pass either paths (or k) or flow_threshold, not both")
        if isinstance(flow_threshold, bool) or not isinstance(flow_threshold, (int, float)) \
                or not 0 < float(flow_threshold) <= 1:
            raise QueryError(f"flow_threshold must be a fraction in (0, 1] of all paths' |gradient|, "
                             f"got {flow_threshold!r}")


def to_json(g, paths=None, *, k=20, order="signed", flow_threshold=None):
    """The pruned scalar graph of some paths, or of the high-flow elements, as a JSON-ready dict.

    Parameters
    ----------
    g : GradGraph
    paths : list[Path], optional
        The paths to keep (their hops and the scalar edges between consecutive hops). Default: the
        top ``k`` paths in ``order``, with their view hops.
    k : int
        Number of top paths when ``paths`` is not given (default 20).
    order : {"signed", "magnitude"}
    flow_threshold : float, optional
        Instead of paths: keep every scalar node whose gradient flow (:meth:`GradGraph.flow`) is at
        least this fraction of all paths' |gradient| Z, and every scalar edge between two kept
        nodes.

    Returns
    -------
    dict
        ``{"directed": True, "multigraph": True, "metadata": {...}, "nodes": [...], "links": [...]}``.
        Node ``id`` is ``"name[index]"``; node attributes ``name, tensor, index, flat_index, op,
        module, role, layer, position, value, flow``; link attributes ``source, target`` (forward
        direction: input element to the element computed from it), ``weight`` (local derivative
        d target / d source), ``key`` and ``edge`` (index of its Jacobian in ``g.edges``) and, for path
        selections, ``paths`` (the ranks, from 1, of the paths using it).

    Examples
    --------
    >>> data = gg.to_json(g, k=5)                               # doctest: +SKIP
    >>> G = networkx.node_link_graph(data, edges="links")       # doctest: +SKIP
    """
    _check_selection(paths, k, flow_threshold)
    flows = g.flow(by="element")
    lead = _position_axis(g)
    nodes = {}                 # (tensor, flat) -> attributes
    links = {}                 # (src key, dst key) -> attributes

    def add_node(t, flat):
        key = (t, flat)
        if key not in nodes:
            n = g.nodes[t]
            index = tuple(int(i) for i in np.unravel_index(flat, n.shape)) if n.shape else ()
            value = None if n.value is None else _finite(np.asarray(n.value).reshape(-1)[flat])
            nodes[key] = {"id": _node_id(n, index), "name": n.name, "tensor": t, "index": list(index),
                          "flat_index": int(flat), "op": n.op, "module": n.module, "role": n.role,
                          "layer": _layer(n.module), "position": _position(n, index, lead),
                          "value": value, "flow": _finite(np.asarray(flows[n.name]).reshape(-1)[flat])}
        return key

    if flow_threshold is None:
        if paths is None:
            paths = g.top_paths(k=k, order=order, include_views=True)
        selection = {"kind": "paths", "k": len(paths), "order": order}
        path_rows = []
        for rank, p in enumerate(paths, 1):
            keys = []
            for h in p.hops:
                t = h.node_id if h.node_id >= 0 else g.node_index(h.node)
                flat = h.flat_index if h.flat_index >= 0 else int(
                    np.ravel_multi_index(h.index, g.nodes[t].shape)) if g.nodes[t].shape else 0
                keys.append(add_node(t, int(flat)))
            ws = p.edge_weights if len(p.edge_weights) == len(keys) - 1 else [None] * (len(keys) - 1)
            # hops run sink -> source; links run forward (input element -> the element it feeds)
            for a, b, w in zip(keys[1:], keys[:-1], ws):
                k_edge, weight = _scalar_edge(g, a, b, w)
                link = links.setdefault((a, b, k_edge), {"weight": weight, "edge": k_edge, "paths": []})
                link["paths"].append(rank)
            path_rows.append({"rank": rank, "weight": _finite(p.weight),
                              "log_abs_weight": _finite(p.log_abs_weight), "sign": int(p.sign),
                              "source": {"name": p.source[0], "index": [int(i) for i in p.source[1]]},
                              "nodes": [nodes[key]["id"] for key in keys]})
    else:
        Z = float(g.path_lengths().sum())
        cut = float(flow_threshold) * Z
        for t, n in enumerate(g.nodes):
            f = np.asarray(flows[n.name]).reshape(-1)
            for flat in np.flatnonzero(f >= cut).tolist():
                if len(nodes) >= MAX_JSON_NODES:
                    raise QueryError(f"more than {MAX_JSON_NODES:,} elements carry at least "
                                     f"{flow_threshold} of the flow; raise flow_threshold")
                add_node(t, flat)
        kept = {}
        for t, flat in nodes:
            kept.setdefault(t, []).append(flat)
        for k_edge, e in enumerate(g.edges):
            if e.dst not in kept:
                continue
            for flat in kept.get(e.src, ()):
                rows, ws = e.jac.out_edges(flat)
                for r, w in zip(rows.tolist(), ws.tolist()):
                    if (e.dst, r) in nodes:
                        links[((e.src, flat), (e.dst, r), k_edge)] = {"weight": float(w), "edge": k_edge}
        selection = {"kind": "flow_threshold", "flow_threshold": float(flow_threshold), "Z": _finite(Z)}
        path_rows = None
    sink = g.sink_node
    metadata = {"format": JSON_FORMAT, "version": JSON_VERSION, "model": g.meta.get("model"),
                "granularity": g.granularity,
                "sink": {"name": sink.name, "module": sink.module, "value": _finite(g.sink_value),
                         "id": _node_id(sink, (0,) * len(sink.shape))},
                "sources": {name: {"shape": list(g.nodes[i].shape), "dtype": g.nodes[i].dtype}
                            for name, i in g.sources.items()},
                "selection": selection, "meta": g.meta}
    if path_rows is not None:
        metadata["paths"] = path_rows
    out_links = []
    for (a, b, k_edge), attrs in links.items():
        out_links.append({"source": nodes[a]["id"], "target": nodes[b]["id"], "key": k_edge, **attrs})
    return {"directed": True, "multigraph": True, "metadata": metadata,
            "nodes": list(nodes.values()), "links": out_links}


def _scalar_edge(g, a, b, w_path):
    """(Jacobian index, local derivative) of the scalar edge a -> b (forward). When one tensor
    feeds an op twice (``x * x``) there are two; the path's own local derivative ``w_path`` picks
    the one it took."""
    found = []
    for k in g.in_edges[b[0]]:
        e = g.edges[k]
        if e.src != a[0]:
            continue
        rows, ws = e.jac.out_edges(a[1])
        hit = np.flatnonzero(rows == b[1])
        if hit.size:
            found.append((int(k), float(np.sum(ws[hit]))))
    if not found:
        raise QueryError(f"path hops {g.nodes[b[0]].name} <- {g.nodes[a[0]].name} are not joined by "
                         f"one op in this graph; were the paths computed on another graph, or without "
                         f"include_views=True?")
    if w_path is None or len(found) == 1:
        return found[0]
    return min(found, key=lambda kw: abs(kw[1] - w_path))


def write_json(g, out_path, *, overwrite=False, **kw):
    """Write :func:`to_json` ``(g, **kw)`` to ``out_path``; returns the dict written.

    Raises :class:`QueryError` if ``out_path`` exists and ``overwrite`` is false.
    """
    from .report import _write_atomically, check_report_output
    out_path = check_report_output(out_path, overwrite)
    data = to_json(g, **kw)
    _write_atomically(out_path, json.dumps(data))
    return data
