"""Top paths of float32 models: the max pass keeps its values in float32, and the k-best search
allows for their rounding.

Two oracles, neither sharing code with gradgraph's search:

* hand-built float32 graphs whose edge weights are 1 + m 2^-12 (m small), so that every path
  weight is an exact float64 product while different paths' weights differ by a few units of
  float32's last place -- near-ties the float32 values cannot order -- checked against a
  plain-Python enumeration ranked by the exact weights (the same helpers as
  tests/test_paths_limits.py);
* small float32 torch models against tests/oracle.py's brute-force enumeration of their dense
  jacrev Jacobians. The oracle computes the local derivatives in float32 where gradgraph derives
  them in float64 from the recorded float32 values, so weights are compared at rtol 1e-5 (float32
  models, say so) and paths only where the oracle's neighbours are further apart than that.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import gradgraph as gg
from gradgraph.algorithms import paths as paths_mod
from gradgraph.algorithms.dp import backward
from gradgraph.algorithms.semirings import MAX_ABS, MAX_SIGNED
from gradgraph.graph import Edge, GradGraph, Node
from gradgraph.jacobians import SparseJacobian
from oracle import ScalarOracle, tiny_attention, tiny_mlp, tiny_residual_ln
from test_paths_limits import brute_ranked, hops_of

ORDERS = ["signed", "magnitude"]


def layered32(mats):
    """``test_paths_limits.layered`` as a float32 model's graph: float32 nodes and weights."""
    widths = [mats[0].shape[1]] + [m.shape[0] for m in mats]
    nodes = [Node("x", "input", (widths[0],), "torch.float32", value=np.ones(widths[0], np.float32),
                  role="source")]
    edges = []
    for layer, W in enumerate(mats):
        last = layer == len(mats) - 1
        shape = () if last else (W.shape[0],)
        nodes.append(Node("s" if last else f"h{layer + 1}", "aten.mv.default", shape, "torch.float32",
                          value=np.ones(shape, np.float32), role="sink" if last else "op",
                          module=f"layer{layer}"))
        rows, cols = np.nonzero(W)
        vals = W[rows, cols].astype(np.float32)
        assert (vals.astype(np.float64) == W[rows, cols]).all()       # the weights are float32 numbers
        edges.append(Edge(layer, layer + 1, SparseJacobian(shape, (W.shape[1],), rows, cols, vals)))
    return GradGraph(nodes, edges, {"x": 0}, len(nodes) - 1, "function")


def near_tie_mats(seed, widths=(4, 3, 3, 2)):
    """Weights +-(1 + m 2^-12), m in 0..7 (13-bit mantissas: a product of four is exact in
    float64, a product of two already rounds in float32), some of them exact duplicates."""
    rng = np.random.default_rng(seed)
    mats = []
    for n_in, n_out in zip(widths, list(widths[1:]) + [1]):
        m = rng.integers(0, 8, size=(n_out, n_in))
        sign = rng.choice([-1.0, 1.0], size=(n_out, n_in))
        mats.append(sign * (1.0 + m * 2.0 ** -12))
    return mats


def check_exact(g, mats, order, k):
    got = g.top_paths(k=k, order=order, progress=False)
    want = brute_ranked(mats, order)[:k]
    assert [hops_of(p) for p in got] == [w[3] for w in want]
    assert [p.weight for p in got] == [w[0] for w in want]
    return got


# ---------------------------------------------------------------------------- the pass's dtype
def test_max_pass_of_a_float32_model_holds_float32_values():
    model, args, kwargs, out = tiny_residual_ln(seed=0, d=4, rows=2)
    g64 = gg.capture(model.double(), tuple(a.double() for a in args), kwargs, output=out)
    model, args, kwargs, out = tiny_residual_ln(seed=0, d=4, rows=2)
    g32 = gg.capture(model.float(), tuple(a.float() for a in args), kwargs, output=out)
    for sr in (MAX_SIGNED, MAX_ABS):
        for g, dt in ((g32, np.float32), (g64, np.float64)):
            B = paths_mod._max_backward(g, sr, paths_mod.pass_dtype(g))
            dtypes = {b.arr.dtype for b in B if b is not None}
            assert dtypes == {np.dtype(dt)}, (sr, dtypes)


def test_float32_seed_is_what_makes_a_pass_float32():
    """The same float32 graph seeded with float64 values runs in float64 throughout (the search's
    fallback), and both passes agree to float32's rounding."""
    model, args, kwargs, out = tiny_attention(seed=0)
    g = gg.capture(model.float(), args, kwargs, output=out)
    B64 = backward(g, MAX_SIGNED)
    B32 = paths_mod._max_backward(g, MAX_SIGNED, np.float32)
    for b64, b32 in zip(B64, B32):
        assert (b64 is None) == (b32 is None)
        if b64 is not None:
            assert b64.arr.dtype == np.float64 and b32.arr.dtype == np.float32
            np.testing.assert_allclose(b32.real(), b64.real(), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------- near ties
@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), order=st.sampled_from(ORDERS), k=st.integers(1, 30))
def test_k_best_with_float32_near_ties_matches_brute_force(seed, order, k):
    """Path weights a few float32 ulps apart (and exact ties): the k best, in exact order, with
    the tie rule, as the brute force ranks them by exact float64 weights."""
    mats = near_tie_mats(seed)
    check_exact(layered32(mats), mats, order, k)


