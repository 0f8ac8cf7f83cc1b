"""Graphviz diagrams of paths. Paths are found here by brute-force enumeration of the scalar graph
(networkx), independently of the semiring path code, and handed to the exporter."""
import math
import re
import xml.etree.ElementTree as ET

import networkx as nx
import numpy as np
import pydot
import pytest
import torch

import gradgraph as gg
from gradgraph.algorithms.paths import Hop, Path
from gradgraph.export.dot import PATH_COLORS, GraphvizNotFoundError, render, to_dot
from gradgraph.export.nx import to_networkx

SVG = "{http://www.w3.org/2000/svg}"


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.norm = torch.nn.LayerNorm(3)

    def forward(self, x):
        return self.norm(torch.tanh(self.lin(x)) + x)


class TwoBlocks(torch.nn.Module):
    """Two residual blocks, then pure data movement (reshape, permute, select) before the sink."""

    def __init__(self):
        super().__init__()
        self.a, self.b = Block(), Block()

    def forward(self, x):
        h = self.b(self.a(x)).reshape(2, 1, 3).permute(1, 0, 2)
        return h[0, 1, 2] * 3.0


def brute_force_paths(g, k):
    """The k paths of largest |weight|, by enumerating the scalar graph (views included)."""
    G = to_networkx(g, level="scalar")
    found = []
    for name, s in g.sources.items():
        for j in range(g.nodes[s].numel):
            for path in nx.all_simple_edge_paths(G, (s, j), (g.sink, 0)):
                ws = [G.edges[e]["w"] for e in path]
                found.append((abs(math.prod(ws)), [path[0][0]] + [e[1] for e in path], ws))
    found.sort(key=lambda t: -t[0])
    out = []
    for _, scalar_nodes, ws in found[:k]:
        scalar_nodes, ws = scalar_nodes[::-1], ws[::-1]      # sink first
        hops = []
        for nid, flat in scalar_nodes:
            n = g.nodes[nid]
            hops.append(Hop(n.name, tuple(int(i) for i in np.unravel_index(flat, n.shape)) if n.shape else (),
                            n.op, n.module, nid, flat))
        w = math.prod(ws)
        out.append(Path(w, math.log(abs(w)), 1 if w > 0 else -1, (hops[-1].node, hops[-1].index), hops, ws,
                        sum(not g.nodes[h.node_id].is_view for h in hops[1:])))
    return out


def without_views(g, p):
    hops = [h for t, h in enumerate(p.hops)
            if t in (0, len(p.hops) - 1) or not g.nodes[h.node_id].is_view]
    return Path(p.weight, p.log_abs_weight, p.sign, p.source, hops, p.edge_weights, p.length)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(1)
    g = gg.capture(TwoBlocks().double(), (torch.randn(2, 3, dtype=torch.double),))
    return g, brute_force_paths(g, 3)


def parse(dot):
    (d,) = pydot.graph_from_dot_data(dot.to_string())
    nodes = {n.get_name(): n for n in d.get_nodes() if n.get_name() not in ("node", "edge", "graph")}
    return d, nodes


def unq(s):
    return s[1:-1].replace('\\"', '"') if s and s.startswith('"') else s


def expected_union(g, paths, include_views):
    """Shown scalar hops and forward edges (input -> output) with their local derivatives."""
    nodes, edges = set(), {}
    for p in paths:
        keep = [t for t, h in enumerate(p.hops) if include_views or t in (0, len(p.hops) - 1)
                or not g.nodes[h.node_id].is_view]
        for t in keep:
            nodes.add((p.hops[t].node_id, p.hops[t].flat_index))
        for a, b in zip(keep, keep[1:]):
            w = math.prod(p.edge_weights[a:b])
            edges[((p.hops[b].node_id, p.hops[b].flat_index), (p.hops[a].node_id, p.hops[a].flat_index))] = w
    return nodes, edges


def lines(node):
    return unq(node.get_label()).split("\\n")


