"""Graphviz diagrams of gradient paths: the union of the hops of some paths, drawn with pydot.

Each path runs from the sink (the explained scalar) down to a source element. The diagram shows
the union of the paths' scalar hops as boxes and every consecutive hop pair as an edge from the
input element to the element computed from it (the direction of the forward computation), labelled
with its local derivative. Each path has its own colour; an edge shared by several paths carries
all their colours side by side. Edge width grows with log |path weight| of its best path. The sink
is a double octagon, source elements are inverted houses.

``collapse`` chooses what one box stands for:

``"none"``
    one scalar element (op, module path, tensor shape, element index);
``"op"``
    one tensor: every element of it that the paths visit (listed in the label);
``"module"``
    a run of consecutive hops inside one module (the innermost module path), so a path through a
    12-layer BERT is a few dozen boxes. A module is one box however often the paths enter it (a
    path that leaves a module and comes back shows a loop). The label gives the hop count and
    the product of the local derivatives inside the run.

Sink and sources always keep their own box. Transparent data-movement hops (view, permute, ...)
are dropped unless ``include_views=True``; the edge across them carries the product of the local
derivatives it spans. Node ids are ``n0, n1, ...``; names (which contain ``.`` and ``:``) only go
into quoted labels.
"""
from __future__ import annotations

import math
import numbers
import os
import shutil
import warnings

import numpy as np
import pydot

from ..errors import GradGraphError, QueryError

__all__ = ["to_dot", "render", "check_output", "format_weight", "GraphvizNotFoundError", "IMAGE_FORMATS", "PATH_COLORS"]

#: Output formats of :func:`render`; all but ``"dot"`` need the Graphviz ``dot`` program.
IMAGE_FORMATS = ("svg", "png", "pdf", "dot")

#: One colour per path rank (colour-blind safe "tab10"-like palette), cycled beyond ten paths.
PATH_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
               "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")

_COLLAPSE = ("module", "op", "none")


class GraphvizNotFoundError(GradGraphError):
    """Rendering an image needs the Graphviz ``dot`` program, which is not installed."""


def _esc(text):
    """Text for a quoted DOT label: backslashes doubled so only our own ``\\n`` break lines."""
    return str(text).replace("\\", "\\\\")


def _fmt(w):
    return f"{w:.3g}"


def format_weight(weight, log_abs_weight, sign, digits=4):
    """A path weight as text, also when it under- or overflows float64: then it is written from
    its exact ``log |w|`` and sign, e.g. ``-5.076e-435``."""
    if (weight != 0.0 and math.isfinite(weight)) or log_abs_weight is None \
            or not math.isfinite(log_abs_weight):
        return f"{weight:.{digits}g}"
    e10 = log_abs_weight / math.log(10)
    exp = math.floor(e10)
    mant = 10 ** (e10 - exp)
    if round(mant, digits - 1) >= 10:      # 9.99995 -> 10.00: carry into the exponent
        mant, exp = mant / 10, exp + 1
    return f"{'-' if sign < 0 else ''}{mant:.{digits}g}e{exp:+04d}"


def _path_weight_text(p):
    return format_weight(p.weight, p.log_abs_weight, p.sign)


class _Hop:
    """A hop resolved against the graph: tensor node index, flat index, the tensor node."""

    __slots__ = ("node_id", "flat", "index", "node", "hop")

    def __init__(self, g, hop):
        nid = hop.node_id if hop.node_id >= 0 else g.node_index(hop.node)
        node = g.nodes[nid]
        index = tuple(int(i) for i in hop.index)
        flat = hop.flat_index if hop.flat_index >= 0 else (
            int(np.ravel_multi_index(index, node.shape)) if node.shape else 0)
        self.node_id, self.flat, self.index, self.node, self.hop = nid, int(flat), index, node, hop


def _chain_weight(g, src, dst):
    """d dst / d src for scalar hops joined through transparent view nodes only (a path that was
    reported without its view hops); searched in the graph, so it needs no stored weights."""
    stack = [(src.node_id, src.flat, 1.0)]
    while stack:
        nid, j, w = stack.pop()
        for k in g.out_edges[nid]:
            e = g.edges[k]
            rows, ws = e.jac.out_edges(j)
            for r, wr in zip(rows.tolist(), ws.tolist()):
                if e.dst == dst.node_id and r == dst.flat:
                    return w * wr
                if g.nodes[e.dst].is_view and e.dst < dst.node_id:
                    stack.append((e.dst, r, w * wr))
    raise QueryError(f"path hops {dst.node.name}{list(dst.index)} <- {src.node.name}{list(src.index)} "
                     f"are not joined by one op in this graph; were the paths computed on another graph?")


