"""Memory: graphs hold values in the model's dtype and reference its weights; graph files load
lazily (memory-mapped) and give the same answers as files read at once.

Oracles: ``torch.autograd.grad`` (float32 models: at float32 tolerance, since the model itself
computes in float32), the eagerly loaded graph (bit for bit), the model's parameter memory, and
the kernel's account of which pages of the file are resident (``/proc/self/smaps``).
"""
from __future__ import annotations

import mmap
import os
import re
import sys

import numpy as np
import pytest
import torch

import gradgraph as gg

sys.path.insert(0, os.path.dirname(__file__))
from models import ZOO, autograd_gradient  # noqa: E402

MB = 2**20


def _mapped(a):
    """True when array ``a`` is a view of a memory map (its base chain ends in an mmap)."""
    while isinstance(a, np.ndarray):
        a = a.base
    return isinstance(a.obj if isinstance(a, memoryview) else a, mmap.mmap)


def _mapped_rss(path):
    """Bytes of this process's mappings of file ``path`` that are resident (pages touched)."""
    total, inside, path = 0, False, os.path.realpath(path)
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def _answers(g):
    """Every query's answer as plain arrays and numbers, on a fixed number of threads: by default a
    query takes fewer threads when the machine is busy, and its contractions then run through
    another BLAS (numpy's at one thread, torch's at more), whose sums round differently in the last
    bit -- answers compared bit for bit must come from the same thread count."""
    from gradgraph.threads import set_dynamic
    previous = set_dynamic(False)
    try:
        paths = g.top_paths(k=5)
        return {
            "gradient": {k: v.numpy() for k, v in g.gradient().items()},
            "entropy": g.entropy(),
            "paths": [(p.weight, [(h.node, h.index) for h in p.hops]) for p in paths],
            "flow": g.flow(),
            "lengths": g.path_lengths(),
        }
    finally:
        set_dynamic(previous)


def _same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
    else:
        assert a == b or (a != a and b != b)


@pytest.mark.parametrize("name", ["bert_mlm_mask", "cnn_norms"])
def test_lazy_load_gives_the_eager_answers_bitwise(name, tmp_path):
    model, args, kwargs, fn = ZOO[name]()
    g = gg.capture(model, args, kwargs, output=fn)
    path = tmp_path / "g.safetensors"
    g.save(path)
    lazy, eager = gg.load(path), gg.load(path, lazy=False)
    assert all(_mapped(n.value) for n in lazy.nodes if n.numel and n.value is not None)
    assert not any(_mapped(n.value) for n in eager.nodes if n.value is not None)
    _same(_answers(lazy), _answers(eager))
    _same(_answers(lazy), _answers(g))