def check_union(g, paths, dot, include_views):
    d, nodes = parse(dot)
    want_nodes, want_edges = expected_union(g, paths, include_views)
    hop_ids = [n for n in nodes if n != "legend"]
    assert len(hop_ids) == len(want_nodes)
    assert all(re.fullmatch(r"n\d+", n) for n in hop_ids)
    # identify each box by its label: first line op/name, last line "[shape] [index]"
    by_label = {}
    for nid, flat in want_nodes:
        n = g.nodes[nid]
        idx = list(int(i) for i in np.unravel_index(flat, n.shape)) if n.shape else []
        by_label[(nid, flat)] = f"{list(n.shape)} {idx}"
    ids = {}
    for key, tail in by_label.items():
        head = g.nodes[key[0]].name if g.nodes[key[0]].role == "source" else g.nodes[key[0]].op_name
        module = g.nodes[key[0]].module
        match = [n for n, v in nodes.items() if n != "legend" and lines(v)[-1] == tail
                 and head in lines(v) and (not module or module in lines(v))]
        assert len(match) == 1, (key, match)
        ids[key] = match[0]
    got = {(e.get_source(), e.get_destination()): e for e in d.get_edges()}
    assert len(got) == len(want_edges)
    for (a, b), w in want_edges.items():
        e = got[(ids[a], ids[b])]
        assert float(unq(e.get_label()).split(" / ")[0]) == pytest.approx(w, rel=2e-3)
    return d, nodes, ids


def test_brute_force_paths_are_real_paths(setup):
    g, paths = setup
    grad = g.gradient()["x"].numpy().reshape(-1)
    assert all(abs(p.weight) <= np.abs(grad).sum() * 10 for p in paths)   # sanity on the oracle itself
    assert paths[0].hops[0].node_id == g.sink and paths[0].hops[-1].node == "x"


def test_union_no_collapse_with_views(setup):
    g, paths = setup
    check_union(g, paths, to_dot(g, paths, collapse="none", include_views=True), True)


def test_views_hidden_and_spanned(setup):
    g, paths = setup
    d, nodes, ids = check_union(g, paths, to_dot(g, paths, collapse="none"), False)
    assert not any(g.nodes[nid].is_view for nid, _ in ids)
    # the last LayerNorm element feeds the sink directly, derivative 3 (views have weight 1)
    ln = [k for k in ids if g.nodes[k[0]].op_name == "native_layer_norm" and g.nodes[k[0]].module == "b.norm"]
    e = d.get_edge(ids[ln[0]], ids[(g.sink, 0)])[0]
    assert float(unq(e.get_label())) == 3.0


def test_paths_reported_without_views_give_same_diagram(setup):
    g, paths = setup
    full = to_dot(g, paths, collapse="none").to_string()
    short = to_dot(g, [without_views(g, p) for p in paths], collapse="none").to_string()
    assert short == full


def test_sink_source_marked_and_colours(setup):
    g, paths = setup
    d, nodes, ids = check_union(g, paths, to_dot(g, paths, collapse="none"), False)
    assert nodes[ids[(g.sink, 0)]].get_shape() == "doubleoctagon"
    src = [k for k in ids if g.nodes[k[0]].role == "source"]
    assert src and all(nodes[ids[k]].get_shape() == "invhouse" for k in src)
    # the sink's in-edges: each coloured with exactly the paths that use it
    for e in d.get_edges():
        if e.get_destination() == ids[(g.sink, 0)]:
            users = [r for r, p in enumerate(paths)
                     if ids[(without_views(g, p).hops[1].node_id, without_views(g, p).hops[1].flat_index)]
                     == e.get_source()]
            assert unq(e.get_color()).split(":") == [PATH_COLORS[r] for r in users]
    legend = unq(nodes["legend"].get_label())
    assert all(f"#{r + 1}" in legend for r in range(len(paths)))
    assert f"{paths[0].weight:.4g}" in legend


def test_collapse_module(setup):
    g, paths = setup
    d, nodes = parse(to_dot(g, paths, collapse="module"))
    modules = {h.module for p in paths for h in without_views(g, p).hops[1:-1]}
    sources = {(h.node_id, h.flat_index) for p in paths for h in p.hops[-1:]}
    boxes = [n for n in nodes if n != "legend"]
    assert len(boxes) == len(modules) + 1 + len(sources)
    labels = [unq(nodes[n].get_label()) for n in boxes]
    for m in modules:
        assert sum(lab.split("\\n")[0] == m for lab in labels) == 1
    # each edge joins two different boxes; collapsing never draws a self loop
    assert all(e.get_source() != e.get_destination() for e in d.get_edges())