@pytest.mark.parametrize("order", ORDERS)
def test_every_path_of_a_near_tie_graph_in_exact_order(order):
    mats = near_tie_mats(7, widths=(5, 4, 3, 3))
    n = len(brute_ranked(mats, order))
    got = check_exact(layered32(mats), mats, order, n + 3)
    assert len(got) == n


def test_near_ties_the_float32_values_cannot_order_are_ranked_exactly():
    """Two paths: 1 * (1 + 2^-12)^2 (exactly 1 + 2^-11 + 2^-24) against (1 + 2^-11) * 1 -- 2^-24
    apart, which float32 rounds away (1 + 2^-11 + 2^-24 is not a float32). The better one must
    come first, in either listing."""
    a = 1.0 + 2.0 ** -12
    # x0 -> h0 -> s: (1 + 2^-11) * 1; x0 -> h1 -> s: a * a. In float32 both are 1 + 2^-11 (the
    # 2^-24 rounds to even), and the tie rule alone would put h0's path first.
    mats = [np.array([[1.0 + 2.0 ** -11], [a]]), np.array([[1.0, a]])]
    g = layered32(mats)
    assert np.float32(a) * np.float32(a) == np.float32(1.0 + 2.0 ** -11)
    for order in ORDERS:
        got = check_exact(g, mats, order, 2)
        assert got[0].weight == a * a > got[1].weight == 1.0 + 2.0 ** -11
        assert [h.flat_index for h in got[0].hops] == [0, 1, 0]
        assert check_exact(g, mats, order, 1)[0].weight == a * a


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_crowd_of_exact_ties_hands_over_to_the_float64_pass(sign, monkeypatch):
    """5,000 inputs tied exactly: the float32 pass cannot tell exact ties from near ones and would
    rank the whole crowd; past ``_CROWD`` paths the float64 pass answers, with the tie rule."""
    n = 5000
    mats = [np.full((1, n), sign)]
    g = layered32(mats)
    dtypes = []
    search = paths_mod._search

    def spy(g, order, masks, k, dtype, bar):
        dtypes.append(np.dtype(dtype).name)
        return search(g, order, masks, k, dtype, bar)
    monkeypatch.setattr(paths_mod, "_search", spy)
    for order in ORDERS:
        dtypes.clear()
        got = g.top_paths(k=3, order=order, progress=False)
        assert [(p.weight, p.source[1]) for p in got] == [(sign, (0,)), (sign, (1,)), (sign, (2,))]
        assert dtypes == ["float32", "float64"]


def test_the_rounding_allowance_is_needed():
    """With no allowance for float32 rounding (the search's float64 tolerance alone), some draw of
    the near-tie graphs comes out misordered: the allowance is what the tests above rely on."""
    wrong = 0
    for seed in range(60):
        mats = near_tie_mats(seed)
        g = layered32(mats)
        for order in ORDERS:
            want = [w[3] for w in brute_ranked(mats, order)[:5]]
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(paths_mod, "_ROUNDINGS_PER_HOP", 0)
                got = [hops_of(p) for p in g.top_paths(k=5, order=order, progress=False)]
            wrong += got != want
    assert wrong > 0


# ---------------------------------------------------------------------------- float32 models
MODELS = {
    "mlp_tanh": (tiny_mlp, dict(seed=1, widths=(3, 4, 2), batch=2)),
    "residual_ln": (tiny_residual_ln, dict(seed=1, d=3, rows=2)),
    "attention": (tiny_attention, dict(seed=1)),
}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_float32_model_k_best_matches_oracle(kind, order):
    builder, params = MODELS[kind]
    model, args, kwargs, out = builder(**params)
    model = model.float()
    args = tuple(a.float() if a.is_floating_point() else a for a in args)
    g = gg.capture(model, args, kwargs, output=out)
    assert paths_mod.pass_dtype(g) == np.float32
    srcs = [g.nodes[i].fx_name for i in g.sources.values()]
    o = ScalarOracle(model, args, kwargs, out, source_fx_names=srcs)
    ranked = o.ranked(order)
    got = g.top_paths(k=len(ranked) + 3, order=order, include_views=True, progress=False)
    assert len(got) == len(ranked)
    np.testing.assert_allclose([p.weight for p in got], [q.weight for q in ranked], rtol=1e-5, atol=0)
    key = (lambda q: q.log_abs) if order == "magnitude" else (lambda q: q.sign * q.log_abs + 1e3 * q.sign)
    for r, (p, q) in enumerate(zip(got, ranked)):
        neighbours = [ranked[j] for j in (r - 1, r + 1) if 0 <= j < len(ranked)]
        if all(abs(key(q) - key(n)) > 1e-4 for n in neighbours):       # well separated: the same path
            assert tuple((g.nodes[h.node_id].fx_name, h.flat_index) for h in p.hops) == tuple(q.nodes)
        assert math.isfinite(p.log_abs_weight)
