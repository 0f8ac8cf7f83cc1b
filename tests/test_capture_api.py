"""The capture API: sources and their names, errors, node metadata, user rules, trace once /
capture many. Gradients are checked against ``torch.autograd.grad``."""
import networkx as nx
import numpy as np
import pytest
import torch

import gradgraph as gg
from gradgraph.capture import registry
from gradgraph.errors import CaptureError, UnsupportedOpError
from gradgraph.jacobians import SparseJacobian

from models import attention_block, autograd_gradient, mlp, residual_mlp_ln, zoo_model


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


# ----------------------------------------------------------------------------- default sources
def test_default_source_float_input_named_by_forward_parameter():
    model, args, kwargs, out = residual_mlp_ln()
    g = gg.capture(model, args, output=out)
    assert list(g.sources) == ["x"]
    node = g.nodes[g.sources["x"]]
    assert node.role == "source" and node.op == "input" and node.shape == (3, 6)
    close(g.gradient()["x"], autograd_gradient(model, args, kwargs, out)["x"])


def test_default_sources_of_bert_are_word_embeddings_only():
    model, args, kwargs, out = zoo_model("bert_mlm_mask")
    g = gg.capture(model, args, kwargs, output=out)
    # position and token-type embeddings are indexed by internal tensors, not by an input
    assert list(g.sources) == ["bert.embeddings.word_embeddings"]
    node = g.nodes[g.sources["bert.embeddings.word_embeddings"]]
    assert node.shape == (2, 6, 16) and node.module == "bert.embeddings.word_embeddings"


def test_repeated_token_keeps_distinct_rows():
    model, _, kwargs, out = attention_block()
    tokens = torch.tensor([[2, 0, 2]])
    g = gg.capture(model, (tokens,), output=out)
    grad = g.gradient()["embed"]
    assert grad.shape == (1, 3, 2)
    expected = autograd_gradient(model, (tokens,), {}, out)["embed"]
    close(grad, expected)
    assert not torch.allclose(grad[0, 0], grad[0, 2])    # same token, different positions


# ----------------------------------------------------------------------------- named sources
def _hooked_gradient(model, module, args, out):
    """Autograd gradient of out wrt the output of ``module``, kept by a forward hook."""
    kept = {}
    h = module.register_forward_hook(lambda m, i, o: kept.setdefault("v", o))
    try:
        with torch.enable_grad():
            y = out(model(*args))
            return torch.autograd.grad(y, kept["v"])[0]
    finally:
        h.remove()


def test_source_by_module_path():
    model, args, kwargs, out = residual_mlp_ln()
    g = gg.capture(model, args, output=out, sources=["blocks.1"])
    assert list(g.sources) == ["blocks.1"]
    close(g.gradient()["blocks.1"], _hooked_gradient(model, model.blocks[1], args, out))


def test_source_by_fx_node_name_and_input_name():
    model, args, kwargs, out = mlp("tanh")
    g0 = gg.capture(model, args, output=out)
    tanh = next(n for n in g0.nodes if n.op == "aten.tanh.default")
    g = gg.capture(model, args, output=out, sources=[tanh.fx_name])
    close(g.gradient()[tanh.fx_name], _hooked_gradient(model, model[1], args, out))
    g = gg.capture(model, args, output=out, sources="input")
    close(g.gradient()["input"], autograd_gradient(model, args, {}, out)["input"])


def test_unknown_source_lists_valid_names():
    model, args, kwargs, out = residual_mlp_ln()
    with pytest.raises(CaptureError, match=r"unknown source 'nope'.*\bx\b.*blocks\.0") as e:
        gg.capture(model, args, output=out, sources=["nope"])
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- bad input
def test_non_scalar_output_says_to_pass_output():
    model, args, _, _ = mlp()
    with pytest.raises(CaptureError, match="output="):
        gg.capture(model, args)
    with pytest.raises(CaptureError, match="output="):
        gg.capture(model, args, output=lambda y: y[0])


def test_wrong_types_are_rejected():
    model, args, _, out = mlp()
    with pytest.raises(CaptureError, match="torch.nn.Module"):
        gg.capture(lambda x: x, args, output=out)
    with pytest.raises(CaptureError, match="callable"):
        gg.capture(model, args, output=3)
    with pytest.raises(CaptureError, match="integer|floating"):
        gg.capture(model, args, output=lambda y: (y[0, 0] > 0).long())
    with pytest.raises(TypeError, match="OpOverload"):
        gg.register_rule("aten.tanh", lambda ctx: {})


def test_granularity_recorded_and_validated():
    model, args, _, out = mlp()
    for gran in ("function", "primitive"):
        assert gg.capture(model, args, output=out, granularity=gran).granularity == gran
    with pytest.raises(CaptureError, match="granularity must be one of"):
        gg.capture(model, args, output=out, granularity="scalar")


