"""The pieces the entropy and flow queries were made faster with, each against an independent
oracle (numpy in float64, brute-force path enumeration): the bitwise check of kept |W|, the
elementwise entropy product on float32 weights, the early-stopping counts of live rows and non-zero
entries, and a value normalised once along identity edges."""
import math

import numpy as np
import pytest
import torch

import gradgraph as gg
from gradgraph.algorithms.flow import total_flow
from gradgraph.algorithms.kernels import nonzero_upto
from gradgraph.jacobians import WEIGHT_CACHE, MatmulJacobian
from gradgraph.jacobians.matmul import _abs_check, _memory_order
from gradgraph.jacobians.rowblock import live_rows
from gradgraph.jacobians.sparse import diag_entropy
from oracle import ScalarOracle


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("transposed", [False, True])
def test_abs_check_sees_every_single_change(dtype, transposed):
    """The check of a kept |W| against its weight: true for the weight it was made from, for a
    sign flip (|W| unchanged) and -0.0; false for a change of any one element (first, in the
    middle, in the last chunk), and for a NaN that was not there."""
    rng = np.random.default_rng(0)
    w = torch.from_numpy(rng.normal(size=(300, 257)).astype(dtype))
    other = (w.t() if transposed else w).numpy()[None]          # a linear layer's weight is viewed transposed
    flat, unflat = _memory_order(other)
    A = unflat(np.abs(flat))
    check = _abs_check(flat, unflat)
    assert check(A)
    w[3, 5] = -w[3, 5]
    w[0, 0] = -0.0 if w[0, 0] == 0 else w[0, 0]
    assert check(A)
    for i, j in [(0, 0), (150, 128), (299, 256)]:
        old = w[i, j].item()
        w[i, j] = old * (1 + 2 * float(np.finfo(dtype).eps))      # one ulp or two
        assert not check(A), (i, j)
        assert not np.array_equal(np.abs(other), A)               # the oracle agrees
        w[i, j] = old
        assert check(A)
    w[7, 7] = float("nan")
    assert not check(A)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_elementwise_entropy_product_in_the_weights_dtype(dtype):
    """diag_entropy on weights of their own dtype against numpy in float64 of the same weights:
    |w| Z exactly, |w| R - |w| log|w| Z to the weights' precision (float32: a float32 logarithm),
    zeros and subnormal weights included (0 log 0 = 0)."""
    rng = np.random.default_rng(1)
    info = np.finfo(dtype)
    w = np.concatenate([rng.normal(size=5000) * np.exp(rng.uniform(-20, 5, 5000)),
                        [0.0, -0.0, float(info.tiny) / 4, -float(info.smallest_subnormal), 1.0, -1.0]]).astype(dtype)
    x = np.vstack([np.abs(rng.normal(size=w.size)), rng.normal(size=w.size)])
    y = np.empty_like(x)
    diag_entropy(x, w, y, 0, w.size)
    a = np.abs(w.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.where(a > 0, -a * np.log(a), 0.0)
    np.testing.assert_array_equal(y[0], a * x[0])
    err = np.abs(y[1] - (a * x[1] + h * x[0]))
    bound = 4 * float(info.eps) * (np.abs(a * x[1]) + np.maximum(np.abs(h), a) * x[0]) + 1e-300
    assert np.all(err <= bound)


def test_live_rows_and_bounded_nonzero_count_against_numpy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 40, 16)) * (rng.random((2, 40, 16)) < 0.05)
    x[:, :3] = 0.0
    x[1, 5, -1] = 1e-300                      # a row live through its last entry of one channel
    np.testing.assert_array_equal(live_rows(x), (x != 0).any(axis=(0, 2)))
    for n in (0, 1, 4097, 20000):
        a = rng.normal(size=n) * (rng.random(n) < 0.3)
        sparse = np.zeros(n, dtype=np.float32)    # a few entries, one NaN, across chunk boundaries
        sparse[rng.choice(n, size=min(n, 5), replace=False)] = [np.nan, 1e-40, -2.0, 3.0, 1.0][:min(n, 5)]
        for a, limit in [(a, lim) for lim in (0, 3, 16, n)] + [(sparse, lim) for lim in (4, 5, 16)]:
            want = np.count_nonzero(a)
            count, where = nonzero_upto(a, limit)
            assert count == (want if want <= limit else limit + 1)
            np.testing.assert_array_equal(where, np.flatnonzero(a) if want <= limit else [])


