"""Entropy of the path distribution against brute-force enumeration of the scalar graph, and on
graphs whose answer is known by hand."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import gradgraph as gg
from gradgraph.errors import QueryError
from oracle import CASES, ScalarOracle, get_case

#: every small model of ``oracle.CASES`` (MLPs, residual LayerNorm, attention over embeddings, at
#: both granularities); captures and enumerations are cached and shared between tests
ALL_CASES = pytest.mark.parametrize("case", range(len(CASES)))


def _source_fx(g, name):
    return g.nodes[g.sources[name]].fx_name


@ALL_CASES
def test_entropy_total_matches_enumeration(case):
    g, o, _ = get_case(case)
    assert math.isclose(g.entropy(), o.entropy(), rel_tol=1e-9)


@ALL_CASES
def test_entropy_per_source_matches_enumeration(case):
    g, o, _ = get_case(case)
    got, want = g.entropy(per_source=True), o.entropy(per_source=True)
    assert set(got) == set(g.sources)
    for name in g.sources:
        np.testing.assert_allclose(got[name], want[_source_fx(g, name)], rtol=1e-9, atol=1e-12)


@ALL_CASES
@settings(max_examples=2, deadline=None, derandomize=True)
@given(data=st.data())
def test_entropy_grouped_matches_enumeration(case, data):
    g, o, _ = get_case(case)
    name = next(iter(g.sources))
    shape = g.nodes[g.sources[name]].shape
    n = int(np.prod(shape))
    labels = np.array(data.draw(st.lists(st.integers(-1, 2), min_size=n, max_size=n)), dtype=np.int64)
    got = g.entropy(groups={name: labels.reshape(shape)})[name]
    groups = [np.flatnonzero(labels == k).tolist() for k in range(int(labels.max()) + 1)]
    want = o.entropy(groups={_source_fx(g, name): groups})[_source_fx(g, name)]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    # rows (e.g. one token's embedding units) as groups: the paper's Eq. 3 aggregation
    rows = np.repeat(np.arange(shape[0]), n // shape[0])
    got = g.entropy(groups={name: rows.reshape(shape)})[name]
    want = o.entropy(groups={_source_fx(g, name): [np.flatnonzero(rows == k).tolist()
                                                    for k in range(shape[0])]})[_source_fx(g, name)]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    # the same groups named by their axis
    np.testing.assert_allclose(g.entropy(groups={name: 0})[name], want, rtol=1e-9, atol=1e-12)


def test_entropy_single_path_is_zero():
    model = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Tanh(), torch.nn.Linear(1, 1)).double()
    g = gg.capture(model, (torch.tensor([[0.3]], dtype=torch.float64),), output=lambda y: y[0, 0])
    assert abs(g.entropy()) < 1e-12
    assert abs(g.entropy(per_source=True)["input"].item()) < 1e-12


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_entropy_of_n_equal_magnitude_paths_is_log_n(n):
    model = torch.nn.Linear(n, 1, bias=False).double()
    with torch.no_grad():   # |w| = 0.7 everywhere, signs mixed: only magnitudes matter
        model.weight.copy_(0.7 * torch.tensor([[(-1.0) ** i for i in range(n)]], dtype=torch.float64))
    g = gg.capture(model, (torch.randn(1, n, dtype=torch.float64),), output=lambda y: y[0, 0])
    assert math.isclose(g.entropy(), math.log(n), rel_tol=1e-12, abs_tol=1e-12)
    # each element has one path: per-element entropies are 0
    np.testing.assert_allclose(g.entropy(per_source=True)["input"], 0.0, atol=1e-12)
    # one group of all n elements is the whole distribution
    assert math.isclose(g.entropy(groups={"input": np.zeros((1, n), dtype=int)})["input"][0], math.log(n),
                        rel_tol=1e-12, abs_tol=1e-12)


def test_entropy_is_nan_where_no_path_arrives():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, -1.0]]))
        model[0].bias.zero_()
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    g = gg.capture(model, (x,), output=lambda y: y[0, 0])
    o = ScalarOracle(model, (x,), output=lambda y: y[0, 0])
    got = g.entropy(per_source=True)["input"]
    want = o.entropy(per_source=True)[next(iter(o.sources))]
    assert np.isnan(got[0, 1]) and np.isnan(want[0, 1])
    assert got[0, 0] == pytest.approx(0.0, abs=1e-12)
    assert g.entropy() == pytest.approx(0.0, abs=1e-12)


def test_entropy_rejects_bad_groups():
    model = torch.nn.Linear(3, 1).double()
    g = gg.capture(model, (torch.randn(1, 3, dtype=torch.float64),), output=lambda y: y[0, 0])
    with pytest.raises(QueryError, match="integer label array"):
        g.entropy(groups={"input": [0.5, 1.0, 2.0]})
    with pytest.raises(QueryError, match="integer label array"):
        g.entropy(groups={"input": [0, 1]})
    with pytest.raises(QueryError, match="unknown source"):
        g.entropy(groups={"nope": [0, 1, 2]})


def test_float32_model_matches_enumeration():
    """A float32 model's products (the layer norm's fused entropy product, the matmuls) run in
    float32, its own precision; the entropy still matches the float64 enumeration over the
    recorded values to float32 accuracy."""
    from oracle import tiny_residual_ln

    model, (x,), kwargs, out = tiny_residual_ln(seed=3, d=12, rows=2)
    model, x = model.float(), x.float()
    g = gg.capture(model, (x,), kwargs, output=out)
    assert [e.jac.precision for e in g.edges if e.jac.kind == "rowblock"] == ["float32"]
    o = ScalarOracle(model, (x,), kwargs, out, source_fx_names=[_source_fx(g, n) for n in g.sources])
    assert math.isclose(g.entropy(), o.entropy(), rel_tol=1e-5)
    got, want = g.entropy(per_source=True)["x"], o.entropy(per_source=True)[_source_fx(g, "x")]
    np.testing.assert_allclose(got, want, rtol=1e-5)
