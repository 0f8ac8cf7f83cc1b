"""The thread policy (gradgraph.threads): gg.set_num_threads sets every pool, a query holds
numpy's BLAS to one thread and restores it, the parallel kernels give bit-for-bit the results of
one thread, and an exactness suite passes with every pool at two threads."""
from __future__ import annotations

import os
import subprocess
import sys
from unittest import mock

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


def test_busy_elsewhere_counts_another_process_and_needs_proc():
    """What a busy machine is (the count behind the test above): a process spinning on a core is
    seen (at some of 50 reads: the scheduler may deschedule it for a moment); where /proc cannot
    be read, nothing is."""
    import builtins
    import time
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)                           # the child is running by now
        assert max(threads._busy_elsewhere() for _ in range(50)) >= 1
    finally:
        child.kill()
        child.wait()
    real_open = builtins.open

    def no_proc(path, *a, **k):
        if str(path).startswith("/proc"):
            raise OSError("no /proc here")
        return real_open(path, *a, **k)
    with mock.patch.object(builtins, "open", no_proc):
        assert threads._busy_elsewhere() == 0


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
def test_parallel_kernels_give_the_results_of_one_thread(restore_pools, precision, monkeypatch):
    # every call parallel at two threads, however small (the products below are small)
    monkeypatch.setattr(threads, "PARALLEL_MIN_WORK", 0)
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
    # d(probs @ V) / dV with causal probabilities (one head): the masked kernel, its output rows
    # split between the threads
    T = 64
    probs = np.tril(rng.random((1, T, T)) + 0.1).astype(dt)
    att = MatmulJacobian((1, T, 40), (1, T, 40), probs, "right")
    from gradgraph.jacobians import matmul as matmul_module
    results, blas, blocks = {}, {}, {}
    for n in (1, 2):
        gg.set_num_threads(n)
        # the numba kernels: every layer-norm product, the contraction's max products
        with mock.patch.object(matmul_module, "mm_maxmin_masked", wraps=matmul_module.mm_maxmin_masked) as masked:
            results[n] = ([r.copy() for r in _products(ln, np.random.default_rng(2))]
                          + [r.copy() for r in _products(mm, np.random.default_rng(2), sums=False)]
                          + [r.copy() for r in _products(att, np.random.default_rng(2), sums=False)])
        blocks[n] = {c.args[-1] for c in masked.call_args_list}
        # the contraction's sums go through BLAS, whose blocking depends on the thread count
        blas[n] = _products(mm, np.random.default_rng(2))[:2]
    assert blocks[1] == {1} and 2 in blocks[2]        # the masked kernel ran, split at two threads
    assert len(results[1]) == 2 * 5 + 2 * 3 + 2 * 3
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


# ----------------------------------------------------------------------------- per-node work and
# sparse products in parallel blocks (gradgraph.jacobians._elementwise, SparseJacobian._scatter)
from gradgraph.jacobians import SparseJacobian, _elementwise  # noqa: E402
from gradgraph.jacobians import sparse as sparse_mod  # noqa: E402

SMALL_GRAIN = 1 << 12
BIG = 3 * SMALL_GRAIN + 7          # splits into blocks at two threads with the grain below


@pytest.fixture
def block_calls(monkeypatch):
    """Blocks of SMALL_GRAIN elements and torch's elementwise path from as few (the library's are
    larger: the tests' arrays stay small), and a count of the calls of every parallel block kernel
    and of the elementwise operations that went through torch (to know the parallel path ran)."""
    monkeypatch.setattr(_elementwise, "GRAIN", SMALL_GRAIN)
    monkeypatch.setattr(_elementwise, "TORCH_MIN", SMALL_GRAIN)
    calls = {}

    def spy(module, name):
        inner = getattr(module, name)

        def wrapper(*args):
            result = inner(*args)
            if name != "_torch" or result is not None:
                calls[name] = calls.get(name, 0) + 1
            return result
        monkeypatch.setattr(module, name, wrapper)
    for name in ("_torch", "_max_finite_abs_blocks"):
        spy(_elementwise, name)
    for name in ("coo_sum_blocks", "coo_entropy_blocks", "coo_max_blocks", "coo_maxmin_blocks",
                 "diag_max_blocks", "diag_entropy_blocks", "_copy_on_torch"):
        spy(sparse_mod, name)
    return calls


