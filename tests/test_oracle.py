"""The brute-force oracle itself: the sum of its path weights per source element must equal
torch.autograd's gradient, and hand-countable graphs must give the hand-counted paths."""
import math

import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from oracle import ScalarOracle, autograd_gradient, tiny_attention, tiny_mlp, tiny_residual_ln

SETTINGS = settings(max_examples=2, deadline=None, derandomize=True)


def _check(builder, embedding=None, **params):
    model, args, kwargs, out = builder(**params)
    src = None if embedding is None else ["embedding"]
    o = ScalarOracle(model, args, kwargs, out, source_fx_names=src)
    want = autograd_gradient(model, args, kwargs, out, embedding=embedding)
    got = list(o.gradient().values())
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    assert len(o.paths()) > 1
    return o


@SETTINGS
@given(seed=st.integers(0, 10_000), hidden=st.integers(1, 4), batch=st.integers(1, 2),
       act=st.sampled_from(["tanh", "relu", "gelu"]))
def test_oracle_gradient_mlp(seed, hidden, batch, act):
    _check(tiny_mlp, seed=seed, widths=(3, hidden, 2), batch=batch, act=act)


@SETTINGS
@given(seed=st.integers(0, 10_000), d=st.integers(2, 3))
def test_oracle_gradient_residual_layernorm(seed, d):
    _check(tiny_residual_ln, seed=seed, d=d)


@SETTINGS
@given(seed=st.integers(0, 10_000), tokens=st.integers(2, 3))
def test_oracle_gradient_attention_over_embeddings(seed, tokens):
    _check(tiny_attention, embedding="embed", seed=seed, tokens=tokens)


class Fig1(torch.nn.Module):
    """Paper Fig. 1: f(x, y) = e^x + (x - y) * y."""

    def forward(self, x, y):
        return torch.exp(x) + (x - y) * y


def test_oracle_paper_figure_1_paths_by_hand():
    x, y = torch.tensor([0.5], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)
    o = ScalarOracle(Fig1(), (x, y), output=lambda f: f[0])
    xs, ys = list(o.sources)
    by_source = {}
    for p in o.paths():
        by_source.setdefault(p.source[0], []).append(p)
    # x: via e^x (weight e^x) and via (x - y) * y (weight 1 * y); y: via -1 * y and via (x - y)
    assert sorted(p.weight for p in by_source[xs]) == sorted([math.exp(0.5), 2.0])
    assert sorted(p.weight for p in by_source[ys]) == sorted([-2.0, 0.5 - 2.0])
    # every hop is a non-view op; the output select f[0] is a view and adds nothing
    assert sorted(p.length for p in o.paths()) == [2, 2, 3, 3]
    assert o.gradient()[xs][0] == math.exp(0.5) + 2.0
    Z = math.exp(0.5) + 2.0 + 2.0 + 1.5
    assert math.isclose(o.Z(), Z) and math.isclose(o.log_Z(), math.log(Z))
    ps = np.array([math.exp(0.5), 2.0, 2.0, 1.5]) / Z
    assert math.isclose(o.entropy(), float(-(ps * np.log(ps)).sum()))


def test_oracle_zero_weight_edges_are_not_edges():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, -1.0]]))
        model[0].bias.zero_()
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    o = ScalarOracle(model, (x,), output=lambda y: y[0, 0])
    # unit 1 is dead (relu'(-3) = 0) and weight[0, 1] = 0: only x0 -> h0 -> relu -> out remains
    assert len(o.paths()) == 1
    assert o.paths()[0].source[1] == 0


def test_oracle_length_counts_non_view_consumers():
    model = torch.nn.Identity()
    x = torch.arange(6, dtype=torch.float64).reshape(2, 3) + 1
    o = ScalarOracle(model, (x,), output=lambda t: (t * 3).reshape(-1).tanh()[4])
    (p,) = o.paths()
    # sink select (view, +0) <- tanh (+1) <- reshape/view (+0) <- mul (+1) <- x
    assert p.length == 2
    assert math.isclose(p.weight, 3 * (1 - math.tanh(15.0) ** 2))
