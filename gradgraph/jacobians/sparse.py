"""Sparse (COO) Jacobians: elementwise, broadcast, index maps, reductions, dense fallback,
with their numba kernels."""
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from ..threads import kernel, parallel
from . import _elementwise
from ._elementwise import blocks, run_blocks, scale_columns
from ._intrinsics import _FM, _TINY, WeightMap, flog, fmax, fmin, tw, weight_map
from .base import Jacobian, _empty_max, max_dtype

# ----------------------------------------------------------------------------- sparse (COO)
@njit(cache=True)
def coo_sum(x, src, dst, w, t, y, lo, hi):
    """y[c, dst[e]] += f(w[e]) * x[c, src[e]] for the entries lo <= e < hi. Entries whose source
    values are all zero are skipped before f is evaluated (near a one-logit sink most of a
    vocabulary-sized tensor is). ``src`` / ``dst`` None stand for arange(n), ``w`` None for ones
    (numba compiles the None case without the array)."""
    C = x.shape[0]
    for e in range(lo, hi):
        s = e if src is None else src[e]
        live = False
        for c in range(C):
            if x[c, s] != 0.0:
                live = True
                break
        if not live:
            continue
        f = tw(1.0 if w is None else w[e], t)
        if f == 0.0:
            continue
        d = e if dst is None else dst[e]
        for c in range(C):
            y[c, d] += f * x[c, s]


@njit(cache=True)
def coo_sum_channels(x, src, dst, w, t, y, n):
    """:func:`coo_sum` for values with several channels (the LENGTH semiring's polynomials),
    channel by channel: each sweep reads one row of ``x`` and writes one row of ``y``, where the
    channel-inner loop of :func:`coo_sum` strides across all C rows at every entry (None arrays
    as in :func:`coo_sum`)."""
    C = x.shape[0]
    live = np.zeros(x.shape[1], np.bool_)
    for c in range(C):
        xc = x[c]
        for j in range(xc.shape[0]):
            live[j] |= xc[j] != 0.0
    f = np.zeros(n)
    for e in range(n):
        if live[e if src is None else src[e]]:
            f[e] = tw(1.0 if w is None else w[e], t)
    for c in range(C):
        xc = x[c]
        yc = y[c]
        for e in range(n):
            fe = f[e]
            if fe != 0.0:
                yc[e if dst is None else dst[e]] += fe * xc[e if src is None else src[e]]


@njit(cache=True)
def coo_entropy(x, src, dst, w, y, lo, hi):
    """The entropy product on pairs x = (Z, R): y[0, d] += |w| Z[s], y[1, d] += |w| R[s] - |w|log|w| Z[s]
    for the entries (s -> d, w) lo <= e < hi, one logarithm per live entry (None arrays as in
    :func:`coo_sum`)."""
    for e in range(lo, hi):
        s = e if src is None else src[e]
        z = x[0, s]
        r = x[1, s]
        a = 1.0 if w is None else abs(w[e])
        if (z == 0.0 and r == 0.0) or a == 0.0:
            continue
        d = e if dst is None else dst[e]
        y[0, d] += a * z
        y[1, d] += a * r
        if z != 0.0 and a != 1.0:
            y[1, d] -= a * np.log(a) * z


@njit(cache=True)
def coo_max(x, src, dst, w, y, lo, hi):
    """y[dst[e]] = max(y[dst[e]], |w[e]| * x[src[e]]) for lo <= e < hi (0 = no path; None arrays as
    in :func:`coo_sum`)."""
    for e in range(lo, hi):
        s = e if src is None else src[e]
        d = e if dst is None else dst[e]
        v = (1.0 if w is None else abs(w[e])) * x[s]
        if v > y[d]:
            y[d] = v


@njit(cache=True)
def coo_maxmin(xmax, xmin, src, dst, w, ymax, ymin, lo, hi):
    """Signed (max, x) and (min, x) at once for lo <= e < hi; a negative weight swaps max and min
    (None arrays as in :func:`coo_sum`)."""
    for e in range(lo, hi):
        we = 1.0 if w is None else w[e]
        s = e if src is None else src[e]
        d = e if dst is None else dst[e]
        if xmax[s] == -np.inf:
            continue
        if we > 0:
            a = we * xmax[s]
            b = we * xmin[s]
        elif we < 0:
            a = we * xmin[s]
            b = we * xmax[s]
        else:
            continue
        if a > ymax[d]:
            ymax[d] = a
        if b < ymin[d]:
            ymin[d] = b