def _wide_mlp(tmp_path):
    """A graph whose file is mostly one 8 MB weight matrix, saved; (path, model, x)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 1)).double()
    x = torch.randn(2, 1024, dtype=torch.float64)
    path = tmp_path / "wide.safetensors"
    gg.capture(model, (x,), output=lambda y: y.sum()).save(path)
    return path, model, x


def test_lazy_load_reads_only_what_a_query_touches(tmp_path):
    path, model, x = _wide_mlp(tmp_path)
    size = os.path.getsize(path)
    assert size > 8 * MB
    g = gg.load(path)
    # loading checked the header, the structure and the index arrays: the weight's pages are
    # not read, and the arrays are views of the file's map, not copies
    assert _mapped_rss(path) < 2 * MB
    weight_edges = [e for e in g.edges if e.jac.kind == "matmul" and e.jac.other.size == 1024 * 1024]
    assert len(weight_edges) == 1 and _mapped(weight_edges[0].jac.other)
    # a query that needs the weight reads it
    x_ = x.clone().requires_grad_(True)
    ref = torch.autograd.grad(model(x_).sum(), x_)[0]
    np.testing.assert_allclose(g.gradient()["input"].numpy(), ref.numpy(), rtol=1e-10)
    assert _mapped_rss(path) > 7 * MB


def test_eager_load_is_independent_of_the_file(tmp_path):
    """lazy=False reads everything during load: rewriting the file in place changes nothing."""
    path, model, x = _wide_mlp(tmp_path)
    g = gg.load(path, lazy=False)
    want = g.gradient()["input"].clone()
    size = os.path.getsize(path)
    with open(path, "r+b") as f:            # overwrite every data byte in place
        f.seek(size - 8 * MB)
        f.write(b"\x7f" * (8 * MB))
    torch.testing.assert_close(g.gradient()["input"], want, rtol=0, atol=0)


def test_lazy_graph_survives_replacing_and_deleting_its_file(tmp_path):
    path, model, x = _wide_mlp(tmp_path)
    g = gg.load(path)
    want = g.gradient()["input"].clone()
    torch.manual_seed(1)
    other = torch.nn.Sequential(torch.nn.Linear(3, 1)).double()
    gg.capture(other, (torch.randn(1, 3, dtype=torch.float64),), output=lambda y: y.sum()).save(path, overwrite=True)
    torch.testing.assert_close(g.gradient()["input"], want, rtol=0, atol=0)
    os.remove(path)
    torch.testing.assert_close(g.gradient()["input"], want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["residual_mlp_ln", "bert_mlm_mask"])
def test_float32_model_keeps_float32_values_and_its_gradient_matches(name):
    """A float32 model's graph holds float32 node values and Jacobian weights, references its
    weights, and its gradient equals autograd's at float32 tolerance (the model computes in
    float32; gradgraph accumulates the same float32 factors in float64)."""
    model, args, kwargs, fn = ZOO[name](dtype=torch.float32)
    g = gg.capture(model, args, kwargs, output=fn)
    floats = [n for n in g.nodes if n.dtype.startswith("float")]
    held = [n for n in floats if n.value is not None]
    assert held and all(n.dtype == "float32" for n in floats)
    assert all(n.value.dtype == np.float32 for n in held)
    sparse_vals = [e.jac.vals for e in g.edges if e.jac.kind == "sparse" and e.jac.vals is not None]
    assert sparse_vals and all(v.dtype == np.float32 for v in sparse_vals)
    params = [p.detach().numpy() for p in model.parameters()]
    others = [e.jac.other for e in g.edges if e.jac.kind == "matmul"]
    referenced = [o for o in others if any(np.shares_memory(o, p) for p in params)]
    assert referenced and all(o.dtype == np.float32 for o in others)
    ref = autograd_gradient(model, args, kwargs, fn)
    got = g.gradient()
    assert set(got) == set(ref)
    for k in ref:
        r = ref[k].detach().double().numpy()
        np.testing.assert_allclose(got[k].double().numpy(), r, rtol=1e-4, atol=1e-5 * np.abs(r).max())
        assert got[k].dtype == torch.float32


class _DropoutAndContiguous(torch.nn.Module):
    """Dropout in eval mode and ``contiguous()`` export as ``clone``: of a contiguous tensor (the
    dropout) and of a transposed one (the ``contiguous()``)."""

    def __init__(self, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(4, 6, generator=g, dtype=dtype))
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        h = self.drop(torch.tanh(x @ self.w))                     # clone of a contiguous tensor
        t = h.transpose(0, 1).contiguous()                        # clone of a transposed view
        return (t.view(-1) * torch.arange(1.0, 1 + t.numel(), dtype=t.dtype)).sum()


def test_clone_of_a_contiguous_value_holds_no_copy_and_the_gradient_is_exact():
    model = _DropoutAndContiguous(torch.float64).eval()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = gg.capture(model, (x,), values="all")      # the values of the clones and their inputs
    clones = [i for i, n in enumerate(g.nodes) if n.op_name == "clone"]
    assert len(clones) == 2
    inputs = {i: g.nodes[g.edges[g.in_edges[i][0]].src] for i in clones}
    dropout, contiguous = clones       # in execution order
    # the dropout's value is its input's memory; the contiguous copy of a transpose is a copy
    assert np.shares_memory(g.nodes[dropout].value, inputs[dropout].value)
    assert not np.shares_memory(g.nodes[contiguous].value, inputs[contiguous].value)
    # oracle for the values: torch's own forward
    h = torch.tanh(x @ model.w).detach().numpy()
    np.testing.assert_array_equal(g.nodes[dropout].value, h)
    np.testing.assert_array_equal(g.nodes[contiguous].value, h.T)
    ref = autograd_gradient(model, (x,), {}, lambda y: y)
    np.testing.assert_allclose(g.gradient()["x"].numpy(), ref["x"].detach().numpy(), rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_factor_is_the_softmax_value_in_the_models_dtype(dtype, tmp_path):
    """A softmax's row-block factor p is the softmax node's own memory (no float64 copy of a
    float32 model's attention probabilities), layer norms' xhat is in the model's dtype, the
    gradient still equals autograd's, and a saved and loaded graph keeps both (bit for bit)."""
    model, args, kwargs, fn = ZOO["bert_mlm_mask"](dtype=dtype)
    g = gg.capture(model, args, kwargs, output=fn)
    want = np.float32 if dtype == torch.float32 else np.float64
    softmax = [e for e in g.edges if e.jac.kind == "rowblock" and e.jac.function == "softmax"]
    norms = [e for e in g.edges if e.jac.kind == "rowblock" and e.jac.function == "layer_norm"]
    assert softmax and norms
    for e in softmax:
        factor, value = e.jac.state()[1]["A"], g.nodes[e.dst].value
        assert factor.dtype == want and np.shares_memory(factor, value)
        np.testing.assert_array_equal(factor.reshape(-1), value.reshape(-1))    # softmax over the last dim
    assert all(e.jac.state()[1]["A"].dtype == want for e in norms)
    ref = autograd_gradient(model, args, kwargs, fn)
    got = g.gradient()
    for k in ref:
        r = ref[k].detach().double().numpy()
        if dtype == torch.float64:
            np.testing.assert_allclose(got[k].numpy(), r, rtol=1e-10, atol=1e-12 * np.abs(r).max())
        else:    # the model computes in float32
            np.testing.assert_allclose(got[k].double().numpy(), r, rtol=1e-4, atol=1e-5 * np.abs(r).max())
    g.save(tmp_path / "g.safetensors")
    loaded = gg.load(tmp_path / "g.safetensors")
    for e, f in zip(g.edges, loaded.edges):
        if e.jac.kind == "rowblock":
            a, b = e.jac.state()[1]["A"], f.jac.state()[1]["A"]
            assert b.dtype == a.dtype and np.array_equal(a, b)
    _same(_answers(loaded), _answers(g))
