"""Flow (inside-outside) and the path-length distribution against brute-force enumeration."""
import math

import numpy as np
import pytest
import torch

import gradgraph as gg
from gradgraph.algorithms.flow import FLOW_LEVELS, total_flow
from gradgraph.errors import QueryError
from oracle import CASES, captured_case, get_case, tiny_mlp

#: every small model of ``oracle.CASES`` (MLPs, residual LayerNorm, attention over embeddings, at
#: both granularities); captures and enumerations are cached and shared between tests
ALL_CASES = pytest.mark.parametrize("case", range(len(CASES)))


@ALL_CASES
def test_flow_per_element_matches_enumeration(case):
    g, o, _ = get_case(case)
    got, want = g.flow(by="element"), o.tensor_flow()
    assert set(got) == {n.name for n in g.nodes}
    for n in g.nodes:
        np.testing.assert_allclose(got[n.name], want[n.fx_name], rtol=1e-9, atol=1e-300)
    # the sink carries every path; each source element carries the paths ending there
    assert math.isclose(got[g.sink_node.name].item(), o.Z(), rel_tol=1e-9)


@ALL_CASES
def test_flow_per_node_and_module_match_enumeration(case):
    g, o, _ = get_case(case)
    per_node = g.flow(by="node")
    tensor = o.tensor_flow()
    for n in g.nodes:
        assert math.isclose(per_node[n.name], float(tensor[n.fx_name].sum()), rel_tol=1e-9, abs_tol=1e-300)
    # module flow from the oracle's own module labels: a scalar node counts toward its innermost
    # module and every enclosing one ("a.b.c" lies in "a" and "a.b")
    want = {}
    for u, f in o.flow().items():
        module = o.G.nodes[u]["module"]
        keys = [module] if not module or module.startswith("<") else \
            [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)]
        for key in keys:
            want[key] = want.get(key, 0.0) + f
    got = g.flow(by="module")
    assert {k for k, v in got.items() if v > 0} == set(want)
    for key, v in want.items():
        assert math.isclose(got[key], v, rel_tol=1e-9), key


@ALL_CASES
def test_path_lengths_match_enumeration(case):
    g, o, _ = get_case(case)
    got, want = g.path_lengths(), o.length_distribution()
    n = max(len(got), len(want))
    got, want = np.pad(got, (0, n - len(got))), np.pad(want, (0, n - len(want)))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-300)
    assert math.isclose(got.sum(), total_flow(g), rel_tol=1e-12)
    assert math.isclose(total_flow(g), o.Z(), rel_tol=1e-9)


@ALL_CASES
def test_log_variants_agree(case):
    g, o, _ = get_case(case)
    for by in FLOW_LEVELS:
        plain, logs = g.flow(by=by), g.flow(by=by, log=True)
        for k in plain:
            with np.errstate(divide="ignore"):
                np.testing.assert_allclose(np.log(plain[k]), logs[k], rtol=1e-12, atol=1e-12)
    assert math.isclose(total_flow(g, log=True), o.log_Z(), rel_tol=1e-9)
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(np.log(g.path_lengths()), g.path_lengths(log=True), rtol=1e-12)


def _check_flow(g, o):
    per_element, per_node = g.flow(by="element"), g.flow(by="node")
    want = o.tensor_flow()
    for n in g.nodes:
        np.testing.assert_allclose(per_element[n.name], want[n.fx_name], rtol=1e-9, atol=1e-300)
        assert math.isclose(per_node[n.name], float(want[n.fx_name].sum()), rel_tol=1e-9, abs_tol=1e-300)


def test_flow_through_a_wide_head_reached_at_two_elements():
    # the sink reads 2 of the 2 x 40 head outputs: the head's tensors are held, and computed by the
    # inside pass, at those elements only (rows of the head's Jacobian instead of its product)
    g, o, _ = captured_case(tiny_mlp, seed=8, widths=(3, 5, 40), batch=2)
    _check_flow(g, o)


def test_flow_rows_extracted_one_at_a_time(monkeypatch):
    # a one-hot block of one row: a node held at several elements is computed row by row
    import gradgraph.algorithms.flow as flow_module
    monkeypatch.setattr(flow_module, "_BLOCK", 1)
    for case in (1, 5, 7):
        _check_flow(*get_case(case)[:2])


class _Uneven(torch.nn.Module):
    """Elements of one tensor at different distances from the sink: h[0] reaches it in a few hops,
    h[1] through three more tanh; a dead ReLU unit below h removes one of the two groups of lengths,
    and a residual from the input joins a short path to the long ones."""

    def __init__(self, dead):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2).double()
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[0.7, -0.4], [0.3, 0.9]]))
            self.lin.bias.copy_(torch.tensor([0.5, 0.5]))
            self.lin.bias[dead] = -5.0           # pre-activation < 0: no path through that unit

    def forward(self, x):
        h = torch.relu(self.lin(torch.tanh(torch.tanh(x))))
        deep = torch.tanh(torch.tanh(torch.tanh(1.5 * h[:, 1:])))
        return torch.cat([h[:, :1], deep], 1).sum() + torch.sin(x).sum()


