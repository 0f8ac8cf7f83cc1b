"""Rich display in Jupyter: a graph and a list of paths show an HTML summary and their diagram.

``GradGraph._repr_html_`` and ``PathList._repr_html_`` call :func:`graph_html` and
:func:`paths_html`; Jupyter calls them on its own when a cell's value is a graph or the result of
``g.top_paths(...)``. The diagram is the module-collapsed SVG of :func:`~gradgraph.export.dot.to_dot`
(omitted, with a note, when Graphviz is not installed).
"""
from __future__ import annotations

import html
import shutil
import warnings

from .dot import PATH_COLORS, format_weight, to_dot

__all__ = ["PathList", "graph_html", "paths_html", "NOTEBOOK_PATHS"]

#: How many top paths the display of a graph draws.
NOTEBOOK_PATHS = 3


class PathList(list):
    """A list of :class:`~gradgraph.algorithms.paths.Path` that remembers its graph, so that
    Jupyter shows it as a table and a diagram. Otherwise an ordinary list."""

    def __init__(self, paths=(), graph=None):
        super().__init__(paths)
        self.graph = graph

    def _repr_html_(self):
        if self.graph is None or not self:
            return None
        return paths_html(self.graph, self)


def _svg(g, paths):
    if shutil.which("dot") is None:
        return '<p><i>(diagram: install Graphviz to see it)</i></p>'
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dot = to_dot(g, paths, collapse="module", path_classes=True)
    try:
        svg = dot.create(prog="dot", format="svg").decode("utf-8")
    except Exception as exc:     # pydot raises bare exceptions with Graphviz's stderr in them
        return f"<p><i>(Graphviz failed: {html.escape(str(exc).strip().splitlines()[0])})</i></p>"
    return '<div style="max-height:600px;overflow:auto">' + svg[svg.index("<svg"):] + "</div>"


def _route(p):
    names = []
    for h in p.hops[1:-1]:
        if h.module and not h.module.startswith("<") and (not names or names[-1] != h.module):
            names.append(h.module)
    if len(names) > 6:
        names = names[:3] + ["..."] + names[-2:]
    return " &larr; ".join(html.escape(n) for n in names)


def paths_html(g, paths):
    """A table of ``paths`` (rank, weight, source, length, route) and their diagram."""
    rows = "".join(
        f'<tr><td style="border-left:6px solid {PATH_COLORS[r % len(PATH_COLORS)]}">#{r + 1}</td>'
        f'<td style="font-family:monospace">{format_weight(p.weight, p.log_abs_weight, p.sign, digits=6)}</td>'
        f'<td>{html.escape(str(p.source[0]))} {list(p.source[1])}</td><td>{p.length}</td>'
        f'<td style="text-align:left">{_route(p)}</td></tr>'
        for r, p in enumerate(paths))
    table = ('<table><tr><th>rank</th><th>weight</th><th>source</th><th>length</th>'
             f'<th style="text-align:left">route (sink &larr; source)</th></tr>{rows}</table>')
    return f"<div>{table}{_svg(g, list(paths))}</div>"


def graph_html(g, k=NOTEBOOK_PATHS):
    """A compact summary of ``g`` (model, sink, sources, size) and the diagram of its top ``k``
    paths."""
    sink = g.sink_node
    rows = [("model", g.meta.get("model", "")),
            ("sink", f"{sink.name} = {g.sink_value:.6g}" + (f" [{sink.module}]" if sink.module else "")),
            ("sources", "; ".join(f"{name} {list(g.nodes[i].shape)}" for name, i in g.sources.items())),
            ("size", f"{len(g.nodes)} tensors, {len(g.edges)} Jacobians, "
                     f"{sum(n.numel for n in g.nodes):,} scalars, granularity {g.granularity}")]
    table = "".join(f'<tr><td style="text-align:left;color:#666">{html.escape(key)}</td>'
                    f'<td style="text-align:left">{html.escape(str(value))}</td></tr>' for key, value in rows)
    paths = g.top_paths(k=k, include_views=True)
    return (f"<div><b>GradGraph</b><table>{table}</table>"
            f"<p>top {len(paths)} gradient paths:</p>{paths_html(g, paths)}</div>")
