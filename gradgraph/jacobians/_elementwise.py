"""Elementwise work of a query on every thread of the query's pool: the engine's per-node work
(the (+) of a node's contributions, the per-tensor rescaling and its scan) and the elementwise
products of the sparse kind.

numpy's ufuncs run on one core, so at two threads these parts of a pass left the second core
idle. Each operation here is a serial numba loop over a range of elements (``_*_range``) and a
``prange`` over blocks of that range; a block writes only its own elements and every element is
computed by the same arithmetic whatever the split, so the results are bit for bit those of one
thread (and of the numpy expressions they replace: one IEEE operation per element, no fast-math
reassociation in the arithmetic). The scan's maximum is exact in any order.

Each range kernel slices its arrays and loops from 0 (an index numba can prove non-negative, so
no wraparound check keeps the loop from vectorising). Arrays below two blocks of :data:`GRAIN`
elements, or a query on one thread, take the serial path directly -- numpy's own loop where it is
the faster one on a single core, else the range kernel over everything: a parallel launch costs
tens of microseconds. Non-contiguous arrays take numpy.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..threads import get_num_threads, parallel
from ._intrinsics import _FM, fmax, fmin

__all__ = ["GRAIN", "blocks", "run_blocks", "add", "div_scalar", "mul_scalar", "max_finite_abs", "maxmin_plus",
           "scale_columns", "fill"]

#: Fewest elements per block of a parallel elementwise loop (2 MB of float64): a parallel launch
#: of the workqueue layer costs 60-100 us of wall time on this machine under load, about what a
#: serial (+) of this many elements takes.
GRAIN = 1 << 18


def blocks(n, threads=None):
    """How many blocks a loop over ``n`` elements is split into: one per thread, but none smaller
    than :data:`GRAIN` (1 means: run serially)."""
    threads = get_num_threads() if threads is None else threads
    return max(1, min(threads, n // GRAIN))


def _bounds(n, nb):
    """Block b covers [b n / nb, (b + 1) n / nb)."""
    return (np.arange(nb + 1, dtype=np.int64) * n) // nb


def _flat(*arrays):
    """1-d views of C-contiguous arrays of one shape, or None (then numpy does the work)."""
    shape = arrays[0].shape
    if all(a.shape == shape and a.flags.c_contiguous for a in arrays):
        return [a.reshape(-1) for a in arrays]
    return None


def run_blocks(serial, parallel_kernel, n, *args):
    """``serial(*args, 0, n)`` on one block, else ``parallel_kernel(*args, bounds)`` under the
    thread policy's kernel lock. ``serial`` is a range kernel, or numpy's expression of the
    operation where numpy's own loop is the faster one on a single core."""
    nb = blocks(n)
    if nb == 1:
        return serial(*args, 0, n)
    with parallel() as threads:
        nb = blocks(n, threads)
        if nb == 1:
            return serial(*args, 0, n)
        return parallel_kernel(*args, _bounds(n, nb))


# ----------------------------------------------------------------------------- out = a + b
@njit(cache=True, error_model="numpy")
def _add_range(a, b, out, lo, hi):
    a, b, out = a[lo:hi], b[lo:hi], out[lo:hi]
    for k in range(out.shape[0]):
        out[k] = a[k] + b[k]


def _add_numpy(a, b, out, lo, hi):
    np.add(a, b, out=out)


@njit(cache=True, parallel=True)
def _add_blocks(a, b, out, bounds):
    for blk in prange(bounds.shape[0] - 1):
        _add_range(a, b, out, bounds[blk], bounds[blk + 1])


def add(a, b, out=None):
    """``a + b`` into ``out`` (a new array by default; ``out`` may be ``a``), as numpy computes
    it."""
    a, b = np.asarray(a), np.asarray(b)
    if out is None:
        out = np.empty(np.broadcast_shapes(a.shape, b.shape), np.result_type(a, b))
    flat = _flat(a, b, out) if a.dtype == b.dtype == out.dtype else None
    if flat is None:
        return np.add(a, b, out=out)
    run_blocks(_add_numpy, _add_blocks, flat[0].shape[0], *flat)
    return out


# ----------------------------------------------------------------------------- out = a / s, a * s
def _div_numpy(a, s, out, lo, hi):
    np.divide(a, s, out=out)


def _mul_numpy(a, s, out, lo, hi):
    np.multiply(a, s, out=out)


@njit(cache=True, error_model="numpy")
def _div_range(a, s, out, lo, hi):
    a, out = a[lo:hi], out[lo:hi]
    for k in range(out.shape[0]):
        out[k] = a[k] / s


@njit(cache=True, parallel=True)
def _div_blocks(a, s, out, bounds):
    for blk in prange(bounds.shape[0] - 1):
        _div_range(a, s, out, bounds[blk], bounds[blk + 1])


@njit(cache=True, error_model="numpy")
def _mul_range(a, s, out, lo, hi):
    a, out = a[lo:hi], out[lo:hi]
    for k in range(out.shape[0]):
        out[k] = a[k] * s


@njit(cache=True, parallel=True)
def _mul_blocks(a, s, out, bounds):
    for blk in prange(bounds.shape[0] - 1):
        _mul_range(a, s, out, bounds[blk], bounds[blk + 1])


