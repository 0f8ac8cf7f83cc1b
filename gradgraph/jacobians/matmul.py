"""Contractions (mm / bmm / addmm wrt one operand), referencing the other operand, with their
numba kernels (BLAS for the sum products)."""
from __future__ import annotations

import warnings
import weakref

import numpy as np
import torch
from numba import njit, prange

from ..threads import kernel, parallel
from ._intrinsics import _FM, WeightMap, flog, fmax, fmin, max_support, weight_map
from ._weightcache import WEIGHT_CACHE
from ._elementwise import fill
from .base import Jacobian, _numel

# ----------------------------------------------------------------------------- contraction
@kernel(cache=True)
def mm_maxmin(Amax, Amin, P, Ymax, Ymin):
    """Signed (max, x)/(min, x) semiring matmul Y = A (x) P, the rows (b, i) in parallel."""
    B, I, T = Amax.shape
    J = P.shape[2]
    for bi in prange(B * I):
        b = bi // I
        i = bi % I
        for t in range(T):
            amax = Amax[b, i, t]
            if amax == -np.inf:
                continue
            amin = Amin[b, i, t]
            for j in range(J):
                w = P[b, t, j]
                if w > 0:
                    hi = w * amax
                    lo = w * amin
                elif w < 0:
                    hi = w * amin
                    lo = w * amax
                else:
                    continue
                if hi > Ymax[b, i, j]:
                    Ymax[b, i, j] = hi
                if lo < Ymin[b, i, j]:
                    Ymin[b, i, j] = lo


@njit(cache=True)
def support_rows_cols(a, out):
    """For a (C, B, I, K) array (any strides): which rows i and which columns k hold a non-zero
    entry in some (c, b) (one pass, branch-free so that it vectorises over k). The same pass
    copies ``a`` into ``out`` (contiguous, in its dtype) unless ``out`` is empty."""
    rows = np.zeros(a.shape[2], np.bool_)
    cols = np.zeros(a.shape[3], np.uint8)
    copy = out.size > 0
    for c in range(a.shape[0]):
        for b in range(a.shape[1]):
            for i in range(a.shape[2]):
                row = a[c, b, i]
                nz = np.uint8(0)
                for k in range(a.shape[3]):
                    f = np.uint8(row[k] != 0.0)
                    cols[k] |= f
                    nz |= f
                rows[i] |= nz != 0
                if copy:
                    dst = out[c, b, i]
                    for k in range(a.shape[3]):
                        dst[k] = row[k]
    return rows, cols != 0




@kernel(cache=True, fastmath=_FM, error_model="numpy")
def mm_maxmin_dense(Amax, Amin, P, Ymax, Ymin, nb):
    """:func:`mm_maxmin` for a P without zeros, t-outer so each row of P is read once per batch.

    ``max(p amax, p amin)`` is p amax for p > 0 and p amin for p < 0 (the min likewise), which
    vectorises where a branch on the sign does not. Works in the arrays' dtype (float32 or float64).
    A zero weight would count as an edge of weight 0: callers redo the columns of P that hold
    zeros with :func:`mm_maxmin_cols`. The output columns are split into ``nb`` blocks, run in
    parallel (a max is exact in any order, so the result does not depend on the split).
    """
    B, I, T = Amax.shape
    J = P.shape[2]
    for blk in prange(nb):
        j0 = blk * J // nb
        j1 = (blk + 1) * J // nb
        for b in range(B):
            for t in range(T):
                p = P[b, t, j0:j1]
                for i in range(I):
                    amax = Amax[b, i, t]
                    if amax == -np.inf:
                        continue
                    amin = Amin[b, i, t]
                    ymx = Ymax[b, i, j0:j1]
                    ymn = Ymin[b, i, j0:j1]
                    for j in range(j1 - j0):
                        u = p[j] * amax
                        v = p[j] * amin
                        ymx[j] = fmax(ymx[j], fmax(u, v))
                        ymn[j] = fmin(ymn[j], fmin(u, v))



@kernel(cache=True, fastmath=_FM, error_model="numpy")
def mm_maxmin_masked(Amax, Amin, P, Ymax, Ymin, nb):
    """:func:`mm_maxmin` for a P with many zeros (a causal attention pattern), branch-free:
    a zero weight is no edge, so a select keeps the output as it was, which
    vectorises where :func:`mm_maxmin`'s branch on the sign does not. Each row of P is visited
    only between its first and last non-zero weight: a causal pattern's rows hold their zeros at
    one end, so half the products of a causal attention are not computed at all (those outside
    are zeros, which the select would skip anyway: the same results; at 12 heads x 64 rows,
    one thread, 1.2-1.5x faster at 256 tokens and 1.7x at 1,024). Works in the arrays'
    dtype (float32 or float64). The output rows run in parallel, split into ``nb`` blocks per
    batch entry (see :func:`masked_blocks`); each output entry receives its contributions in the
    same order however the rows are split, so every thread count gives the same bits."""
    B, I, T = Amax.shape
    J = P.shape[2]
    for blk in prange(B * nb):
        b = blk // nb
        k = blk % nb
        i0 = (k * I) // nb
        i1 = ((k + 1) * I) // nb
        for t in range(T):
            p = P[b, t]
            lo = 0
            while lo < J and p[lo] == 0.0:
                lo += 1
            if lo == J:
                continue
            hi = J
            while p[hi - 1] == 0.0:
                hi -= 1
            p = p[lo:hi]                   # (views from 0: a loop from lo vectorises worse)
            for i in range(i0, i1):
                amax = Amax[b, i, t]
                if amax == -np.inf:
                    continue
                amin = Amin[b, i, t]
                ymx = Ymax[b, i, lo:hi]
                ymn = Ymin[b, i, lo:hi]
                for j in range(hi - lo):
                    w = p[j]
                    u = w * amax
                    v = w * amin
                    hi_ = ymx[j]
                    lo_ = ymn[j]
                    ymx[j] = fmax(hi_, fmax(u, v)) if w != 0.0 else hi_
                    ymn[j] = fmin(lo_, fmin(u, v)) if w != 0.0 else lo_


