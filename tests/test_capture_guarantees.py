"""What capture guarantees beyond the op rules (``docs/capture.md``, "Guarantees"): custom
``torch.autograd.Function``s by their own backward, ``detach`` and ``no_grad`` cut the graph, a
cached program is never used for a model that now computes something else, non-finite values and
empty path sets are reported, the graph's metadata lists dense and lower-precision nodes, and a
failed export keeps torch's whole message and the user's line. Gradients are checked against
``torch.autograd.grad``."""
import json
import subprocess
import sys
import warnings

import pytest
import torch

import gradgraph as gg
from gradgraph.capture import registry
from gradgraph.errors import CaptureError, CaptureWarning, QueryWarning, UnsupportedOpError

from models import autograd_gradient, gpt2_lm


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def x64(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- autograd.Function
class StraightThroughRound(torch.autograd.Function):
    """round in the forward, identity in the backward (its forward's derivative is 0)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class ScaledPair(torch.autograd.Function):
    """Two inputs, a non-tensor argument, two outputs, and a backward that is deliberately not
    the derivative of the forward: capture must follow the backward, as autograd does."""

    @staticmethod
    def forward(ctx, a, b, scale):
        ctx.save_for_backward(a, b)
        ctx.scale = scale
        return a * b * scale, torch.sin(a)

    @staticmethod
    def backward(ctx, g1, g2):
        a, b = ctx.saved_tensors
        return g1 * b * 3.0 + g2 * a, g1 * ctx.scale + g2, None


class RoundingNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.lin1 = torch.nn.Linear(4, 5).double()
        self.lin2 = torch.nn.Linear(5, 3).double()
        for p in self.parameters():
            p.data = torch.randn(p.shape, dtype=torch.float64, generator=g)

    def forward(self, x):
        h = StraightThroughRound.apply(self.lin1(x) * 3.0)
        p, s = ScaledPair.apply(h, torch.tanh(h), 0.5)
        q, _ = ScaledPair.apply(s, p, 2.0)      # a second application, another scale
        return self.lin2(p + q)


def test_straight_through_round_gets_its_backward_not_the_zero_derivative_of_round():
    class M(torch.nn.Module):
        def forward(self, x):
            return StraightThroughRound.apply(x * 2.0).sum()
    x = x64(5)
    g = gg.capture(M(), (x,))
    expected = autograd_gradient(M(), (x,), {}, lambda y: y)["x"]
    assert torch.equal(expected, torch.full_like(x, 2.0))        # autograd: 2, round' = 0
    close(g.gradient()["x"], expected)
    assert [n.op for n in g.nodes if n.role != "source"] == ["aten.mul.Tensor", "StraightThroughRound.apply",
                                                                "aten.sum.dim_IntList"]


def test_function_with_several_inputs_outputs_and_arguments_follows_its_backward():
    model, x = RoundingNet(), x64(2, 4, seed=3)
    out = lambda y: y[1, 2] - y[0, 0]   # noqa: E731
    g = gg.capture(model, (x,), output=out)
    close(g.gradient()["x"], autograd_gradient(model, (x,), {}, out)["x"])
    ops = [n.op for n in g.nodes]
    assert ops.count("ScaledPair.apply") >= 2 and "StraightThroughRound.apply" in ops
    # every backward of these two is elementwise: diagonal Jacobians, none dense
    assert g.meta["dense_jacobians"] == []
    # the cached program keeps both applications apart (their scales are baked in)
    x2 = x64(2, 4, seed=4)
    cap = gg.Capturer(model, out)
    g2 = cap.capture((x2,))
    close(g2.gradient()["x"], autograd_gradient(model, (x2,), {}, out)["x"])
    close(cap.capture((x,)).gradient()["x"], autograd_gradient(model, (x,), {}, out)["x"])
    assert cap.n_exports == 1


class FlipBackward(torch.autograd.Function):
    """Doubles in the forward; its backward mixes elements (reverses the last axis): not elementwise."""

    @staticmethod
    def forward(ctx, x):
        return 2.0 * x

    @staticmethod
    def backward(ctx, grad):
        return grad.flip(-1)


class AlmostElementwise(torch.autograd.Function):
    """An elementwise backward plus an off-diagonal term far below the gradient's size (1e-9 of
    the neighbour's gradient): only a dense Jacobian holds it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2) + 1e-9 * grad.roll(1, -1)


class ClippedBackward(torch.autograd.Function):
    """Elementwise but not linear in the incoming gradient (clips it to [-1.5, 1.5])."""

    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(-1.5, 1.5)


def _function_jacobian(fn, x):
    """The Function's Jacobian read off its backward, one unit vector per row (the oracle)."""
    x = x.clone().requires_grad_()
    y = fn.apply(x).reshape(-1)
    return torch.stack([torch.autograd.grad(y, x, torch.eye(y.numel(), dtype=y.dtype)[i], retain_graph=True)[0]
                        .reshape(-1) for i in range(y.numel())])


@pytest.mark.parametrize("fn, elementwise", [(StraightThroughRound, True), (AlmostElementwise, False),
                                             (FlipBackward, False), (ClippedBackward, False)])
def test_function_jacobian_is_diagonal_exactly_when_its_backward_is_elementwise(fn, elementwise):
    """An elementwise backward gives a diagonal Jacobian (not dense); any other -- mixing elements,
    an off-diagonal term at 1e-9, a backward not linear in the gradient -- keeps the dense path.
    Either way the Jacobian equals the one read off the backward row by row."""
    class M(torch.nn.Module):
        def forward(self, x):
            return fn.apply(x * 1.5)
    x = x64(2, 3, seed=5) * 2
    g = gg.capture(M(), (x,), output=lambda y: (y * torch.arange(1.0, 7.0, dtype=torch.float64).reshape(2, 3)).sum(),
                   values="all")         # the Function's input value, to differentiate it again
    node = next(i for i, n in enumerate(g.nodes) if n.op == f"{fn.__name__}.apply")
    (edge,) = [e for e in g.edges if e.dst == node]
    expected = _function_jacobian(fn, torch.from_numpy(g.nodes[edge.src].value))
    got = torch.from_numpy(edge.jac.to_dense()).reshape(expected.shape)
    assert torch.equal(got, expected)
    dense = [d["op"] for d in g.meta["dense_jacobians"]]
    assert dense == ([] if elementwise else [f"{fn.__name__}.apply"])
    if elementwise:
        assert edge.jac.nnz() <= x.numel()


def test_bloom_gelu_function_is_elementwise():
    """BLOOM's ``GeLUFunction`` (an autograd.Function with a hand-written tanh-GeLU backward) is
    elementwise: a diagonal Jacobian equal to the one its backward gives row by row."""
    import transformers
    from transformers.models.bloom.modeling_bloom import GeLUFunction
    x = x64(3, 4, seed=8) * 2
    jac = _function_jacobian(GeLUFunction, x)
    assert torch.equal(jac, torch.diag(torch.diagonal(jac)))     # the oracle: it is diagonal
    model = transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=40, hidden_size=16, n_layer=1, n_head=2, attn_implementation="eager")).double().eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    g = gg.capture(model, (), {"input_ids": ids}, output=lambda o: o.logits[0, -1, 3] - o.logits[0, -1, 4])
    assert "GeLUFunction.apply" in [n.op for n in g.nodes]
    assert g.meta["dense_jacobians"] == []
    expected = autograd_gradient(model, (), {"input_ids": ids},
                                 lambda o: o.logits[0, -1, 3] - o.logits[0, -1, 4])["transformer.word_embeddings"]
    torch.testing.assert_close(g.gradient()["transformer.word_embeddings"], expected, rtol=1e-10,
                               atol=1e-10 * expected.abs().max().item())


