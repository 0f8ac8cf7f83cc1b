"""Top paths and branches at the limits: infinite, overflowing and NaN weights, long runs of exact
ties, and k far beyond the number of paths.

The graphs are built by hand from dense weight matrices, and the expected answers come from a
plain-Python enumeration of every path of those matrices (weights multiplied from the sink down,
ties broken by the flat indices read from the source), which shares no code with gradgraph's
search. A captured torch model with 1e300 weights is checked against tests/oracle.py.
"""
import itertools
import math
import resource
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import gradgraph as gg
from gradgraph.errors import QueryError
from gradgraph.graph import Edge, GradGraph, Node
from gradgraph.jacobians import SparseJacobian
from oracle import ScalarOracle

ORDERS = ["signed", "magnitude"]
MB = 1 << 20


def layered(mats):
    """x -> h1 -> ... -> sink: ``mats[l]`` is the dense Jacobian (out, in) of layer l; the last has
    one row (the scalar sink). Zero entries are not edges."""
    widths = [mats[0].shape[1]] + [m.shape[0] for m in mats]
    nodes = [Node("x", "input", (widths[0],), "torch.float64", value=np.ones(widths[0]), role="source")]
    edges = []
    for layer, W in enumerate(mats):
        last = layer == len(mats) - 1
        shape = () if last else (W.shape[0],)
        nodes.append(Node("s" if last else f"h{layer + 1}", "aten.mv.default", shape, "torch.float64",
                          value=np.ones(shape), role="sink" if last else "op", module=f"layer{layer}"))
        rows, cols = np.nonzero(W)
        edges.append(Edge(layer, layer + 1, SparseJacobian(shape, (W.shape[1],), rows, cols, W[rows, cols])))
    return GradGraph(nodes, edges, {"x": 0}, len(nodes) - 1, "function")


def brute_paths(mats):
    """Every path of ``layered(mats)`` as (weight, log|weight|, sign, flat indices source -> sink).
    The weight is the float product from the sink down (what a float64 reports, inf beyond range);
    log|weight| is the exact sum of logs."""
    out = []
    widths = [mats[0].shape[1]] + [m.shape[0] for m in mats]
    for idx in itertools.product(*(range(w) for w in widths[:-1])):
        chain = list(idx) + [0]
        ws = [mats[l][chain[l + 1], chain[l]] for l in range(len(mats))]
        if any(w == 0 for w in ws):
            continue
        ws = ws[::-1]                                      # sink first
        weight = 1.0
        with np.errstate(over="ignore"):
            for w in ws:
                weight = float(np.float64(weight) * np.float64(w))
        sign = -1 if sum(w < 0 for w in ws) % 2 else 1
        out.append((weight, math.fsum(math.log(abs(w)) for w in ws), sign, tuple(chain)))
    return out


def brute_ranked(mats, order):
    """All paths best first: signed by (sign, sign * log|w|), magnitude by log|w|; ties by the flat
    indices read from the source."""
    def key(p):
        _, la, s, hops = p
        return ((-la,) if order == "magnitude" else (-s, -s * la)) + (hops,)
    return sorted(brute_paths(mats), key=key)


def hops_of(p):
    """Flat indices of a Path's hops from the source up to the sink (one layer per hop)."""
    return tuple(h.flat_index for h in reversed(p.hops))


def check_against_brute(g, mats, order, k):
    got = g.top_paths(k=k, order=order)
    want = brute_ranked(mats, order)[:k]
    assert [hops_of(p) for p in got] == [w[3] for w in want]
    assert [p.sign for p in got] == [w[2] for w in want]
    assert [p.weight for p in got] == [w[0] for w in want]          # inf, -inf and finite alike
    for p, w in zip(got, want):
        if math.isinf(w[1]):
            assert p.log_abs_weight == math.inf
        else:
            assert p.log_abs_weight == pytest.approx(w[1], rel=1e-12, abs=1e-12)
    return got


