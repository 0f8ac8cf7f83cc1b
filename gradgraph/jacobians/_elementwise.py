"""Elementwise work of a query on every thread of the query's pool: the engine's per-node work
(the (+) of a node's contributions, the per-tensor rescaling and its scan), the elementwise
products of the sparse kind and the "no path" fill of a max product's output.

numpy's ufuncs run on one core. Large arrays here go through torch's elementwise ops on zero-copy
``torch.from_numpy`` views instead: they run on torch's pool -- the one the contractions use, so
its threads are already awake and no second pool fights them for the cores -- with as many
threads as the query has (the thread policy sets torch's count per query), and each element is
one IEEE operation, so the results are bit for bit numpy's at any number of threads. A numba
``prange`` over blocks was tried first and lost: its serial loops are not vectorised (a float32
``a += b`` over 786,432 elements: 498 us, numpy 158 us, torch at two threads 106 us; numba's
two-block ``prange`` 412 us) -- docs/benchmarks.md, "Thread pools".

Arrays below :data:`TORCH_MIN` elements, non-contiguous or read-only ones (torch does not view
those) take numpy. :func:`blocks` and :func:`run_blocks` split the sparse kind's own numba kernels
(:mod:`.sparse`).
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch
from numba import njit, prange

from ..threads import PARALLEL_MIN_WORK, get_num_threads, kernel, parallel
from ._intrinsics import _FM, fmax

__all__ = ["GRAIN", "TORCH_MIN", "torch_min", "on_torch", "blocks", "run_blocks", "add", "div_scalar", "mul_scalar", "max_finite_abs",
           "maxmin_plus", "scale_columns", "fill"]

#: Fewest elements per block of a parallel numba loop: fewer take less time than starting the
#: parallel region (see ``threads.PARALLEL_MIN_WORK``).
GRAIN = PARALLEL_MIN_WORK

#: Fewest elements for which an operation goes through torch (its dispatch costs a few
#: microseconds, what numpy's loop takes over about this many elements).
TORCH_MIN = 1 << 16

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_local = threading.local()


def torch_min():
    """The fewest elements for which an operation goes through torch in this thread now:
    :data:`TORCH_MIN`, or never inside :func:`on_torch(False) <on_torch>`."""
    return TORCH_MIN if getattr(_local, "torch", True) else np.inf


@contextlib.contextmanager
def on_torch(allowed):
    """Within: large elementwise work goes through torch (``allowed``) or always through numpy
    and numba (a pass whose products are numba kernels: see ``Semiring.torch_elementwise``)."""
    previous = getattr(_local, "torch", True)
    _local.torch = bool(allowed)
    try:
        yield
    finally:
        _local.torch = previous


def blocks(n, threads=None):
    """How many blocks a loop over ``n`` elements is split into: one per thread, but none smaller
    than :data:`GRAIN` (1 means: run serially)."""
    threads = get_num_threads() if threads is None else threads
    return max(1, min(threads, n // GRAIN))


def _bounds(n, nb):
    """Block b covers [b n / nb, (b + 1) n / nb)."""
    return (np.arange(nb + 1, dtype=np.int64) * n) // nb


def run_blocks(serial, parallel_kernel, n, *args):
    """``serial(*args, 0, n)`` on one block, else ``parallel_kernel(*args, bounds)`` under the
    thread policy's kernel lock."""
    nb = blocks(n)
    if nb == 1:
        return serial(*args, 0, n)
    with parallel() as threads:
        nb = blocks(n, threads)
        if nb == 1:
            return serial(*args, 0, n)
        return parallel_kernel(*args, _bounds(n, nb))


def _torch(*arrays):
    """torch views of numpy arrays of one shape when the operation should run on torch's pool:
    at least :data:`TORCH_MIN` elements, C-contiguous and writeable (torch views nothing else
    without a copy); else None (then numpy does the work)."""
    shape = arrays[0].shape
    if arrays[0].size < torch_min():
        return None
    for a in arrays:
        if a.shape != shape or a.dtype not in _FLOATS or not (a.flags.c_contiguous and a.flags.writeable):
            return None
    return [torch.from_numpy(a) for a in arrays]


# ----------------------------------------------------------------------------- out = a + b
def add(a, b, out=None):
    """``a + b`` into ``out`` (a new array by default; ``out`` may be ``a``), as numpy computes
    it."""
    a, b = np.asarray(a), np.asarray(b)
    if out is None:
        out = np.empty(np.broadcast_shapes(a.shape, b.shape), np.result_type(a, b))
    views = _torch(a, b, out) if a.dtype == b.dtype == out.dtype else None
    if views is None:
        return np.add(a, b, out=out)
    torch.add(views[0], views[1], out=views[2])
    return out


