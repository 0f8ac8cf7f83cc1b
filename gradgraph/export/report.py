"""One self-contained, interactive HTML report of a gradient graph.

:func:`report` writes a single HTML file that opens offline in any browser: plotly's JavaScript
and the Graphviz SVG are inlined, nothing is fetched. Sections:

* **summary** -- model, sink and its value, sources, entropy, the graph's provenance (``g.meta``);
* **top paths** -- the k best paths as a list beside the module-collapsed diagram of
  :func:`~gradgraph.export.dot.to_dot`; selecting a path highlights its boxes and edges (the SVG
  elements carry the classes ``path1``, ``path2``, ...) and shows its hops (module, op, element
  index, local derivative);
* **tokens** -- for every token input (a source made by an embedding lookup, shaped
  ``(..., tokens, hidden)``): gradient x input summed over the hidden units, the value of the best
  path ending at the token and the entropy of the paths ending at it, as heat strips;
* **layers** -- a layer x component heatmap of gradient flow and the branch that carries the best
  path through each token at each layer's input (the paper's Fig. 4), for models whose module paths
  number their layers and name their branches (see :func:`layer_structure`);
* **path lengths** -- the |gradient| mass of the paths by length.

Every plot is a plotly figure; hovering a cell shows its exact number. The page is light to open:
plotly.js and the figures (one compact JSON object) are inlined as inert text, and the page runs
plotly and draws the figures one by one after its load event (``window.gradgraphReport.drawn``
is then the time in milliseconds from navigation start), so the summary, the path list and the
diagram show at once.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
import warnings

import numpy as np

from ..errors import GradGraphError, QueryError
from .dot import PATH_COLORS, _shown_hops, format_weight, to_dot

__all__ = ["report", "report_html", "layer_structure", "token_sources", "Layer", "CONTRACTION_OPS",
           "SOFTMAX_OPS"]

#: ATen ops whose output is taken as the output of a component (its last linear map).
CONTRACTION_OPS = frozenset({"addmm", "mm", "bmm", "matmul", "linear", "baddbmm", "convolution", "einsum"})

#: Ops whose 4-d output (batch, heads, queries, keys) are the attention weights of each head.
SOFTMAX_OPS = frozenset({"_softmax", "softmax", "_safe_softmax"})


# ============================================================================ model structure
class Layer:
    """One numbered block of a model (``bert.encoder.layer.3``, ``transformer.h.3``) as seen in
    the graph.

    Attributes
    ----------
    prefix : str
        Its module path.
    input : int or None
        Node index of the tensor entering the block (the residual stream), or None.
    attention, mlp : int or None
        Node index of the output of the attention and MLP sublayers: the last contraction (linear
        map) whose module path inside the block has a part naming attention (containing ``attn`` or
        ``attention``), or any other part, respectively.
    softmax : list[int]
        Node indices of the attention weights, shaped (batch, heads, queries, keys).
    """

    def __init__(self, prefix):
        self.prefix = prefix
        self.input = None
        self.attention = None
        self.mlp = None
        self.softmax = []
        self.first = None      # its first non-view op


def _layer_prefix(module):
    """``bert.encoder.layer.3.attention.self`` -> (``bert.encoder.layer.3``, ``attention.self``):
    the module path cut after its first numbered part, if anything follows it."""
    if not module or module.startswith("<"):
        return None, None
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return (".".join(parts[:i + 1]), ".".join(parts[i + 1:])) if i + 1 < len(parts) else (None, None)
    return None, None


def _is_attention(rest):
    return any("attn" in p.lower() or "attention" in p.lower() for p in rest.split("."))


def layer_structure(g):
    """The numbered blocks of ``g`` that hold an attention or MLP sublayer, in forward order.

    Found from module paths only: a block is a module path up to its first numbered part; within
    it, contractions under a part naming attention belong to the attention sublayer, the others to
    the MLP. Models whose module paths number no blocks give an empty list.

    Returns
    -------
    list[Layer]
    """
    layers = {}
    for i, n in enumerate(g.nodes):
        prefix, rest = _layer_prefix(n.module)
        if prefix is None or n.role != "op":
            continue
        layer = layers.setdefault(prefix, Layer(prefix))
        if n.is_view:
            continue
        if layer.first is None:
            layer.first = i
        if n.op_name in CONTRACTION_OPS:
            if _is_attention(rest):
                layer.attention = i
            else:
                layer.mlp = i
        if n.op_name in SOFTMAX_OPS and len(n.shape) == 4 and _is_attention(rest):
            layer.softmax.append(i)
    out = [lay for lay in layers.values() if lay.first is not None
           and (lay.attention is not None or lay.mlp is not None)]
    for lay in out:
        lay.input = _block_input(g, lay)
    return out


def _block_input(g, layer):
    """The non-view tensor outside the block that its first op reads (looking back through
    views), or None."""
    u = layer.first
    while True:
        prev = [g.edges[k].src for k in g.in_edges[u]]
        if not prev:
            return None if u == layer.first else u
        u = prev[0]
        n = g.nodes[u]
        if not n.is_view and _layer_prefix(n.module)[0] != layer.prefix:
            return u


def token_sources(g):
    """``{source name: token axis}`` of the sources made by an embedding lookup with at least two
    dimensions: ``(..., tokens, hidden)``, so the token axis is the second to last."""
    out = {}
    for name, i in g.sources.items():
        n = g.nodes[i]
        if n.op_name == "embedding" and len(n.shape) >= 2:
            out[name] = len(n.shape) - 2
    return out


def _per_axis(arr, axis, reduce=np.sum):
    arr = np.asarray(arr, dtype=float)
    return reduce(arr, axis=tuple(a for a in range(arr.ndim) if a != axis))


def _token_labels(g, tokens, count):
    """(token strings for ``count`` positions, whether they were given): from ``tokens``, else
    from ``g.meta["tokens"]``, else the positions."""
    given = tokens if tokens is not None else g.meta.get("tokens")
    if given is None:
        return [str(i) for i in range(count)], False
    given = [str(t) for t in given]
    if len(given) != count:
        raise QueryError(f"{len(given)} token labels given for {count} token positions; "
                         f"pass one label per token")
    return given, True


# ============================================================================ figures
def _plotly():
    try:
        import plotly.graph_objects as go
        import plotly.offline
    except ImportError as exc:   # pragma: no cover - plotly is a dependency
        raise GradGraphError("the HTML report needs plotly: pip install plotly jinja2") from exc
    return go, plotly.offline


class _Figures:
    """The page's plotly figures, drawn by the page after its load event (see the template).

    :meth:`add` returns an empty ``<div>`` of the figure's height (so the page does not jump when
    the figure appears); :meth:`json` gives every figure's data and layout as one compact JSON
    object, with plotly's layout template, which is the same for every figure, stored once."""

    CONFIG = {"displaylogo": False, "displayModeBar": False, "responsive": True}

    def __init__(self):
        self.figures, self.template = {}, None

    def add(self, fig, div_id):
        spec = fig.to_plotly_json()
        self.template = spec["layout"].pop("template", self.template)
        self.figures[div_id] = spec
        height = spec["layout"].get("height") or 450
        return f'<div class="plot" id="{div_id}" style="height: {int(height)}px"></div>'

    def json(self):
        from plotly.io.json import to_json_plotly
        # to_json_plotly escapes "/" (as \u002f), so the text cannot close its <script> element
        return to_json_plotly({"template": self.template, "config": self.CONFIG, "figures": self.figures})