def _shown_hops(g, p, include_views):
    """(hops, weights): the hops to draw, sink first, and the local derivative between each
    consecutive pair (products across hidden view hops)."""
    hops = [_Hop(g, h) for h in p.hops]
    aligned = len(p.edge_weights) == len(hops) - 1
    shown, weights, carry = [hops[0]], [], 1.0
    for t in range(1, len(hops)):
        h = hops[t]
        w = p.edge_weights[t - 1] if aligned else None
        hidden = h.node.is_view and not include_views and h.node.role == "op" and t < len(hops) - 1
        if w is None:
            if hidden:
                continue
            w = _chain_weight(g, h, shown[-1])
            carry = 1.0
        if hidden:
            carry *= w
            continue
        weights.append(carry * w)
        carry = 1.0
        shown.append(h)
    return shown, weights


def _box_key(h, collapse):
    role = h.node.role
    if role in ("sink", "source") or collapse == "none":
        return ("el", h.node_id, h.flat)
    if collapse == "op":
        return ("tensor", h.node_id)
    return ("module", h.node.module)


def _scalar_label(h):
    n = h.node
    head = f"{n.name}" if n.role == "source" else n.op_name
    lines = [head]
    if n.module and n.role != "source":
        lines.append(n.module)
    lines.append(f"{list(n.shape)} {list(h.index)}")
    if n.role == "sink":
        lines.insert(0, "sink" if n.value is None else f"sink = {float(np.asarray(n.value).reshape(-1)[0]):.4g}")
    return lines