def test_collapse_op(setup):
    g, paths = setup
    d, nodes = parse(to_dot(g, paths, collapse="op"))
    inner = {h.node_id for p in paths for h in without_views(g, p).hops[1:-1]}
    sources = {(h.node_id, h.flat_index) for p in paths for h in p.hops[-1:]}
    assert len([n for n in nodes if n != "legend"]) == len(inner) + 1 + len(sources)


def test_names_with_colons_only_in_labels(setup):
    g, paths = setup
    old = [n.module for n in g.nodes]
    try:
        for n in g.nodes:
            if n.module:
                n.module = "model:" + n.module + '."q"'
        dot = to_dot(g, paths, collapse="module")
    finally:
        for n, m in zip(g.nodes, old):
            n.module = m
    d, nodes = parse(dot)
    assert all(re.fullmatch(r"n\d+|legend", n) for n in nodes)
    assert any(unq(v.get_label()).startswith("model:b.norm") for v in nodes.values())


def test_node_cap_warns_and_notes(setup):
    g, paths = setup
    with pytest.warns(UserWarning, match="max_nodes=4"):
        dot = to_dot(g, paths, collapse="none", max_nodes=4)
    d, nodes = parse(dot)
    assert "note" in nodes
    assert len([n for n in nodes if n not in ("legend", "note")]) <= 5   # 4 boxes + the ellipsis


def test_bad_arguments(setup):
    g, paths = setup
    with pytest.raises(gg.QueryError, match="collapse"):
        to_dot(g, paths, collapse="layer")
    with pytest.raises(gg.QueryError, match="no paths"):
        to_dot(g, [])


def test_max_nodes_below_three_is_refused_not_clamped(setup):
    """Regression: max_nodes < 3 was silently raised to 3 (the command line refuses it)."""
    g, paths = setup
    for bad in (2, 0, -1, 2.5, True, "5"):
        with pytest.raises(gg.QueryError, match="max_nodes must be an integer >= 3"):
            to_dot(g, paths, max_nodes=bad)
    with pytest.warns(UserWarning, match="max_nodes=3"):
        d, nodes = parse(to_dot(g, paths, collapse="none", max_nodes=3))
    assert len([n for n in nodes if n not in ("legend", "note")]) == 3    # sink, ellipsis, source


def test_render_svg_png_pdf(setup, tmp_path):
    g, paths = setup
    out = render(g, paths, tmp_path / "top.svg", collapse="none")
    root = ET.parse(out).getroot()
    groups = [e for e in root.iter(SVG + "g") if e.get("class") == "node"]
    _, nodes = parse(to_dot(g, paths, collapse="none"))
    assert len(groups) == len(nodes)
    assert (tmp_path / "top.png").exists() is False
    assert open(render(g, paths, tmp_path / "top.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert open(render(g, paths, tmp_path / "top.pdf"), "rb").read(5) == b"%PDF-"
    with pytest.raises(gg.QueryError, match="overwrite"):
        render(g, paths, tmp_path / "top.svg")
    render(g, paths, tmp_path / "top.svg", overwrite=True, collapse="module")


def test_render_without_graphviz(setup, tmp_path, monkeypatch):
    g, paths = setup
    monkeypatch.setenv("PATH", str(tmp_path))          # no `dot` program on PATH
    with pytest.raises(GraphvizNotFoundError, match="apt-get install graphviz.*\\.dot"):
        render(g, paths, tmp_path / "top.svg")
    out = render(g, paths, tmp_path / "top.dot")
    assert pydot.graph_from_dot_file(out)[0].get_node("legend")


def test_render_unknown_format(setup, tmp_path):
    g, paths = setup
    with pytest.raises(gg.QueryError, match="unknown image format 'jpg'"):
        render(g, paths, tmp_path / "top.jpg")


def test_underflowed_weight_in_legend(setup):
    """A path weight below float64's range is printed from its exact log (oracle: decimal)."""
    from decimal import Decimal
    g, paths = setup
    p = paths[0]
    tiny = Path(0.0, -1000.0, -1, p.source, p.hops, p.edge_weights, p.length)
    d, nodes = parse(to_dot(g, [tiny, paths[1]], collapse="none"))
    want = "-" + format(Decimal(-1000).exp(), ".4g")
    assert want == "-5.076e-435"
    assert want in unq(nodes["legend"].get_label())