def _at_threads(n, fn):
    gg.set_num_threads(n)
    return fn()


@needs_two
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_elementwise_work_on_torchs_pool_is_numpys_bit_for_bit(restore_pools, block_calls, dtype):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((2, BIG)).astype(dtype)
    b = rng.standard_normal((2, BIG)).astype(dtype)
    a[0, ::11] = np.inf
    a[1, ::13] = -np.inf
    a[:, ::17] = 0.0
    w = rng.standard_normal(BIG).astype(np.float32)
    x = rng.standard_normal((2, BIG))
    finite = np.abs(a)[np.isfinite(a)]
    for n in (1, 2):
        gg.set_num_threads(n)
        into = a.copy()
        pair = np.empty_like(a)
        cases = [
            (_elementwise.add(a, b), a + b),
            (_elementwise.add(into, b, out=into), a + b),
            (_elementwise.div_scalar(a, 3.7), a / 3.7),
            (_elementwise.mul_scalar(a, 0.3), a * 0.3),
            (_elementwise.maxmin_plus(a, b, pair), np.stack([np.maximum(a[0], b[0]), np.minimum(a[1], b[1])])),
            (_elementwise.scale_columns(w, x), w * x),
            (_elementwise.scale_columns(w, x, absolute=True), np.abs(w) * x),
        ]
        for got, want in cases:
            assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=True)
        assert _elementwise.max_finite_abs(a) == finite.max()
        filled = _elementwise.fill(np.empty_like(a), -np.inf)
        assert filled.dtype == a.dtype and np.array_equal(filled, np.full_like(a, -np.inf))
        # the same through numpy's loops (arrays torch does not view: read-only)
        ro = a.copy()
        ro.flags.writeable = False
        assert np.array_equal(_elementwise.add(ro, b), a + b, equal_nan=True)
        assert np.array_equal(_elementwise.div_scalar(ro, 3.7), a / 3.7, equal_nan=True)
        assert _elementwise.max_finite_abs(ro) == finite.max()
    # torch's path ran (add, div, mul, maxmin, scale_columns x2, fill and the scan's extremes, per
    # round), and the scan of an array with infinities went on to the blocks at two threads
    assert block_calls["_torch"] >= 2 * 8 and "_max_finite_abs_blocks" in block_calls
    finite_only = np.where(np.isfinite(a), a, 0.0)
    assert _elementwise.max_finite_abs(finite_only) == finite.max()