# ----------------------------------------------------------------------------- graph contents
class Branchy(torch.nn.Module):
    """A branch that never reaches the sink, and one that does not start at the source."""

    def __init__(self):
        super().__init__()
        self.used = torch.nn.Linear(3, 2).double()
        self.unused = torch.nn.Linear(3, 4).double()
        self.const = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))

    def forward(self, x):
        side = torch.sigmoid(self.unused(x))
        scale = torch.exp(self.const * 2)
        return self.used(x) * scale, side


def test_only_nodes_on_source_to_sink_paths_are_kept():
    model = Branchy()
    x = torch.randn(2, 3, dtype=torch.float64)
    g = gg.capture(model, (x,), output=lambda o: o[0][1, 0])
    assert not [n for n in g.nodes if n.module == "unused" or n.op == "aten.sigmoid.default"]
    assert not [n for n in g.nodes if n.op == "aten.exp.default"]
    G = nx.DiGraph([(e.src, e.dst) for e in g.edges])
    for i, n in enumerate(g.nodes):
        assert i == g.sink or nx.has_path(G, i, g.sink), n.name
        assert any(i == s or nx.has_path(G, s, i) for s in g.sources.values()), n.name
    close(g.gradient()["x"], autograd_gradient(model, (x,), {}, lambda o: o[0][1, 0])["x"])


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Sequential(torch.nn.Linear(3, 3))
        self.out = torch.nn.Linear(3, 1)

    def forward(self, x):
        h = torch.tanh(self.inner(x))  # the tanh line
        return self.out(h).sum()


def test_nodes_carry_op_shape_dtype_module_and_source_line():
    model = TwoLayer().double()
    g = gg.capture(model, (torch.randn(2, 3, dtype=torch.float64),))
    by_op = {n.op: n for n in g.nodes}
    tanh = by_op["aten.tanh.default"]
    assert tanh.shape == (2, 3) and tanh.dtype == "float64"
    assert "test_capture_api.py" in tanh.source_line and "the tanh line" in tanh.source_line
    assert by_op["aten.addmm.default"].module in ("inner.0", "out")
    assert {n.module for n in g.nodes if n.op == "aten.addmm.default"} == {"inner.0", "out"}
    assert g.nodes[g.sink].role == "sink"
    for n in g.nodes:
        assert n.op and n.dtype and isinstance(n.shape, tuple)
        assert n.value is None or np.asarray(n.value).shape == n.shape


# ----------------------------------------------------------------------------- rules
class CumsumBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3).double()

    def forward(self, x):
        return torch.logcumsumexp(self.lin(x), dim=-1)  # no rule for logcumsumexp


class WithCumsum(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = CumsumBlock()

    def forward(self, x):
        return self.block(x)[0, 2]


def test_op_without_rule_too_big_for_fallback_raises_with_op_module_and_line(monkeypatch):
    model = WithCumsum()
    x = torch.randn(2, 3, dtype=torch.float64)
    assert registry.get_rule(torch.ops.aten.logcumsumexp.default) is None
    g = gg.capture(model, (x,))                  # small: the dense fallback is exact
    close(g.gradient()["x"], autograd_gradient(model, (x,), {}, lambda y: y)["x"])
    monkeypatch.setattr(registry, "DENSE_FALLBACK_MAX_ENTRIES", 0)
    with pytest.raises(UnsupportedOpError) as e:
        gg.capture(model, (x + 1,))
    msg = str(e.value)
    assert "aten.logcumsumexp.default" in msg and "module block" in msg
    assert "test_capture_api.py" in msg and "no rule for logcumsumexp" in msg
    assert "register_rule" in msg and "\n" not in msg


@torch.library.custom_op("gradgraph_test::cube", mutates_args=())
def cube(x: torch.Tensor) -> torch.Tensor:
    return x ** 3


@cube.register_fake
def _(x):
    return torch.empty_like(x)


cube.register_autograd(lambda ctx, g: g * 3 * ctx.saved_tensors[0] ** 2,
                       setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[0]))


class CubeModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3).double()

    def forward(self, x):
        return cube(self.lin(x))[1].sum()


def test_register_rule_for_a_user_op(monkeypatch):
    op = torch.ops.gradgraph_test.cube.default
    model = CubeModel()
    x = torch.randn(2, 3, dtype=torch.float64)
    monkeypatch.setattr(registry, "DENSE_FALLBACK_MAX_ENTRIES", 0)
    with pytest.raises(UnsupportedOpError, match="gradgraph_test.cube"):
        gg.capture(model, (x,))
    calls = []

    @gg.register_rule(op)
    def cube_rule(ctx):
        calls.append(ctx.op)
        t = ctx.args[0]
        return {0: SparseJacobian(ctx.out.shape, t.shape, vals=(3 * t ** 2).reshape(-1).numpy())}
    try:
        g = gg.capture(model, (x,))
        assert calls == [op] and registry.get_rule(op) is cube_rule
    finally:
        registry.unregister_rule(op, cube_rule)         # undone after the test
    close(g.gradient()["x"], autograd_gradient(model, (x,), {}, lambda y: y)["x"])
    assert registry.get_rule(op) is None


