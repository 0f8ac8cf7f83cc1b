"""The recording capture path (``tracer="record"``, and ``"auto"`` where ``torch.export`` fails on
data-dependent control flow): it records the ATen ops one input runs and builds the graph with the
same rules. Gradients are checked against ``torch.autograd.grad``; the mixture-of-experts and
Longformer models are in ``tests/test_zoo.py``."""
import pytest
import torch

import gradgraph as gg
from gradgraph.errors import CaptureError

from models import autograd_gradient


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def x64(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


class Branching(torch.nn.Module):
    """Branches on a tensor value and sizes a tensor by one (nonzero): torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4).double()

    def forward(self, x):
        h = self.lin(x)
        if x.sum() > 0:
            h = torch.tanh(h)
        else:
            h = torch.sin(h) * 2.0
        rows = torch.nonzero(h[:, 0] > 0).reshape(-1)      # data-dependent size
        return h[rows].sum() + (h ** 2).sum()


def test_auto_records_a_model_export_cannot_trace_and_follows_each_inputs_branch():
    model = Branching()
    cap = gg.Capturer(model)
    inputs = [x64(3, 4, seed=s) for s in range(6)]
    branches = set()
    for x in inputs:
        g = cap.capture((x,))
        assert g.meta["tracer"] == "record"
        assert "Branching.forward" not in g.meta["export_failure"] or "test_capture_record.py" in g.meta["export_failure"]
        close(g.gradient()["x"], autograd_gradient(model, (x,), {}, lambda y: y)["x"])
        branches.add("aten.tanh.default" in [n.op for n in g.nodes])
    assert branches == {True, False}, "the inputs should take both branches"
    assert cap.n_exports == 0 and cap.n_records == len(inputs)
    assert len(cap.notes) == 1 and "data-dependent" in cap.notes[0]


def test_export_only_raises_naming_the_users_line():
    with pytest.raises(CaptureError) as err:
        gg.capture(Branching(), (x64(3, 4),), tracer="export")
    first = str(err.value).splitlines()[0]
    assert "test_capture_record.py" in first and "if x.sum() > 0:" in first, first


def test_tracer_must_be_known():
    with pytest.raises(CaptureError, match="tracer must be one of"):
        gg.capture(Branching(), (x64(3, 4),), tracer="trace")


class Everything(torch.nn.Module):
    """detach, a no_grad block, inference_mode, an autograd.Function and a buffer, in one forward."""

    def __init__(self):
        super().__init__()
        self.lin1 = torch.nn.Linear(4, 5).double()
        self.lin2 = torch.nn.Linear(5, 3).double()
        self.register_buffer("shift", torch.linspace(-1, 1, 5, dtype=torch.float64))

    def forward(self, x):
        h = self.lin1(x) + self.shift
        with torch.no_grad():
            scale = h.abs().mean() + 1.0                # no gradient flows through the scale
        with torch.inference_mode():
            offset = h.tanh().sum(-1, keepdim=True)     # nor through this
        h = Doubling.apply(h / scale) + h.detach() * h + offset.clone()
        return self.lin2(torch.relu(h))


class Doubling(torch.autograd.Function):
    """Forward doubles; backward triples (not the forward's derivative: capture must follow it)."""

    @staticmethod
    def forward(ctx, x):
        return 2.0 * x

    @staticmethod
    def backward(ctx, grad):
        return 3.0 * grad


@pytest.mark.parametrize("tracer", ["record", "export"])
def test_recording_honours_detach_no_grad_and_autograd_functions(tracer):
    model, x = Everything(), x64(2, 4, seed=3)
    out = lambda y: y[1, 2] - y[0, 0]   # noqa: E731
    g = gg.capture(model, (x,), output=out, tracer=tracer)
    assert g.meta["tracer"] == tracer
    close(g.gradient()["x"], autograd_gradient(model, (x,), {}, out)["x"])
    assert "Doubling.apply" in [n.op for n in g.nodes]


def test_recorded_graph_has_module_paths_and_source_lines():
    model, x = Everything(), x64(2, 4, seed=3)
    rec = gg.capture(model, (x,), output=lambda y: y[1, 2], tracer="record")
    exp = gg.capture(model, (x,), output=lambda y: y[1, 2], tracer="export")
    assert [n.op for n in rec.nodes] == [n.op for n in exp.nodes]
    assert [n.module for n in rec.nodes] == [n.module for n in exp.nodes]
    assert {n.module for n in rec.nodes} >= {"lin1", "lin2"}
    assert [n.source_line for n in rec.nodes] == [n.source_line for n in exp.nodes]
    lines = [n.source_line for n in rec.nodes if n.role != "source" and n.module != "<output>"]
    assert all("test_capture_record.py" in s for s in lines), lines
    assert any("self.lin2(torch.relu(h))" in s for s in lines)


def test_recorded_program_is_never_reused_for_another_input():
    model = Everything()
    cap = gg.Capturer(model, lambda y: y[0, 1], tracer="record")
    for seed in range(3):
        x = x64(2, 4, seed=seed)
        close(cap.capture((x,)).gradient()["x"], autograd_gradient(model, (x,), {}, lambda y: y[0, 1])["x"])
    assert cap.n_records == 3 and cap.n_exports == 0


def test_info_says_the_graph_was_recorded(tmp_path):
    import subprocess
    import sys
    g = gg.capture(Branching(), (x64(3, 4),))
    path = tmp_path / "recorded.safetensors"
    g.save(path)
    assert gg.load(path).meta["tracer"] == "record"
    text = subprocess.run([sys.executable, "-m", "gradgraph", "info", str(path)], capture_output=True, text=True,
                          check=True).stdout
    assert "captured by   recording this input's ops (torch.export failed on data-dependent control flow)" in text
