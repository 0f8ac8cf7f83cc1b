"""The entropy and flow of float32 models: their passes hold float32 values, and the answers agree
with float64 oracles that share no code with those passes.

Oracles:

* tests/oracle.py's brute-force enumeration of the scalar graph (dense jacrev Jacobians of the
  recorded float32 model, every path's weight in float64) on tiny models;
* the same transformer / CNN cast to float64 and run through the float64 passes (whose own
  exactness is tested at 1e-9 against the enumeration in tests/test_entropy.py and test_flow.py);
* exact rescaling: multiplying a ReLU layer's weights and bias by a power of two multiplies every
  path weight through it by that power exactly, so the entropy is unchanged and every flow
  through the scaled paths scales by it exactly.

Tolerance: relative 1e-5. A float32 model records its values and computes its local derivatives
to float32's rounding (2^-24 = 6e-8 relative); the passes add one rounding per product and per
(+) (the contractions' sums run in float32 BLAS). Entropies, per-source entropies and summed flows
are averages over many paths, so the roundings do not accumulate coherently: the measured
differences are 1e-8 to 2e-7 relative. 1e-5 leaves a factor 50 for other BLAS kernels. An entropy
near 0 (a single path) is compared absolutely (``ATOL_NATS``). A single
element's flow is compared relative to the largest flow of its tensor: between a float32 and a
float64 forward, an element whose derivative cancels (a layer-norm input near its row's mean)
differs far more than the pass's rounding in relative terms, however the pass computes.
"""
import copy
import math

import numpy as np
import pytest
import torch

import gradgraph as gg
from gradgraph.algorithms import entropy as entropy_mod
from gradgraph.algorithms.dp import Scaled, backward
from gradgraph.algorithms.semirings import ENTROPY, MAGNITUDE
from oracle import ScalarOracle, tiny_attention, tiny_mlp, tiny_residual_ln

RTOL = 1e-5
#: H = log Z + R / Z is a sum of two terms of size |log Z| that cancel for a single path (H = 0):
#: float32 mantissas of Z and R leave an absolute error of ~6e-8 (|log Z| + |R / Z|) nats, 2e-7
#: measured where H = 0 (log Z ~ -3) -- an absolute tolerance for per-element entropies
ATOL_NATS = 1e-6


def _f32(builder, **kw):
    model, args, kwargs, out = builder(**kw)
    model = model.float()
    args = tuple(a.float() if a.is_floating_point() else a for a in args)
    return model, args, kwargs, out


def _fx(g, name):
    return g.nodes[g.sources[name]].fx_name


# ---------------------------------------------------------------------------- the passes' dtype
@pytest.mark.parametrize("builder", [tiny_residual_ln, tiny_attention])
@pytest.mark.parametrize("sr", [ENTROPY, MAGNITUDE], ids=lambda s: s.name)
def test_a_float32_model_s_pass_holds_float32_values(builder, sr):
    """Seeded in float32, every value of the pass is float32 (contractions, layer norm, softmax,
    elementwise ops, index maps and the (+) of several contributions keep it); the float64 model's
    pass is float64 throughout."""
    model, args, kwargs, out = builder(seed=1)
    g64 = gg.capture(model, args, kwargs, output=out)
    model, args, kwargs, out = _f32(builder, seed=1)
    g32 = gg.capture(model, args, kwargs, output=out)
    for g, dt in ((g32, np.float32), (g64, np.float64)):
        seed = sr.seed(g.nodes[g.sink].numel)
        seed.arr = seed.arr.astype(dt)
        B = backward(g, sr, seed=seed)
        assert {b.arr.dtype for b in B if b is not None} == {np.dtype(dt)}


def test_entropy_and_flow_seed_their_passes_in_the_model_s_precision(monkeypatch):
    seen = []
    real = entropy_mod.backward

    def spy(g, sr, seed=None, **kw):
        seen.append(seed.arr.dtype)
        return real(g, sr, seed=seed, **kw)
    monkeypatch.setattr(entropy_mod, "backward", spy)
    model, args, kwargs, out = tiny_residual_ln(seed=0, d=4)
    gg.capture(model, args, kwargs, output=out).entropy()
    model, args, kwargs, out = _f32(tiny_residual_ln, seed=0, d=4)
    gg.capture(model, args, kwargs, output=out).entropy()
    assert seen == [np.float64, np.float32]