# The same kernels over blocks of entries in parallel. The caller splits the entries so that no
# destination receives entries from two blocks (see SparseJacobian._scatter): each destination's
# contributions then arrive in the serial order, and the results are bit for bit one thread's.
@kernel(cache=True)
def coo_sum_blocks(x, src, dst, w, t, y, bounds):
    for blk in prange(bounds.shape[0] - 1):
        coo_sum(x, src, dst, w, t, y, bounds[blk], bounds[blk + 1])


@kernel(cache=True)
def coo_entropy_blocks(x, src, dst, w, y, bounds):
    for blk in prange(bounds.shape[0] - 1):
        coo_entropy(x, src, dst, w, y, bounds[blk], bounds[blk + 1])


@kernel(cache=True)
def coo_max_blocks(x, src, dst, w, y, bounds):
    for blk in prange(bounds.shape[0] - 1):
        coo_max(x, src, dst, w, y, bounds[blk], bounds[blk + 1])


@kernel(cache=True)
def coo_maxmin_blocks(xmax, xmin, src, dst, w, ymax, ymin, bounds):
    for blk in prange(bounds.shape[0] - 1):
        coo_maxmin(xmax, xmin, src, dst, w, ymax, ymin, bounds[blk], bounds[blk + 1])




@njit(cache=True, fastmath=_FM)
def diag_max(xmax, xmin, w, signed, out, lo_k, hi_k):
    """(max, x) through a diagonal Jacobian (one edge j -> j of non-zero weight w[j] per element),
    branch-free, for the elements lo_k <= k < hi_k: signed, out = (max, min) of (w xmax, w xmin),
    -inf / +inf where no path arrives (xmax = -inf); unsigned, out[0] = |w| xmax (0 stays 0)."""
    # sliced, so that the loops run from 0 (no wraparound check: they vectorise)
    w, xmax, xmin = w[lo_k:hi_k], xmax[lo_k:hi_k], xmin[lo_k:hi_k]
    if signed:
        hi, lo = out[0, lo_k:hi_k], out[1, lo_k:hi_k]
        for k in range(w.shape[0]):
            u = w[k] * xmax[k]
            v = w[k] * xmin[k]
            dead = xmax[k] == -np.inf
            hi[k] = -np.inf if dead else fmax(u, v)
            lo[k] = np.inf if dead else fmin(u, v)
    else:
        y = out[0, lo_k:hi_k]
        for k in range(w.shape[0]):
            y[k] = abs(w[k]) * xmax[k]


@kernel(cache=True)
def diag_max_blocks(xmax, xmin, w, signed, out, bounds):
    for blk in prange(bounds.shape[0] - 1):
        diag_max(xmax, xmin, w, signed, out, bounds[blk], bounds[blk + 1])


@njit(cache=True, fastmath=_FM, error_model="numpy")
def diag_entropy(x, w, y, lo, hi):
    """The entropy product through a diagonal Jacobian (weight w[j] on j -> j), vectorised, for
    the elements lo <= k < hi: y = (|w| Z, |w| R - |w| log|w| Z) for x = (Z, R) (float64, or float32
    through float32 weights: see SparseJacobian._values_dtype). The
    weights stay in their own dtype: a float32 model's derivatives take a float32 logarithm
    (relative error 2e-7, the precision the model computed them in) and are read at half the
    memory traffic."""
    # sliced, so that the loops run from 0 (no wraparound check: they vectorise)
    w, z, r, y0, y1 = w[lo:hi], x[0, lo:hi], x[1, lo:hi], y[0, lo:hi], y[1, lo:hi]
    tiny = np.finfo(w.dtype).tiny
    m = np.finfo(w.dtype).max
    for k in range(w.shape[0]):
        a = abs(w[k])
        m = min(m, a)
        y0[k] = a * z[k]
        y1[k] = a * r[k] - a * flog(a) * z[k]
    if m < tiny:                       # zero or subnormal weights: libm's log, 0 log 0 = 0
        for k in range(w.shape[0]):
            a = np.float64(abs(w[k]))     # float64: a float32 -a log a of a subnormal is subnormal
            if a < tiny:
                y1[k] = a * r[k] - (a * np.log(a) * z[k] if a > 0 else 0.0)


@kernel(cache=True)
def diag_entropy_blocks(x, w, y, bounds):
    for blk in prange(bounds.shape[0] - 1):
        diag_entropy(x, w, y, bounds[blk], bounds[blk + 1])