def _scalar_op(a, s, serial, par, fallback):
    flat = _flat(a) if a.dtype in (np.float32, np.float64) else None
    if flat is None:
        return fallback(a, s)
    # a Python float meets a float32 array in the array's precision (numpy's rule): s is rounded
    # to it first, and the operation runs in it
    out = np.empty(a.shape, a.dtype)
    run_blocks(serial, par, a.size, flat[0], a.dtype.type(s), out.reshape(-1))
    return out


def div_scalar(a, s):
    """``a / s`` for a Python float ``s``: a new array of a's dtype, as numpy computes it."""
    return _scalar_op(a, s, _div_numpy, _div_blocks, lambda a, s: a / s)


def mul_scalar(a, s):
    """``a * s`` for a Python float ``s``: a new array of a's dtype, as numpy computes it."""
    return _scalar_op(a, s, _mul_numpy, _mul_blocks, lambda a, s: a * s)


# ----------------------------------------------------------------------------- the rescaling scan
@njit(cache=True, fastmath=_FM)
def _max_finite_abs_range(a, lo, hi):
    a = a[lo:hi]
    m = 0.0
    for k in range(a.shape[0]):
        v = abs(a[k])
        m = fmax(m, v if v < np.inf else 0.0)
    return m


@njit(cache=True, parallel=True)
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
    value arrays next to a vocabulary-sized sink hold millions of entries)."""
    if a.size == 0:
        return 0.0
    if not a.flags.c_contiguous:                # a strided view: serially, without a copy
        return float(_max_finite_abs_2d(a.reshape(a.shape[0], -1)))
    flat = a.reshape(-1)
    return float(run_blocks(_max_finite_abs_range, _max_finite_abs_blocks, flat.shape[0], flat))


# ----------------------------------------------------------------------------- max-signed (+)
@njit(cache=True, fastmath=_FM)
def _maxmin_range(a0, a1, b0, b1, o0, o1, lo, hi):
    a0, a1, b0, b1, o0, o1 = a0[lo:hi], a1[lo:hi], b0[lo:hi], b1[lo:hi], o0[lo:hi], o1[lo:hi]
    for k in range(o0.shape[0]):
        o0[k] = fmax(a0[k], b0[k])
    for k in range(o1.shape[0]):
        o1[k] = fmin(a1[k], b1[k])


@njit(cache=True, parallel=True)
def _maxmin_blocks(a0, a1, b0, b1, o0, o1, bounds):
    for blk in prange(bounds.shape[0] - 1):
        _maxmin_range(a0, a1, b0, b1, o0, o1, bounds[blk], bounds[blk + 1])


def maxmin_plus(a, b, out):
    """(+) of the max-signed semiring on (2, n) pairs: out = (max(a0, b0), min(a1, b1))."""
    run_blocks(_maxmin_range, _maxmin_blocks, a.shape[1], a[0], a[1], b[0], b[1], out[0], out[1])
    return out


# ----------------------------------------------------------------------------- y = f(w) * x
@njit(cache=True, error_model="numpy")
def _scale_columns_range(w, absolute, x, y, lo, hi):
    w = w[lo:hi]
    for c in range(x.shape[0]):
        xc, yc = x[c, lo:hi], y[c, lo:hi]
        if absolute:
            for k in range(w.shape[0]):
                yc[k] = abs(w[k]) * xc[k]
        else:
            for k in range(w.shape[0]):
                yc[k] = w[k] * xc[k]


def _scale_columns_numpy(w, absolute, x, y, lo, hi):
    np.multiply(np.abs(w) if absolute else w, x, out=y)


@njit(cache=True, parallel=True)
def _scale_columns_blocks(w, absolute, x, y, bounds):
    for blk in prange(bounds.shape[0] - 1):
        _scale_columns_range(w, absolute, x, y, bounds[blk], bounds[blk + 1])


def scale_columns(w, x, absolute=False, dtype=np.float64):
    """``w * x`` (``|w| * x`` if ``absolute``) for weights ``w`` (n,) and values ``x`` (C, n): a
    new (C, n) array of ``dtype``, each product computed as numpy's ``w.astype(dtype) * x``
    (float32 for a float32 model's values through float32 weights)."""
    y = np.empty(x.shape, dtype)
    run_blocks(_scale_columns_numpy, _scale_columns_blocks, x.shape[1], w, bool(absolute), x, y)
    return y


# ----------------------------------------------------------------------------- a[:] = v
@njit(cache=True)
def _fill_range(a, v, lo, hi):
    a = a[lo:hi]
    for k in range(a.shape[0]):
        a[k] = v


@njit(cache=True, parallel=True)
def _fill_blocks(a, v, bounds):
    for blk in prange(bounds.shape[0] - 1):
        _fill_range(a, v, bounds[blk], bounds[blk + 1])


def _fill_numpy(a, v, lo, hi):
    a.fill(v)


def fill(a, value):
    """``a[...] = value`` in place (the "no path" values of a vocabulary-sized max product's
    output: 2 x 12.9 M entries at GPT-2 / 256 tokens, whose first writes also fault the pages in)."""
    if not a.flags.c_contiguous:
        a[...] = value
        return a
    run_blocks(_fill_numpy, _fill_blocks, a.size, a.reshape(-1), a.dtype.type(value))
    return a