# ---------------------------------------------------------------------------- brute force
TINY = [
    (tiny_mlp, dict(seed=2, widths=(3, 4, 3, 2), act="tanh")),
    (tiny_mlp, dict(seed=3, widths=(4, 5, 2), batch=2, act="relu")),
    (tiny_mlp, dict(seed=4, widths=(3, 4, 2), act="gelu")),
    (tiny_residual_ln, dict(seed=3, d=6, rows=2)),
    (tiny_attention, dict(seed=5, vocab=7, d=3, tokens=4)),
]


@pytest.fixture(scope="module", params=range(len(TINY)), ids=lambda i: f"{TINY[i][0].__name__}-{i}")
def tiny32(request):
    builder, kw = TINY[request.param]
    model, args, kwargs, out = _f32(builder, **kw)
    g = gg.capture(model, args, kwargs, output=out)
    o = ScalarOracle(model, args, kwargs, out, source_fx_names=[_fx(g, n) for n in g.sources])
    return g, o


def test_float32_entropy_matches_enumeration(tiny32):
    g, o = tiny32
    assert math.isclose(g.entropy(), o.entropy(), rel_tol=RTOL)
    got, want = g.entropy(per_source=True), o.entropy(per_source=True)
    for name in g.sources:
        np.testing.assert_allclose(got[name], want[_fx(g, name)], rtol=RTOL, atol=ATOL_NATS)
    # groups: the source's elements in two groups by parity, one left out (-1)
    for name in g.sources:
        n = g.nodes[g.sources[name]].numel
        labels = np.arange(n) % 2
        labels[0] = -1
        got = g.entropy(groups={name: labels})[name]
        want = o.entropy(groups={_fx(g, name): [[j for j in range(n) if labels[j] == k] for k in (0, 1)]})
        np.testing.assert_allclose(got, want[_fx(g, name)], rtol=RTOL, atol=ATOL_NATS)


def test_float32_flow_matches_enumeration(tiny32):
    g, o = tiny32
    want = o.tensor_flow()
    per_element, per_node = g.flow(by="element"), g.flow(by="node")
    for n in g.nodes:
        w = want[n.fx_name]
        assert per_element[n.name].dtype == np.float64
        np.testing.assert_allclose(per_element[n.name], w, rtol=RTOL, atol=RTOL * float(np.abs(w).max()))
        assert math.isclose(per_node[n.name], float(w.sum()), rel_tol=RTOL)
    assert math.isclose(per_element[g.sink_node.name].item(), o.Z(), rel_tol=RTOL)


# ---------------------------------------------------------------------------- models cast to float64
def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0,
                        eos_token_id=0, attn_implementation="eager", use_cache=False)
    ids = torch.randint(0, 50, (1, 6))       # causal: masked attention (probabilities exactly 0)
    return GPT2LMHeadModel(config).eval(), {"input_ids": ids}, lambda o: o.logits[0, -1, 1] - o.logits[0, -1, 2]


def _bert():
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                        vocab_size=50, max_position_embeddings=16)
    ids = torch.randint(0, 50, (1, 6))
    return BertForMaskedLM(config).eval(), {"input_ids": ids}, lambda o: o.logits[0, 2, 1] - o.logits[0, 2, 2]


class _CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 3, 3, stride=2)
        self.head = torch.nn.Linear(3 * 2 * 2, 3)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.tanh(self.conv2(h))
        return self.head(h.flatten(1))


def _cnn():
    torch.manual_seed(0)
    return _CNN().eval(), {"x": torch.randn(1, 2, 6, 6)}, lambda y: y[0, 0] - y[0, 2]