def uneven_lengths(dead):
    x = torch.tensor([[0.3, -0.8]], dtype=torch.float64)
    return _Uneven(dead), (x,), {}, None


@pytest.mark.parametrize("dead", [0, 1])
def test_path_lengths_with_gaps_match_enumeration(dead):
    """Paths of very different lengths end at one source, and a dead unit removes all paths of
    some lengths: the length polynomials are held from their shortest live length on and trimmed
    where a Jacobian zeroes whole channels."""
    g, o, _ = captured_case(uneven_lengths, dead=dead)
    got, want = g.path_lengths(), o.length_distribution()
    assert len(got) == len(want) and want[0] == want[1] == 0     # shortest path: >= 2 hops
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-300)
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(g.path_lengths(log=True), np.log(want), rtol=1e-12)
    assert math.isclose(got.sum(), o.Z(), rel_tol=1e-9)


def test_flow_by_hand_two_paths():
    model = torch.nn.Sequential(torch.nn.Linear(2, 1, bias=False), torch.nn.Tanh()).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[2.0, -3.0]]))
    x = torch.tensor([[0.1, 0.2]], dtype=torch.float64)
    g = gg.capture(model, (x,), output=lambda y: y[0, 0])
    d = 1 - math.tanh(0.2 - 0.6) ** 2
    f = g.flow()
    np.testing.assert_allclose(f["input"], [[2 * d, 3 * d]], rtol=1e-12)
    assert math.isclose(g.flow(by="node")[g.sink_node.name], 5 * d, rel_tol=1e-12)
    # mm (length 1) then tanh (length 2); the output select is a view and adds nothing
    np.testing.assert_allclose(g.path_lengths(), [0, 0, 5 * d], rtol=1e-12, atol=0)


def test_flow_rejects_unknown_level():
    model = torch.nn.Linear(2, 1).double()
    g = gg.capture(model, (torch.randn(1, 2, dtype=torch.float64),), output=lambda y: y[0, 0])
    with pytest.raises(QueryError, match="'element', 'node', 'module'"):
        g.flow(by="tensor")


class _SqrtAndLinear(torch.nn.Module):
    """sqrt(x) (NaN value and derivative at a negative element) next to a finite branch in z."""

    def forward(self, x, z):
        return torch.sqrt(x).sum() + (torch.tanh(z) * 2.0).sum()


def test_nan_derivative_propagates_to_node_and_module_flow():
    """A NaN derivative makes the flow of every node it reaches NaN, at every level (as it makes
    the gradient NaN); nodes it does not reach keep their values. Expected values by hand (the
    brute-force oracle's jacrev spreads a NaN across a whole Jacobian row, so it cannot serve)."""
    x = torch.tensor([-1.0, 4.0], dtype=torch.float64)
    z = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
    g = gg.capture(_SqrtAndLinear(), (x, z), output=lambda y: y)
    dz = 2.0 * (1.0 - torch.tanh(z).numpy() ** 2)      # |d sink / d z_j|, one path each
    element = g.flow()
    np.testing.assert_allclose(element["x"], [np.nan, 0.25], rtol=1e-12)
    np.testing.assert_allclose(element["z"], dz, rtol=1e-12)
    by_node = g.flow(by="node")
    assert math.isnan(by_node["x"]) and math.isnan(by_node[g.sink_node.name])
    assert math.isclose(by_node["z"], dz.sum(), rel_tol=1e-12)
    sqrt = next(n.name for n in g.nodes if n.op_name == "sqrt")
    tanh = next(n.name for n in g.nodes if n.op_name == "tanh")
    assert math.isnan(by_node[sqrt]) and math.isclose(by_node[tanh], dz.sum(), rel_tol=1e-12)
    assert math.isnan(g.flow(by="node", log=True)["x"])
    assert all(math.isnan(v) for v in g.flow(by="module").values())      # every op is in ""
    assert math.isnan(total_flow(g))
    m = g.path_lengths()                     # the x paths have one length, the z paths another
    assert np.isnan(m).sum() == 1
    assert math.isclose(np.nansum(m), dz.sum(), rel_tol=1e-12) and np.count_nonzero(np.nan_to_num(m)) == 1
    # entropy and gradient show the NaN where it goes, and only there
    h = g.entropy(per_source=True)
    assert math.isnan(h["x"][0]) and h["x"][1] == 0.0 and np.isfinite(h["z"]).all()
    grad = {name: np.asarray(v) for name, v in g.gradient().items()}
    assert math.isnan(grad["x"][0]) and np.isfinite(grad["z"]).all()


