"""The max pass keeps only some nodes' values and derives the others' scores when a path search
reads them (``_derived_nodes`` in gradgraph/algorithms/paths.py): the derived scores against the
values a pass that keeps every node holds, the paths found against that full-keeping search and
against brute-force enumeration (tests/oracle.py), and the Jacobians' per-element out-edge
lookup against their dense matrices."""
import math
from collections import Counter

import numpy as np
import pytest
import torch

import gradgraph as gg
from gradgraph.algorithms import paths as paths_module
from gradgraph.algorithms.paths import MAGNITUDE, SIGNED, _derived_nodes, _Values, pass_dtype, shared_max_passes
from gradgraph.jacobians import SparseJacobian
from oracle import ScalarOracle, tiny_attention, tiny_mlp, tiny_residual_ln, tiny_writes

MODELS = {
    "mlp_gelu": (tiny_mlp, dict(seed=3, widths=(3, 4, 2), batch=2, act="gelu")),
    "residual_ln": (tiny_residual_ln, dict(seed=2, d=3, rows=2)),
    "attention": (tiny_attention, dict(seed=2)),
    "writes": (tiny_writes, dict(seed=2)),
}
ORDERS = {"signed": SIGNED, "magnitude": MAGNITUDE}
_CACHE = {}


@pytest.fixture(autouse=True)
def derive_at_any_size(monkeypatch):
    """These models are far below the size from which a max pass derives values
    (``DERIVE_ABOVE_BYTES``): derive at any size, so that the tests exercise the derivation."""
    monkeypatch.setattr(paths_module, "DERIVE_ABOVE_BYTES", 0)


def case(kind, dtype=torch.float64):
    """(graph, model pieces) of one model of MODELS, captured in ``dtype``."""
    key = (kind, dtype)
    if key not in _CACHE:
        builder, params = MODELS[kind]
        model, args, kwargs, out = builder(**params)
        model = model.to(dtype)
        args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
        g = gg.capture(model, args, kwargs, output=out)
        _CACHE[key] = (g, (model, args, kwargs, out))
    return _CACHE[key]


def path_keys(paths):
    return [(p.weight, p.log_abs_weight, tuple((h.node_id, h.flat_index) for h in p.hops), tuple(p.edge_weights))
            for p in paths]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("order", sorted(ORDERS))
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_derived_scores_equal_the_kept_values(kind, order, dtype):
    """Every element's score of every derived node equals the score read from a pass that keeps
    every value (float64: to float64 rounding; float32: within the pass's rounding bound, the
    kept values being float32), and a derived node's values are not held."""
    g, _ = case(kind, dtype)
    derived = _derived_nodes(g)
    assert derived, "the model has elementwise ops and views: some nodes must be derived"
    o = ORDERS[order]
    dt = pass_dtype(g)
    values = _Values(g, o, dt)
    assert values.derived == derived
    assert all(values.B[t] is None for t in derived)
    with shared_max_passes(g):
        full = _Values(g, o, dt)
    assert not full.derived
    assert np.array_equal(values.reached, full.reached)
    tol = 1e-12 if dt == np.float64 else 2 * full.error
    checked = 0
    for t in sorted(derived):
        if not full.reached[t]:
            continue
        idx = np.arange(g.nodes[t].numel)
        for p in ((0, 1) if o.signed else (0,)):
            v1, s1, l1 = values.scores(t, idx, p)
            v2, s2, l2 = full.scores(t, idx, p)
            assert np.array_equal(v1, v2), (g.nodes[t].name, p)
            assert np.array_equal(s1[v1], s2[v2]), (g.nodes[t].name, p)
            np.testing.assert_allclose(l1[v1], l2[v2], rtol=tol, atol=tol)
            checked += int(v1.sum())
    assert checked > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("order", sorted(ORDERS))
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_paths_equal_the_full_keeping_search(kind, order, dtype):
    """All paths, ranked, with derived values: the same paths, weights and hops, in the same
    order, as a search over a pass that keeps every node's values."""
    g, _ = case(kind, dtype)
    got = g.top_paths(k=10 ** 6, order=order, include_views=True)
    with shared_max_passes(g):
        ref = g.top_paths(k=10 ** 6, order=order, include_views=True)
    assert len(got) == len(ref) > 1
    assert path_keys(got) == path_keys(ref)


@pytest.mark.parametrize("order", sorted(ORDERS))
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_paths_with_derived_values_match_brute_force(kind, order):
    g, (model, args, kwargs, out) = case(kind)
    srcs = [g.nodes[i].fx_name for i in g.sources.values()]
    ranked = ScalarOracle(model, args, kwargs, out, source_fx_names=srcs).ranked(order)
    got = g.top_paths(k=len(ranked) + 3, order=order, include_views=True)
    assert len(got) == len(ranked)
    np.testing.assert_allclose([p.weight for p in got], [q.weight for q in ranked], rtol=1e-9, atol=0)
    nodes = [tuple((g.nodes[h.node_id].fx_name, h.flat_index) for h in p.hops) for p in got]
    assert Counter(nodes) == Counter(tuple(q.nodes) for q in ranked)
    for p in got:
        la = math.fsum(math.log(abs(w)) for w in p.edge_weights)
        assert p.log_abs_weight == pytest.approx(la, rel=1e-12, abs=1e-12)