@pytest.fixture(scope="module", params=[_gpt2, _bert, _cnn], ids=lambda f: f.__name__.strip("_"))
def model_pair(request):
    model, kwargs, out = request.param()
    g32 = gg.capture(model, (), kwargs, output=out)
    model64 = copy.deepcopy(model).double()
    kwargs64 = {k: v.double() if v.is_floating_point() else v for k, v in kwargs.items()}
    g64 = gg.capture(model64, (), kwargs64, output=out)
    assert str(g32.nodes[g32.sink].dtype).endswith("float32") and str(g64.nodes[g64.sink].dtype).endswith("float64")
    return g32, g64


def test_float32_entropy_agrees_with_the_float64_model(model_pair):
    g32, g64 = model_pair
    assert math.isclose(g32.entropy(), g64.entropy(), rel_tol=RTOL)
    got, want = g32.entropy(per_source=True), g64.entropy(per_source=True)
    for name in g64.sources:
        np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL_NATS)
    axis = 1 if g64.nodes[g64.sources[next(iter(g64.sources))]].shape[1:] else 0
    groups = {name: axis for name in g64.sources}
    got, want = g32.entropy(groups=groups), g64.entropy(groups=groups)
    for name in g64.sources:
        np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL_NATS)


def test_float32_flow_agrees_with_the_float64_model(model_pair):
    g32, g64 = model_pair
    for by in ("node", "module"):
        got, want = g32.flow(by=by), g64.flow(by=by)
        assert set(got) == set(want)
        for key, w in want.items():
            assert math.isclose(got[key], w, rel_tol=RTOL), (by, key)
    got, want = g32.flow(by="element"), g64.flow(by="element")
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=0, atol=RTOL * float(np.abs(w).max()))


# ---------------------------------------------------------------------------- extreme weights
def _relu_mlp(scale_first, scale_second, zeros=False):
    """A float32 ReLU MLP (3 -> 5 -> 4 -> 2) whose first / second layer (weight and bias) are
    multiplied by powers of two: path weights scale exactly, the activation pattern is unchanged."""
    torch.manual_seed(11)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4), torch.nn.ReLU(),
                                torch.nn.Linear(4, 2)).float().eval()
    with torch.no_grad():
        if zeros:
            model[2].weight[:, 1] = 0.0           # zero weights: no edges
            model[2].weight[0, 0] = 0.0
        model[0].weight.mul_(scale_first)
        model[0].bias.mul_(scale_first)
        model[2].weight.mul_(scale_second)
        model[2].bias.mul_(scale_first * scale_second)
    x = torch.tensor([[0.7, -1.1, 0.4]])
    return gg.capture(model, (x,), output=lambda y: y[0, 0] - y[0, 1])


@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("scales", [(2.0 ** -100, 1.0), (2.0 ** 50, 2.0 ** 50), (2.0 ** -60, 2.0 ** -60),
                                    (2.0 ** 90, 2.0 ** -90)])
def test_float32_extreme_weights_scale_exactly(scales, zeros):
    """Weights of 1e-30 (and path weights of 1e-36), 1e15 (path weights 1e30): the entropy is that
    of the unscaled model, every flow scales by the product of the scales, all finite."""
    base = _relu_mlp(1.0, 1.0, zeros)
    g = _relu_mlp(*scales, zeros)
    c = scales[0] * scales[1]
    h = g.entropy()
    assert math.isfinite(h) and math.isclose(h, base.entropy(), rel_tol=RTOL)
    for name in g.sources:
        np.testing.assert_allclose(g.entropy(per_source=True)[name], base.entropy(per_source=True)[name],
                                   rtol=RTOL, atol=ATOL_NATS)
    f, f0 = g.flow(by="node"), base.flow(by="node")
    assert all(math.isfinite(v) for v in f.values())
    # the sink's flow is Z: every path passes through both scaled layers
    sink = g.sink_node.name
    assert math.isclose(f[sink], c * f0[sink], rel_tol=RTOL)
    logf = g.flow(by="node", log=True)
    assert math.isclose(logf[sink], math.log(c) + math.log(f0[sink]), rel_tol=0, abs_tol=RTOL)
