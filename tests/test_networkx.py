"""networkx views: the tensor view mirrors the graph; the scalar view is the paper's gradient
graph, checked against torch.autograd by networkx path enumeration."""
import math

import networkx as nx
import numpy as np
import pytest
import torch

import gradgraph as gg
from gradgraph.export.nx import to_networkx


class Tiny(torch.nn.Module):
    """Linear -> softmax -> layer norm -> tanh * x: contraction, row-block and broadcast kinds."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.norm = torch.nn.LayerNorm(3)

    def forward(self, x):
        h = torch.softmax(self.lin(x), dim=-1)
        h = torch.tanh(self.norm(h)) * x
        return h.sum(0)[1] * 2.0


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Tiny().double()
    x = torch.randn(2, 3, dtype=torch.double)
    g = gg.capture(model, (x,))
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xr), xr)
    return g, grad


def test_tensor_view_mirrors_graph(tiny):
    g, _ = tiny
    G = to_networkx(g, level="tensor")
    assert isinstance(G, nx.MultiDiGraph)
    assert sorted(G.nodes) == list(range(len(g.nodes)))
    assert G.number_of_edges() == len(g.edges)
    for i, n in enumerate(g.nodes):
        a = G.nodes[i]
        assert (a["name"], a["op"], a["shape"], a["role"], a["numel"]) == \
            (n.name, n.op, tuple(n.shape), n.role, math.prod(n.shape))
    for k, e in enumerate(g.edges):
        a = G.edges[e.src, e.dst, k]
        assert a["kind"] == e.jac.kind and a["op"] == g.nodes[e.dst].op
        # edge count checked against the materialised dense Jacobian
        assert a["nnz"] == int(np.count_nonzero(e.jac.to_dense()))
    assert nx.is_directed_acyclic_graph(G)
    assert list(nx.topological_sort(G))[-1] == g.sink


def test_scalar_view_sum_over_paths_is_autograd(tiny):
    g, grad = tiny
    G = to_networkx(g, level="scalar")
    sink = (g.sink, 0)
    src = g.sources["x"]
    got = np.zeros(grad.numel())
    for j in range(grad.numel()):
        for path in nx.all_simple_edge_paths(G, (src, j), sink):
            got[j] += math.prod(G.edges[e]["w"] for e in path)
    np.testing.assert_allclose(got, grad.numpy().reshape(-1), rtol=1e-10, atol=1e-12)


def test_scalar_view_edges_are_dense_nonzeros(tiny):
    g, _ = tiny
    G = to_networkx(g, level="scalar")
    assert G.number_of_nodes() == sum(n.numel for n in g.nodes)
    assert G.number_of_edges() == sum(int(np.count_nonzero(e.jac.to_dense())) for e in g.edges)
    assert all(w != 0 for _, _, w in G.edges(data="w"))


def test_scalar_view_cap(tiny):
    g, _ = tiny
    with pytest.raises(gg.QueryError, match="level='tensor'"):
        to_networkx(g, level="scalar", max_edges=5)


def test_bad_level(tiny):
    g, _ = tiny
    with pytest.raises(gg.QueryError, match="unknown level"):
        g.to_networkx(level="neuron")


def test_method_matches_function(tiny):
    g, _ = tiny
    assert nx.utils.graphs_equal(g.to_networkx(), to_networkx(g))
