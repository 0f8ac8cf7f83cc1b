"""Top paths, k best paths and branches against the brute-force scalar oracle (tests/oracle.py):
dense per-op jacrev Jacobians, a networkx graph and exhaustive path enumeration, built without
gradgraph's rules, Jacobians or DP."""
import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import gradgraph as gg
from gradgraph.algorithms.dp import backward
from gradgraph.errors import QueryError
from oracle import ScalarOracle, tiny_attention, tiny_mlp, tiny_residual_ln, tiny_writes

SETTINGS = settings(max_examples=3, deadline=None, derandomize=True)
ORDERS = ["signed", "magnitude"]

_CACHE = {}


def case(builder, **params):
    """(graph, oracle) of ``builder(**params)``, shared by the tests of this file."""
    key = (builder.__name__, tuple(sorted(params.items())))
    if key not in _CACHE:
        model, args, kwargs, out = builder(**params)
        g = gg.capture(model, args, kwargs, output=out)
        srcs = [g.nodes[i].fx_name for i in g.sources.values()]
        _CACHE[key] = (g, ScalarOracle(model, args, kwargs, out, source_fx_names=srcs))
    return _CACHE[key]


MODELS = {
    "mlp_tanh": (tiny_mlp, dict(seed=1, widths=(3, 4, 2), batch=2)),
    "mlp_relu": (tiny_mlp, dict(seed=2, widths=(2, 3, 3, 2), batch=2, act="relu")),
    "residual_ln": (tiny_residual_ln, dict(seed=1, d=3, rows=2)),
    "attention": (tiny_attention, dict(seed=1)),
    "writes": (tiny_writes, dict(seed=1)),   # conv-transpose, in-place writes, cumsum
}


def random_case(kind, seed):
    builder, params = MODELS[kind]
    return case(builder, **dict(params, seed=seed))


def oracle_nodes(g, path):
    """The path's scalar nodes as the oracle names them, sink first (needs include_views=True)."""
    return tuple((g.nodes[h.node_id].fx_name, h.flat_index) for h in path.hops)


def oracle_key(p, order):
    """Larger is better."""
    return (p.log_abs,) if order == "magnitude" else (p.sign, p.sign * p.log_abs)


def check_weights_from_oracle_edges(o, nodes, path):
    """Each edge weight is one of the oracle's parallel edges between the two scalars, and the
    reported weight, log|weight| and sign are the product of those edge weights."""
    assert len(path.edge_weights) == len(nodes) - 1
    for (child, parent), w in zip(zip(nodes[:-1], nodes[1:]), path.edge_weights):
        ws = [d["w"] for d in o.G.get_edge_data(parent, child).values()]
        assert any(math.isclose(w, x, rel_tol=1e-12) for x in ws), (child, parent, w, ws)
    la = math.fsum(math.log(abs(w)) for w in path.edge_weights)
    sign = -1 if sum(w < 0 for w in path.edge_weights) % 2 else 1
    assert path.sign == sign
    assert path.log_abs_weight == pytest.approx(la, rel=1e-12, abs=1e-12)
    assert path.weight == pytest.approx(sign * math.exp(la), rel=1e-12, abs=0)


def check_tie_rule(paths):
    """Exactly tied neighbours are ordered by their hops read from the source, (node, flat index)."""
    for a, b in zip(paths, paths[1:]):
        if a.sign == b.sign and a.log_abs_weight == b.log_abs_weight:
            ka = [(h.node_id, h.flat_index) for h in reversed(a.hops)]
            kb = [(h.node_id, h.flat_index) for h in reversed(b.hops)]
            assert ka <= kb


# ---------------------------------------------------------------------------- top path, k best
@SETTINGS
@given(kind=st.sampled_from(sorted(MODELS)), seed=st.integers(0, 3), order=st.sampled_from(ORDERS))
def test_top_path_matches_oracle(kind, seed, order):
    check_top_path(kind, seed, order)


