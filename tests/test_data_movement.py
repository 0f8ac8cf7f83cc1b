"""The per-rule "pure data movement" flag: declared at rule registration, recorded on each node at
capture, stored in graph files; files without it fall back to classifying by op name.

Oracles: an independent list of the view ops (written out here, not imported) for a captured BERT,
and save -> load round trips.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

import gradgraph as gg
from gradgraph.capture.registry import is_data_movement, rule
from gradgraph.jacobians import SparseJacobian

sys.path.insert(0, os.path.dirname(__file__))
from models import ZOO  # noqa: E402

#: The op names classified as views before the flag existed (a copy, kept independent of
#: gradgraph.graph.VIEW_OPS on purpose).
OLD_VIEW_NAMES = {
    "view", "_unsafe_view", "reshape", "permute", "expand", "slice", "select", "clone",
    "contiguous", "transpose", "t", "unsqueeze", "squeeze", "alias", "detach", "lift_fresh_copy",
    "_to_copy", "flatten", "unflatten", "as_strided", "expand_copy", "view_copy", "permute_copy",
    "unsqueeze_copy", "squeeze_copy", "slice_copy", "select_copy", "t_copy", "transpose_copy",
    "alias_copy", "getitem",
}


def _short(op):
    parts = op.split(".")
    return parts[1] if len(parts) >= 2 and parts[0] == "aten" else parts[0]


@pytest.fixture(scope="module")
def bert():
    model, args, kwargs, fn = ZOO["bert_mlm_mask"]()
    return gg.capture(model, args, kwargs, output=fn)


def test_bert_view_nodes_flagged_as_by_the_old_op_names(bert):
    assert all(n.data_movement is not None for n in bert.nodes)     # recorded, not derived
    flagged = [n.name for n in bert.nodes if n.is_view]
    by_name = [n.name for n in bert.nodes if _short(n.op) in OLD_VIEW_NAMES]
    assert flagged == by_name
    assert len(flagged) > 20           # the BERT has reshapes, permutes, transposes, expands, ...
    kinds = {_short(n.op) for n in bert.nodes if n.is_view}
    assert {"view", "permute", "expand"} <= kinds


def test_flag_survives_save_and_load(bert, tmp_path):
    bert.save(tmp_path / "g.safetensors")
    h = gg.load(tmp_path / "g.safetensors")
    assert [n.data_movement for n in h.nodes] == [n.data_movement for n in bert.nodes]
    assert [n.is_view for n in h.nodes] == [n.is_view for n in bert.nodes]


def _relu_graph(flag, tmp_path=None):
    """A graph through aten.relu explained by a test rule registered with ``flag``."""
    def relu_rule(ctx):
        x = ctx.args[0]
        return {0: SparseJacobian(ctx.out.shape, x.shape, vals=(x > 0).double().reshape(-1).numpy())}

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1)).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    with rule(torch.ops.aten.relu.default, relu_rule, data_movement=flag):
        assert is_data_movement(torch.ops.aten.relu.default) is flag
        g = gg.capture(model, (x,), output=lambda y: y.sum())
    assert not is_data_movement(torch.ops.aten.relu.default)      # the library's rule again
    return g, model, x


@pytest.mark.parametrize("flag", [True, False])
def test_rule_registered_with_the_flag_gives_view_nodes(flag, tmp_path):
    g, model, x = _relu_graph(flag)
    relu = [n for n in g.nodes if _short(n.op) == "relu"]
    assert len(relu) == 1 and relu[0].is_view is flag and relu[0].data_movement is flag
    # not by op name: relu is in no list of views
    assert "relu" not in OLD_VIEW_NAMES
    others = [n for n in g.nodes if _short(n.op) != "relu"]
    assert not any(n.is_view for n in others)
    g.save(tmp_path / "g.safetensors")
    h = gg.load(tmp_path / "g.safetensors")
    assert [n.is_view for n in h.nodes] == [n.is_view for n in g.nodes]
    # the flag changes path reporting only, never the gradient
    x_ = x.clone().requires_grad_(True)
    ref = torch.autograd.grad(model(x_).sum(), x_)[0]
    np.testing.assert_allclose(h.gradient()["input"].numpy(), ref.numpy(), rtol=1e-10)
    # a view hop is not counted in path lengths: the graph is a chain of tensors, so every path
    # has one hop per tensor after the input that is neither a view by name nor the flagged relu
    assert [e.src for e in g.edges] == list(range(len(g.nodes) - 1))
    hops = sum(1 for n in g.nodes[1:]
               if not (_short(n.op) in OLD_VIEW_NAMES or (_short(n.op) == "relu" and flag)))
    lengths = g.path_lengths()
    assert np.flatnonzero(lengths).tolist() == [hops]


def test_file_without_the_field_falls_back_to_op_names(bert, tmp_path):
    """A file written before nodes recorded the flag: is_view by op name, as then."""
    path = tmp_path / "g.safetensors"
    bert.save(path)
    with safe_open(path, framework="np") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    doc = json.loads(meta["graph"])
    for d in doc["nodes"]:
        del d["data_movement"]
    old = tmp_path / "old.safetensors"
    save_file(tensors, old, metadata={**meta, "graph": json.dumps(doc)})
    h = gg.load(old)
    assert all(n.data_movement is None for n in h.nodes)
    assert [n.is_view for n in h.nodes] == [_short(n.op) in OLD_VIEW_NAMES for n in h.nodes]
    assert [n.is_view for n in h.nodes] == [n.is_view for n in bert.nodes]


def test_malformed_flag_is_a_format_error(bert, tmp_path):
    path = tmp_path / "g.safetensors"
    bert.save(path)
    with safe_open(path, framework="np") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    doc = json.loads(meta["graph"])
    doc["nodes"][3]["data_movement"] = "yes"
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad, metadata={**meta, "graph": json.dumps(doc)})
    with pytest.raises(gg.GraphFormatError, match="node 3: field 'data_movement'"):
        gg.load(bad)