def test_function_too_large_for_a_dense_jacobian_is_named(monkeypatch):
    class M(torch.nn.Module):
        def forward(self, x):
            return FlipBackward.apply(x * 3.0)
    monkeypatch.setattr(registry, "DENSE_FALLBACK_MAX_ENTRIES", 10)
    with pytest.raises(UnsupportedOpError) as e:
        gg.capture(M(), (x64(2, 4),), output=lambda y: y.sum())
    msg = str(e.value)
    assert "torch.autograd.Function test_capture_guarantees.FlipBackward" in msg
    assert "module <top>" in msg and "test_capture_guarantees.py" in msg
    assert "FlipBackward.apply(x * 3.0)" in msg
    # elementwise Functions have no dense Jacobian, hence no cap
    g = gg.capture(RoundingNet(), (x64(2, 4),), output=lambda y: y.sum())
    assert g.meta["dense_jacobians"] == []


# ----------------------------------------------------------------------------- detach, no_grad
class Detaching(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3).double()

    def forward(self, x):
        a = self.lin(x)
        b = a.detach() * 2.0                 # a constant to autograd
        with torch.no_grad():
            c = torch.sin(a) * 3.0           # so is all of this block
        with torch.inference_mode():
            d = torch.cos(a) * 5.0           # and this one
        return torch.tanh(a) * b + c + d.clone()