def _heat_strip(go, values, labels, title, colorscale, zmid=None, fmt=".4g"):
    x = list(range(len(values)))
    text = [[f"{lab}" for lab in labels]]
    fig = go.Figure(go.Heatmap(
        z=[[None if not math.isfinite(v) else float(v) for v in values]], x=x, y=[title],
        text=text, colorscale=colorscale, zmid=zmid, xgap=1,
        hovertemplate="token %{text} (position %{x})<br>" + title + " = %{z:" + fmt + "}<extra></extra>",
        colorbar=dict(thickness=10, len=1.0)))
    fig.update_layout(height=130, margin=dict(l=170, r=20, t=10, b=40),
                      xaxis=dict(tickmode="array", tickvals=x, ticktext=labels, tickangle=-60 if len(x) > 20 else 0),
                      yaxis=dict(automargin=True))
    return fig


def _flow_figure(go, rows, cols, z, Z):
    zf = [[None if v is None else v / Z if Z > 0 else 0.0 for v in r] for r in z]
    text = [[("n/a" if v is None else f"{v:.6g}") for v in r] for r in z]
    fig = go.Figure(go.Heatmap(
        z=zf, x=cols, y=rows, text=text, colorscale="Viridis", xgap=1, ygap=1,
        hovertemplate="%{y}, %{x}<br>flow %{text}<br>fraction of all |gradient| %{z:.4g}<extra></extra>",
        colorbar=dict(title=dict(text="flow / Z"), thickness=10)))
    fig.update_layout(height=max(220, 32 * len(rows) + 120), margin=dict(l=200, r=20, t=10, b=60),
                      yaxis=dict(autorange="reversed", type="category"), xaxis=dict(type="category"))
    return fig