# ----------------------------------------------------------------------------- out = a / s, a * s
def _scalar_op(a, s, torch_op, numpy_op):
    if a.dtype not in (np.float32, np.float64):
        return numpy_op(a, s)
    # a Python float meets a float32 array in the array's precision (numpy's rule): s is rounded
    # to it first, and the operation runs in it
    s = a.dtype.type(s)
    out = np.empty(a.shape, a.dtype)
    views = _torch(a, out)
    if views is None:
        return numpy_op(a, s, out=out)
    torch_op(views[0], torch.tensor(s), out=views[1])
    return out


def div_scalar(a, s):
    """``a / s`` for a Python float ``s``: a new array of a's dtype, as numpy computes it."""
    return _scalar_op(a, s, torch.div, np.divide)


def mul_scalar(a, s):
    """``a * s`` for a Python float ``s``: a new array of a's dtype, as numpy computes it."""
    return _scalar_op(a, s, torch.mul, np.multiply)


# ----------------------------------------------------------------------------- the rescaling scan
@njit(cache=True, fastmath=_FM)
def _max_finite_abs_range(a, lo, hi):
    a = a[lo:hi]
    m = 0.0
    for k in range(a.shape[0]):
        v = abs(a[k])
        m = fmax(m, v if v < np.inf else 0.0)
    return m


@kernel(cache=True)
def _max_finite_abs_blocks(a, bounds):
    nb = bounds.shape[0] - 1
    part = np.zeros(nb)
    for blk in prange(nb):
        part[blk] = _max_finite_abs_range(a, bounds[blk], bounds[blk + 1])
    return part.max()


@njit(cache=True, fastmath=_FM)
def _max_finite_abs_2d(a):
    m = 0.0
    for c in range(a.shape[0]):
        m = fmax(m, _max_finite_abs_range(a[c], 0, a.shape[1]))
    return m


def max_finite_abs(a):
    """The largest finite |a| over an array (0 if there is none): one pass, no temporaries (the
    value arrays next to a vocabulary-sized sink hold millions of entries). Where the array's
    extremes are finite they give it (torch's reduction, on the query's threads); an array with
    infinities (a max pass's "no path" entries) takes the scan that skips them."""
    if a.size == 0:
        return 0.0
    if not a.flags.c_contiguous:                # a strided view: serially, without a copy
        return float(_max_finite_abs_2d(a.reshape(a.shape[0], -1)))
    views = _torch(a)
    if views is not None:
        lo, hi = (float(v) for v in torch.aminmax(views[0]))
        if -np.inf < lo and hi < np.inf:
            return max(-lo, hi, 0.0)
    flat = a.reshape(-1)
    return float(run_blocks(_max_finite_abs_range, _max_finite_abs_blocks, flat.shape[0], flat))


# ----------------------------------------------------------------------------- max-signed (+)
def maxmin_plus(a, b, out):
    """(+) of the max-signed semiring on (2, n) pairs (never NaN): out = (max(a0, b0), min(a1, b1))."""
    views = _torch(a, b, out)
    if views is None:
        np.maximum(a[0], b[0], out=out[0])
        np.minimum(a[1], b[1], out=out[1])
        return out
    ta, tb, to = views
    torch.maximum(ta[0], tb[0], out=to[0])
    torch.minimum(ta[1], tb[1], out=to[1])
    return out


# ----------------------------------------------------------------------------- y = f(w) * x
def scale_columns(w, x, absolute=False, dtype=np.float64):
    """``w * x`` (``|w| * x`` if ``absolute``) for weights ``w`` (n,) and values ``x`` (C, n): a
    new (C, n) array of ``dtype``, each product computed as numpy's ``w.astype(dtype) * x``
    (float32 for a float32 model's values through float32 weights)."""
    y = np.empty(x.shape, dtype)
    f = np.abs(w) if absolute else w
    f = np.require(f.astype(dtype, copy=False), requirements=["C", "W"])
    views = _torch(x, y) if np.result_type(f, x) == y.dtype else None
    if views is None:
        return np.multiply(f, x, out=y)
    torch.mul(torch.from_numpy(f), views[0], out=views[1])
    return y


# ----------------------------------------------------------------------------- a[:] = v
def fill(a, value):
    """``a[...] = value`` in place (the "no path" values of a vocabulary-sized max product's
    output: 2 x 12.9 M entries at GPT-2 / 256 tokens, whose first writes also fault the pages in)."""
    views = _torch(a)
    if views is None:
        a[...] = value
    else:
        views[0].fill_(value)
    return a
