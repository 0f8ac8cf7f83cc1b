"""Node values held only where needed: ``gg.capture(..., values="needed")`` (the default) keeps the
values a Jacobian references and the sources' and the sink's; ``values="all"`` keeps every one.

Oracles: every query's answers on the graph holding every value (bit for bit, threads pinned),
``torch.autograd.grad`` (float64 models at rtol 1e-10), numpy's own test of which arrays share
memory (``np.may_share_memory``) between the values and the Jacobians' arrays of the graph holding
every value, the model's forward for the held values, and a file written by gradgraph 0.x's format
version 1 (``tests/data/format_v1_mlp.safetensors``, written before nodes could lack a value).
"""
from __future__ import annotations

import json
import os
import struct
import sys

import numpy as np
import pytest
import torch

import gradgraph as gg
from gradgraph.errors import GraphFormatError, ValueNotHeldError

sys.path.insert(0, os.path.dirname(__file__))
from models import autograd_gradient, zoo_model  # noqa: E402
from test_memory import _answers, _same  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data")
MODELS = ["mlp_tanh", "residual_mlp_ln", "bert_mlm_mask", "cnn_norms"]


def _capture(name, values, dtype=torch.float64):
    model, args, kwargs, fn = zoo_model(name, dtype)
    return gg.capture(model, args, kwargs, output=fn, values=values), (model, args, kwargs, fn)


def _jacobian_arrays(g):
    return [a for e in g.edges for a in e.jac.state()[1].values() if isinstance(a, np.ndarray) and a.size]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", MODELS)