def test_detach_and_no_grad_cut_the_graph_as_in_autograd():
    model, x = Detaching(), x64(2, 3)
    out = lambda y: y.sum()   # noqa: E731
    g = gg.capture(model, (x,), output=out)
    close(g.gradient()["x"], autograd_gradient(model, (x,), {}, out)["x"])
    assert not any(n.op in ("aten.sin.default", "aten.cos.default", "aten.alias.default") for n in g.nodes)


def test_detached_output_has_no_gradient():
    model, x = torch.nn.Linear(3, 3).double(), x64(2, 3)
    y = model(x.requires_grad_())
    assert not y.detach().sum().requires_grad             # autograd: no gradient at all
    with pytest.raises(CaptureError, match="does not depend on the sources"):
        gg.capture(model, (x.detach(),), output=lambda y: y.detach().sum())
    out = lambda y: (y * y.detach()).sum()   # noqa: E731
    g = gg.capture(model, (x.detach(),), output=out)
    close(g.gradient()["input"], autograd_gradient(model, (x.detach(),), {}, out)["input"])


def test_dot_data_is_a_capture_error_not_a_silent_gradient():
    class UsesData(torch.nn.Module):
        def forward(self, x):
            return (x * x.data).sum()
    with pytest.raises(CaptureError, match="torch.export could not trace"):
        gg.capture(UsesData(), (x64(3),))


# ----------------------------------------------------------------------------- stale programs
class Switchable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3).double()
        self.use_tanh = True
        self.scale = 1.0

    def forward(self, x):
        h = self.lin(x) * self.scale
        return torch.tanh(h) if self.use_tanh else torch.sigmoid(h)


def test_a_changed_python_attribute_re_exports():
    model, x = Switchable(), x64(2, 3)
    out = lambda y: y[0, 1]   # noqa: E731
    cap = gg.Capturer(model, out)
    assert "aten.tanh.default" in [n.op for n in cap.capture((x,)).nodes]
    model.use_tanh = False
    g = cap.capture((x,))
    ops = [n.op for n in g.nodes]
    assert "aten.sigmoid.default" in ops and "aten.tanh.default" not in ops
    assert cap.n_exports == 2
    close(g.gradient()["x"], autograd_gradient(model, (x,), {}, out)["x"])
    # gg.capture keeps its own Capturer: the same holds there
    model.use_tanh = True
    g = gg.capture(model, (x,), output=out)
    assert "aten.tanh.default" in [n.op for n in g.nodes]
    close(g.gradient()["x"], autograd_gradient(model, (x,), {}, out)["x"])


def test_a_tiny_change_of_a_float64_constant_is_seen():
    model, x = Switchable(), x64(2, 3)
    out = lambda y: y[0, 1]   # noqa: E731
    cap = gg.Capturer(model, out)
    cap.capture((x,))
    model.scale = 1.0 + 1e-9                     # baked into the program as a constant
    g = cap.capture((x,))
    assert cap.n_exports == 2
    close(g.gradient()["x"], autograd_gradient(model, (x,), {}, out)["x"])
    for _ in range(2):                           # unchanged: the cached program is used
        cap.capture((x64(2, 3, seed=7),))
    assert cap.n_exports == 2