def masked_blocks(B, I, threads):
    """Blocks of output rows per batch entry for :func:`mm_maxmin_masked`: none beyond the batch
    when it has an entry per thread (the attention's heads), otherwise enough for every thread,
    each of at least 16 rows."""
    if B >= threads:
        return 1
    return max(1, min(-(-threads // B), I // 16))




@kernel(cache=True, fastmath=_FM, error_model="numpy")
def mm_maxmin_dot(Amax, Amin, PT, Ymax, Ymin, jb):
    """:func:`mm_maxmin_dense` in dot-product form, for an A without "no path" entries: PT is P
    transposed (B, J, T), so each output pair is a max / min reduction along contiguous rows,
    held in registers (no read-modify-write of output rows per weight row). ``Ymax`` / ``Ymin``
    come in as -inf / +inf. Zero weights count as edges here too (see mm_maxmin_dense).

    The weight rows are taken ``jb`` at a time (see :func:`dot_block`), each block against every
    row of A, so a block stays in the core's cache while the rows of A pass it: looping over the
    whole of a 3072 x 768 weight per row of A streams it from memory 256 times at 256 tokens and
    halves the speed. The blocks run in parallel (a max is exact in any order)."""
    B, I, T = Amax.shape
    J = PT.shape[1]
    nj = (J + jb - 1) // jb
    for blk in prange(B * nj):
        b = blk // nj
        j0 = (blk % nj) * jb
        j1 = min(j0 + jb, J)
        for i in range(I):
            ax = Amax[b, i]
            an = Amin[b, i]
            for j in range(j0, j1):
                p = PT[b, j]
                hi = Ymax[b, i, j]
                lo = Ymin[b, i, j]
                for t in range(T):
                    u = p[t] * ax[t]
                    v = p[t] * an[t]
                    hi = fmax(hi, fmax(u, v))
                    lo = fmin(lo, fmin(u, v))
                Ymax[b, i, j] = hi
                Ymin[b, i, j] = lo


#: rows of A from which the signed max product takes the dot-product form when that needs a
#: copy of the operand in the other orientation (see MatmulJacobian.max_product)
DOT_MIN_ROWS = 16


def dot_block(T, itemsize, threads, J):
    """Weight rows per block of :func:`mm_maxmin_dot`: about 128 KB of them (a quarter of a
    core's L2 cache on the machines measured, leaving room for the rows of A), and at least one
    block per thread."""
    jb = max(1, (128 << 10) // (T * itemsize))
    return max(1, min(jb, -(-J // threads)))


@kernel(cache=True)
def transpose_into(src, dst):
    """dst[b] = src[b]^T for C-contiguous (B, R, C) ``src`` and (B, C, R) ``dst``. The body goes
    in 8 x 8 tiles of constant size, which LLVM turns into register shuffles (twice the speed of
    element-wise tiles, faster than torch's copy at one thread); blocks of 8 source columns run in
    parallel, the ragged edges element by element."""
    B, R, C = src.shape
    nc = (C + 7) // 8
    R8 = R - R % 8
    for blk in prange(B * nc):
        b = blk // nc
        c0 = (blk % nc) * 8
        s = src[b]
        d = dst[b]
        if c0 + 8 <= C:
            for r0 in range(0, R8, 8):
                for c in range(8):
                    for r in range(8):
                        d[c0 + c, r0 + r] = s[r0 + r, c0 + c]
            for c in range(c0, c0 + 8):
                for r in range(R8, R):
                    d[c, r] = s[r, c]
        else:
            for c in range(c0, C):
                for r in range(R):
                    d[c, r] = s[r, c]


@kernel(cache=True)
def mm_maxmin_cols(Amax, Amin, P, cols, Ymax, Ymin):
    """Recompute the columns ``cols`` of a signed max product exactly (zero weights skipped),
    the columns in parallel."""
    B, I, T = Amax.shape
    for jj in prange(cols.shape[0]):
        j = cols[jj]
        for b in range(B):
            for i in range(I):
                hi = -np.inf
                lo = np.inf
                for t in range(T):
                    w = P[b, t, j]
                    amax = Amax[b, i, t]
                    if w == 0.0 or amax == -np.inf:
                        continue
                    u = w * amax
                    v = w * Amin[b, i, t]
                    hi = max(hi, max(u, v))
                    lo = min(lo, min(u, v))
                Ymax[b, i, j] = hi
                Ymin[b, i, j] = lo


@kernel(cache=True, fastmath=_FM, error_model="numpy")
def mm_max_dense(A, P, Y, nb):
    """Y[b, i, :] = max_t |P[b, t, :]| * A[b, i, t], t-outer so each row of P is read once per
    batch (a zero weight gives the candidate 0, which is "no path" here); ``nb`` blocks of output
    columns in parallel, as :func:`mm_maxmin_dense`."""
    B, I, T = A.shape
    J = P.shape[2]
    for blk in prange(nb):
        j0 = blk * J // nb
        j1 = (blk + 1) * J // nb
        for b in range(B):
            for t in range(T):
                p = P[b, t, j0:j1]
                for i in range(I):
                    a = A[b, i, t]
                    if a == 0.0:
                        continue
                    y = Y[b, i, j0:j1]
                    for j in range(j1 - j0):
                        y[j] = fmax(y[j], abs(p[j]) * a)




@njit(cache=True, fastmath={"contract", "nsz"}, error_model="numpy")
def _abs_xlogx_block(w, a, h):
    """a = |w| and, unless ``h`` is empty, h = -a log a (0 where a = 0): one read of the weight
    and one vectorised loop for both transforms, elementwise on 1-d arrays in w's dtype."""
    if h.shape[0] == 0:
        for k in range(w.shape[0]):
            a[k] = abs(w[k])
        return
    tiny = np.finfo(w.dtype).tiny
    small = False
    for k in range(w.shape[0]):
        v = abs(w[k])
        a[k] = v
        h[k] = -v * flog(v)                # 0 for v = 0 (flog(0) is finite)
        small |= v < tiny                  # an or-reduction: keeps the loop vectorised
    if small:
        for k in range(w.shape[0]):        # subnormal: libm's log (flog does not handle them)
            v = a[k]
            if 0.0 < v < tiny:
                h[k] = -v * np.log(v)


@kernel(cache=True)
def abs_xlogx(w, a, h, nb):
    """:func:`_abs_xlogx_block` over ``nb`` blocks of the arrays in parallel, each block small
    enough (see :func:`weight_transforms`) that its |w| is still in the core's cache when the
    logarithms read it."""
    n = w.shape[0]
    with_h = h.shape[0] > 0
    for blk in prange(nb):
        k0 = blk * n // nb
        k1 = (blk + 1) * n // nb
        _abs_xlogx_block(w[k0:k1], a[k0:k1], h[k0:k1] if with_h else h)


def weight_transforms(flat, with_h, scratch=False):
    """[|W|] or [|W|, -|W| log|W|] of a 1-d array in its own dtype, by :func:`abs_xlogx` on every
    thread of the query; ``scratch``: in the query's scratch memory (:meth:`WeightCache.scratch`:
    valid until the next product asks for it), else in new arrays."""
    n = flat.size
    if scratch:
        buf = WEIGHT_CACHE.scratch(2 * n if with_h else n, flat.dtype)
        a, h = buf[:n], buf[n:]
    else:
        a = np.empty_like(flat)
        h = np.empty_like(flat) if with_h else np.empty(0, dtype=flat.dtype)
    if flat.size:
        with parallel(work=flat.size * 8) as threads:
            # blocks of 16 K elements: a block's |w| (64 KB in float32) stays in L2 between its loops
            abs_xlogx(flat, a, h, max(threads, -(-flat.size // (1 << 14))))
    return [a, h] if with_h else [a]


@njit(cache=True)
def _abs_bits_differ(w, a, mask):
    """Whether (w & mask) != a anywhere, on the bits of two 1-d float arrays viewed as unsigned
    integers of their width (an or of xors: integer SIMD, no branch)."""
    diff = w[0] ^ w[0]
    for k in range(w.shape[0]):
        diff |= (w[k] & mask) ^ a[k]
    return diff != 0


@kernel(cache=True)
def abs_bits_equal(w, a, mask, nb):
    """Whether the bits of |w| (w's bits without the sign: ``mask``) equal those of ``a``, for
    1-d unsigned views of float arrays of one width, in ``nb`` blocks in parallel; each block stops
    at the first chunk that differs. Bit equality is exactly "abs(w) would give a again", NaNs
    included."""
    n = w.shape[0]
    ok = np.ones(nb, np.bool_)
    chunk = 1 << 14
    for blk in prange(nb):
        k0 = blk * n // nb
        k1 = (blk + 1) * n // nb
        for c in range(k0, k1, chunk):
            if _abs_bits_differ(w[c:min(c + chunk, k1)], a[c:min(c + chunk, k1)], mask):
                ok[blk] = False
                break
    return ok.all()


def _support_scan(a, out):
    """:func:`support_rows_cols` reading ``a`` in its memory order: a transposed operand (the keys
    of ``q k^T``, the values of ``probs @ V``, wrt the right operand) has its unit stride on the rows,
    so the scan runs on the swapped view and swaps the answer back. ``out`` is laid out like ``a``
    (``np.empty_like``) or empty."""
    if a.shape[2] > 1 and a.shape[3] > 1 and abs(a.strides[2]) < abs(a.strides[3]):
        cols, rows = support_rows_cols(np.swapaxes(a, 2, 3), np.swapaxes(out, 2, 3) if out.size else out)
        return rows, cols
    return support_rows_cols(a, out)


# ============================================================================ contraction
class MatmulJacobian(Jacobian):
    """out = L @ R (2-d ``mm`` or batched 3-d ``bmm``) wrt L (``wrt="left"``) or R.

    ``other`` is the other operand, stored by reference (a weight is stored once however many
    edges use it). Internally everything is put in the canonical form ``out' = X' @ M`` with the
    input X' of shape (B, I, T): for ``wrt="right"`` that is the transposed product.
    """

    kind = "matmul"

    def __init__(self, out_shape, in_shape, other, wrt):
        super().__init__(out_shape, in_shape)
        if wrt not in ("left", "right"):
            raise ValueError("wrt must be 'left' or 'right'")
        self.other, self.wrt = other, wrt
        o3 = other.reshape((1,) + other.shape) if other.ndim == 2 else other
        self._M = o3 if wrt == "left" else np.swapaxes(o3, 1, 2)   # (B, T, J')
        self._cache = {}

    def _magnitudes(self, transpose, with_h):
        """|P| (and -|P| log|P| if ``with_h``) of the whole operand as torch tensors oriented like
        :meth:`_support`'s P, computed in the operand's own memory order; inside
        ``WEIGHT_CACHE.active()`` kept in the process's cache for every product, graph and query --
        both directions of a flow, entropy and magnitude alike -- while the operand's memory holds
        the same |W| (outside a block, per product, in the query's scratch memory: valid until the
        next product's transforms): each query compares
        the weight with the kept |W| once (exact, no logarithm), so a weight edited in place
        (``.data``, ``copy_``, a numpy view) is seen at once."""
        flat, unflat = _memory_order(self._M if self.wrt == "left" else np.swapaxes(self._M, 1, 2))
        if not WEIGHT_CACHE.keeping:
            # nothing is kept outside a block: both transforms from one read of the weight, into
            # memory the query reuses for every product (the caller uses them before the next)
            return [self._oriented(unflat(X), transpose) for X in weight_transforms(flat, with_h, scratch=True)]
        A = WEIGHT_CACHE.get(self.other, "abs", lambda: unflat(weight_transforms(flat, False)[0]),
                             check=_abs_check(flat, unflat))
        out = [A]
        if with_h:
            def compute_h():
                # by the kernel that makes both outside a block (|A| = A): the same bits there and here
                return weakref.ref(A), unflat(weight_transforms(_memory_order(A)[0], True)[1])
            # H is valid exactly when it was made from the |W| just checked (the same array; a
            # reference that does not keep it alive)
            out.append(WEIGHT_CACHE.get(self.other, "xlogx", compute_h, check=lambda v: v[0]() is A)[1])
        return [self._oriented(X, transpose) for X in out]

    def _oriented(self, X3, transpose):
        """An array laid out like the operand (canonical ``other`` as (B, ., .)) as P of
        :meth:`_support`: (B, K, N), contracting K."""
        M = X3 if self.wrt == "left" else np.swapaxes(X3, 1, 2)
        return _tensor(np.swapaxes(M, 1, 2) if transpose else M)

    def _kept(self, key, compute):
        """``compute()``, a transform of the whole operand, kept by this Jacobian (its graph
        references the weight as it was at capture) and, inside ``WEIGHT_CACHE.active()``, shared
        with the process's other graphs of the model."""
        if key not in self._cache:
            self._cache[key] = WEIGHT_CACHE.get(self.other, (self.wrt,) + key, compute)
        return self._cache[key]

    def _view(self, which):
        """M (B, T, J) or M^T (B, J, T) as it lies in the operand's memory."""
        return self._M if which == "M" else np.swapaxes(self._M, 1, 2)

    def _copied(self, which):
        """Whether :meth:`_P` makes a copy of this orientation for each product."""
        return not (self._view(which).flags.c_contiguous or WEIGHT_CACHE.keeping)

    def _P(self, which):
        """M (B, T, J) or M^T (B, J, T), C-contiguous. A linear layer's weight is already contiguous
        as M^T, so that orientation costs nothing; the other one (read by the dot-product form of
        the max kernels backward, by the axpy form forward) is a copy. It is kept across graphs
        inside ``WEIGHT_CACHE.active()``; otherwise it is made per product in the query's scratch
        memory (one slot per orientation, valid until the next product's) and never held by the
        graph: copies of every weight kept for the graph's life cost a query the size of the
        model's contractions again (340 MB at GPT-2 small, 8x torch's backward at a small BERT)."""
        X = self._view(which)
        if X.flags.c_contiguous:
            return X
        if WEIGHT_CACHE.keeping:
            return WEIGHT_CACHE.get(self.other, (self.wrt, which), lambda: _contiguous(X, np.empty(X.shape, X.dtype)))
        return _contiguous(X, WEIGHT_CACHE.scratch(X.size, X.dtype, slot=("P", which)).reshape(X.shape))

    def _canon(self, x, shape, C):
        """View a (C, numel) batch of an in/out tensor in canonical (C, B, rows, cols) layout."""
        s3 = shape if len(shape) == 3 else (1,) + tuple(shape)
        v = x.reshape((C,) + tuple(s3))
        return v if self.wrt == "left" else np.swapaxes(v, 2, 3)

    def _uncanon(self, v, C, dtype=np.float64):
        if self.wrt == "right":
            v = np.swapaxes(v, 2, 3)
        return np.ascontiguousarray(v, dtype=dtype).reshape(C, -1)

    def _support(self, x, transpose):
        """The batch as a torch tensor (C, B, I, K) contracting K, the operand P (B, K, N) in its
        own dtype restricted to the columns K the batch reaches, and where the result goes.

        A backward pass from one logit reaches a vocabulary-sized product through a handful of
        non-zero entries: contract only the non-zero rows and columns (and transform only the
        weights they meet), so the cost follows the support."""
        C = x.shape[0]
        a = self._canon(x, self.out_shape if transpose else self.in_shape, C)
        M = self._M
        P = _tensor(np.swapaxes(M, 1, 2) if transpose else M)
        # the scan for the support also converts float64 values to float32 weights' dtype in passing
        # (a float32 model's float32 pass needs no copy)
        conv = (np.empty_like(a, dtype=P.numpy().dtype) if P.dtype != torch.float64 and a.dtype == np.float64
                else np.empty((0, 0, 0, 0), dtype=a.dtype))
        rows, cols = _support_scan(a, conv)
        at = torch.from_numpy(conv) if conv.size else _tensor(a)
        if a.shape[1] != 1:
            rows[:] = True
        dense_cols = 2 * int(cols.sum()) > cols.size
        if dense_cols and 2 * int(rows.sum()) > rows.size:
            return at.to(P.dtype), P, None
        ri = torch.from_numpy(np.flatnonzero(rows))
        where = a.shape[:3] + (P.shape[2],)
        if dense_cols:
            # a few rows reaching most columns (a logit's row below the last layer's weights):
            # the whole operand, not a copy of nearly all of it
            return at[:, :, ri].to(P.dtype), P, (where, ri, torch.arange(cols.size))
        ci = torch.from_numpy(np.flatnonzero(cols))
        return at[:, :, ri][..., ci].to(P.dtype), P[:, ci, :], (where, ri, ci)

    def _abs_operands(self, P, where, transpose, with_h):
        """|P| (and -|P| log|P|) for a product through :meth:`_support`'s P. The kept transforms
        of the whole operand (:meth:`_magnitudes`) when the product reaches a good part of it,
        restricted to the columns it reaches; for a few columns of a large operand (a
        vocabulary-sized weight below a logit difference) the transforms of those columns alone,
        which cost what the pass there costs and keep nothing of the vocabulary's size."""
        if where is not None and 8 * len(where[2]) < self._M.shape[2 if transpose else 1]:
            return [_transform_t(P, WeightMap.ABS)] + ([_transform_t(P, WeightMap.XLOGX)] if with_h else [])
        out = self._magnitudes(transpose, with_h)
        if where is None or len(where[2]) == out[0].shape[1]:     # every column (a few rows)
            return out
        return [X[:, where[2], :] for X in out]

    def _product(self, at, P, where, values):
        """:meth:`_gemm` as a (C, numel) array of the destination tensor: float32 for float32
        ``values`` (a float32 model's pass) through float32 operands, else float64."""
        y = self._gemm(at, P, where).numpy()
        return self._uncanon(y, y.shape[0], np.result_type(values.dtype, y.dtype))

    def _gemm(self, at, P, where):
        """at @ P (torch.matmul: BLAS on strided operands, in the weights' own dtype -- no float64
        copy of a float32 matrix), scattered back to the full rows: a canonical (C, B, I, N)
        tensor in P's dtype. With one shared matrix (a weight) every channel and row goes into one
        (C I, K) @ (K, N) product, which BLAS runs faster than a batch of small ones."""
        if P.shape[0] == 1:
            C, B, I, Kc = at.shape
            a2 = at.reshape(C * B * I, Kc)
            if torch.get_num_threads() == 1 and NUMPY_GEMM_AT_ONE_THREAD:
                y = torch.from_numpy(a2.numpy() @ P[0].numpy())
            else:
                # more: torch's, whose pool the query's other parallel ops use too (gradgraph.threads)
                y = torch.mm(a2, P[0])
            y = y.reshape(C, B, I, P.shape[2])
        else:
            y = torch.matmul(at, P)
        if where is not None:
            shape, ri = where[:2]
            full = torch.zeros((y.shape[0],) + shape[1:], dtype=y.dtype)
            full[:, :, ri] = y
            y = full
        return y

    def sum_product(self, x, weight, transpose):
        at, P, where = self._support(x, transpose)
        t = weight_map(weight)
        if t == WeightMap.ABS:
            return self._product(at, self._abs_operands(P, where, transpose, False)[0], where, x)
        return self._product(at, _transform_t(P, t), where, x)

    def entropy_product(self, x, transpose):
        at, P, where = self._support(x, transpose)
        A, H = self._abs_operands(P, where, transpose, True)
        # <Z, R> -> <Z |P|, R |P| + Z H>: three products of the contraction's size, the fewest
        # the expectation semiring allows; Z H is added into the R channel in one pass
        y = self._product(at, A, where, x)
        zh = self._gemm(at[:1], H, where).numpy()
        r = self._canon(y[1:], self.in_shape if transpose else self.out_shape, 1)
        np.add(r, zh, out=r)
        return y

    def max_product(self, xmax, xmin, transpose):
        signed = xmin is not None
        shape_src, shape_dst = (self.out_shape, self.in_shape) if transpose else (self.in_shape, self.out_shape)
        P = self._P("MT" if transpose else "M")
        zero_cols = self._zero_cols("MT" if transpose else "M")
        # the branch-free kernel counts zero weights as edges: it is used when few columns hold
        # zeros, which are then redone exactly
        dense = len(zero_cols) <= P.shape[2] // 8 or not signed
        # Contract only the live rows and columns of the input (entries with a path): a pass from one
        # logit reaches a vocabulary-sized product through a couple of entries. The same scan gives
        # the smallest live magnitude: float32 values through float32 weights run the branch-free
        # kernels in float32 (twice the SIMD width, half the memory of the result) unless some
        # value is below 1e-20, where products with small weights would leave float32's normal
        # range -- values are renormalised per tensor (largest 1), path weights are recomputed
        # exactly in float64 afterwards. float64 values (a float64 pass) stay float64.
        A = self._canon(xmax, shape_src, 1)[0]
        Amin = self._canon(xmin, shape_src, 1)[0] if signed else A
        B_, I_, T_ = A.shape
        rows = np.zeros((B_, I_), dtype=np.bool_)
        cols = np.zeros(T_, dtype=np.bool_)
        nlive, smallest = max_support(A, Amin, -np.inf if signed else 0.0, rows, cols)
        dt = np.float32 if P.dtype == np.float32 and xmax.dtype == np.float32 and smallest >= 1e-20 else np.float64
        ri = np.flatnonzero(rows.any(axis=0))
        ci = np.flatnonzero(cols)
        if len(ci) < T_:
            A, Amin = A[:, :, ci], Amin[:, :, ci]
        if len(ri) < I_:
            A, Amin = A[:, ri], Amin[:, ri]
        A = np.ascontiguousarray(A, dtype=dt)
        ncol = P.shape[2]
        # the result, in the dtype computed in: the (max, min) pair as the rows of one (2, n)
        # buffer (see _empty_max), written through its canonical (B, I, J) view
        n = _numel(shape_dst)
        buf = np.empty((2, n) if signed else (1, n), dtype=dt)
        out = self._canon(buf, shape_dst, buf.shape[0])
        if len(ri) < I_:
            out[0] = -np.inf if signed else 0.0
            if signed:
                out[1] = np.inf
        if len(ri) == 0 or len(ci) == 0:
            return (buf[0], buf[1]) if signed else (buf[0], None)
        live = slice(None) if len(ri) == I_ else ri
        # every row live and the canonical view contiguous: the kernels write the result in place
        direct = len(ri) == I_ and all(o.flags.c_contiguous for o in out)
        if signed:
            Amin = np.ascontiguousarray(Amin, dtype=dt)
            if direct:
                Ymax, Ymin = fill(out[0], -np.inf), fill(out[1], np.inf)
            else:
                Ymax, Ymin = _no_path((B_, len(ri), ncol), dt, -np.inf), _no_path((B_, len(ri), ncol), dt, np.inf)
            # rows of A whose every remaining entry is live, with a long enough contraction: the
            # dot-product kernel (twice as fast, reading the other orientation of the weights);
            # the other rows (a few, e.g. the query of the first position, which no path
            # reaches) the axpy-form kernel. When that orientation is a copy made for this
            # product (see _P), only for enough rows to repay it: copying a weight costs about
            # what the dot kernel spends on a dozen rows.
            full = None
            dot_rows = DOT_MIN_ROWS if self._copied("M" if transpose else "MT") else 1
            if dense and len(ci) >= 128 and B_ * len(ri) >= dot_rows:
                if nlive == B_ * len(ri) * len(ci):
                    full = np.ones(len(ri), dtype=np.bool_)
                elif B_ == 1:
                    full = ~np.isneginf(A[0]).any(axis=1)
                    if 2 * int(full.sum()) < len(ri):
                        full = None
            sliced = []

            def live_P():
                """P restricted to A's live columns (copied at most once, only when needed)."""
                if not sliced:
                    sliced.append(np.ascontiguousarray(P[:, ci, :]) if len(ci) < T_ else P)
                return sliced[0]
            with parallel(work=B_ * len(ri) * len(ci) * ncol) as threads:
                if full is not None:
                    PT = self._P("M" if transpose else "MT")
                    if len(ci) < T_:
                        PT = np.ascontiguousarray(PT[:, :, ci])
                    fi, pi = np.flatnonzero(full), np.flatnonzero(~full)
                    some = len(fi) < len(ri)
                    Af, Afmin = (A[:, fi], Amin[:, fi]) if some else (A, Amin)
                    Yf = (_no_path((B_, len(fi), ncol), dt, -np.inf), _no_path((B_, len(fi), ncol), dt, np.inf)) \
                        if some else (Ymax, Ymin)
                    mm_maxmin_dot(Af, Afmin, PT, *Yf, dot_block(A.shape[2], A.itemsize, threads, ncol))
                    if some:
                        Ymax[:, fi], Ymin[:, fi] = Yf
                        Yp = (_no_path((B_, len(pi), ncol), dt, -np.inf), _no_path((B_, len(pi), ncol), dt, np.inf))
                        mm_maxmin_dense(np.ascontiguousarray(A[:, pi]), np.ascontiguousarray(Amin[:, pi]), live_P(), *Yp,
                                        _blocks(ncol, threads, 64))
                        Ymax[:, pi], Ymin[:, pi] = Yp
                elif dense:
                    mm_maxmin_dense(A, Amin, live_P(), Ymax, Ymin, _blocks(ncol, threads, 64))
                else:
                    mm_maxmin_masked(A, Amin, live_P(), Ymax, Ymin, masked_blocks(B_, len(ri), threads))
                if dense and len(zero_cols):
                    mm_maxmin_cols(A, Amin, live_P(), zero_cols, Ymax, Ymin)
            if not direct:
                out[0][:, live] = Ymax
                out[1][:, live] = Ymin
            return buf[0], buf[1]
        if len(ci) < T_:
            P = np.ascontiguousarray(P[:, ci, :])
        Y = fill(out[0], 0.0) if direct else np.zeros((B_, len(ri), ncol), dtype=dt)
        with parallel(work=B_ * len(ri) * len(ci) * ncol) as threads:
            mm_max_dense(A, P, Y, _blocks(ncol, threads, 64))
        if not direct:
            out[0][:, live] = Y
        return buf[0], None

    def _zero_cols(self, which):
        """Indices of the columns of ``_P(which)`` (B, T, N) holding a zero weight (cached per
        weight; read from the operand as it lies, no copy)."""
        return self._kept(("zero_cols", which), lambda: np.flatnonzero((self._view(which) == 0).any(axis=(0, 1))))

    def out_edges(self, j):
        s_in = self.in_shape if len(self.in_shape) == 3 else (1,) + self.in_shape
        s_out = self.out_shape if len(self.out_shape) == 3 else (1,) + self.out_shape
        b, r, c = np.unravel_index(j, s_in)
        if self.wrt == "left":          # in (b, i, k) -> out (b, i, :) with weights R[b, k, :]
            w = self._M[b, c, :]
            idx = np.ravel_multi_index((np.full(s_out[2], b), np.full(s_out[2], r),
                                        np.arange(s_out[2])), s_out)
        else:                            # in (b, k, j) -> out (b, :, j) with weights L[b, :, k]
            w = self._M[b, r, :]
            idx = np.ravel_multi_index((np.full(s_out[1], b), np.arange(s_out[1]),
                                        np.full(s_out[1], c)), s_out)
        w = np.asarray(w, dtype=np.float64)
        nz = w != 0
        return idx[nz].astype(np.int64), w[nz]

    @property
    def out_degree(self):
        """Edges per input element: the free dimension of the product (columns of the output for
        the left operand, its rows for the right)."""
        return self._M.shape[2]

    def out_edges_of(self, idx):
        """:meth:`out_edges` of many elements at once."""
        s_in = self.in_shape if len(self.in_shape) == 3 else (1,) + self.in_shape
        s_out = self.out_shape if len(self.out_shape) == 3 else (1,) + self.out_shape
        b, r, c = np.unravel_index(np.asarray(idx, dtype=np.int64), s_in)
        M = np.asarray(self._M)
        n = self._M.shape[2]
        f = np.arange(n)
        if self.wrt == "left":          # in (b, i, k) -> out (b, i, :) with weights R[b, k, :]
            w = M[b, c, :]
            out = np.ravel_multi_index((b[:, None], r[:, None], f[None, :]), s_out)
        else:                            # in (b, k, j) -> out (b, :, j) with weights L[b, :, k]
            w = M[b, r, :]
            out = np.ravel_multi_index((b[:, None], f[None, :], c[:, None]), s_out)
        which, col = np.nonzero(w)
        return which, out[which, col].astype(np.int64), w[which, col].astype(np.float64)

    def entries(self):
        s_in = self.in_shape if len(self.in_shape) == 3 else (1,) + self.in_shape
        s_out = self.out_shape if len(self.out_shape) == 3 else (1,) + self.out_shape
        M = np.asarray(self._M, dtype=np.float64)            # canonical (B, T, J')
        b, t, jj = np.nonzero(M)
        w = M[b, t, jj]
        n_free = s_out[1] if self.wrt == "left" else s_out[2]   # rows i (left) / columns j (right)
        f = np.arange(n_free)
        b, t, jj, w = (np.repeat(a, n_free) for a in (b, t, jj, w))
        f = np.tile(f, len(M[M != 0]))
        if self.wrt == "left":     # in (b, i, t) -> out (b, i, j') with weight R[b, t, j']
            cols = np.ravel_multi_index((b, f, t), s_in)
            rows = np.ravel_multi_index((b, f, jj), s_out)
        else:                      # in (b, t, j) -> out (b, i', j) with weight L[b, i', t]
            cols = np.ravel_multi_index((b, t, f), s_in)
            rows = np.ravel_multi_index((b, jj, f), s_out)
        return rows.astype(np.int64), cols.astype(np.int64), w

    def state(self):
        return {"wrt": self.wrt}, {"other": self.other}

    @classmethod
    def from_state(cls, out_shape, in_shape, params, arrays):
        return cls(out_shape, in_shape, arrays["other"], params["wrt"])


def _cpu_vendor():
    """The CPU's vendor string from /proc/cpuinfo ("GenuineIntel", "AuthenticAMD"), or ""."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


#: Which BLAS the one-thread contractions call. Measured at one thread, float32, 32-256 x
#: 512-3072 x 512-3072 (``benchmarks/blas.py``): on AMD EPYC numpy's (OpenBLAS) beat torch's
#: (MKL) by 1.0-1.8x; on Intel Xeon torch's MKL beat numpy's by 1.2-2.0x, and by 6x for a few
#: rows. So numpy's unless torch's BLAS is MKL on an Intel CPU. (From two threads on, torch's
#: always: its pool is the one the query's other parallel work uses, see gradgraph.threads.)
NUMPY_GEMM_AT_ONE_THREAD = not (torch.backends.mkl.is_available() and _cpu_vendor() == "GenuineIntel")


def _contiguous(X, out):
    """``out[...] = X`` for a (B, ., .) view ``X`` and a C-contiguous ``out``: by the tiled
    transpose when ``X`` is a transposed contiguous array (a linear layer's weight), else by numpy."""
    src = np.swapaxes(X, 1, 2)
    if src.flags.c_contiguous:
        with parallel(work=X.size):
            transpose_into(src, out)
    else:
        np.copyto(out, X)
    return out


def _no_path(shape, dtype, value):
    """A new array of "no path" values (-inf max, +inf min, 0 unsigned), filled on the query's
    threads (:func:`._elementwise.fill`)."""
    return fill(np.empty(shape, dtype), value)


def _blocks(n, threads, smallest):
    """How many blocks to split ``n`` independent items into for ``threads`` threads: one per
    thread, each of at least ``smallest`` items (a thread's share stays a long vector loop)."""
    return max(1, min(threads, n // smallest))


def _tensor(a):
    """A torch view of a numpy array (read-only arrays, e.g. loaded from a file, are only read)."""
    if not a.flags.writeable:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(a)
    return torch.from_numpy(a)


def _memory_order(X):
    """A 1-d view of array X (B, R, C) in its memory order, and the function that lays a 1-d
    array of that order out like X (a linear layer's weight is the canonical operand transposed).
    Neither orientation contiguous: a contiguous copy."""
    if X.flags.c_contiguous:
        return X.reshape(-1), lambda f: f.reshape(X.shape)
    Xt = np.swapaxes(X, 1, 2)
    if Xt.flags.c_contiguous:
        return Xt.reshape(-1), lambda f: np.swapaxes(f.reshape(Xt.shape), 1, 2)
    return np.ascontiguousarray(X).reshape(-1), lambda f: f.reshape(X.shape)


def _abs_check(flat, unflat):
    """check(A): whether the kept |W| ``A`` still equals |W| of the weight viewed by ``flat``."""
    def check(A):
        a = _memory_order(A)[0]
        if a.shape != flat.shape or a.dtype != flat.dtype or not a.size:
            return a.shape == flat.shape and a.dtype == flat.dtype
        bits = np.dtype(f"u{flat.itemsize}")
        mask = bits.type(np.iinfo(bits).max >> 1)
        with parallel(work=a.size) as threads:
            return abs_bits_equal(flat.view(bits), a.view(bits), mask, _blocks(a.size, threads, 1 << 16))
    return check


def _transform_t(M, t):
    """f(M) for a torch tensor (``t`` a :class:`WeightMap`), in its own dtype: M, |M| or -|M| log|M| (0 where M = 0)."""
    if t == WeightMap.SIGNED:
        return M
    a = M.abs()
    if t == WeightMap.ABS:
        return a
    # a log a with 0 log 0 = 0: the nan of 0 * -inf is the only non-finite value (xlogy is slower)
    return torch.log(a).mul_(a).neg_().nan_to_num_(0.0)


