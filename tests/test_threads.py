"""The thread policy (gradgraph.threads): gg.set_num_threads sets every pool, a query holds
numpy's BLAS to one thread and restores it, the parallel kernels give bit-for-bit the results of
one thread, and an exactness suite passes with every pool at two threads."""
from __future__ import annotations

import os
import subprocess
import sys

import numba
import numpy as np
import pytest
import torch
from threadpoolctl import ThreadpoolController, threadpool_info

import gradgraph as gg
from gradgraph import threads
from gradgraph.algorithms.dp import backward
from gradgraph.algorithms.semirings import ENTROPY, MAX_SIGNED
from gradgraph.jacobians import MatmulJacobian, RowBlockJacobian

TWO = numba.config.NUMBA_NUM_THREADS >= 2
needs_two = pytest.mark.skipif(not TWO, reason="numba's pool has one thread here (NUMBA_NUM_THREADS=1)")


def _blas_threads():
    return {lib["filepath"]: lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


@pytest.fixture
def restore_pools():
    """Put torch's, numba's and the BLAS pools back as they were."""
    t, n = torch.get_num_threads(), numba.get_num_threads()
    blas = ThreadpoolController().info()
    dyn = threads.set_dynamic(True)
    yield
    torch.set_num_threads(t)
    numba.set_num_threads(n)
    for lib in blas:
        if lib["user_api"] == "blas":
            ThreadpoolController().select(filepath=lib["filepath"]).limit(limits=lib["num_threads"])
    threads.set_dynamic(dyn)


@pytest.mark.parametrize("n", [1, 2])
def test_set_num_threads_sets_every_pool(restore_pools, n):
    if n == 2 and not TWO:
        pytest.skip("numba's pool has one thread here (NUMBA_NUM_THREADS=1)")
    other = 2 if n == 1 else 1
    torch.set_num_threads(other)
    numba.set_num_threads(min(other, numba.config.NUMBA_NUM_THREADS))
    gg.set_num_threads(n)
    assert torch.get_num_threads() == n
    assert gg.get_num_threads() == n
    assert numba.get_num_threads() == n
    blas = _blas_threads()
    assert blas, "numpy links a BLAS that threadpoolctl sees"
    assert set(blas.values()) == {n}


def test_get_num_threads_follows_torch(restore_pools):
    torch.set_num_threads(1)
    assert gg.get_num_threads() == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, None])
def test_set_num_threads_rejects_bad_input(bad):
    with pytest.raises(gg.GradGraphError, match="integer >= 1"):
        gg.set_num_threads(bad)


def _tiny_graph():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3)).double()
    return gg.capture(model, (torch.randn(4, 6, dtype=torch.float64),), output=lambda y: y[0, 0] - y[1, 2])


@needs_two
def test_a_query_holds_blas_to_one_thread_and_restores_it(restore_pools):
    g = _tiny_graph()
    gg.set_num_threads(2)
    threads.set_dynamic(False)
    backward(g, ENTROPY)      # once first: a BLAS that a query's own lazy imports load is not limited
    seen = []
    backward(g, ENTROPY, visit=lambda v, b: seen.append((torch.get_num_threads(), _blas_threads())))
    assert seen and all(t == 2 and set(b.values()) == {1} for t, b in seen)
    assert set(_blas_threads().values()) == {2} and torch.get_num_threads() == 2


def test_a_busy_machine_gives_a_query_one_thread(restore_pools, monkeypatch):
    g = _tiny_graph()
    gg.set_num_threads(2)
    monkeypatch.setattr(threads, "_busy_elsewhere", lambda: 64)
    seen = []
    backward(g, MAX_SIGNED, visit=lambda v, b: seen.append(torch.get_num_threads()))
    assert set(seen) == {1}
    assert torch.get_num_threads() == 2          # the user's setting is back after the query
    monkeypatch.setattr(threads, "_busy_elsewhere", lambda: 0)
    assert threads.free_threads(2) == min(2, len(os.sched_getaffinity(0)))
    threads.set_dynamic(False)
    monkeypatch.setattr(threads, "_busy_elsewhere", lambda: 64)
    assert threads.free_threads(2) == 2


def _products(jac, rng, sums=True):
    """Every product family of ``jac`` (the sum and entropy products only if ``sums``), both
    directions, on random values with some "no path" entries."""
    out = []
    for transpose in (False, True):
        m = jac.out_numel if transpose else jac.in_numel
        x = rng.standard_normal((2, m))
        x[:, rng.random(m) < 0.2] = 0.0
        xmax = np.maximum(x[0], x[1])
        xmin = np.minimum(x[0], x[1])
        xmax[x[0] == 0] = -np.inf
        xmin[x[0] == 0] = np.inf
        if sums:
            out.append(jac.entropy_product(np.abs(x), transpose))
            out.append(jac.sum_product(np.abs(x), 1, transpose))
        out.extend(v for v in jac.max_product(xmax, xmin, transpose))
        out.append(jac.max_product(np.abs(x[0]), None, transpose)[0])
    return out


@needs_two
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_parallel_kernels_give_the_results_of_one_thread(restore_pools, precision):
    rng = np.random.default_rng(1)
    rows, d = 9, 300
    A = rng.standard_normal((rows, d))
    A = (A - A.mean(1, keepdims=True)) / A.std(1, keepdims=True)
    ln = RowBlockJacobian((rows, d), "layer_norm", rows, d, 1, A, rng.uniform(0.5, 2, rows),
                          rng.standard_normal(d), precision=precision)
    dt = np.float32 if precision == "float32" else np.float64
    W = rng.standard_normal((d, 700)).astype(dt)
    W[:, 5] = 0.0                                       # a column of zeros: the exact redo path
    mm = MatmulJacobian((rows, 700), (rows, d), W, "left")
    results, blas = {}, {}
    for n in (1, 2):
        gg.set_num_threads(n)
        # the numba kernels: every layer-norm product, the contraction's max products
        results[n] = ([r.copy() for r in _products(ln, np.random.default_rng(2))]
                      + [r.copy() for r in _products(mm, np.random.default_rng(2), sums=False)])
        # the contraction's sums go through BLAS, whose blocking depends on the thread count
        blas[n] = _products(mm, np.random.default_rng(2))[:2]
    assert len(results[1]) == 2 * 5 + 2 * 3
    for a, b in zip(results[1], results[2]):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
    for a, b in zip(blas[1], blas[2]):
        assert np.allclose(a, b, rtol=1e-10 if precision == "float64" else 1e-5, atol=0)


@needs_two
def test_an_exactness_suite_passes_with_every_pool_at_two_threads():
    """tests/test_jacobians.py (every Jacobian kind and product family against dense Jacobians)
    in a fresh process with GRADGRAPH_TEST_THREADS=2 (see conftest.py)."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, GRADGRAPH_TEST_THREADS="2")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          os.path.join(here, "test_jacobians.py")], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(here))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