# ---------------------------------------------------------------- the path-length pass's cut
def _cut_nodes_by_networkx(g):
    """Oracle for :func:`length_cuts`: the tensor nodes whose removal disconnects every source
    from the sink (the sink itself too), on the tensor graph without edges into sources (paths end
    at the first source they reach), found by networkx reachability."""
    import networkx as nx

    sources = set(g.sources.values())
    G = nx.DiGraph()
    G.add_nodes_from(range(len(g.nodes)))
    G.add_edges_from((e.src, e.dst) for e in g.edges if e.dst not in sources)
    G.add_edges_from(("start", i) for i in sources)
    on = nx.descendants(G, "start") & (nx.ancestors(G, g.sink) | {g.sink})
    cuts = {g.sink}
    for c in on - {g.sink}:
        H = G.subgraph(set(G) - {c})
        if not nx.has_path(H, "start", g.sink):
            cuts.add(c)
    return cuts


@ALL_CASES
def test_path_lengths_at_every_cut_match_enumeration(case):
    """The distribution met at any cut node (inside pass below it, outside pass above it, the
    length polynomials' windows of both) is the enumerated one; the cut nodes are those networkx
    finds."""
    from gradgraph.algorithms.flow import length_cuts, lengths_through

    g, o, _ = get_case(case)
    cuts = length_cuts(g)
    assert set(cuts) == _cut_nodes_by_networkx(g)
    want = o.length_distribution()
    for c in cuts:
        got = lengths_through(g, c)
        assert len(got) == len(want), g.nodes[c].name
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-300, err_msg=g.nodes[c].name)
        with np.errstate(divide="ignore"):
            np.testing.assert_allclose(lengths_through(g, c, log=True), o.log_length_distribution(),
                                       rtol=1e-9, err_msg=g.nodes[c].name)


class _ResidualStack(torch.nn.Module):
    """Residual tanh blocks: paths of many lengths, all through each block's output."""

    def __init__(self, d, depth):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return x


def residual_stack(seed=0, d=3, depth=3):
    torch.manual_seed(seed)
    x = torch.randn(1, d, dtype=torch.float64)
    return _ResidualStack(d, depth).double().eval(), (x,), {}, lambda y: y[0, 0] - 2.0 * y[0, 1]


def test_path_lengths_meet_in_the_middle_of_a_deep_graph():
    """In a stack of residual blocks the pass meets at a cut between the first block's input and
    the sink (the cheapest by its estimate), and the distribution there is the enumerated one."""
    from gradgraph.algorithms.flow import length_cuts

    g, o, _ = captured_case(residual_stack)
    cuts = length_cuts(g)
    chosen = min(cuts, key=cuts.get)
    assert chosen not in set(g.sources.values()) | {g.sink}
    got, want = g.path_lengths(), o.length_distribution()
    assert len(got) == len(want) and np.count_nonzero(want) >= 6      # paths of many lengths
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-300)


def test_polynomial_dot_matches_per_element_convolution():
    """sum_e f_e(x) b_e(x) against numpy's polynomial products element by element; a zero
    coefficient next to a NaN or infinite one stays zero (no path), as in the passes."""
    from gradgraph.algorithms.flow import _polynomial_dot

    rng = np.random.default_rng(0)
    f, b = rng.random((4, 6)), rng.random((3, 6))
    f[0, 1] = f[3, 2] = b[2, 4] = 0.0
    want = sum(np.convolve(f[:, e], b[:, e]) for e in range(6))
    np.testing.assert_allclose(_polynomial_dot(f, b), want, rtol=1e-12)
    f[1, 5], f[2, 5], b[:, 5] = np.nan, 0.0, [0.0, 1.0, 0.0]     # NaN at x^1 meets x^1 only
    b[0, 3], f[:, 3] = np.inf, [0.0, 0.0, 0.0, 2.0]              # inf at x^0 meets x^3 only
    got = _polynomial_dot(f, b)
    finite = sum(np.convolve(f[:, e], b[:, e]) for e in range(3))
    finite = finite + np.convolve(f[:, 4], b[:, 4]) + np.convolve(f[:, 3], [0.0, b[1, 3], b[2, 3]])
    assert np.isnan(got[2]) and np.isinf(got[3])
    keep = [0, 1, 4, 5]
    np.testing.assert_allclose(got[keep], (finite + np.convolve(np.nan_to_num(f[:, 5]), b[:, 5]))[keep],
                               rtol=1e-12)


class _Fig1(torch.nn.Module):
    def forward(self, x, y):
        return torch.exp(x) + (x - y) * y


def test_path_lengths_of_two_sources_at_each_cut_by_hand():
    """The paper's Fig. 1 graph (docs/semirings.md's worked example): two sources whose paths meet
    first at the add, so the add and the output select are the cut nodes; at x = 0, y = 2 the
    paths of length 2 carry 1 + 2 and those of length 3 carry 2 + 2, met at either cut."""
    from gradgraph.algorithms.flow import length_cuts, lengths_through

    x = torch.tensor([0.0], dtype=torch.float64)
    y = torch.tensor([2.0], dtype=torch.float64)
    g = gg.capture(_Fig1(), (x, y), output=lambda f: f[0])
    cuts = length_cuts(g)
    assert sorted(g.nodes[c].op_name for c in cuts) == ["add", "select"]
    for c in cuts:
        np.testing.assert_allclose(lengths_through(g, c), [0, 0, 3, 4], rtol=1e-12, atol=0)
