"""A 200-layer narrow network whose path weights are ~1e-400, far below float64's range: the
scaled semiring passes must still agree with a log-space brute force over the scalar graph."""
import math

import numpy as np
import pytest
import torch

import gradgraph as gg
from gradgraph.algorithms.dp import backward
from gradgraph.algorithms.flow import total_flow
from gradgraph.algorithms.semirings import MAX_ABS, MAX_SIGNED
from oracle import ScalarOracle, logsumexp

DEPTH = 200


class Deep(torch.nn.Module):
    """x <- tanh(x @ W_i), 200 times: a width-1 chain, widened to 2 for one layer every 50 (16 paths
    per input element, so the brute force stays small); |W| in [0.005, 0.012], 30% negative."""

    def __init__(self, depth=DEPTH, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        shapes = [(1, 2) if i % 50 == 9 else (2, 1) if i == 0 or i % 50 == 10 else (1, 1)
                  for i in range(depth)]
        weights = []
        for shape in shapes:
            mag = 0.005 + 0.007 * torch.rand(shape, generator=g, dtype=torch.float64)
            sign = torch.where(torch.rand(shape, generator=g) < 0.3, -1.0, 1.0).double()
            weights.append(torch.nn.Parameter(mag * sign))
        self.weights = torch.nn.ParameterList(weights)

    def forward(self, x):
        for w in self.weights:
            x = torch.tanh(x @ w)
        return x


@pytest.fixture(scope="module")
def deep():
    model = Deep().double().eval()
    x = torch.tensor([[0.7, -1.3]], dtype=torch.float64)
    out = lambda y: y[0, 0]  # noqa: E731
    capturer = gg.Capturer(model, out)
    g = capturer.capture((x,))
    o = ScalarOracle(model, (x,), output=out, source_fx_names=[g.nodes[g.sources["x"]].fx_name],
                     exported=capturer.program((x,), {}))   # reuse torch's export (slow at depth 200)
    return g, o


def test_deep_network_really_is_beyond_float64(deep):
    g, o = deep
    assert len(o.paths()) == 2 * 16
    assert max(p.log_abs for p in o.paths()) < -350 * math.log(10)
    assert all(p.weight == 0.0 for p in o.paths())     # plain products underflow


def test_deep_entropy_is_finite_and_exact(deep):
    g, o = deep
    H = g.entropy()
    assert math.isfinite(H)
    assert math.isclose(H, o.entropy(), rel_tol=1e-9)
    np.testing.assert_allclose(g.entropy(per_source=True)["x"], o.entropy(per_source=True)[next(iter(o.sources))],
                               rtol=1e-9)


def test_deep_log_total_flow_and_lengths(deep):
    g, o = deep
    assert math.isclose(total_flow(g, log=True), o.log_Z(), rel_tol=1e-12)
    assert total_flow(g) == 0.0                         # documented underflow of the plain value
    got, want = g.path_lengths(log=True), o.log_length_distribution()
    n = max(len(got), len(want))
    got = np.pad(got, (0, n - len(got)), constant_values=-np.inf)
    want = np.pad(want, (0, n - len(want)), constant_values=-np.inf)
    assert np.array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-12)


def test_deep_log_flow_per_element(deep):
    g, o = deep
    logs = g.flow(by="element", log=True)
    want = o.log_flow()
    for n in g.nodes:
        for j in range(n.numel):
            w = want.get((n.fx_name, j), -math.inf)
            v = float(logs[n.name].reshape(-1)[j])
            assert (v == w == -math.inf) or math.isclose(v, w, rel_tol=1e-11), (n.name, j)


def _signed_best(paths):
    """(sign, log|g|) of the most positive path weight, compared in log space."""
    best = max(paths, key=lambda p: (p.sign, p.sign * p.log_abs))
    return best.sign, best.log_abs


def test_deep_max_passes_give_the_best_log_weight(deep):
    g, o = deep
    src = g.sources["x"]
    by_elem = {}
    for p in o.paths():
        by_elem.setdefault(p.source[1], []).append(p)
    Bs = backward(g, MAX_SIGNED)[src]
    Ba = backward(g, MAX_ABS)[src]
    for j, ps in by_elem.items():
        # MAX_ABS: largest |g(path)|
        assert math.isclose(math.log(Ba.arr[0, j]) + Ba.log_scale, max(p.log_abs for p in ps), rel_tol=1e-12)
        # MAX_SIGNED: the most positive g(path) in channel 0, the most negative in channel 1
        sign, la = _signed_best(ps)
        assert np.sign(Bs.arr[0, j]) == sign
        assert math.isclose(math.log(abs(Bs.arr[0, j])) + Bs.log_scale, la, rel_tol=1e-12)
        worst = min(ps, key=lambda p: (p.sign, p.sign * p.log_abs))
        assert np.sign(Bs.arr[1, j]) == worst.sign
        assert math.isclose(math.log(abs(Bs.arr[1, j])) + Bs.log_scale, worst.log_abs, rel_tol=1e-12)
    # and the log-space total agrees with summing the per-path logs
    assert math.isclose(logsumexp([p.log_abs for p in o.paths()]), o.log_Z())


@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_vectorised_log_term_against_numpy(dtype, blocks):
    """abs_xlogx (|w| and -|w| log|w| by the bit-level logarithm) against numpy's log in
    float64, over the whole range where the term is finite: zeros, subnormals, the mantissa
    boundaries sqrt(1/2), 1, sqrt(2), powers of two; in one block and split into parallel blocks."""
    from gradgraph.jacobians.matmul import abs_xlogx

    info = np.finfo(dtype)
    rng = np.random.default_rng(0)
    lo, hi = math.log(float(info.tiny)), math.log(float(info.max)) - 7    # -w log w stays finite
    w = np.concatenate([
        np.exp(rng.uniform(lo, hi, 20000)) * rng.choice([-1.0, 1.0], 20000),
        1 + rng.uniform(-0.5, 0.5, 5000),
        [0.0, -0.0, float(info.tiny), float(info.tiny) / 8, float(info.smallest_subnormal),
         1.0, 2.0, 0.5, math.sqrt(0.5), math.sqrt(2.0), np.nextafter(math.sqrt(2.0), 0), 1 - 2**-20]]).astype(dtype)
    a, h = np.empty_like(w), np.empty_like(w)
    abs_xlogx(w, a, h, blocks)
    w64 = np.abs(w.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        want = np.where(w64 > 0, -w64 * np.log(w64), 0.0)
    assert np.array_equal(a, np.abs(w))
    tol = 4 * float(info.eps)
    err = np.abs(h.astype(np.float64) - want)
    bound = tol * np.maximum(np.abs(want), w64)   # relative to the term, or to |w| where log|w| ~ 0
    assert np.all(err <= bound + float(info.smallest_subnormal)), float(np.max(err / np.maximum(bound, 1e-300)))