def test_gpt2_layout_ten_best_equal_the_full_keeping_search():
    """A small GPT-2 (transformers, float32): most scalars are derived, and the 10 best paths in
    both orders equal those of the full-keeping search."""
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32,
                        attn_implementation="eager", use_cache=False)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(1))
    g = gg.capture(model, (), {"input_ids": ids}, output=lambda o: o.logits[0, -1, 1] - o.logits[0, -1, 7])
    derived = _derived_nodes(g)
    share = sum(g.nodes[t].numel for t in derived) / sum(n.numel for n in g.nodes)
    assert share > 0.5
    for order in ORDERS:
        got = g.top_paths(k=10, order=order, include_views=True)
        with shared_max_passes(g):
            ref = g.top_paths(k=10, order=order, include_views=True)
        assert path_keys(got) == path_keys(ref)


# ---------------------------------------------------------------------------- the Jacobians' lookup
def _matmul(wrt):
    from gradgraph.jacobians import MatmulJacobian
    other = np.random.default_rng(3).integers(-2, 3, (2, 3, 4)).astype(np.float64)   # zeros: no edges
    in_shape = (2, 5, 3) if wrt == "left" else (2, 4, 5)
    out_shape = (2, 5, 4) if wrt == "left" else (2, 3, 5)
    return MatmulJacobian(out_shape, in_shape, other, wrt)


@pytest.mark.parametrize("make, degree", [
    (lambda: SparseJacobian((5,), (5,), vals=np.array([1.0, -2.0, 0.0, 3.0, 0.5])), 1),   # elementwise, a zero
    (lambda: SparseJacobian((2,), (6,), rows=np.array([0, 0, 0, 1, 1, 1])), 1),           # a sum over rows
    (lambda: SparseJacobian((3,), (7,), cols=np.array([1, 4, 6])), 1),                    # a strided slice
    (lambda: SparseJacobian((4,), (4,), rows=np.array([2, 0, 3, 1]), vals=np.array([1.5, -1, 2, 4.0])), 1),
    (lambda: SparseJacobian((2,), (2,), rows=np.zeros(0, int), cols=np.zeros(0, int), vals=np.zeros(0)), 1),
    (lambda: _matmul("left"), 4),
    (lambda: _matmul("right"), 3),
])
def test_out_edges_of_against_the_dense_matrix(make, degree):
    """The edges of many elements at once (repeated and unordered indices) are the non-zero
    entries of their columns of the dense Jacobian, at most ``out_degree`` per element."""
    jac = make()
    assert jac.out_degree == degree
    dense = jac.to_dense()
    idx = np.array([*range(jac.in_numel), *reversed(range(jac.in_numel))])
    which, o, w = jac.out_edges_of(idx)
    got = Counter((int(a), int(b), float(c)) for a, b, c in zip(which, o, w))
    want = Counter((a, int(i), float(dense[i, j])) for a, j in enumerate(idx) for i in np.flatnonzero(dense[:, j]))
    assert got == want
    assert max(Counter(which.tolist()).values(), default=0) <= degree


def test_broadcast_has_no_out_degree_and_lists_its_edges_generically():
    """A broadcast (two edges per element, columns not increasing) gives no out_degree, so its
    input is never derived; its out_edges_of is the generic one, against the dense matrix."""
    jac = SparseJacobian((2, 3), (3,), cols=np.array([0, 1, 2, 0, 1, 2]),
                         vals=np.array([1.0, -2.0, 3.0, 4.0, 0.5, -6.0]))   # expand (3,) -> (2, 3)
    assert jac.out_degree is None
    dense = jac.to_dense()
    idx = np.array([2, 0, 2, 1])
    which, o, w = jac.out_edges_of(idx)
    got = Counter((int(a), int(b), float(c)) for a, b, c in zip(which, o, w))
    want = Counter((a, int(i), float(dense[i, j])) for a, j in enumerate(idx) for i in np.flatnonzero(dense[:, j]))
    assert got == want and len(got) == 8


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_values_are_derived_only_above_the_size_threshold(monkeypatch, order):
    """A pass whose values take at most DERIVE_ABOVE_BYTES keeps them all; one above derives; the
    paths are the same either way (and brute force agrees, test above)."""
    g, _ = case("mlp_gelu")
    o = ORDERS[order]
    dt = pass_dtype(g)
    size = sum(n.numel for n in g.nodes) * (2 if o.signed else 1) * np.dtype(dt).itemsize
    monkeypatch.setattr(paths_module, "DERIVE_ABOVE_BYTES", size)
    kept = _Values(g, o, dt)
    assert not kept.derived and all(kept.B[t] is not None for t in range(len(g.nodes)) if kept.reached[t])
    found_kept = path_keys(g.top_paths(k=20, order=order))
    monkeypatch.setattr(paths_module, "DERIVE_ABOVE_BYTES", size - 1)
    derived = _Values(g, o, dt)
    assert derived.derived == _derived_nodes(g) and derived.derived
    assert path_keys(g.top_paths(k=20, order=order)) == found_kept