def test_answers_identical_with_and_without_every_value(name, dtype):
    needed, (model, args, kwargs, fn) = _capture(name, "needed", dtype)
    every, _ = _capture(name, "all", dtype)
    assert needed.meta["values"] == "needed" and every.meta["values"] == "all"
    assert all(n.value is not None for n in every.nodes)
    assert any(n.value is None for n in needed.nodes), "nothing was dropped"
    _same(_answers(needed), _answers(every))
    if dtype == torch.float64:
        ref = autograd_gradient(model, args, kwargs, fn)
        got = needed.gradient()
        for k in ref:
            r = ref[k].detach().numpy()
            np.testing.assert_allclose(got[k].numpy(), r, rtol=1e-10, atol=1e-12 * np.abs(r).max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", MODELS)
def test_dropped_values_are_exactly_those_no_jacobian_holds(name, dtype):
    """A node loses its value exactly when it is neither a source nor the sink and no Jacobian
    holds memory of it (judged on the graph holding every value, which has the same nodes and
    Jacobians)."""
    needed, _ = _capture(name, "needed", dtype)
    every, _ = _capture(name, "all", dtype)
    assert [n.name for n in needed.nodes] == [n.name for n in every.nodes]
    arrays = _jacobian_arrays(every)
    keep = set(every.sources.values()) | {every.sink}
    for i, n in enumerate(every.nodes):
        referenced = n.value.size > 0 and any(np.may_share_memory(n.value, a) for a in arrays)
        held = needed.nodes[i].value is not None
        assert held == (i in keep or referenced), (n.name, n.op, held, referenced)
        if held:      # the value it holds is the forward's
            np.testing.assert_array_equal(needed.nodes[i].value, n.value)


def test_held_values_are_the_jacobians_memory_not_copies():
    g, _ = _capture("bert_mlm_mask", "needed", torch.float32)
    arrays = _jacobian_arrays(g)
    for i, n in enumerate(g.nodes):
        if n.value is not None and i not in g.sources.values() and i != g.sink and n.value.size:
            assert any(np.may_share_memory(n.value, a) for a in arrays), n.name


def test_value_not_held_is_a_clear_error_and_held_values_are_the_forwards():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g = gg.capture(model, (x,), output=lambda y: y[0, 0] - y[1, 1])
    dropped = [n.name for n in g.nodes if n.value is None]
    assert dropped
    with pytest.raises(ValueNotHeldError) as info:
        g.value(dropped[0])
    assert 'values="all"' in str(info.value) and dropped[0] in str(info.value)
    assert isinstance(info.value, gg.QueryError)
    with pytest.raises(gg.QueryError):
        g.value("no such node")
    y = model(x)
    assert g.value(g.sink) == pytest.approx(float(y[0, 0] - y[1, 1]), rel=1e-15)
    np.testing.assert_array_equal(g.value("input"), x.numpy())
    every = gg.capture(model, (x,), output=lambda y: y[0, 0] - y[1, 1], values="all")
    np.testing.assert_array_equal(every.value(dropped[0]), every.nodes[every.node_index(dropped[0])].value)
    with pytest.raises(gg.CaptureError, match="values must be one of"):
        gg.capture(model, (x,), output=lambda y: y[0, 0], values="some")


@pytest.mark.parametrize("values", ["needed", "all"])
@pytest.mark.parametrize("lazy", [True, False])
def test_save_and_load_round_trip(values, lazy, tmp_path):
    g, _ = _capture("bert_mlm_mask", values)
    path = tmp_path / "g.safetensors"
    g.save(path)
    h = gg.load(path, lazy=lazy)
    assert [n.value is None for n in h.nodes] == [n.value is None for n in g.nodes]
    for a, b in zip(g.nodes, h.nodes):
        if a.value is not None:
            assert a.value.dtype == b.value.dtype and np.array_equal(a.value, b.value)
    _same(_answers(h), _answers(g))
    # saved again, the loaded graph gives the same bytes
    h.save(tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


def test_a_file_holding_only_needed_values_is_smaller(tmp_path):
    needed, _ = _capture("bert_mlm_mask", "needed")
    every, _ = _capture("bert_mlm_mask", "all")
    needed.save(tmp_path / "n.safetensors")
    every.save(tmp_path / "a.safetensors")
    assert os.path.getsize(tmp_path / "n.safetensors") < os.path.getsize(tmp_path / "a.safetensors")


def _v1_model():
    """The model and input ``tests/data/format_v1_mlp.safetensors`` was captured from."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4),
                            torch.nn.Softmax(-1)).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    return m, x


def test_a_version_1_file_loads_with_every_value():
    path = os.path.join(DATA, "format_v1_mlp.safetensors")
    from safetensors import safe_open
    with safe_open(path, framework="numpy") as f:
        assert f.metadata()["version"] == "1"
    g = gg.load(path)
    assert all(n.value is not None for n in g.nodes)
    m, x = _v1_model()
    xg = x.clone().requires_grad_()
    y = m(xg)
    sink = y[0, 0] * y[1, 1]
    (want,) = torch.autograd.grad(sink, xg)
    np.testing.assert_allclose(g.gradient()["input"].numpy(), want.numpy(), rtol=1e-10)
    assert g.sink_value == pytest.approx(float(sink), rel=1e-15)
    np.testing.assert_array_equal(g.value("input"), x.numpy())


def _rewrite(src, dst, edit_metadata):
    """Copy safetensors file ``src`` to ``dst`` with its metadata edited (the tensors unchanged)."""
    raw = open(src, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit_metadata(header["__metadata__"])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _edit_graph(edit):
    def go(meta):
        doc = json.loads(meta["graph"])
        edit(doc)
        meta["graph"] = json.dumps(doc)
    return go


def test_missing_values_that_make_a_file_corrupt(tmp_path):
    g, _ = _capture("mlp_tanh", "needed")
    good = tmp_path / "g.safetensors"
    g.save(good)
    dropped = next(i for i, n in enumerate(g.nodes) if n.value is None)
    source = next(iter(g.sources.values()))

    def fails(name, edit, match):
        bad = tmp_path / name
        _rewrite(good, bad, edit)
        with pytest.raises(GraphFormatError, match=match):
            gg.load(bad)

    # a version 1 file must hold every value
    fails("v1.safetensors", lambda m: m.update(version="1"), f"node {dropped}: no value")
    # a source's and the sink's values are always held
    fails("sink.safetensors", _edit_graph(lambda d: d["nodes"][-1].update(value=None)), "sources and its sink")
    fails("source.safetensors", _edit_graph(lambda d: d["nodes"][source].update(value=None)),
          "sources and its sink")
    # a node without a value cannot declare more elements than the file's data bounds
    fails("huge.safetensors", _edit_graph(lambda d: d["nodes"][dropped].update(shape=[10**12])),
          "declare more elements than")
    # the unedited file still loads
    gg.load(good)


def test_saving_a_graph_without_a_sink_value_is_refused(tmp_path):
    g, _ = _capture("mlp_tanh", "needed")
    g.nodes[g.sink].value = None
    with pytest.raises(gg.GradGraphError, match="sources and its sink"):
        g.save(tmp_path / "g.safetensors")
    assert not os.listdir(tmp_path)


def test_consumers_of_values_work_without_them(tmp_path):
    """The report, the diagram, the JSON export and the networkx views on a graph whose values
    were not held (and on the same graph loaded from a file)."""
    g, _ = _capture("bert_mlm_mask", "needed")
    g.save(tmp_path / "g.safetensors")
    for graph in (g, gg.load(tmp_path / "g.safetensors")):
        paths = graph.top_paths(k=3)
        assert "digraph" in gg.to_dot(graph, paths).to_string()
        assert graph.to_json(k=3)["nodes"]
        report = tmp_path / f"r{id(graph)}.html"
        graph.report(report, k=3)
        assert report.stat().st_size > 0
        tg = graph.to_networkx("tensor")
        assert tg.number_of_nodes() == len(graph.nodes)
        assert graph._repr_html_()


def test_scalar_networkx_view_without_values():
    g, _ = _capture("mlp_tanh", "needed")
    sg = g.to_networkx("scalar")
    assert sg.number_of_nodes() == sum(n.numel for n in g.nodes)
    dropped = next(n.name for n in g.nodes if n.value is None)
    assert all(d.get("value") is None for (name, _), d in sg.nodes(data=True) if name == dropped)


def test_cli_on_a_file_without_values(tmp_path, capsys):
    from gradgraph.cli import main
    g, _ = _capture("bert_mlm_mask", "needed")
    path = tmp_path / "g.safetensors"
    g.save(path)
    for argv in (["info", path], ["info", path, "--json"], ["paths", path, "--k", "2"], ["entropy", path],
                 ["flow", path], ["render", path, "-o", tmp_path / "g.dot"],
                 ["report", path, "-o", tmp_path / "r.html"], ["export", path, "--json", tmp_path / "g.json"]):
        assert main([str(a) for a in argv]) == 0, argv
    out = capsys.readouterr().out
    assert f"held for {sum(n.value is not None for n in g.nodes)} of {len(g.nodes)} tensors" in out


def test_cli_capture_values_option(tmp_path, capsys):
    from gradgraph.cli import main
    spec = os.path.join(os.path.dirname(DATA), "..", "examples", "tiny_bert.py") + ":build"
    assert main(["capture", spec, "--out", str(tmp_path / "n.safetensors")]) == 0
    assert main(["capture", spec, "--out", str(tmp_path / "a.safetensors"), "--values", "all"]) == 0
    needed, every = gg.load(tmp_path / "n.safetensors"), gg.load(tmp_path / "a.safetensors")
    assert all(n.value is not None for n in every.nodes)
    assert any(n.value is None for n in needed.nodes)
    _same(_answers(needed), _answers(every))
    capsys.readouterr()
    assert main(["capture", spec, "--out", str(tmp_path / "x.safetensors"), "--values", "some"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--values" in err[0]