def _branch_figure(go, layers, names, best, values, labels):
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
               "#17becf", "#bcbd22", "#7f7f7f"]
    n = max(len(names), 1)
    # a discrete colour scale: category c occupies [c/n, (c+1)/n]
    scale = []
    for c in range(n):
        col = palette[c % len(palette)]
        scale += [[c / n, col], [(c + 1) / n, col]]
    x = list(range(len(labels)))
    text = [[("no path" if b < 0 else f"{names[b]}: best path {v:.6g}") for b, v in zip(rb, rv)]
            for rb, rv in zip(best, values)]
    fig = go.Figure(go.Heatmap(
        z=[[None if b < 0 else b + 0.5 for b in rb] for rb in best], x=x, y=layers, text=text,
        zmin=0, zmax=n, colorscale=scale, xgap=1, ygap=1,
        customdata=[[labels[i] for i in x] for _ in layers],
        hovertemplate="%{y}, token %{customdata} (position %{x})<br>%{text}<extra></extra>",
        colorbar=dict(thickness=10, tickvals=[c + 0.5 for c in range(n)], ticktext=names)))
    fig.update_layout(height=max(220, 32 * len(layers) + 120), margin=dict(l=200, r=20, t=10, b=60),
                      yaxis=dict(autorange="reversed", type="category"),
                      xaxis=dict(tickmode="array", tickvals=x, ticktext=labels,
                                 tickangle=-60 if len(x) > 20 else 0))
    return fig


def _lengths_figure(go, mass):
    Z = float(np.sum(mass))
    x = [i for i, m in enumerate(mass) if m > 0]
    y = [float(mass[i]) / Z if Z > 0 else 0.0 for i in x]
    fig = go.Figure(go.Bar(x=x, y=y, customdata=[float(mass[i]) for i in x],
                           hovertemplate="length %{x}<br>|gradient| mass %{customdata:.6g}<br>"
                                         "fraction %{y:.4g}<extra></extra>"))
    fig.update_layout(height=300, margin=dict(l=60, r=20, t=10, b=50), yaxis=dict(type="log", title="fraction of Z"),
                      xaxis=dict(title="path length (non-view hops)"))
    return fig


# ============================================================================ sections
def _branch_name(label):
    """``"addmm @ bert.encoder.layer.0.attention.self.key"`` -> ``"key"``; a residual add -> ``"skip"``."""
    op, _, module = label.partition(" @ ")
    return "skip" if op == "add" else (module.rsplit(".", 1)[-1] or op)