# ============================================================================ sparse
class SparseJacobian(Jacobian):
    """Entries ``J[rows[e], cols[e]] = vals[e]``; ``rows``/``cols`` None mean ``arange(nnz)``,
    ``vals`` None means all ones. Elementwise ops are ``rows=None`` with a broadcast ``cols``;
    reductions are ``cols=None`` with ``rows`` mapping each input to its output.

    Index arrays that are ``arange(nnz)`` and weights that are all one are not kept (they are
    stored as None): the index maps of reshapes, contiguous slices and elementwise ops, and the
    weights of additions and copies, cost no memory. Weights that are all equal are kept as one
    number (a read-only broadcast view). ``n`` gives the entry count when no array
    does (default: the tensors' common size)."""

    kind = "sparse"

    def __init__(self, out_shape, in_shape, rows=None, cols=None, vals=None, n=None):
        super().__init__(out_shape, in_shape)
        for a in (rows, cols, vals):
            if a is not None:
                n = len(a)
                break
        if n is None:
            if self.out_numel != self.in_numel:
                raise ValueError("identity SparseJacobian needs equal sizes")
            n = self.out_numel
        idx_t = np.int32 if max(self.out_numel, self.in_numel) < 2**31 - 1 else np.int64
        rows = None if rows is None else np.ascontiguousarray(rows, dtype=idx_t)
        cols = None if cols is None else np.ascontiguousarray(cols, dtype=idx_t)
        if vals is not None:
            vals = np.ascontiguousarray(vals)
            keep = vals != 0
            if not keep.all():
                rows = (np.arange(n, dtype=idx_t) if rows is None else rows)[keep]
                cols = (np.arange(n, dtype=idx_t) if cols is None else cols)[keep]
                vals = vals[keep]
                n = len(vals)
            if n and bool(np.all(vals == 1)):
                vals = None
            elif n > 1 and vals.strides[0] != 0 and bool(np.all(vals == vals[0])):
                # one derivative for every entry (a product with a constant): kept once
                vals = np.broadcast_to(vals[:1].copy(), (n,))
        rows, cols = (None if _is_arange(a) else a for a in (rows, cols))
        if max(n, 0) > min(self.out_numel if rows is None else n, self.in_numel if cols is None else n):
            raise ValueError(f"{n} entries with implicit indices run past the tensors' sizes")
        self.rows, self.cols, self.vals, self.n = rows, cols, vals, n
        #: one edge j -> j per element (an elementwise op): max products need no scatter
        self.is_diagonal = bool(n == self.out_numel == self.in_numel and rows is None and cols is None)
        self.is_identity = self.is_diagonal and vals is None
        self._csc = None
        self._layout = {}          # transpose -> how the destinations lie (see _destinations)
        self._finite = None        # whether every weight is finite (found once)
        self._narrow = None        # whether float32 values may be multiplied in float32 (found once)
        self._single = None        # whether every input element has at most one entry (found once)
        self._forms = {}           # transpose -> the strided forms of a copy (see _copy_forms)

    def _r(self):
        return np.arange(self.n, dtype=np.int64) if self.rows is None else self.rows

    def _c(self):
        return np.arange(self.n, dtype=np.int64) if self.cols is None else self.cols

    def _v(self):
        return np.ones(self.n) if self.vals is None else self.vals

    def _src_dst(self, transpose):
        return (self.rows, self.cols) if transpose else (self.cols, self.rows)

    def nnz(self):
        return self.n

    def _destinations(self, transpose):
        """How the entries' destinations are laid out in this direction: "distinct" (no
        destination receives two entries: elementwise ops, permutations, slices), "sorted"
        (non-decreasing: reductions) or "mixed" (e.g. a broadcast's sum). Found once per
        direction."""
        if transpose not in self._layout:
            dst = self._src_dst(transpose)[1]
            if dst is None or len(dst) < 2:
                layout = "distinct"
            else:
                step = dst[1:].astype(np.int64) - dst[:-1]
                if step.min() > 0:
                    layout = "distinct"
                elif step.min() == 0:
                    layout = "sorted"
                else:
                    once = np.bincount(dst, minlength=self._dims(transpose)[1]).max() <= 1
                    layout = "distinct" if once else "mixed"
            self._layout[transpose] = layout
        return self._layout[transpose]

    def _copy_forms(self, transpose):
        """The strided forms (source, destination) of the index maps when a product in this
        direction is a copy -- no weights, distinct destinations, both index arrays strided
        (slices, splits, selects, reshapes, the permutations of transposes) -- else None."""
        if self.vals is not None or self.n == 0 or self._destinations(transpose) != "distinct":
            return None
        if transpose not in self._forms:
            src, dst = (_strided_form(a, self.n) for a in self._src_dst(transpose))
            self._forms[transpose] = None if src is None or dst is None else _common_shape(src, dst)
        return self._forms[transpose]

    def _copy(self, forms, x, y):
        """``y[:, dst[e]] = x[:, src[e]]`` for every entry, as one copy between strided views: on
        torch's pool (the query's threads) from :data:`._elementwise.TORCH_MIN` elements, by numpy
        below that or from read-only values (which torch does not view). Each element is copied,
        not added to a zero, so the results are the scatter's (up to the sign of a zero: a copied
        -0 stays -0), on any number of threads."""
        src, dst = _strided_view(x, forms[0]), _strided_view(y, forms[1])
        if not (src.size >= _elementwise.torch_min() and x.flags.writeable and _copy_on_torch(src, dst)):
            np.copyto(dst, src, casting="same_kind")
        return y

    def _scatter(self, serial, blocked, transpose, *args):
        """``serial(*args, 0, n)`` over all entries, or ``blocked(*args, bounds)`` on the query's
        threads over blocks of entries no two of which share a destination -- a sorted
        destination's run of entries stays in one block -- so each destination's contributions
        arrive in the serial order (bit for bit one thread's results)."""
        if blocks(self.n) > 1 and self._destinations(transpose) != "mixed":
            with parallel() as threads:
                nb = blocks(self.n, threads)
                if nb > 1:
                    bounds = (np.arange(nb + 1, dtype=np.int64) * self.n) // nb
                    dst = self._src_dst(transpose)[1]
                    if self._destinations(transpose) == "sorted":
                        bounds[1:-1] = np.searchsorted(dst, dst[bounds[1:-1]], side="left")
                    return blocked(*args, bounds)
        return serial(*args, 0, self.n)

    def _values_dtype(self, x):
        """The dtype of a sum or entropy product's result through the weights: float32 for float32
        values (a float32 model's pass) through float32 weights whose non-zero magnitudes lie in
        [1e-18, 1e30] -- a pass's values are normalised to at most 2^10, so no product or
        -|w| log|w| term overflows, and none underflows unless the value itself is more than 1e-20
        below its tensor's largest (as in the max pass); float32 values through weights of one
        (an index map: a copy, a permutation, a sum) stay float32 too; float64 otherwise."""
        if x.dtype != np.float32:
            return np.dtype(np.float64)
        if self.vals is None:
            return np.dtype(np.float32)
        if self.vals.dtype != np.float32:
            return np.dtype(np.float64)
        if self._narrow is None:
            a = np.abs(self.vals)
            nz = a[a != 0]
            self._narrow = bool(np.isfinite(a).all() and (nz.size == 0 or (nz.min() >= 1e-18 and nz.max() <= 1e30)))
        return np.dtype(np.float32 if self._narrow else np.float64)

    def _finite_vals(self):
        if self._finite is None:
            self._finite = bool(np.isfinite(self.vals).all())
        return self._finite

    def sum_product(self, x, weight, transpose):
        t = weight_map(weight)
        if self.is_diagonal and self.vals is not None and t != WeightMap.XLOGX:
            # an elementwise op: one vectorised multiply instead of the scatter. The scatter's zero
            # inputs contribute 0 even through an infinite weight; so here (rarely needed)
            dt = self._values_dtype(x)
            x = np.ascontiguousarray(x, dtype=dt)
            y = scale_columns(self.vals, x, absolute=t == WeightMap.ABS, dtype=dt)
            if not self._finite_vals():
                y[:, ~(x != 0).any(axis=0)] = 0.0
            return y
        dt = self._values_dtype(x)
        x = np.ascontiguousarray(x, dtype=dt)
        y = np.zeros((x.shape[0], self._dims(transpose)[1]), dtype=dt)
        forms = self._copy_forms(transpose) if t != WeightMap.XLOGX else None   # -1 log 1 = 0: no copy
        if forms is not None:
            return self._copy(forms, x, y)
        src, dst = self._src_dst(transpose)
        if x.shape[0] == 1:
            self._scatter(coo_sum, coo_sum_blocks, transpose, x, src, dst, self.vals, int(t), y)
        else:
            coo_sum_channels(x, src, dst, self.vals, int(t), y, self.n)
        return y

    def entropy_product(self, x, transpose):
        if self.is_diagonal and self.vals is not None:
            dt = self._values_dtype(x)
            x = np.ascontiguousarray(x, dtype=dt)
            y = np.empty((2, self.n), dtype=dt)
            w = self.vals if self.vals.dtype in (np.float32, np.float64) else self.vals.astype(np.float64)
            run_blocks(diag_entropy, diag_entropy_blocks, self.n, x, w, y)
            return y
        dt = self._values_dtype(x)
        x = np.ascontiguousarray(x, dtype=dt)
        y = np.zeros((2, self._dims(transpose)[1]), dtype=dt)
        forms = self._copy_forms(transpose)
        if forms is not None:              # weight one: (Z, R) pass unchanged (-1 log 1 = 0)
            return self._copy(forms, x, y)
        src, dst = self._src_dst(transpose)
        self._scatter(coo_entropy, coo_entropy_blocks, transpose, x, src, dst, self.vals, y)
        return y

    def max_product(self, xmax, xmin, transpose):
        signed = xmin is not None
        # the values' dtype is kept (float32 for a float32 model's pass): the weights enter
        # rounded to it, one rounding per hop, which the path search allows for
        dt = max_dtype(xmax)
        if self.is_diagonal and self.vals is not None:
            buf = np.empty((2 if signed else 1, self.n), dtype=dt)
            run_blocks(diag_max, diag_max_blocks, self.n, xmax, xmax if xmin is None else xmin, self.vals,
                       signed, buf)
            return (buf[0], buf[1]) if signed else (buf[0], None)
        ymax, ymin = _empty_max(self._dims(transpose)[1], signed, dt)
        forms = self._copy_forms(transpose)
        if forms is not None:
            # weight one: the values are copied (a pair with no path is (-inf, +inf) in every
            # pass, and copies as such; a magnitude is never negative)
            self._copy(forms, np.ascontiguousarray(xmax)[None], ymax[None])
            if signed:
                self._copy(forms, np.ascontiguousarray(xmin)[None], ymin[None])
            return ymax, ymin
        src, dst = self._src_dst(transpose)
        if signed:
            self._scatter(coo_maxmin, coo_maxmin_blocks, transpose, xmax, xmin, src, dst, self.vals, ymax, ymin)
        else:
            self._scatter(coo_max, coo_max_blocks, transpose, xmax, src, dst, self.vals, ymax)
        return ymax, ymin

    def entries(self):
        return (self._r().astype(np.int64), self._c().astype(np.int64),
                self._v().astype(np.float64))

    def out_edges(self, j):
        c = self.cols
        if c is None:                                   # entry j is the one edge leaving j
            e = np.arange(j, min(j + 1, self.n))
        else:
            if self._csc is None:
                # sorted columns (slices, reductions, broadcasts) are found by bisection; other
                # index maps get a column-sorted order once
                if len(c) < 2 or bool(np.all(c[1:] >= c[:-1])):
                    self._csc = False
                else:
                    order = np.argsort(c, kind="stable").astype(c.dtype)
                    self._csc = (order, np.searchsorted(c[order], np.arange(self.in_numel + 1)))
            if self._csc is False:
                e = np.arange(*np.searchsorted(c, (j, j + 1)))
            else:
                order, starts = self._csc
                e = order[starts[j]:starts[j + 1]]
        # (path recovery calls this per visited element: no arrays of the Jacobian's size)
        rows = e if self.rows is None else self.rows[e]
        vals = np.ones(len(e)) if self.vals is None else self.vals[e]
        return rows.astype(np.int64), vals.astype(np.float64)

    @property
    def out_degree(self):
        """1 when every input element has at most one entry (no column index, or strictly
        increasing ones: elementwise ops, reshapes, slices, reductions; found once), else None."""
        if self._single is None:
            c = self.cols
            self._single = c is None or len(c) < 2 or bool(np.all(c[1:] > c[:-1]))
        return 1 if self._single else None

    def out_edges_of(self, idx):
        if self.out_degree is None:
            return super().out_edges_of(idx)
        idx = np.asarray(idx, dtype=np.int64)
        if self.n == 0:                                 # no edges at all (e.g. a zeroed write)
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
        if self.cols is None:
            which = np.flatnonzero(idx < self.n)
            e = idx[which]
        else:
            e = np.minimum(np.searchsorted(self.cols, idx), self.n - 1)
            which = np.flatnonzero(self.cols[e] == idx)
            e = e[which]
        rows = e if self.rows is None else self.rows[e]
        vals = np.ones(len(e)) if self.vals is None else self.vals[e]
        return which, rows.astype(np.int64), vals.astype(np.float64)

    def to_dense(self):
        D = np.zeros((self.out_numel, self.in_numel))
        np.add.at(D, (self._r(), self._c()), self._v())
        return D

    def state(self):
        arrays = {k: v for k, v in (("rows", self.rows), ("cols", self.cols), ("vals", self.vals))
                  if v is not None}
        return {"n": self.n}, arrays

    @classmethod
    def from_state(cls, out_shape, in_shape, params, arrays):
        j = cls(out_shape, in_shape, arrays.get("rows"), arrays.get("cols"), arrays.get("vals"),
                n=params["n"])
        if j.n != params["n"]:
            raise ValueError("entry count does not match")
        return j