def test_a_residual_stack_of_identity_edges_keeps_exact_flow_and_entropy():
    """Values handed on unchanged through identity edges (reshapes, residual adds) are normalised
    once; a deep stack whose path weights leave float64's range still gives the enumerated entropy,
    and the flow's logarithms."""
    torch.manual_seed(0)

    class Deep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2, bias=False) for _ in range(14))
            with torch.no_grad():
                for l in self.layers:           # path weights ~1e-420: below float64's range
                    l.weight.mul_(1e-30)

        def forward(self, x):
            for l in self.layers:
                x = l(x).reshape(1, 2).reshape(2)
            return x.sum()

    model = Deep().double()
    x = torch.randn(2, dtype=torch.float64)
    g = gg.capture(model, (x,))
    o = ScalarOracle(model, (x,))
    assert g.entropy() == pytest.approx(o.entropy(), rel=1e-10)
    assert math.isclose(total_flow(g, log=True), o.log_Z(), rel_tol=1e-10)


def test_flow_passes_share_one_kept_magnitude_per_weight():
    """Inside ``WEIGHT_CACHE.active()``, flow's outside and inside passes read one |W| per weight
    (both directions), checked once per query: a second flow of the same model computes no
    transform; its answer is the enumerated one."""
    WEIGHT_CACHE.clear()
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    g = gg.capture(model, (x,), output=lambda y: (y[:, 0] - y[:, 1]).sum())
    with WEIGHT_CACHE.active():
        g.flow(by="node")
        kept = sorted(key[-1] for key in WEIGHT_CACHE._entries)
        assert kept.count("abs") == 2                       # the two weights, one |W| each
        misses = WEIGHT_CACHE.misses
        f = g.flow(by="node")
        assert WEIGHT_CACHE.misses == misses
    want = ScalarOracle(model, (x,), output=lambda y: (y[:, 0] - y[:, 1]).sum()).tensor_flow()
    for n in g.nodes:
        assert math.isclose(f[n.name], float(want[n.fx_name].sum()), rel_tol=1e-10, abs_tol=1e-300)
    WEIGHT_CACHE.clear()


def test_products_through_part_of_a_weight_use_its_columns():
    """A contraction reached at a few rows and some of its columns (a pass from one position)
    takes the kept transforms restricted to those columns: the entropy pair equals the dense
    oracle's."""
    from gradgraph.algorithms.products import product
    from gradgraph.algorithms.semirings import ENTROPY, MAGNITUDE
    rng = np.random.default_rng(4)
    w = torch.from_numpy(rng.normal(size=(6, 40)))
    jac = MatmulJacobian((5, 6), (5, 40), w.t().numpy(), "left")
    J = jac.to_dense()
    A = np.abs(J)
    H = np.where(A > 0, -A * np.log(np.where(A > 0, A, 1.0)), 0.0)
    for live_cols in (6, 3, 1):
        z = np.zeros((5, 6))
        z[4, :live_cols] = rng.random(live_cols)
        r = np.zeros((5, 6))
        r[4, :live_cols] = rng.normal(size=live_cols)
        z, r = z.reshape(-1), r.reshape(-1)
        got = product(ENTROPY, jac, np.vstack([z, r]), True)
        np.testing.assert_allclose(got, np.vstack([A.T @ z, A.T @ r + H.T @ z]), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(product(MAGNITUDE, jac, z[None], True)[0], A.T @ z, rtol=1e-12, atol=1e-14)