def _layers_section(g, go, layers, flows, Z, best_branches, token_labels):
    if not layers:
        return None
    node_flow = {i: float(np.sum(flows[g.nodes[i].name])) for lay in layers
                 for i in [lay.input, lay.attention, lay.mlp] + lay.softmax if i is not None}
    heads = max((g.nodes[s].shape[1] for lay in layers for s in lay.softmax), default=0)
    cols = [f"head {h}" for h in range(heads)] + ["attention", "attention skip", "MLP", "MLP skip"]
    z = []
    for lay in layers:
        row = [None] * heads
        for s in lay.softmax:
            per_head = _per_axis(flows[g.nodes[s].name], 1)
            for h, v in enumerate(per_head):
                row[h] = (row[h] or 0.0) + float(v)
        through = node_flow.get(lay.input)
        for comp in (lay.attention, lay.mlp):
            f = node_flow.get(comp)
            row.append(f)
            # the paths through the block that go around this sublayer (its residual connection);
            # clipped at 0 against rounding
            row.append(None if f is None or through is None else max(through - f, 0.0))
        z.append(row)
    names = [lay.prefix for lay in layers]
    flow_fig = _flow_figure(go, names, cols, z, Z)

    # the paper's Fig. 4: the branch carrying the best path through each token at each block input
    branch = None
    rows, best_rows, value_rows, cats = [], [], [], []
    for lay in layers:
        if lay.input is None or len(g.nodes[lay.input].shape) < 2:
            continue
        br = best_branches[g.nodes[lay.input].name]
        vals = br.values
        bnames = [_branch_name(lab) for lab in br.labels]
        for nm in bnames:
            if nm not in cats:
                cats.append(nm)
        rows.append(lay.prefix)
        best_rows.append([cats.index(bnames[b]) if b >= 0 else -1 for b in br.best])
        value_rows.append([float(vals[t, b]) if b >= 0 else float("nan") for t, b in enumerate(br.best)])
    if rows:
        width = max(len(r) for r in best_rows)
        labels = token_labels(width)
        branch = _branch_figure(go, rows, cats, best_rows, value_rows, labels)
    return {"flow": flow_fig, "branch": branch, "layers": names, "components": cols}


def _all_branches(g, queries):
    """``{node name: Branches}`` for ``(node name, token axis)`` queries: one pair of max passes
    per distinct axis (in practice one), not one per node."""
    by_axis = {}
    for name, axis in queries:
        by_axis.setdefault(axis, []).append(name)
    out = {}
    for axis, names in by_axis.items():
        names = list(dict.fromkeys(names))
        out.update(zip(names, g.branches(names, groups=axis)))
    return out


def _summary(g, entropy, source_file):
    sink = g.sink_node
    rows = [("model", g.meta.get("model", "(not recorded)")),
            ("sink", f"{sink.name} = {g.sink_value:.6g}" + (f"  [{sink.module}]" if sink.module else "")),
            ("sources", "; ".join(f"{name} {list(g.nodes[i].shape)} {g.nodes[i].dtype}"
                                  for name, i in g.sources.items())),
            ("entropy of the path distribution", f"{entropy:.6g} nats"),
            ("graph", f"{len(g.nodes)} tensors, {len(g.edges)} Jacobians, "
                      f"{sum(n.numel for n in g.nodes):,} scalars, granularity {g.granularity}")]
    if source_file:
        rows.append(("file", str(source_file)))
    for key, value in g.meta.items():
        if key not in ("model", "tokens"):
            rows.append((f"meta: {key}", str(value)))
    return rows


def _paths_section(g, paths):
    items = []
    for r, p in enumerate(paths, 1):
        hops, ws = _shown_hops(g, p, False)
        rows = []
        for t, h in enumerate(hops):
            n = h.node
            rows.append({"module": n.module if n.role != "source" else n.name,
                         "op": n.op_name if n.role != "source" else "source",
                         "index": str(list(h.index)),
                         "derivative": "" if t == 0 else f"{ws[t - 1]:.6g}"})
        items.append({"rank": r, "color": PATH_COLORS[(r - 1) % len(PATH_COLORS)],
                      "weight": format_weight(p.weight, p.log_abs_weight, p.sign, digits=6),
                      "source": f"{p.source[0]} {list(p.source[1])}", "length": p.length,
                      "hops": rows})
    return items