def _strided_form(idx, n, max_dims=8):
    """``(offset, shape, strides)`` such that the index array ``idx`` (None: ``arange(n)``) lists
    ``offset + sum_k i_k strides[k]`` over the multi-indices ``i`` of ``shape`` in C order, with
    non-negative strides: the index map of a slice, a split, a select, a reshape or a transpose's
    permutation is such a view. None when ``idx`` has no such form in ``max_dims`` dimensions.

    Found from the innermost dimension out: with the first ``size`` offsets a block of the form,
    the next dimension's stride is the offset at ``size``, and its length the number of blocks
    that repeat the first one shifted by multiples of that stride."""
    if idx is None:
        return 0, (n,), (1,)
    if n == 0:
        return None
    d = idx.astype(np.int64) - np.int64(idx[0])
    dims = []                                   # (length, stride), innermost first
    size = 1
    while size < n:
        stride = int(d[size])
        if stride < 0 or len(dims) == max_dims:
            return None
        rows = n // size
        block = d[:rows * size].reshape(rows, size)
        same = (block == block[0] + stride * np.arange(rows, dtype=np.int64)[:, None]).all(axis=1)
        length = rows if same.all() else int(np.argmin(same))
        if length < 2:
            return None
        dims.append((length, stride))
        size *= length
    if size != n:
        return None
    return int(idx[0]), tuple(m for m, _ in reversed(dims)), tuple(s for _, s in reversed(dims))