def peak_memory(fn):
    """(result, peak bytes traced by tracemalloc during fn, growth of the process's peak RSS)."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    try:
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0


# ---------------------------------------------------------------------------- infinite weights
def inf_mats():
    """3 inputs -> 3 hidden -> sink with one +inf and one -inf weight in the middle layer."""
    W1 = np.array([[0.5, -2.0, 1.5], [1.0, 0.25, -0.75], [-1.25, 3.0, 0.5]])
    W1[0, 1] = np.inf
    W1[2, 0] = -np.inf
    W2 = np.array([[2.0, -1.0, 0.5]])
    return [W1, W2]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("k", [1, 2, 3, 5, 10**9])
def test_infinite_weights_rank_as_the_largest(order, k):
    """An infinite weight makes |g(p)| = inf: first in magnitude order; +inf first and -inf last in
    signed order; infinite paths tie and follow the hop rule."""
    mats = inf_mats()
    got = check_against_brute(layered(mats), mats, order, k)
    if order == "magnitude":
        assert all(math.isinf(p.weight) for p in got[:min(k, 2)])   # the two infinite paths


def test_infinite_kth_weight_with_many_tied_paths_is_bounded():
    """Every one of 200 000 paths crosses one infinite edge near the sink, so all tie at inf: the
    k best must come from the first k in the hop order without enumerating the rest."""
    n = 200_000
    mats = [np.ones((1, n)), np.array([[np.inf]])]
    g = layered(mats)
    for order in ORDERS:
        got, peak, rss = peak_memory(lambda: g.top_paths(k=3, order=order, progress=False))
        assert [p.weight for p in got] == [math.inf] * 3
        assert [p.source for p in got] == [("x", (0,)), ("x", (1,)), ("x", (2,))]
        assert peak < 200 * MB and rss < 200 * MB, (peak / MB, rss / MB)


# ---------------------------------------------------------------------------- overflow
def test_weights_beyond_float64_are_inf_with_exact_logs():
    mats = [np.array([[1e300, 1.0, -1e300], [1.0, 1e-300, 2.0]]), np.array([[1e300, -3.0]])]
    g = layered(mats)
    for order in ORDERS:
        got = check_against_brute(g, mats, order, 10)
        assert len(got) == 6
    best = g.top_paths(k=1, order="magnitude")[0]
    assert best.weight in (math.inf, -math.inf)
    assert best.log_abs_weight == pytest.approx(2 * math.log(1e300), rel=1e-12)


def test_captured_model_with_huge_weights_matches_oracle():
    """A captured two-layer linear model whose path weights are ~1e600."""
    m = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 1, bias=False)).double()
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1e300, -2.0], [3.0, 1e300]], dtype=torch.float64))
        m[1].weight.copy_(torch.tensor([[1e300, -1e299]], dtype=torch.float64))
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    out = lambda y: y.sum()  # noqa: E731
    g = gg.capture(m, (x,), output=out)
    o = ScalarOracle(m, (x,), output=out, source_fx_names=[g.nodes[i].fx_name for i in g.sources.values()])
    for order in ORDERS:
        got = g.top_paths(k=100, order=order)
        want = o.ranked(order)
        assert len(got) == len(want) == 4
        assert [p.log_abs_weight for p in got] == pytest.approx([q.log_abs for q in want], rel=1e-12)
        assert [p.sign for p in got] == [q.sign for q in want]
        assert [p.weight for p in got] == [q.weight for q in want]      # +-inf where beyond float64
    assert any(math.isinf(p.weight) for p in got)


def deep_and_skip_graph(depth=200):
    """x (2) -> 200 elementwise layers of weight 0.01 (element 1 cut at the first) -> sum, plus a
    skip x -> sink of weights (1, -1): values of scales e^0 and e^-921 meet at the sink's inputs."""
    n = 2
    nodes = [Node("x", "input", (n,), "torch.float64", role="source")]
    edges = []
    for layer in range(depth):
        nodes.append(Node(f"h{layer}", "aten.mul.Tensor", (n,), "torch.float64"))
        vals = np.array([0.01, 0.0]) if layer == 0 else np.array([0.01, 0.02])
        edges.append(Edge(layer, layer + 1, SparseJacobian((n,), (n,), None, None, vals)))
    nodes.append(Node("s", "aten.add.Tensor", (), "torch.float64", role="sink"))
    s = len(nodes) - 1
    edges.append(Edge(s - 1, s, SparseJacobian((), (n,), np.zeros(n, int), np.arange(n), np.ones(n))))
    edges.append(Edge(0, s, SparseJacobian((), (n,), np.zeros(n, int), np.arange(n), np.array([1.0, -1.0])),
                      arg=1))
    return GradGraph(nodes, edges, {"x": 0}, s, "function")


def test_no_path_survives_a_scale_gap_beyond_float64():
    """The max passes combine a value of scale e^-921 with one of scale 1: the smaller one's factor
    underflows to 0, and its "no path" entries (-inf, +inf) must stay "no path", not NaN (which
    lost the skip path of x[1] in signed order)."""
    g = deep_and_skip_graph()
    deep = 200 * math.log(0.01)                 # the one deep path, x[0]: 1e-400
    signed = g.top_paths(k=10, order="signed")
    assert [(p.sign, p.source[1]) for p in signed] == [(1, (0,)), (1, (0,)), (-1, (1,))]
    assert [p.weight for p in signed] == [1.0, 0.0, -1.0]
    assert signed[1].log_abs_weight == pytest.approx(deep, rel=1e-12)
    mag = g.top_paths(k=10, order="magnitude")
    assert [(p.weight, p.source[1]) for p in mag] == [(1.0, (0,)), (-1.0, (1,)), (0.0, (0,))]
    br = g.branches("x", order="signed")
    mul, add = br.labels.index("mul @ "), br.labels.index("add @ ")
    assert br.sign[:, add].tolist() == [1, -1] and br.log_abs[:, add].tolist() == [0.0, 0.0]
    assert br.sign[:, mul].tolist() == [1, 0] and br.log_abs[0, mul] == pytest.approx(deep, rel=1e-12)