def test_rule_registrations_are_undone_in_any_order():
    op = torch.ops.aten.tanh.default
    library_rule = registry.get_rule(op)
    first, second = (lambda ctx: {}), (lambda ctx: {})
    with registry.rule(op, first):
        assert registry.get_rule(op) is first
        with registry.rule(op, second):
            assert registry.get_rule(op) is second
        assert registry.get_rule(op) is first
    assert registry.get_rule(op) is library_rule
    gg.register_rule(op, first)
    gg.register_rule(op, second)
    registry.unregister_rule(op, first)               # the older one: the newer stays in force
    assert registry.get_rule(op) is second
    registry.unregister_rule(op, second)
    assert registry.get_rule(op) is library_rule
    with pytest.raises(KeyError):
        registry.unregister_rule(op, second)


def test_user_rule_overrides_library_rule():
    op = torch.ops.aten.tanh.default
    library_rule = registry.get_rule(op)
    calls = []

    def tanh_rule(ctx):
        calls.append(1)
        y = ctx.out.reshape(-1)
        return {0: SparseJacobian(ctx.out.shape, ctx.args[0].shape, vals=(1 - y * y).numpy())}
    gg.register_rule(op, tanh_rule)
    try:
        assert registry.get_rule(op) is tanh_rule
        model, args, _, out = mlp("tanh")
        g = gg.capture(model, args, output=out)
        assert calls
        close(g.gradient()["input"], autograd_gradient(model, args, {}, out)["input"])
    finally:
        registry.unregister_rule(op, tanh_rule)
    assert registry.get_rule(op) is library_rule


# ----------------------------------------------------------------------------- trace once
def test_second_capture_of_same_signature_does_not_export(monkeypatch):
    model, (x,), _, out = mlp("relu", seed=3)
    n_calls = []
    real_export = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: n_calls.append(1) or real_export(*a, **k))
    gg.capture(model, (x,), output=out)
    assert len(n_calls) == 1
    x2 = torch.randn(x.shape, dtype=x.dtype)
    g2 = gg.capture(model, (x2,), output=out)
    assert len(n_calls) == 1
    close(g2.gradient()["input"], autograd_gradient(model, (x2,), {}, out)["input"])
    x3 = torch.randn(5, 4, dtype=x.dtype)
    g3 = gg.capture(model, (x3,), output=lambda y: y[4, 1] - y[1, 2])
    assert len(n_calls) == 2
    close(g3.gradient()["input"], autograd_gradient(model, (x3,), {}, lambda y: y[4, 1] - y[1, 2])["input"])


def test_capturer_api_exports_once_per_signature():
    model, (x,), _, out = mlp("tanh", seed=4)
    cap = gg.Capturer(model, out)
    for seed in range(3):
        xi = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(seed))
        g = cap.capture((xi,))
        close(g.gradient()["input"], autograd_gradient(model, (xi,), {}, out)["input"])
    assert cap.n_exports == 1
    cap.capture((torch.randn(3, 4, dtype=x.dtype),))
    assert cap.n_exports == 2


def _target(tok):
    return lambda y: y[0, -1, tok] - y[0, -1, 0]


def _target_in_list(toks):
    return lambda y: y[0, -1, toks[0]]


def test_output_closures_over_different_values_do_not_reuse_a_stale_export():
    model, args, _, _ = attention_block()
    for out in (_target(1), _target(3), _target_in_list([2]), _target_in_list([4])):
        g = gg.capture(model, args, output=out)
        close(g.gradient()["embed"], autograd_gradient(model, args, {}, out)["embed"])


TARGET = 1


def test_output_reading_a_changed_global_does_not_reuse_a_stale_export():
    global TARGET
    model, args, _, _ = attention_block()

    def out(y):
        return y[0, -1, TARGET]
    try:
        for TARGET in (1, 4):
            g = gg.capture(model, args, output=out)
            close(g.gradient()["embed"], autograd_gradient(model, args, {}, out)["embed"])
    finally:
        TARGET = 1


def test_output_closing_over_a_mutated_tensor_does_not_reuse_a_stale_export():
    model, args, _, _ = attention_block()
    idx = torch.tensor([1])

    def out(y):
        return y[0, -1].index_select(0, idx).sum()
    for v in (1, 3):
        idx[0] = v
        g = gg.capture(model, args, output=out)
        close(g.gradient()["embed"], autograd_gradient(model, args, {}, out)["embed"])


def test_switching_to_eval_mode_re_exports():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    out = lambda y: y.sum()   # noqa: E731
    cap = gg.Capturer(model, out)
    with pytest.warns(gg.CaptureWarning, match="not deterministic"):
        cap.capture((x,))                   # training mode: dropout is traced in
    model.eval()
    g = cap.capture((x,))
    assert cap.n_exports == 2
    close(g.gradient()["input"], autograd_gradient(model, (x,), {}, out)["input"])