def _diagram(g, paths):
    """(inline SVG text or None, notes)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        dot = to_dot(g, paths, collapse="module", path_classes=True)
    notes = [" ".join(str(w.message).split()) for w in caught]
    if shutil.which("dot") is None:
        return None, notes + ["the diagram needs the Graphviz 'dot' program, which is not installed"]
    try:
        svg = dot.create(prog="dot", format="svg").decode("utf-8")
    except Exception as exc:    # pydot raises bare exceptions with Graphviz's stderr in them
        return None, notes + [f"Graphviz failed: {str(exc).strip().splitlines()[0]}"]
    return svg[svg.index("<svg"):], notes


def _entropies(g, flows):
    """(entropy of all paths, ``{token source: entropy per token}``) from one entropy pass.

    The pass is asked for the entropy of each group of source elements (a token's hidden units;
    all of a source that is not a token input), and the total follows by the chain rule of
    entropy: with p_G = Z_G / Z the share of the |gradient| mass ending in group G (its flow),
    H = sum_G p_G H_G - sum_G p_G log p_G."""
    tok = token_sources(g)
    groups = {name: tok.get(name, np.zeros(g.nodes[i].shape, dtype=np.int64)) for name, i in g.sources.items()}
    H = g.entropy(groups=groups)
    mass = {name: (_per_axis(flows[g.nodes[i].name], tok[name]) if name in tok
                   else np.array([float(np.sum(flows[g.nodes[i].name]))])) for name, i in g.sources.items()}
    Z = sum(float(np.sum(m)) for m in mass.values())
    if not Z > 0:
        return math.nan, {name: np.asarray(H[name], dtype=float) for name in tok}
    total = 0.0
    for name in g.sources:
        p = mass[name] / Z
        live = p > 0
        total += float(np.sum(p[live] * np.asarray(H[name], dtype=float)[live]) - np.sum(p[live] * np.log(p[live])))
    return total, {name: np.asarray(H[name], dtype=float) for name in tok}


def _tokens_section(g, go, figures, tokens, best_branches, entropies):
    grads = None
    out = []
    for name, axis in token_sources(g).items():
        node = g.nodes[g.sources[name]]
        count = node.shape[axis]
        labels, given = _token_labels(g, tokens, count)
        if grads is None:
            grads = g.gradient()
        gxi = _per_axis(grads[name].double().numpy() * np.asarray(node.value, dtype=float), axis)
        br = best_branches[name]
        vals = br.values
        best = [float(vals[t, b]) if b >= 0 else float("nan") for t, b in enumerate(br.best)]
        H = entropies[name]
        figs = [figures.add(_heat_strip(go, gxi, labels, "gradient x input", "RdBu_r", zmid=0.0), f"tok-gxi-{len(out)}"),
                figures.add(_heat_strip(go, best, labels, "best path value", "RdBu_r", zmid=0.0), f"tok-best-{len(out)}"),
                figures.add(_heat_strip(go, H, labels, "entropy (nats)", "Viridis"), f"tok-entropy-{len(out)}")]
        out.append({"name": name, "shape": list(node.shape), "labels_given": given, "figures": figs,
                    "labels": labels})
    return out


class _Timer:
    """``with timed(name): ...`` adds (CPU seconds, wall seconds) of the block to ``timings[name]``
    (nothing when ``timings`` is None)."""

    def __init__(self, timings):
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, name):
        if self.timings is None:
            yield
            return
        t = os.times()
        c0, w0 = t.user + t.system + t.children_user + t.children_system, time.perf_counter()
        try:
            yield
        finally:
            t = os.times()
            c1 = t.user + t.system + t.children_user + t.children_system
            c, w = self.timings.get(name, (0.0, 0.0))
            self.timings[name] = (c + c1 - c0, w + time.perf_counter() - w0)


# ============================================================================ the report
def report_html(g, k=20, *, order="signed", paths=None, tokens=None, source_file=None, title=None,
                timings=None):
    """The report of :func:`report` as one HTML string (see the module docstring).

    Parameters are those of :func:`report`, and:

    timings : dict, optional
        Filled with ``{section: (CPU seconds, wall seconds)}`` of each step (CPU time of this
        process and of finished child processes, i.e. Graphviz), for ``benchmarks/report.py``.
    """
    from jinja2 import Environment, PackageLoader, select_autoescape

    from ..algorithms.paths import _check_k, _check_order
    _check_order(order)
    go, offline = _plotly()
    timed = _Timer(timings)
    chosen = paths is not None
    if paths is None:
        with timed("top paths"):
            paths = g.top_paths(k=_check_k(k), order=order, include_views=True)
    elif not len(paths):
        raise QueryError("no paths to report; pass e.g. paths=g.top_paths(k=5, include_views=True)")
    k = len(paths)
    with timed("diagram (to_dot and Graphviz)"):
        svg, notes = _diagram(g, paths)
    layers = layer_structure(g)
    with timed("branches (one pair of max passes)"):
        # the branches of every token input and block input share one pair of max passes
        best_branches = _all_branches(g, list(token_sources(g).items()) + [
            (g.nodes[lay.input].name, len(g.nodes[lay.input].shape) - 2) for lay in layers
            if lay.input is not None and len(g.nodes[lay.input].shape) >= 2])
    with timed("flow (one inside-outside pass)"):
        flows = g.flow(by="element")
    with timed("entropy (one pass, per token and total)"):
        entropy, token_entropies = _entropies(g, flows)
    figures = _Figures()
    with timed("gradient and token figures"):
        token_views = _tokens_section(g, go, figures, tokens, best_branches, token_entropies)

    def labels_for(count):
        """Token labels for a block input with ``count`` positions: those of a token input of
        that length, else the positions."""
        return next((tv["labels"] for tv in token_views if len(tv["labels"]) == count),
                    [str(i) for i in range(count)])

    with timed("path lengths (inside and outside polynomial passes met at a cut)"):
        mass = g.path_lengths()
    with timed("layer figures"):
        layers = _layers_section(g, go, layers, flows, float(mass.sum()), best_branches, labels_for)
    del flows
    with timed("HTML (figures' JSON, template)"):
        flow_html = figures.add(layers["flow"], "flow-heatmap") if layers else None
        branch_html = figures.add(layers["branch"], "branch-heatmap") if layers and layers["branch"] else None
        lengths = figures.add(_lengths_figure(go, mass), "path-lengths")
        env = Environment(loader=PackageLoader("gradgraph", "export/templates"),
                          autoescape=select_autoescape(["html", "j2"]))
        page = env.get_template("report.html.j2").render(
            title=title or f"gradgraph report: {g.meta.get('model', 'graph')}",
            plotly_js=offline.get_plotlyjs(), figures_json=figures.json(),
            summary=_summary(g, entropy, source_file),
            paths=_paths_section(g, paths), chosen=chosen, svg=svg, notes=notes, k=k, order=order,
            tokens=token_views, flow_html=flow_html, branch_html=branch_html,
            layer_names=layers["layers"] if layers else [], components=layers["components"] if layers else [],
            lengths_html=lengths)
    return page


def check_report_output(out_path, overwrite=False):
    """Raise :class:`QueryError` unless ``out_path`` can be written (no existing file unless
    ``overwrite``, an existing writable directory)."""
    out_path = os.fspath(out_path)
    if os.path.exists(out_path) and not overwrite:
        raise QueryError(f"{out_path} exists; pass overwrite=True (command line: --overwrite) to replace it")
    parent = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(parent):
        raise QueryError(f"cannot write {out_path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise QueryError(f"cannot write {out_path}: directory {parent} is not writable")
    return out_path


def report(g, out_path, k=20, *, order="signed", paths=None, tokens=None, overwrite=False,
           source_file=None, title=None, timings=None):
    """Write an interactive, self-contained HTML report of ``g`` to ``out_path``.

    Parameters
    ----------
    g : GradGraph
    out_path : str or os.PathLike
        The HTML file to write (opens offline: everything is inlined).
    k : int
        Number of top paths to list and draw (default 20).
    order : {"signed", "magnitude"}
        Order of the top paths (see :meth:`GradGraph.top_paths`).
    paths : list[Path], optional
        Report these paths instead of the top ``k`` (e.g. ``g.top_paths(k=10, source=...,
        include_views=True)``), listed in the order given.
    tokens : list[str], optional
        One label per token position of the token inputs; default ``g.meta["tokens"]`` if the
        graph carries labels, else the positions.
    overwrite : bool
        Replace an existing file (otherwise a :class:`QueryError`).
    source_file : str, optional
        The graph file the report was made from, shown in the summary.
    title : str, optional
    timings : dict, optional
        Filled with the CPU and wall seconds of each step (see :func:`report_html`).

    Returns
    -------
    str
        ``out_path``.

    Examples
    --------
    >>> gg.report(g, "report.html", k=10)            # doctest: +SKIP
    'report.html'
    """
    out_path = check_report_output(out_path, overwrite)
    page = report_html(g, k, order=order, paths=paths, tokens=tokens, source_file=source_file, title=title,
                       timings=timings)
    _write_atomically(out_path, page)
    return out_path


def _write_atomically(out_path, text):
    """Write ``text`` to a temporary file beside ``out_path`` and rename it over ``out_path``, so
    the target is either untouched or complete."""
    tmp = os.fspath(out_path) + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