def test_a_replaced_parameter_is_used():
    model, x = Switchable(), x64(2, 3)
    out = lambda y: y[0, 1]   # noqa: E731
    cap = gg.Capturer(model, out)
    cap.capture((x,))
    # a new Parameter object: the program's own reference would still be the old one
    model.lin.weight = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.float64))
    g = cap.capture((x,))
    close(g.gradient()["x"], autograd_gradient(model, (x,), {}, out)["x"])


def test_a_nan_output_is_not_taken_for_a_stale_program():
    class NaNOut(torch.nn.Module):
        def forward(self, x):
            return torch.log(x - 10.0).sum()    # NaN for every x < 10
    cap = gg.Capturer(NaNOut())
    with pytest.warns(CaptureWarning):
        cap.capture((x64(3),))
    with pytest.warns(CaptureWarning):
        cap.capture((x64(3, seed=1),))
    assert cap.n_exports == 1


def test_random_model_is_reported():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1)).double()
    with pytest.warns(CaptureWarning, match="not deterministic"):
        gg.capture(model, (x64(5, 4),), output=lambda y: y.sum())


def test_batch_norm_in_training_mode_captures_and_keeps_its_statistics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 1)).double()
    x, out = x64(5, 4), (lambda y: y[2, 0])
    before = [b.clone() for b in model.buffers()]
    g = gg.capture(model, (x,), output=out)       # batch statistics; running ones not updated
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    close(g.gradient()["input"], autograd_gradient(model, (x,), {}, out)["input"])


# ----------------------------------------------------------------------------- non-finite values
def test_nan_names_the_first_node_where_it_appears():
    class MakesNaN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3).double()

        def forward(self, x):
            h = self.lin(x)
            bad = torch.log(h - 100.0)      # NaN here first
            return torch.tanh(h) + bad * 2.0
    with pytest.warns(CaptureWarning) as record:
        g = gg.capture(MakesNaN(), (x64(2, 3),), output=lambda y: y.sum())
    record = [w for w in record if issubclass(w.category, CaptureWarning)]
    msg = str(record[0].message)
    assert "node log (aten.log.default" in msg and "holds NaN" in msg
    assert "test_capture_guarantees.py" in msg and "bad = torch.log(h - 100.0)" in msg
    assert record[0].filename == __file__                  # attributed to the caller
    assert g.meta["first_non_finite"]["node"] == "log"


def test_infinite_local_derivative_is_reported():
    class Sqrt(torch.nn.Module):
        def forward(self, x):
            return torch.sqrt(x).sum()
    x = torch.tensor([0.0, 4.0], dtype=torch.float64)
    with pytest.warns(CaptureWarning, match="node sqrt .*non-finite local derivative"):
        g = gg.capture(Sqrt(), (x,))
    expected = autograd_gradient(Sqrt(), (x,), {}, lambda y: y)["x"]
    assert torch.isinf(expected[0])                 # autograd: d sqrt(0) = inf
    torch.testing.assert_close(g.gradient()["x"], expected, rtol=1e-10, atol=0)


def test_masked_minus_infinity_that_softmax_removes_is_not_reported():
    class Masked(torch.nn.Module):
        def forward(self, s):
            mask = torch.tensor([[False, True, False]])
            return torch.softmax(s.masked_fill(mask, float("-inf")), -1)[0, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CaptureWarning)
        g = gg.capture(Masked(), (x64(1, 3),))
    assert "first_non_finite" not in g.meta