def _sparse_cases(rng):
    """Sparse Jacobians of every destination layout, big enough to split into blocks."""
    n, d = BIG, 97
    perm = rng.permutation(n)
    vals = rng.standard_normal(n)
    vals[::29] = 1e-320                   # subnormal weights: the entropy's libm branch
    return {
        "diagonal": SparseJacobian((n,), (n,), vals=vals),
        "permutation": SparseJacobian((n,), (n,), rows=perm, vals=vals),
        "reduction": SparseJacobian((n // 5 + 1,), (n,), rows=np.arange(n) // 5, vals=vals),
        "broadcast": SparseJacobian((n,), (d,), cols=np.arange(n) % d, vals=vals),
        "slice": SparseJacobian((n,), (2 * n,), cols=np.arange(0, 2 * n, 2)),
        # the permutation of a transpose of attention heads (T, H, D) -> (H, T, D): a strided map
        "transpose": SparseJacobian((n - 7,), (n - 7,), cols=np.arange(n - 7).reshape(24, 16, 32).transpose(1, 0, 2).ravel()),
    }


def _sparse_oracle(jac, x, xmax, xmin, transpose):
    """Sum, entropy and max products from the entries with scipy.sparse and numpy ufunc.at."""
    import scipy.sparse
    r, c, v = jac.entries()
    src, dst = (r, c) if transpose else (c, r)
    m, k = (jac.in_numel, jac.out_numel) if transpose else (jac.out_numel, jac.in_numel)
    a = np.abs(v)
    h = np.where(a > 0, -a * np.log(np.where(a > 0, a, 1.0)), 0.0)

    def mat(weights):
        return scipy.sparse.coo_matrix((weights, (dst, src)), shape=(m, k)).tocsr()
    z, rr = np.abs(x[0]), np.abs(x[1])
    signed = mat(v) @ x[0]
    magnitude = mat(a) @ z
    entropy = np.stack([mat(a) @ z, mat(a) @ rr + mat(h) @ z])
    hi = np.full(m, -np.inf)
    lo = np.full(m, np.inf)
    live = xmax[src] != -np.inf
    u, w_ = v[live] * xmax[src][live], v[live] * xmin[src][live]
    np.maximum.at(hi, dst[live], np.maximum(u, w_))
    np.minimum.at(lo, dst[live], np.minimum(u, w_))
    return signed, magnitude, entropy, hi, lo


@needs_two
@pytest.mark.parametrize("layout", ["diagonal", "permutation", "reduction", "broadcast", "slice", "transpose"])
@pytest.mark.parametrize("transpose", [False, True])
def test_sparse_products_in_blocks_give_one_threads_results(restore_pools, block_calls, layout, transpose):
    from gradgraph.algorithms.products import product
    from gradgraph.algorithms.semirings import MAGNITUDE, REAL
    jac = _sparse_cases(np.random.default_rng(4))[layout]
    rng = np.random.default_rng(5)
    size = jac.out_numel if transpose else jac.in_numel
    x = rng.standard_normal((2, size))
    x[:, rng.random(size) < 0.2] = 0.0        # elements no path reaches
    xmax, xmin = np.maximum(x[0], x[1]), np.minimum(x[0], x[1])
    xmax[x[0] == 0], xmin[x[0] == 0] = -np.inf, np.inf

    def run():
        out = [product(REAL, jac, x[:1], transpose)[0], product(MAGNITUDE, jac, np.abs(x[:1]), transpose)[0],
               product(ENTROPY, jac, np.abs(x), transpose)]
        out.extend(jac.max_product(xmax, xmin, transpose))
        out.append(jac.max_product(np.abs(x[0]), None, transpose)[0])
        return [np.array(o, copy=True) for o in out]
    one, two = _at_threads(1, run), _at_threads(2, run)
    for a, b in zip(one, two):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
    # and right: against scipy.sparse sums and numpy's ufunc.at maxima over the entries
    signed, magnitude, entropy, hi, lo = _sparse_oracle(jac, x, xmax, xmin, transpose)
    np.testing.assert_allclose(two[0], signed, rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(two[1], magnitude, rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(two[2], entropy, rtol=1e-10, atol=1e-300)
    assert np.array_equal(two[3], hi) and np.array_equal(two[4], lo)
    mag_max = np.zeros_like(hi)
    r, c, v = jac.entries()
    src, dst = (r, c) if transpose else (c, r)
    np.maximum.at(mag_max, dst, np.abs(v) * np.abs(x[0])[src])
    assert np.array_equal(two[5], mag_max)
    # the parallel kernels ran unless the destinations are shared between entries
    ran = set(block_calls)
    if layout == "diagonal":
        assert ran >= {"_torch", "diag_entropy_blocks", "diag_max_blocks"}
    elif layout in ("slice", "transpose"):
        # unit weights through a strided index map: every product is a torch copy on its pool
        assert "_copy_on_torch" in ran and not ran & {"coo_sum_blocks", "coo_entropy_blocks", "coo_max_blocks",
                                                       "coo_maxmin_blocks"}
    elif layout == "broadcast" and transpose:
        assert not ran & {"coo_sum_blocks", "coo_entropy_blocks", "coo_max_blocks", "coo_maxmin_blocks"}
    else:
        assert ran >= {"coo_sum_blocks", "coo_entropy_blocks", "coo_max_blocks", "coo_maxmin_blocks"}


class _Elementwise(torch.nn.Module):
    """Big elementwise ops, a broadcast, a permutation and a reduction: a graph whose every
    product is a sparse one, so its passes run only the blocked kernels and torch's copies (no
    BLAS)."""

    def __init__(self, n):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.scale = torch.nn.Parameter(torch.rand(n, dtype=torch.float64, generator=g) + 0.5)
        self.bias = torch.nn.Parameter(torch.randn(n // 64, 1, dtype=torch.float64, generator=g))

    def forward(self, x):
        h = torch.tanh(x * self.scale)                       # (n,)
        h = h.reshape(-1, 64) + self.bias                    # broadcast
        h = torch.sigmoid(h.t().contiguous()) * h.t()        # a permutation, used twice
        return (h * h).sum(0)[:3].sum()


@needs_two
def test_a_pass_over_big_sparse_products_is_the_same_at_two_threads(restore_pools, block_calls):
    from gradgraph.algorithms.semirings import REAL
    n = 64 * (BIG // 64)
    model = _Elementwise(n)
    x = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    g = gg.capture(model, (x.detach(),), output=lambda y: y)
    threads.set_dynamic(False)
    results = {}
    for t in (1, 2):
        gg.set_num_threads(t)
        results[t] = [[None if b is None else (b.arr.copy(), b.log_scale) for b in backward(g, sr)]
                      for sr in (REAL, ENTROPY, MAX_SIGNED)]
    for one, two in zip(results[1], results[2]):
        for a, b in zip(one, two):
            assert (a is None) == (b is None)
            if a is not None:
                assert np.array_equal(a[0], b[0], equal_nan=True) and a[1] == b[1]
    # (the transposes' permutations and the reduction's backward are strided copies on torch's pool)
    assert {"_torch", "_copy_on_torch", "_max_finite_abs_blocks"} <= set(block_calls)
    model(x).backward()
    arr, scale = results[2][0][g.sources["x"]]
    np.testing.assert_allclose(arr[0] * np.exp(scale), x.grad.numpy(), rtol=1e-10, atol=1e-300)


def test_max_passes_keep_their_elementwise_work_off_torchs_pool(block_calls):
    """The max semirings' products are numba kernels: their passes do the (+), the rescaling and
    the index-map copies with numpy (torch's spinning OpenMP workers would share a core with the
    kernels' parallel regions); the sum and entropy passes, whose products are torch's, use
    torch's pool. Both give the same values (checked against autograd for the real pass)."""
    from gradgraph.algorithms.semirings import REAL
    n = 64 * (BIG // 64)
    model = _Elementwise(n)
    x = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    g = gg.capture(model, (x.detach(),), output=lambda y: y)
    for sr, on_torch in ((MAX_SIGNED, False), (ENTROPY, True), (REAL, True)):
        block_calls.clear()
        B = backward(g, sr)
        assert ("_torch" in block_calls) == on_torch, sr
        assert B[g.sources["x"]] is not None
    # outside a pass, and after one, the default again
    assert _elementwise.torch_min() == _elementwise.TORCH_MIN
    with _elementwise.on_torch(False):
        assert _elementwise.torch_min() == np.inf
    model(x).backward()
    arr, scale = B[g.sources["x"]].arr, B[g.sources["x"]].log_scale
    np.testing.assert_allclose(arr[0] * np.exp(scale), x.grad.numpy(), rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize("numpy_blas", [True, False])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_one_thread_contractions_through_either_blas_are_the_dense_product(restore_pools, monkeypatch, numpy_blas,
                                                                           dtype):
    """At one thread the contractions call numpy's BLAS or torch's, chosen by the CPU (see
    ``NUMPY_GEMM_AT_ONE_THREAD``): both give the product of the dense matrices (numpy, float64)."""
    from gradgraph.jacobians import matmul as matmul_module
    gg.set_num_threads(1)
    monkeypatch.setattr(matmul_module, "NUMPY_GEMM_AT_ONE_THREAD", numpy_blas)
    rng = np.random.default_rng(5)
    W = rng.standard_normal((300, 700)).astype(dtype)
    jac = MatmulJacobian((9, 700), (9, 300), W, "left")
    x = rng.standard_normal((2, 9 * 300)).astype(dtype)
    with mock.patch.object(torch, "mm", wraps=torch.mm) as torch_mm:
        out = jac.sum_product(x, 0, False)          # x @ W, the forward direction
        g = rng.standard_normal((2, 9 * 700)).astype(dtype)
        back = jac.sum_product(g, 1, True)          # g @ |W|^T, the magnitudes backward
    assert torch_mm.called == (not numpy_blas)
    W64 = W.astype(np.float64)
    expected = (x.astype(np.float64).reshape(2, 9, 300) @ W64).reshape(2, -1)
    rtol = 1e-10 if dtype == np.float64 else 1e-5
    assert out.shape == expected.shape and np.allclose(out, expected, rtol=rtol, atol=rtol * np.abs(expected).max())
    expected = (g.astype(np.float64).reshape(2, 9, 700) @ np.abs(W64).T).reshape(2, -1)
    assert back.shape == expected.shape and np.allclose(back, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@needs_two
def test_small_kernel_calls_run_on_one_thread_and_kernels_have_a_serial_twin(restore_pools):
    """``parallel(work=...)`` gives one thread below PARALLEL_MIN_WORK (a parallel region costs more
    than such a call's work), the query's threads above; a kernel takes its serial twin at one
    numba thread and its parallel compilation above, with the same results."""
    gg.set_num_threads(2)
    with threads.parallel(work=threads.PARALLEL_MIN_WORK - 1) as n:
        assert n == 1 and numba.get_num_threads() == 1
    with threads.parallel(work=threads.PARALLEL_MIN_WORK) as n:
        assert n == 2 and numba.get_num_threads() == 2
    with threads.parallel() as n:
        assert n == 2
        with threads.parallel(work=1) as inner:      # nested: its own count, the outer's after
            assert inner == 1 and numba.get_num_threads() == 1
        assert numba.get_num_threads() == 2
    from gradgraph.jacobians.matmul import mm_maxmin_dense
    rng = np.random.default_rng(3)
    A = rng.standard_normal((1, 5, 7))
    P = rng.standard_normal((1, 7, 300))
    outs = {}
    for nt in (1, 2):
        numba.set_num_threads(nt)
        Y, Z = np.full((1, 5, 300), -np.inf), np.full((1, 5, 300), np.inf)
        mm_maxmin_dense(A, A - 1, P, Y, Z, 2)
        outs[nt] = (Y, Z)
    assert mm_maxmin_dense.serial.signatures and mm_maxmin_dense.parallel.signatures
    assert all(np.array_equal(a, b) for a, b in zip(outs[1], outs[2]))
    prods = A[0][:, :, None] * P[0][None]                       # (5, 7, 300)
    prods_min = (A[0] - 1)[:, :, None] * P[0][None]
    both = np.concatenate([prods, prods_min], axis=1)
    assert np.array_equal(outs[1][0][0], both.max(axis=1)) and np.array_equal(outs[1][1][0], both.min(axis=1))


LAYER_PROBE = """
import ctypes, json, os, sys
import numpy as np, torch, numba
import gradgraph as gg
from gradgraph import threads
from gradgraph.jacobians.matmul import mm_maxmin_dot
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2)).double()
x = torch.randn(32, 48, dtype=torch.float64)
g = gg.capture(model, (x,), output=lambda y: y[0, 0] - y[5, 1])
threads.set_dynamic(False)
gg.set_num_threads(2)
a = np.ones((1, 4, 16))
y, z = np.full((1, 4, 8), -np.inf), np.full((1, 4, 8), np.inf)
mm_maxmin_dot.parallel(a, -a, np.full((1, 8, 16), 2.0), y, z, 1)     # starts numba's pool
assert (y == 2).all() and (z == -2).all()
oracle = torch.func.jacrev(lambda v: (lambda o: o[0, 0] - o[5, 1])(model(v)))(x)

class DlInfo(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p), ("sname", ctypes.c_char_p),
                ("saddr", ctypes.c_void_p)]


# the library whose GOMP_parallel the process's global scope gives (numba's omp extension binds
# its OpenMP calls there), found by dladdr
process = ctypes.CDLL(None)
info = DlInfo()
region = None
if hasattr(process, "GOMP_parallel") and process.dladdr(ctypes.cast(process.GOMP_parallel, ctypes.c_void_p),
                                                        ctypes.byref(info)):
    region = os.path.realpath(info.fname.decode())
out = {"layer": threads.LAYER, "numba": numba.threading_layer(), "min_work": threads.PARALLEL_MIN_WORK,
       "region": region, "torch_dir": os.path.realpath(os.path.dirname(torch.__file__))}
if sys.argv[1] == "fork":
    torch.ones(512, 512) @ torch.ones(512, 512)                      # torch's pool has run
    g.gradient()                   # numba's pool ran above (mm_maxmin_dot.parallel, two threads)
    pid = os.fork()
    if pid == 0:                    # the documented recipe: a forked child stays at one thread
        gg.set_num_threads(1)
        grad = next(iter(g.gradient().values()))
        os._exit(0 if torch.allclose(grad, oracle, rtol=1e-10, atol=0) else 3)
    out["child"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(out))
"""


def _layer_probe(mode="plain", **env):
    run = subprocess.run([sys.executable, "-c", LAYER_PROBE, mode], capture_output=True, text=True, timeout=300,
                         env={**{k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}, **env})
    assert run.returncode == 0, run.stderr[-2000:]
    import json
    return json.loads(run.stdout.strip().splitlines()[-1])


def _numba_omp_extension_loads():
    try:
        from numba.np.ufunc import omppool
    except ImportError:
        return False
    return omppool.openmp_vendor == "GNU"


def test_kernels_run_on_torchs_own_openmp_runtime_where_it_is_gnus():
    """numba's omp layer when torch brought GNU OpenMP and numba's GNU OpenMP extension loads:
    then the kernels' regions are started through torch's own copy of the runtime (one pool of
    workers for torch's operations and the kernels); workqueue otherwise."""
    out = _layer_probe()
    torch_gomp = sys.platform.startswith("linux") and any("libgomp" in line for line in open("/proc/self/maps"))
    if torch_gomp and _numba_omp_extension_loads():
        assert out["layer"] == out["numba"] == "omp"
        assert out["min_work"] == 1 << 15
        assert out["region"] is not None and out["region"].startswith(out["torch_dir"] + os.sep), out
    else:
        assert out["layer"] == out["numba"] == "workqueue"
        assert out["min_work"] == 1 << 18


def test_the_threading_layer_asked_for_in_the_environment_is_kept():
    out = _layer_probe(NUMBA_THREADING_LAYER="workqueue")
    assert out["layer"] == out["numba"] == "workqueue"
    assert out["min_work"] == 1 << 18


@needs_two
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_child_forked_after_both_pools_ran_queries_at_one_thread():
    """The recipe the thread policy documents for forked workers; the child's gradient is
    checked against torch.func.jacrev at rtol 1e-10."""
    assert _layer_probe("fork")["child"] == 0