def _common_shape(a, b):
    """Strided forms ``a`` and ``b`` (of one number of elements) rewritten over one shape, by
    splitting dimensions (a dimension of length p q and stride s is (p, q) with strides (q s, s)),
    so that the two views can be copied into each other; None if their dimensions do not nest."""
    def bounds(shape):                      # element counts of the inner dimensions, 1 first
        return np.cumprod((1,) + shape[::-1]).tolist()
    cuts = sorted(set(bounds(a[1])) | set(bounds(b[1])))
    if any(hi % lo for lo, hi in zip(cuts, cuts[1:])):
        return None

    def split(form):
        offset, shape, strides = form
        inner = bounds(shape)
        lengths, steps = [], []
        for lo, hi in zip(cuts, cuts[1:]):         # innermost first
            k = max(i for i in range(len(shape)) if inner[i] <= lo)   # the dimension [lo, hi) lies in
            lengths.append(hi // lo)
            steps.append(strides[len(shape) - 1 - k] * (lo // inner[k]))
        return offset, tuple(lengths[::-1]), tuple(steps[::-1])
    return split(a), split(b)


def _strided_view(a, form):
    """The elements ``a[:, idx]`` of a C-contiguous (C, m) array as a (C, *shape) view, for
    ``form`` the strided form of ``idx`` (see :func:`_strided_form`)."""
    offset, shape, strides = form
    item = a.itemsize
    return np.lib.stride_tricks.as_strided(a[:, offset:], (a.shape[0],) + shape,
                                           (a.shape[1] * item,) + tuple(s * item for s in strides))


def _copy_on_torch(src, dst):
    """``dst[...] = src`` by torch (views of both; True when done)."""
    torch.from_numpy(dst).copy_(torch.from_numpy(src))
    return True


def _is_arange(a):
    """``a`` (an index array or None) is 0, 1, ..., len(a) - 1, so it need not be kept."""
    if a is None or not len(a) or a[0] != 0 or a[-1] != len(a) - 1:
        return False
    return bool(np.all(np.diff(a) == 1))