class TinyCausalLM(torch.nn.Module):
    """One causal attention layer masking with -inf, as many LLM implementations do: with left
    padding, a padded query position sees no key at all and its softmax row is 0/0 = NaN."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.embed = torch.nn.Embedding(7, 4).double()
        self.qkv = torch.nn.Linear(4, 12).double()
        self.head = torch.nn.Linear(4, 7).double()
        for p in self.parameters():
            p.data = torch.randn(p.shape, dtype=torch.float64, generator=g)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        q, k, v = self.qkv(h).split(4, dim=-1)
        n = input_ids.shape[1]
        allowed = torch.ones(n, n, dtype=torch.bool).tril() & attention_mask[:, None, :].bool()
        scores = (q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
        attn = torch.softmax(scores, dim=-1)
        return self.head(attn @ v)


def test_left_padded_float64_causal_lm_warns_at_the_first_nan():
    model = TinyCausalLM()
    ids = torch.tensor([[0, 0, 3, 5, 1]])
    out = lambda o: o[0, -1, 2] - o[0, -1, 4]   # noqa: E731
    with torch.no_grad():                       # the model itself produces NaN
        assert torch.isnan(model(ids, torch.tensor([[0, 0, 1, 1, 1]]))).any()
    with pytest.warns(CaptureWarning) as record:
        g = gg.capture(model, (ids, torch.tensor([[0, 0, 1, 1, 1]])), output=out)
    record = [w for w in record if issubclass(w.category, CaptureWarning)]
    msg = str(record[0].message)
    assert "(aten._softmax.default" in msg and "holds NaN" in msg
    assert "attn = torch.softmax(scores, dim=-1)" in msg
    assert g.meta["first_non_finite"]["op"] == "aten._softmax.default"
    with warnings.catch_warnings():             # without padding: finite, and no warning
        warnings.simplefilter("error", CaptureWarning)
        g = gg.capture(model, (ids, torch.ones_like(ids)), output=out)
    assert "first_non_finite" not in g.meta


def test_left_padded_hf_gpt2_warns_exactly_when_it_gives_nan():
    model, _, kwargs, out = gpt2_lm(mask=True)
    kwargs = dict(kwargs)
    mask = torch.ones_like(kwargs["attention_mask"])
    mask[:, :2] = 0                                                  # left padding
    kwargs["attention_mask"] = mask
    with torch.no_grad():
        nan_in_model = bool(torch.isnan(model(**kwargs).logits).any())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        g = gg.capture(model, (), kwargs, output=out)
    reported = [w for w in record if issubclass(w.category, CaptureWarning)]
    assert bool(reported) == nan_in_model == ("first_non_finite" in g.meta)


# ----------------------------------------------------------------------------- no path
def test_output_independent_of_the_input_warns_in_queries():
    model, x = torch.nn.Linear(3, 3).double(), x64(2, 3)
    out = lambda y: (y * 0.0).sum()   # noqa: E731
    g = gg.capture(model, (x,), output=out)
    close(g.gradient()["input"], autograd_gradient(model, (x,), {}, out)["input"])
    with pytest.warns(QueryWarning, match="top_paths.*gradient is zero"):
        assert g.top_paths() == []
    with pytest.warns(QueryWarning, match="entropy.*no path"):
        assert g.entropy() != g.entropy()      # NaN


# ----------------------------------------------------------------------------- metadata
@torch.library.custom_op("gradgraph_test::smooth_step", mutates_args=())
def smooth_step(x: torch.Tensor) -> torch.Tensor:
    return x * x * (3 - 2 * x)


@smooth_step.register_fake
def _(x):
    return torch.empty_like(x)


smooth_step.register_autograd(lambda ctx, g: g * 6 * ctx.saved_tensors[0] * (1 - ctx.saved_tensors[0]),
                              setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[0]))


class MixedPrecision(torch.nn.Module):
    """float64 model with a user op without a rule and a float32 softmax (as HF models do)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4).double()

    def forward(self, x):
        h = smooth_step(self.lin(x))
        p = torch.softmax(h.float(), dim=-1).to(torch.float64)
        return (p * h).sum()