def check_top_path(kind, seed, order):
    g, o = random_case(kind, seed)
    best = g.top_paths(k=1, order=order, include_views=True)
    assert len(best) == 1
    p = best[0]
    ranked = o.ranked(order)
    top = oracle_key(ranked[0], order)
    assert p.weight == pytest.approx(ranked[0].weight, rel=1e-9)
    # the path found is one of the oracle's best paths (several if tied)
    tied = {tuple(q.nodes) for q in ranked if np.allclose(oracle_key(q, order), top, rtol=1e-12, atol=0)}
    nodes = oracle_nodes(g, p)
    assert nodes in tied
    assert p.source == (g.nodes[p.hops[-1].node_id].name, p.hops[-1].index)
    assert p.source[1] == np.unravel_index(nodes[-1][1], g.nodes[p.hops[-1].node_id].shape)
    check_weights_from_oracle_edges(o, nodes, p)


@SETTINGS
@given(kind=st.sampled_from(sorted(MODELS)), seed=st.integers(0, 3), order=st.sampled_from(ORDERS))
def test_k_best_is_the_whole_ranked_list(kind, seed, order):
    check_k_best(kind, seed, order)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("seed", [0, 1])
def test_paths_through_the_write_cumsum_and_conv_transpose_rules(seed, order):
    """The model of index_put, copy, cumsum and a transposed convolution, on every draw."""
    check_top_path("writes", seed, order)
    check_k_best("writes", seed, order)