# ---------------------------------------------------------------------------- NaN
def nan_graph(dead=False):
    """x (3) -> h (3, elementwise) -> s, with a NaN local derivative at element 1 of h. With
    ``dead``, h feeds a side tensor instead and the sink reads x directly: the NaN is on no path."""
    n = 3
    nodes = [Node("x", "input", (n,), "torch.float64", value=np.ones(n), role="source"),
             Node("h", "aten.mul.Tensor", (n,), "torch.float64", value=np.ones(n)),
             Node("s", "aten.sum.default", (), "torch.float64", value=np.ones(()), role="sink")]
    diag = SparseJacobian((n,), (n,), None, None, np.array([2.0, np.nan, -1.0]))
    to_sink = SparseJacobian((), (n,), np.zeros(n, int), np.arange(n), np.array([1.0, 3.0, 0.5]))
    if dead:
        nodes.insert(2, Node("side", "aten.mul.Tensor", (n,), "torch.float64", value=np.ones(n)))
        edges = [Edge(0, 1, diag), Edge(1, 2, SparseJacobian((n,), (n,), None, None, np.ones(n))),
                 Edge(0, 3, to_sink)]
        return GradGraph(nodes, edges, {"x": 0}, 3, "function")
    return GradGraph(nodes, [Edge(0, 1, diag), Edge(1, 2, to_sink)], {"x": 0}, 2, "function")


@pytest.mark.parametrize("order", ORDERS)
def test_nan_derivative_on_a_path_is_a_query_error(order):
    g = nan_graph()
    with pytest.raises(QueryError, match="NaN local derivatives .*'h' <- 'x'"):
        g.top_paths(k=1, order=order)
    with pytest.raises(QueryError, match="NaN"):
        g.branches("h", order=order)
    # the sum queries show where the NaN goes instead (consistent with the gradient)
    grad = g.gradient()["x"]
    assert math.isnan(grad[1]) and grad[0] == 2.0 and grad[2] == -0.5


def test_nan_derivative_off_every_path_is_ignored():
    g = nan_graph(dead=True)
    got = g.top_paths(k=5, order="magnitude")
    assert [p.weight for p in got] == [3.0, 1.0, 0.5]
    assert [p.source for p in got] == [("x", (1,)), ("x", (0,)), ("x", (2,))]


# ---------------------------------------------------------------------------- ties and huge k
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_k1_over_a_million_tied_inputs_is_lazy(sign):
    """s = sum of 10^6 inputs, every path of weight +-1: k = 1 returns input 0 (the hop rule)
    without building the 10^6 tied paths (the search stops at the first exact tie)."""
    n = 1_000_000
    g = layered([np.full((1, n), sign)])
    for order in ORDERS:
        got, peak, rss = peak_memory(lambda: g.top_paths(k=1, order=order, progress=False))
        assert [(p.weight, p.source) for p in got] == [(sign, ("x", (0,)))]
        assert peak < 500 * MB and rss < 500 * MB, (peak / MB, rss / MB)
    got = g.top_paths(k=4, order="signed", progress=False)
    assert [p.source[1] for p in got] == [(0,), (1,), (2,), (3,)]


def test_ties_inside_the_graph_are_lazy():
    """One input fans out to 10^6 tied units that the sink sums: the ties sit in the input's own
    list of candidates rather than at the root."""
    n = 1_000_000
    g = layered([np.full((n, 1), 2.0), np.full((1, n), 0.5)])
    got, peak, rss = peak_memory(lambda: g.top_paths(k=2, progress=False))
    assert [p.weight for p in got] == [1.0, 1.0]
    assert [p.hops[1].flat_index for p in got] == [0, 1]
    assert peak < 500 * MB and rss < 500 * MB, (peak / MB, rss / MB)


def tied_mats(seed):
    rng = np.random.default_rng(seed)
    W1 = rng.choice([-2.0, -1.0, 1.0, 2.0, 0.0], size=(3, 4))
    W2 = rng.choice([-1.0, 1.0, 3.0], size=(2, 3))
    W3 = rng.choice([1.0, -2.0], size=(1, 2))
    return [W1, W2, W3]