def test_meta_lists_dense_jacobians_and_lower_precision_nodes():
    assert registry.get_rule(torch.ops.gradgraph_test.smooth_step.default) is None
    model, x = MixedPrecision(), x64(2, 4)
    g = gg.capture(model, (x,))
    torch.testing.assert_close(g.gradient()["x"], autograd_gradient(model, (x,), {}, lambda y: y)["x"],
                               rtol=1e-5, atol=1e-7)      # the softmax is float32
    assert [d["op"] for d in g.meta["dense_jacobians"]] == ["gradgraph_test.smooth_step.default"]
    assert "smooth_step(self.lin(x))" in g.meta["dense_jacobians"][0]["source_line"]
    expected = {n.name for n in g.nodes if n.dtype == "float32"}       # read off the nodes
    assert expected and {d["node"] for d in g.meta["lower_precision"]} == expected
    assert {d["op"] for d in g.meta["lower_precision"]} == {"aten._to_copy.default", "aten._softmax.default"}
    assert all(d["dtype"] == "float32" for d in g.meta["lower_precision"])
    plain = gg.capture(torch.nn.Linear(4, 1).double(), (x,), output=lambda y: y.sum())
    assert plain.meta["dense_jacobians"] == [] and plain.meta["lower_precision"] == []


def test_info_lists_dense_jacobians_and_lower_precision_nodes(tmp_path):
    g = gg.capture(MixedPrecision(), (x64(2, 4),))
    path = tmp_path / "mixed.safetensors"
    g.save(path)
    assert gg.load(path).meta["lower_precision"] == g.meta["lower_precision"]
    cli = [sys.executable, "-m", "gradgraph", "info", str(path)]
    text = subprocess.run(cli, capture_output=True, text=True, check=True).stdout
    assert "dense        1 node: gradgraph_test.smooth_step.default" in text
    assert "lower prec.  2 nodes (float32): aten._to_copy.default, aten._softmax.default" in text
    info = json.loads(subprocess.run(cli + ["--json"], capture_output=True, text=True, check=True).stdout)
    assert info["meta"]["dense_jacobians"][0]["op"] == "gradgraph_test.smooth_step.default"


# ----------------------------------------------------------------------------- export errors
class DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:                       # data-dependent branch: export cannot trace it
            return x.sum()
        return -x.sum()


class RaisesWithCause(torch.nn.Module):
    def forward(self, x):
        try:
            {}["missing"]
        except KeyError as exc:
            raise ValueError("the model's own message") from exc


def test_export_error_keeps_torch_message_and_the_user_line():
    # tracer="export": the default ("auto") records such a model instead (tests/test_capture_record.py)
    with pytest.raises(CaptureError) as e:
        gg.capture(DataDependent(), (x64(3),), tracer="export")
    msg = str(e.value)
    assert "test_capture_guarantees.py" in msg and "if x.sum() > 0:" in msg
    assert "GuardOnDataDependentSymNode" in msg
    assert "draft_export" in msg                 # the last line of torch's message is kept


def test_export_error_keeps_the_chain_of_causes():
    with pytest.raises(CaptureError) as e:
        gg.capture(RaisesWithCause(), (x64(3),))
    msg = str(e.value)
    assert "ValueError: the model's own message" in msg and "KeyError: 'missing'" in msg
    assert msg.index("ValueError") < msg.index("KeyError")
    assert '{}["missing"]' in msg                # the user's line of the deepest cause


NAN_SPEC = '''
import torch

class MakesNaN(torch.nn.Module):
    def forward(self, x):
        return (torch.tanh(x) + torch.log(x - 100.0)).sum()

def build():
    return MakesNaN(), (torch.randn(2, 3, dtype=torch.float64),), None, None
'''


def test_cli_prints_a_capture_warning_as_one_line_and_info_shows_it(tmp_path):
    spec = tmp_path / "nan_spec.py"
    spec.write_text(NAN_SPEC)
    out = tmp_path / "nan.safetensors"
    cli = [sys.executable, "-m", "gradgraph"]
    r = subprocess.run(cli + ["capture", f"{spec}:build", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "gradgraph: warning:" in ln]
    assert len(lines) == 1 and "node log (aten.log.default" in lines[0] and "holds NaN" in lines[0]
    assert "Traceback" not in r.stderr
    text = subprocess.run(cli + ["info", str(out)], capture_output=True, text=True, check=True).stdout
    assert "non-finite   node log (aten.log.default) holds NaN at " in text
    assert "nan_spec.py:6 in forward" in text