def check_k_best(kind, seed, order):
    g, o = random_case(kind, seed)
    ranked = o.ranked(order)
    n = len(ranked)
    got = g.top_paths(k=n + 5, order=order, include_views=True)
    assert len(got) == n                                  # k beyond the number of paths: all of them
    np.testing.assert_allclose([p.weight for p in got], [q.weight for q in ranked], rtol=1e-9, atol=0)
    np.testing.assert_allclose([p.log_abs_weight for p in got], [q.log_abs for q in ranked],
                               rtol=1e-9, atol=1e-12)
    # every path exactly once (parallel edges give repeated node sequences: compare multisets)
    assert Counter(oracle_nodes(g, p) for p in got) == Counter(tuple(q.nodes) for q in ranked)
    by_nodes = {tuple(q.nodes): q for q in ranked}
    for p in got:
        nodes = oracle_nodes(g, p)
        check_weights_from_oracle_edges(o, nodes, p)
        assert p.length == by_nodes[nodes].length
    check_tie_rule(got)
    # a shorter list is a prefix of the full one
    k = max(1, n // 3)
    part = g.top_paths(k=k, order=order, include_views=True)
    assert [oracle_nodes(g, p) for p in part] == [oracle_nodes(g, p) for p in got[:k]]


@pytest.mark.parametrize("order", ORDERS)
def test_views_are_hidden_unless_asked(order):
    g, o = random_case("attention", 2)
    view = {u: d["is_view"] for u, d in o.G.nodes(data=True)}
    full = g.top_paths(k=20, order=order, include_views=True)
    short = g.top_paths(k=20, order=order)
    assert any(view[u] for p in full for u in oracle_nodes(g, p)[1:-1])
    for pf, ps in zip(full, short):
        nodes = oracle_nodes(g, pf)
        kept = [nodes[0]] + [u for u in nodes[1:-1] if not view[u]] + [nodes[-1]]
        assert [(g.nodes[h.node_id].fx_name, h.flat_index) for h in ps.hops] == kept
        assert ps.edge_weights == pf.edge_weights and ps.weight == pf.weight
        assert ps.length == pf.length == sum(1 for u in nodes[:-1] if not view[u])


# ---------------------------------------------------------------------------- sources
@pytest.mark.parametrize("order", ORDERS)
def test_source_restriction_single_element_and_groups(order):
    g, o = random_case("mlp_tanh", 0)
    (name, s), = g.sources.items()
    fx = g.nodes[s].fx_name
    shape = g.nodes[s].shape
    ranked = o.ranked(order)

    def expect(flat):
        return [q.weight for q in ranked if q.source[0] == fx and q.source[1] in flat]

    def got(src):
        return [p.weight for p in g.top_paths(k=10_000, order=order, source=src)]

    one = (1, 2)
    flat_one = {int(np.ravel_multi_index(one, shape))}
    np.testing.assert_allclose(got((name, one)), expect(flat_one), rtol=1e-9)
    assert all(p.source == (name, one) for p in g.top_paths(k=5, order=order, source=(name, one)))
    group = [(0, 0), (1, 2), (0, 1)]
    flat_group = {int(np.ravel_multi_index(i, shape)) for i in group}
    np.testing.assert_allclose(got((name, group)), expect(flat_group), rtol=1e-9)
    mask = np.zeros(shape, dtype=bool)
    for i in group:
        mask[i] = True
    np.testing.assert_allclose(got((name, mask)), expect(flat_group), rtol=1e-9)
    row = {int(np.ravel_multi_index((1, j), shape)) for j in range(shape[1])}
    np.testing.assert_allclose(got((name, 1)), expect(row), rtol=1e-9)   # numpy indexing: row 1
    np.testing.assert_allclose(got(name), [q.weight for q in ranked], rtol=1e-9)


class Fig1(torch.nn.Module):
    """Paper Fig. 1: f(x, y) = e^x + (x - y) * y."""

    def forward(self, x, y):
        return torch.exp(x) + (x - y) * y


def fig1_graph():
    x, y = torch.tensor([0.5], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)
    return gg.capture(Fig1(), (x, y), output=lambda f: f[0])


def test_paper_figure_1_by_hand():
    g = fig1_graph()
    x, y = sorted(g.sources, key=g.sources.get)
    e = math.exp(0.5)
    # x: e^x (exp) and y = 2 (through (x - y) * y); y: -y = -2 (through x - y) and x - y = -1.5
    signed = g.top_paths(k=10, order="signed")
    assert [p.source[0] for p in signed] == [x, x, y, y]
    np.testing.assert_allclose([p.weight for p in signed], [2.0, e, -1.5, -2.0], rtol=1e-12)
    mag = g.top_paths(k=10, order="magnitude")
    # |2| = |-2| exactly: the tie goes to the path from the lower source node (x)
    np.testing.assert_allclose([p.weight for p in mag], [2.0, -2.0, e, -1.5], rtol=1e-12)
    assert [p.source[0] for p in mag] == [x, y, x, y]
    assert [p.weight for p in g.top_paths(k=10, source=y)] == [-1.5, -2.0]
    assert g.top_paths(k=1, order="magnitude", source=y)[0].weight == -2.0


def test_exact_ties_follow_source_order():
    """All paths of relu(x).sum() on positive x weigh exactly 1: ordered by source element."""
    x = torch.tensor([[0.3, 1.2, 0.7], [2.0, 0.1, 0.4]], dtype=torch.float64)
    g = gg.capture(torch.nn.ReLU(), (x,), output=lambda y: (y * 2.0).sum())
    for order in ORDERS:
        ps = g.top_paths(k=4, order=order)
        assert [p.weight for p in ps] == [2.0] * 4
        assert [p.source[1] for p in ps] == [(0, 0), (0, 1), (0, 2), (1, 0)]


def test_parallel_edges_are_distinct_paths():
    """x * x uses x twice: two paths x -> mul of weight x each (one per argument)."""
    x = torch.tensor([3.0], dtype=torch.float64)
    g = gg.capture(torch.nn.Identity(), (x,), output=lambda y: (y * y)[0])
    ps = g.top_paths(k=5, include_views=True)
    assert len(ps) == 2 and [p.weight for p in ps] == [3.0, 3.0]


# ---------------------------------------------------------------------------- deep and tiny
def deep_narrow_graph(depth, width, scale, seed):
    """A GradGraph of x -> [tanh(W_l x)] * depth -> y[0], built directly from its local Jacobians
    (torch.export of hundreds of layers is slow); returns the graph and the layers' (W_l, z_l)."""
    from gradgraph.graph import Edge, GradGraph, Node
    from gradgraph.jacobians import SparseJacobian

    rng = np.random.default_rng(seed)
    x = np.array([0.7, -0.4] + [0.1] * (width - 2))[:width]
    nodes = [Node("x", "input", (width,), "torch.float64", value=x, role="source")]
    edges, layers, h = [], [], x
    rows, cols = np.divmod(np.arange(width * width), width)
    for layer in range(depth):
        W = rng.standard_normal((width, width))
        W *= scale / np.abs(W).max()
        z = W @ h
        h = np.tanh(z)
        layers.append((W, z))
        nodes.append(Node(f"mm_{layer}", "aten.mv.default", (width,), "torch.float64", value=z,
                          module=f"layers.{layer}"))
        edges.append(Edge(len(nodes) - 2, len(nodes) - 1,
                          SparseJacobian((width,), (width,), rows, cols, W.reshape(-1))))
        nodes.append(Node(f"tanh_{layer}", "aten.tanh.default", (width,), "torch.float64", value=h))
        edges.append(Edge(len(nodes) - 2, len(nodes) - 1,
                          SparseJacobian((width,), (width,), None, None, 1 - h * h)))
    nodes.append(Node("select", "aten.select.int", (), "torch.float64", value=h[:1], role="sink"))
    edges.append(Edge(len(nodes) - 2, len(nodes) - 1, SparseJacobian((), (width,), [0], [0], [1.0])))
    return GradGraph(nodes, edges, {"x": 0}, len(nodes) - 1, "function"), layers


def log_space_k_best(layers, k):
    """Independent reference: per-layer dense Jacobians diag(tanh'(z)) W from torch.autograd,
    then eager k-lists of (sign, log|.|) sink prefixes per unit -- the k most positive and the k most
    negative kept separately for the signed order. Returns {order: [(sign, log_abs, source unit)]}."""
    Ws = torch.from_numpy(np.stack([W for W, _ in layers]))
    xs = torch.linalg.solve(Ws, torch.from_numpy(np.stack([z for _, z in layers])))   # layer inputs
    J = torch.autograd.functional.jacobian(lambda t: torch.tanh(torch.einsum("lij,lj->li", Ws, t)), xs).numpy()
    jacs = [J[layer, :, layer, :] for layer in range(len(layers))]          # (out, in) per layer
    width = layers[0][0].shape[0]

    def run(key):
        top = [[(1, 0.0, None)] if u == 0 else [] for u in range(width)]   # the sink is y[0]
        bot = [list(t) for t in top]
        for J in reversed(jacs):
            ntop, nbot = [], []
            for j in range(width):
                cands = {(s * (1 if J[i, j] > 0 else -1), la + math.log(abs(J[i, j])), j)
                         for i in range(width) if J[i, j] != 0 for s, la, _ in top[i] + bot[i]}
                ntop.append(sorted(cands, key=key, reverse=True)[:k])
                nbot.append(sorted(cands, key=key)[:k])
            top, bot = ntop, nbot
        return sorted((c for u in range(width) for c in top[u]), key=key, reverse=True)[:k]

    return {"signed": run(lambda c: (c[0], c[0] * c[1])), "magnitude": run(lambda c: c[1])}


def test_200_layers_with_weights_far_below_float64():
    g, layers = deep_narrow_graph(200, 2, 0.01, seed=3)
    ref = log_space_k_best(layers, 4)
    for order in ORDERS:
        got = g.top_paths(k=4, order=order)
        assert len(got) == 4
        for p, (s, la, src) in zip(got, ref[order]):
            assert la < -900                       # ~1e-400: below float64's smallest subnormal
            assert p.log_abs_weight == pytest.approx(la, rel=1e-9)
            assert p.sign == s and p.source == ("x", (src,))
            assert p.weight == 0.0                 # underflow only; log|w| and sign stay exact
            assert p.length == 400
            assert math.fsum(math.log(abs(w)) for w in p.edge_weights) == pytest.approx(la, rel=1e-9)


# ---------------------------------------------------------------------------- branches
@pytest.mark.parametrize("shared", [False, True], ids=["own-pass", "pass-shared-with-top-paths"])
@pytest.mark.parametrize("order", ORDERS)
def test_branches_match_oracle(order, shared, monkeypatch):
    g, o = random_case("attention", 3)
    (name, s), = g.sources.items()
    node = g.nodes[s]
    if shared:       # as the report asks them: the top paths' backward max pass serves the branches
        from gradgraph.algorithms import paths as paths_mod
        calls = []
        monkeypatch.setattr(paths_mod, "backward", lambda *a, **kw: calls.append(1) or backward(*a, **kw))
        with paths_mod.shared_max_passes(g):
            best = g.top_paths(k=2, order=order)
            br = g.branches(name, order=order)
        assert len(calls) == 1 and "paths.max_passes" not in g._cache
        assert best[0].log_abs_weight == pytest.approx(o.best(order).log_abs, rel=1e-10)
    else:
        br = g.branches(name, order=order)
    labels = [lab.split(" @ ")[1] for lab in br.labels]
    assert sorted(labels) == ["", "k", "q", "v"]           # residual add, key, query, value
    consumer_fx = {g.nodes[g.node_index(c)].fx_name: b for b, cs in enumerate(br.consumers) for c in cs}
    want = np.full((node.numel, len(br.labels)), -np.inf)
    want_key = {}
    for q in o.paths():
        j = [u for u in q.nodes if u[0] == node.fx_name]
        if not j:
            continue
        pos = q.nodes.index(j[0]) - 1
        while o.G.nodes[q.nodes[pos]]["is_view"] and pos > 0:    # branches look through views
            pos -= 1
        b = consumer_fx[q.nodes[pos][0]]
        key = oracle_key(q, order)
        jj = j[0][1]
        if (jj, b) not in want_key or key > want_key[(jj, b)]:
            want_key[(jj, b)] = key
            want[jj, b] = (q.sign if order == "signed" else 1) * math.exp(q.log_abs)
    got = br.values
    for (jj, b), _ in want_key.items():
        assert got[jj, b] == pytest.approx(want[jj, b], rel=1e-9)
    assert np.isneginf(br.log_abs[want == -np.inf]).all()
    for jj in range(node.numel):
        keys = [want_key.get((jj, b)) for b in range(len(br.labels))]
        if any(kk is not None for kk in keys):
            bestk = max(kk for kk in keys if kk is not None)
            assert keys[br.best[jj]] == bestk
    # per token (axis 0 of the (tokens, d) embedding output): the max over the token's elements
    tok = g.branches(name, order=order, groups=0)
    assert tok.log_abs.shape == (node.shape[0], len(br.labels))
    key = (lambda c: c[1]) if order == "magnitude" else (lambda c: (c[0], c[0] * c[1]))  # noqa: E731
    for t in range(node.shape[0]):
        for b in range(len(br.labels)):
            elems = np.ravel_multi_index((np.full(node.shape[1], t), np.arange(node.shape[1])), node.shape)
            cands = [(int(br.sign[j, b]), br.log_abs[j, b]) for j in elems if br.sign[j, b] != 0]
            if not cands:
                assert tok.sign[t, b] == 0
                continue
            assert (int(tok.sign[t, b]), tok.log_abs[t, b]) == max(cands, key=key)
    # the top path's branch at the node is the best branch of its element
    top = g.top_paths(k=1, order=order, include_views=True)[0]
    pos = [h.node_id for h in top.hops].index(s) - 1
    while g.nodes[top.hops[pos].node_id].is_view and pos > 0:
        pos -= 1
    prev = top.hops[pos].node
    j = [h for h in top.hops if h.node_id == s][0].flat_index
    assert prev in br.consumers[br.best[j]]


# ---------------------------------------------------------------------------- errors
def test_bad_queries_raise_query_error():
    g = fig1_graph()
    for k in (0, -1, 1.5, True, "3"):
        with pytest.raises(QueryError, match="k must be"):
            g.top_paths(k=k)
    with pytest.raises(QueryError, match="order"):
        g.top_paths(order="best")
    with pytest.raises(QueryError, match="valid sources"):
        g.top_paths(source="nope")
    with pytest.raises(QueryError, match="valid sources"):
        g.top_paths(source=("nope", 0))
    name = next(iter(g.sources))
    with pytest.raises(QueryError, match="index"):
        g.top_paths(source=(name, 5))
    with pytest.raises(QueryError, match="order"):
        g.branches(name, order="x")
    with pytest.raises(QueryError):
        g.branches("no_such_node")