@pytest.mark.parametrize("order", ORDERS)
def test_huge_k_on_a_small_graph_returns_every_path_without_per_k_memory(order):
    mats = tied_mats(0)
    g = layered(mats)
    n = len(brute_paths(mats))
    got, peak, _ = peak_memory(lambda: check_against_brute(g, mats, order, 10**9))
    assert len(got) == n > 10
    assert peak < 20 * MB, peak / MB


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), order=st.sampled_from(ORDERS), k=st.integers(1, 40))
def test_k_best_with_many_exact_ties_matches_brute_force(seed, order, k):
    """Small-integer weights make many exact ties. The k weights returned are exactly the k best;
    the paths strictly better than the k-th weight are exactly the brute force's; tied paths at
    the k-th place are genuine paths of that weight, listed in the hop order."""
    mats = tied_mats(seed)
    g = layered(mats)
    got = g.top_paths(k=k, order=order)
    want = brute_ranked(mats, order)
    value = abs if order == "magnitude" else float          # what the order compares
    assert [value(p.weight) for p in got] == [value(w[0]) for w in want[:k]]
    kth = value(got[-1].weight)
    n_better = sum(value(p.weight) != kth for p in got)
    better = [w[3] for w in want if value(w[0]) != kth][:n_better]
    assert [hops_of(p) for p in got if value(p.weight) != kth] == better
    tied = {w[3] for w in want if value(w[0]) == kth}
    boundary = [hops_of(p) for p in got if value(p.weight) == kth]
    assert set(boundary) <= tied and boundary == sorted(boundary)


# ---------------------------------------------------------------------------- branches
def two_branch_graph(a_weights, b_weights):
    """x (2) -> h (2) -> a (2) and h -> b (2), s = sum(a) + sum(b)."""
    n = 2
    nodes = [Node("x", "input", (n,), "torch.float64", value=np.ones(n), role="source"),
             Node("h", "aten.mul.Tensor", (n,), "torch.float64", value=np.ones(n), module="h"),
             Node("a", "aten.mul.Tensor", (n,), "torch.float64", value=np.ones(n), module="a"),
             Node("b", "aten.mul.Tensor", (n,), "torch.float64", value=np.ones(n), module="b"),
             Node("s", "aten.add.Tensor", (), "torch.float64", value=np.ones(()), role="sink")]
    diag = lambda w: SparseJacobian((n,), (n,), None, None, np.asarray(w, float))  # noqa: E731
    to_sink = SparseJacobian((), (n,), np.zeros(n, int), np.arange(n), np.ones(n))
    edges = [Edge(0, 1, diag([1.0, -1.0])), Edge(1, 2, diag(a_weights)), Edge(1, 3, diag(b_weights)),
             Edge(2, 4, to_sink), Edge(3, 4, to_sink, arg=1)]
    return GradGraph(nodes, edges, {"x": 0}, 4, "function")


def test_branches_with_infinite_weights():
    """Branch a carries +inf at element 0 and -inf at element 1; branch b is finite."""
    g = two_branch_graph([np.inf, -np.inf], [2.0, 3.0])
    a, b = 0, 1
    mag = g.branches("h", order="magnitude")
    assert [lab.split(" @ ")[1] for lab in mag.labels] == ["a", "b"]
    assert mag.best.tolist() == [a, a]
    assert mag.log_abs[:, a].tolist() == [math.inf, math.inf]
    assert mag.log_abs[:, b] == pytest.approx([math.log(2.0), math.log(3.0)], rel=1e-12)
    signed = g.branches("h", order="signed")
    # element 0: a gives +inf; element 1 (x weight -1): a gives -1 * -inf = +inf, b gives -3
    assert signed.sign[:, a].tolist() == [1, 1] and signed.log_abs[:, a].tolist() == [math.inf] * 2
    assert signed.sign[:, b].tolist() == [1, -1]
    assert signed.best.tolist() == [a, a]
    top = g.top_paths(k=1, order="signed")[0]
    assert top.weight == math.inf and top.hops[1].node == "a"


def test_docs_example_runs_as_printed(capsys):
    """The example of docs/paths.md "Infinite, overflowing and NaN weights": each print gives what
    its comment says, and the last line raises QueryError."""
    import os
    import re
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "paths.md")).read()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "def scaled_sum" in b)
    lines = block.rstrip("\n").split("\n")
    ns = {}
    exec("\n".join(lines[:-1]), ns)
    printed = capsys.readouterr().out.strip().split("\n")
    expected = [ln.split("#", 1)[1].strip() for ln in lines if ln.startswith("print(")]
    assert printed == expected
    with pytest.raises(QueryError, match=r"NaN .*'h' <- 'x'"):
        exec(lines[-1], ns)