def to_dot(g, paths, collapse="module", include_views=False, max_nodes=200, title=None,
           path_classes=False):
    """A Graphviz diagram (a :class:`pydot.Dot`) of the union of ``paths``.

    Parameters
    ----------
    g : GradGraph
        The graph the paths were computed on (for shapes, modules and view detection).
    paths : list[Path]
        Best first, e.g. ``g.top_paths(k=5, include_views=True)``; rank ``i`` gets colour
        ``PATH_COLORS[i % 10]``. Paths without their view hops work too.
    collapse : {"module", "op", "none"}
        What one box stands for (see the module docstring).
    include_views : bool
        Draw transparent data-movement hops (only possible if the paths contain them).
    max_nodes : int
        Cap on boxes, at least 3 (the sink, the source and an ellipsis). Paths are added best first while they fit; a path that does not fit alone
        is cut short with a "... hops not shown" box. Either way a note box and a
        :class:`UserWarning` say what was left out.
    title : str, optional
        Graph label; default names the sink and its value.
    path_classes : bool
        Give every box and edge the SVG classes of the paths through it (``path1 path3``, ranks
        from 1), so that a page showing the SVG can highlight one path.

    Returns
    -------
    pydot.Dot
        Edges point from input element to output element; edge ``label`` is the local
        derivative d(output)/d(input) (several values, ``/``-separated, when collapsed boxes
        join different element pairs).

    Raises
    ------
    QueryError
        Unknown ``collapse``, no paths, ``max_nodes`` below 3, or hops that are not in ``g``.
    """
    if collapse not in _COLLAPSE:
        raise QueryError(f"unknown collapse {collapse!r}; use one of {', '.join(_COLLAPSE)}")
    paths = list(paths)
    if not paths:
        raise QueryError("no paths to draw; pass e.g. g.top_paths(k=5)")
    if isinstance(max_nodes, bool) or not isinstance(max_nodes, numbers.Integral) or max_nodes < 3:
        raise QueryError(f"max_nodes must be an integer >= 3 (a sink, a source and an ellipsis); "
                         f"got {max_nodes!r}")
    max_nodes = int(max_nodes)

    boxes = {}          # key -> {"hops": [...], "ranks": [...], "inner": {rank: product inside the box}}
    edges = {}          # (key_src, key_dst) -> {rank: [weights]}
    notes = []
    drawn = 0
    for rank, p in enumerate(paths):
        hops, ws = _shown_hops(g, p, include_views)
        keys = [_box_key(h, collapse) for h in hops]
        new = len(set(keys) - set(boxes))
        truncated = 0
        if len(boxes) + new > max_nodes:
            if rank > 0:
                notes.append(f"{len(paths) - rank} of {len(paths)} paths not drawn (max_nodes={max_nodes})")
                break
            # the best path alone is too long: keep its start, an ellipsis box, and its source
            keep = max_nodes - 2
            truncated = len(hops) - keep - 1
            hops, keys, ws = hops[:keep] + hops[-1:], keys[:keep] + keys[-1:], ws[:keep - 1] + [None]
            notes.append(f"path 1 cut short: {truncated} of {len(p.hops)} hops not shown "
                         f"(max_nodes={max_nodes}; try collapse='module')")
        drawn += 1
        for t, (h, key) in enumerate(zip(hops, keys)):
            box = boxes.setdefault(key, {"hops": [], "ranks": [], "inner": {}})
            if h.flat not in [x.flat for x in box["hops"] if x.node_id == h.node_id]:
                box["hops"].append(h)
            if rank not in box["ranks"]:
                box["ranks"].append(rank)
            if t == 0:
                continue
            w = ws[t - 1]
            if key == keys[t - 1]:          # inside one collapsed box
                box["inner"][rank] = box["inner"].get(rank, 1.0) * w
                continue
            if truncated and t == len(hops) - 1:
                edges.setdefault((key, ("ellipsis",)), {})
                edges.setdefault((("ellipsis",), keys[t - 1]), {})
                continue
            # forward direction: the hop nearer the source feeds the one nearer the sink
            edges.setdefault((key, keys[t - 1]), {}).setdefault(rank, []).append(w)
    for n in notes:
        warnings.warn(f"to_dot: {n}", UserWarning, stacklevel=2)

    sink = g.sink_node
    label = title if title is not None else (
        f"top {drawn} gradient path{'s' if drawn != 1 else ''} of {sink.name} = {g.sink_value:.4g}"
        f"  (collapse={collapse}, granularity={g.granularity})")
    dot = pydot.Dot("gradgraph", graph_type="digraph", rankdir="BT", labelloc="t",
                    label=_esc(label), fontname="Helvetica", fontsize="12", nodesep="0.25",
                    ranksep="0.35")
    dot.set_node_defaults(shape="box", style="rounded,filled", fillcolor="#f7f7f7",
                          fontname="Helvetica", fontsize="10", color="#555555")
    dot.set_edge_defaults(fontname="Helvetica", fontsize="9", arrowsize="0.6")

    ids = {}
    for key, box in boxes.items():
        ids[key] = f"n{len(ids)}"
        h0 = box["hops"][0]
        attrs = {}
        if key[0] == "el":
            lines = _scalar_label(h0)
        elif key[0] == "tensor":
            n = h0.node
            lines = [n.op_name] + ([n.module] if n.module else []) + [f"{list(n.shape)}"]
            idx = [list(h.index) for h in box["hops"]]
            lines.append(" ".join(str(i) for i in idx[:4]) + (f" (+{len(idx) - 4})" if len(idx) > 4 else ""))
        else:
            ops = []
            for h in box["hops"]:
                if h.node.op_name not in ops:
                    ops.append(h.node.op_name)
            lines = [key[1] or "<top level>", f"{len(box['hops'])} hop{'s' if len(box['hops']) != 1 else ''}: "
                     + ", ".join(ops[:5]) + (" ..." if len(ops) > 5 else "")]
            inner = [box["inner"][r] for r in box["ranks"] if r in box["inner"]]
            if inner:
                lines.append("inside: x" + " / x".join(_fmt(w) for w in inner[:3]))
        role = h0.node.role
        if role == "sink":
            attrs.update(shape="doubleoctagon", fillcolor="#fde0dd", style="filled")
        elif role == "source":
            attrs.update(shape="invhouse", fillcolor="#deebf7", style="filled")
        if path_classes:
            attrs["class"] = _path_classes(box["ranks"])
        dot.add_node(pydot.Node(ids[key], label="\\n".join(_esc(s) for s in lines), **attrs))
    if any(k == ("ellipsis",) for pair in edges for k in pair):
        ids[("ellipsis",)] = f"n{len(ids)}"
        dot.add_node(pydot.Node(ids[("ellipsis",)], label="...", shape="plaintext", style=""))

    logs = [p.log_abs_weight for p in paths[:drawn]]
    lo, hi = (min(logs), max(logs)) if logs else (0.0, 0.0)

    def width(rank):
        x = paths[rank].log_abs_weight
        if not math.isfinite(x) or not math.isfinite(lo) or hi == lo:
            return 3.0
        return 1.0 + 3.0 * (x - lo) / (hi - lo)

    for (a, b), per_rank in edges.items():
        ranks = sorted(per_rank)
        attrs = {}
        if ranks:
            attrs["color"] = ":".join(PATH_COLORS[r % len(PATH_COLORS)] for r in ranks)
            if path_classes:
                attrs["class"] = _path_classes(ranks)
            attrs["penwidth"] = f"{max(width(r) for r in ranks):.2f}"
            vals = []
            for r in ranks:
                for w in per_rank[r]:
                    if _fmt(w) not in vals:
                        vals.append(_fmt(w))
            # leading spaces keep the text clear of wide multi-colour edges
            attrs["label"] = "  " + " / ".join(vals[:3]) + (" ..." if len(vals) > 3 else "")
        else:
            attrs.update(style="dashed", color="#999999")
        dot.add_edge(pydot.Edge(ids[a], ids[b], **attrs))

    rows = "".join(
        f'<tr><td><font color="{PATH_COLORS[r % len(PATH_COLORS)]}">&#9644;&#9644;</font></td>'
        f'<td align="left">#{r + 1}</td><td align="right">{_path_weight_text(paths[r])}</td>'
        f'<td align="left">{_html(paths[r].source[0])} {list(paths[r].source[1])}</td></tr>'
        for r in range(drawn))
    legend = ('<<table border="0" cellborder="0" cellspacing="1"><tr><td colspan="4"><b>path, weight, '
              f'source</b></td></tr>{rows}</table>>')
    dot.add_node(pydot.Node("legend", label=legend, shape="box", style="rounded", color="#bbbbbb"))
    if notes:
        dot.add_node(pydot.Node("note", label="\\n".join(_esc(n) for n in notes), shape="note",
                                fillcolor="#fff7bc", style="filled"))
    return dot


