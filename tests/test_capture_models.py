"""``g.gradient()`` equals ``torch.autograd.grad`` on every model of the zoo, in both granularities."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradgraph as gg


from models import HF_ZOO, ZOO, autograd_gradient, zoo_model

TOL = {torch.float64: dict(rtol=1e-7, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}



def _check(name, granularity, dtype):
    model, args, kwargs, out = zoo_model(name, dtype)
    g = gg.capture(model, args, kwargs, output=out, granularity=granularity)
    assert g.granularity == granularity
    got = g.gradient()
    expected = autograd_gradient(model, args, kwargs, out)
    assert set(got) == set(expected)
    for k in expected:
        assert got[k].shape == expected[k].shape and got[k].dtype == expected[k].dtype
        assert expected[k].abs().max() > 0, f"{name}: the oracle gradient of {k} is zero"
        torch.testing.assert_close(got[k], expected[k], **TOL[dtype], msg=f"{name} {granularity} {k}")
    return g


# the HuggingFace models without padding are checked at function granularity only, to keep the
# suite fast (each is one more torch.export); their masked variants run both granularities
CASES = [(name, gran) for name in ZOO for gran in ("function", "primitive")
         if gran == "function" or not (name in HF_ZOO and not name.endswith("_mask"))]


@pytest.mark.parametrize("name, granularity", CASES)
def test_gradient_matches_autograd_float64(name, granularity, no_dense_fallback):
    _check(name, granularity, torch.float64)


@pytest.mark.parametrize("name", ["mlp_relu", "cnn", "residual_mlp_ln", "bert_mlm_mask"])
def test_gradient_matches_autograd_float32(name, no_dense_fallback):
    g = _check(name, "function", torch.float32)
    assert g.nodes[g.sink].dtype == "float32"


def test_function_granularity_keeps_softmax_and_layer_norm_whole():
    model, args, kwargs, out = zoo_model("bert_mlm_mask")
    ops = {gran: {n.op for n in gg.capture(model, args, kwargs, output=out, granularity=gran).nodes}
           for gran in ("function", "primitive")}
    assert {"aten._softmax.default", "aten.native_layer_norm.default", "aten.gelu.default"} <= ops["function"]
    assert not {"aten._softmax.default", "aten.native_layer_norm.default"} & ops["primitive"]
    assert "aten.exp.default" in ops["primitive"]


# random widths, activations (incl. softmax over the batch and layer norm) and granularities
ACTS = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "sigmoid": torch.nn.Sigmoid,
        "silu": torch.nn.SiLU, "softmax": lambda: torch.nn.Softmax(dim=0), "layer_norm": None}


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(widths=st.lists(st.integers(1, 5), min_size=2, max_size=4),
       acts=st.lists(st.sampled_from(sorted(ACTS)), min_size=3, max_size=3),
       batch=st.integers(1, 3), seed=st.integers(0, 2**16), granularity=st.sampled_from(["function", "primitive"]))
def test_random_mlps_match_autograd(widths, acts, batch, seed, granularity):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(a, b))
        act = acts[i % len(acts)]
        layers.append(torch.nn.LayerNorm(b) if act == "layer_norm" else ACTS[act]())
    model = torch.nn.Sequential(*layers).double().eval()
    x = torch.randn(batch, widths[0], dtype=torch.float64)

    def out(y):
        return (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum()
    g = gg.capture(model, (x,), output=out, granularity=granularity)
    torch.testing.assert_close(g.gradient()["input"], autograd_gradient(model, (x,), {}, out)["input"],
                               rtol=1e-7, atol=1e-10)