def _path_classes(ranks):
    """SVG classes naming the paths through a box or edge (``path1 path3``: ranks from 1), so that
    a page showing the SVG can highlight one path (see :mod:`gradgraph.export.report`)."""
    return " ".join(f"path{r + 1}" for r in sorted(ranks))


def _html(text):
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def check_output(out_path, format=None, *, overwrite=False):
    """The output format for ``out_path`` (from ``format`` or the suffix), after checking that it
    can be written: a known format, no existing file unless ``overwrite``, Graphviz for images.
    :func:`render` calls it first; callers may call it before any costly work."""
    out_path = os.fspath(out_path)
    fmt = (format or os.path.splitext(out_path)[1].lstrip(".")).lower()
    if fmt == "gv":
        fmt = "dot"
    if fmt not in IMAGE_FORMATS:
        raise QueryError(f"unknown image format {fmt or '(no suffix)'!r} for {out_path!r}; "
                         f"use one of: {', '.join('.' + f for f in IMAGE_FORMATS)}")
    if os.path.exists(out_path) and not overwrite:
        raise QueryError(f"{out_path} exists; pass overwrite=True (command line: --overwrite) to replace it")
    if fmt != "dot" and shutil.which("dot") is None:
        raise GraphvizNotFoundError(
            f"rendering .{fmt} needs the Graphviz 'dot' program, which is not on PATH; install it "
            f"(apt-get install graphviz, brew install graphviz, conda install graphviz) or write "
            f".dot output instead, which needs no Graphviz")
    return fmt


def render(g, paths, out_path, format=None, *, overwrite=False, **kw):
    """Draw ``paths`` with :func:`to_dot` and write the diagram to ``out_path``.

    Parameters
    ----------
    format : {"svg", "png", "pdf", "dot"}, optional
        Default: from the file suffix. ``"dot"`` writes the DOT text and needs no Graphviz.
    overwrite : bool
        Replace an existing file (otherwise a :class:`QueryError`).
    **kw
        Passed to :func:`to_dot` (``collapse``, ``include_views``, ``max_nodes``, ``title``).

    Returns
    -------
    str
        ``out_path``.

    Raises
    ------
    QueryError
        Unknown format, or ``out_path`` exists and ``overwrite`` is false.
    GraphvizNotFoundError
        An image was asked for but the Graphviz ``dot`` program is not installed.
    """
    out_path = os.fspath(out_path)
    fmt = check_output(out_path, format, overwrite=overwrite)
    dot = to_dot(g, paths, **kw)
    if fmt == "dot":
        data = dot.to_string().encode()
    else:
        try:
            data = dot.create(prog="dot", format=fmt)
        except Exception as exc:   # pydot raises bare exceptions with Graphviz's stderr in them
            raise GradGraphError(f"Graphviz failed to render {out_path}: {str(exc).strip().splitlines()[0]}") \
                from exc
    with open(out_path, "wb") as f:
        f.write(data)
    return out_path
