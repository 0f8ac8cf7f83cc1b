"""Structured local Jacobians: the edge weights of the gradient graph, never expanded to scalars.

A :class:`Jacobian` is d(out)/d(in) of one op for one tensor argument. Its scalar edges are the
non-zero entries ``J[i, j]`` (output element ``i`` <- input element ``j``, flat C-order indices);
zero entries are not edges. Every kind offers the same small interface, which is all the semiring
engine and the exporters use:

``apply_sum(x, t, transpose)``
    (+, x) product with transformed weights ``f(w)`` (``t``: 0 ``w``, 1 ``|w|``, 2 ``-|w|log|w|``)
    on a batch ``x`` of shape (C, n). ``transpose=True`` is backward (out -> in).
``apply_entropy(x, transpose)``
    the entropy semiring's product on pairs ``x = (Z, R)``: ``(|J| Z, |J| R + H Z)`` with
    ``H = -|J| log|J|``; by default two ``apply_sum`` calls, fused where a kind can do better.
``apply_max(xmax, xmin, signed, transpose)``
    (max, x) product: unsigned on ``|w|`` (0 = no path) or signed on ``w`` with the (max, min) pair.
``out_edges(j)``
    the edges leaving input element ``j``: (output indices, weights) -- used by path recovery.
``to_dense()``
    the (out_numel, in_numel) matrix, for tests and small graphs.
``state()`` / ``from_state()``
    JSON-able parameters and named arrays, for the file format.

Kinds: :class:`SparseJacobian` (elementwise, broadcast, index maps, reductions, dense fallback),
:class:`MatmulJacobian` (mm / bmm / addmm contractions, referencing the other operand),
:class:`ConvJacobian` (convolution wrt its input, referencing the weight) and
:class:`RowBlockJacobian` (softmax, log-softmax, layer norm, stored as their factors).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from .algorithms import kernels as K

__all__ = ["Jacobian", "SparseJacobian", "MatmulJacobian", "ConvJacobian", "RowBlockJacobian",
           "JACOBIAN_KINDS"]


def _numel(shape):
    return int(math.prod(shape))


def _empty_max(n, signed):
    """"No path" outputs of a max product; the signed (max, min) pair are the two rows of one
    (2, n) buffer, which the max-signed semiring then uses as its value without a copy."""
    if signed:
        buf = np.empty((2, n))
        buf[0] = -np.inf
        buf[1] = np.inf
        return buf[0], buf[1]
    return np.zeros(n), None


class Jacobian:
    """Base class; see the module docstring for the interface."""

    kind = "abstract"
    #: True when the Jacobian is the identity (same shape, every element copied with weight 1).
    is_identity = False

    def __init__(self, out_shape, in_shape):
        self.out_shape = tuple(int(s) for s in out_shape)
        self.in_shape = tuple(int(s) for s in in_shape)

    @property
    def out_numel(self):
        return _numel(self.out_shape)

    @property
    def in_numel(self):
        return _numel(self.in_shape)

    def _dims(self, transpose):
        return (self.out_numel, self.in_numel) if transpose else (self.in_numel, self.out_numel)

    def apply_entropy(self, x, transpose):
        y = self.apply_sum(x, K.ABS, transpose)
        y[1] += self.apply_sum(x[:1], K.XLOGX, transpose)[0]
        return y

    def to_dense(self):
        D = np.zeros((self.out_numel, self.in_numel))
        for j in range(self.in_numel):
            idx, w = self.out_edges(j)
            D[idx, j] += w
        return D

    def nnz(self):
        """Number of scalar edges (non-zero entries)."""
        return int(sum(len(self.out_edges(j)[0]) for j in range(self.in_numel)))

    def __repr__(self):
        return f"{type(self).__name__}(out={self.out_shape}, in={self.in_shape})"


# ============================================================================ sparse
class SparseJacobian(Jacobian):
    """Entries ``J[rows[e], cols[e]] = vals[e]``; ``rows``/``cols`` None mean ``arange(nnz)``,
    ``vals`` None means all ones. Elementwise ops are ``rows=None`` with a broadcast ``cols``;
    reductions are ``cols=None`` with ``rows`` mapping each input to its output."""

    kind = "sparse"

    def __init__(self, out_shape, in_shape, rows=None, cols=None, vals=None):
        super().__init__(out_shape, in_shape)
        n = None
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
        self.rows, self.cols, self.vals, self.n = rows, cols, vals, n
        #: one edge j -> j per element (an elementwise op): max products need no scatter
        self.is_diagonal = bool(
            n == self.out_numel == self.in_numel
            and all(a is None or (a[0] == 0 and np.array_equal(a, np.arange(n, dtype=a.dtype)))
                    for a in (rows, cols) if a is None or len(a)))
        self.is_identity = self.is_diagonal and (vals is None or bool(np.all(vals == 1)))
        self._csc = None

    def _r(self):
        return np.arange(self.n, dtype=np.int64) if self.rows is None else self.rows

    def _c(self):
        return np.arange(self.n, dtype=np.int64) if self.cols is None else self.cols

    def _v(self):
        return np.ones(self.n) if self.vals is None else self.vals

    def nnz(self):
        return self.n

    def apply_sum(self, x, t, transpose):
        x = np.ascontiguousarray(x, dtype=np.float64)
        y = np.zeros((x.shape[0], self._dims(transpose)[1]))
        src, dst = (self._r(), self._c()) if transpose else (self._c(), self._r())
        K.coo_sum(x, src, dst, self._v(), t, y)
        return y

    def apply_entropy(self, x, transpose):
        x = np.ascontiguousarray(x, dtype=np.float64)
        if self.is_diagonal and self.vals is not None:
            y = np.empty((2, self.n))
            K.diag_entropy(x, self.vals.astype(np.float64, copy=False), y)
            return y
        y = np.zeros((2, self._dims(transpose)[1]))
        src, dst = (self._r(), self._c()) if transpose else (self._c(), self._r())
        K.coo_entropy(x, src, dst, self._v(), y)
        return y

    def apply_max(self, xmax, xmin, signed, transpose):
        if self.is_diagonal and self.vals is not None:
            buf = np.empty((2 if signed else 1, self.n))
            K.diag_max(xmax, xmax if xmin is None else xmin, self.vals, signed, buf)
            return (buf[0], buf[1]) if signed else (buf[0], None)
        ymax, ymin = _empty_max(self._dims(transpose)[1], signed)
        src, dst = (self._r(), self._c()) if transpose else (self._c(), self._r())
        if signed:
            K.coo_maxmin(xmax, xmin, src, dst, self._v(), ymax, ymin)
        else:
            K.coo_max(xmax, src, dst, self._v(), ymax)
        return ymax, ymin

    def out_edges(self, j):
        if self._csc is None:
            c = self._c()
            order = np.argsort(c, kind="stable")
            starts = np.searchsorted(c[order], np.arange(self.in_numel + 1))
            self._csc = (order, starts)
        order, starts = self._csc
        e = order[starts[j]:starts[j + 1]]
        # (path recovery calls this per visited element: no arrays of the Jacobian's size)
        rows = e if self.rows is None else self.rows[e]
        vals = np.ones(len(e)) if self.vals is None else self.vals[e]
        return rows.astype(np.int64), vals.astype(np.float64)

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
        j = cls(out_shape, in_shape, arrays.get("rows"), arrays.get("cols"), arrays.get("vals"))
        if j.n != params["n"]:
            raise ValueError("entry count does not match")
        return j


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

    def _P(self, which):
        """Contiguous M or M^T, cached: weights of a linear layer are already contiguous as M^T,
        so that costs nothing there. The axpy-form max kernels read M^T backward (M forward); the
        dot-product form reads the other one (a copy of a linear layer's weight, kept)."""
        if which not in self._cache:
            M = self._M
            self._cache[which] = np.ascontiguousarray(M if which == "M" else np.swapaxes(M, 1, 2))
        return self._cache[which]

    def _canon(self, x, shape, C):
        """View a (C, numel) batch of an in/out tensor in canonical (C, B, rows, cols) layout."""
        s3 = shape if len(shape) == 3 else (1,) + tuple(shape)
        v = x.reshape((C,) + tuple(s3))
        return v if self.wrt == "left" else np.swapaxes(v, 2, 3)

    def _uncanon(self, v, C):
        if self.wrt == "right":
            v = np.swapaxes(v, 2, 3)
        return np.ascontiguousarray(v, dtype=np.float64).reshape(C, -1)

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
        # the scan for the support also converts to the weights' dtype (float32) in passing
        conv = np.empty(a.shape if P.dtype != torch.float64 else (0, 0, 0, 0), dtype=P.numpy().dtype)
        rows, cols = K.support_rows_cols(a, conv)
        at = torch.from_numpy(conv) if conv.size else _tensor(a)
        if a.shape[1] != 1:
            rows[:] = True
        if 2 * int(cols.sum()) > cols.size and 2 * int(rows.sum()) > rows.size:
            return at.to(P.dtype), P, None
        ri = torch.from_numpy(np.flatnonzero(rows))
        ci = torch.from_numpy(np.flatnonzero(cols))
        return at[:, :, ri][..., ci].to(P.dtype), P[:, ci, :], (a.shape[:3] + (P.shape[2],), ri)

    def _product(self, at, P, where):
        """at @ P (torch.matmul: BLAS on strided operands, in the weights' own dtype -- no float64
        copy of a float32 matrix), scattered back to the full rows, as a (C, numel) float64 array.
        With one shared matrix (a weight) every channel and row goes into one (C I, K) @ (K, N)
        product, which BLAS runs faster than a batch of small ones."""
        if P.shape[0] == 1:
            # a 2-d product: numpy's BLAS call (OpenBLAS) beat torch's by 1.0-1.8x on these
            # shapes on AMD CPUs (measured 32-64 x 512-2048 x 512-2048, float32)
            C, B, I, Kc = at.shape
            y = torch.from_numpy(at.reshape(C * B * I, Kc).numpy() @ P[0].numpy()).reshape(C, B, I, P.shape[2])
        else:
            y = torch.matmul(at, P)
        if where is not None:
            shape, ri = where
            full = torch.zeros((y.shape[0],) + shape[1:], dtype=y.dtype)
            full[:, :, ri] = y
            y = full
        return self._uncanon(y.numpy().astype(np.float64, copy=False), y.shape[0])

    def apply_sum(self, x, t, transpose):
        at, P, where = self._support(x, transpose)
        return self._product(at, _transform_t(P, t), where)

    def apply_entropy(self, x, transpose):
        at, P, where = self._support(x, transpose)
        # |P| and -|P| log|P| in one vectorised pass over P's own memory (a linear layer's weight
        # is P transposed), used by two products
        Pn = P.numpy()
        flip = not Pn.flags.c_contiguous and np.swapaxes(Pn, 1, 2).flags.c_contiguous
        base = np.ascontiguousarray(np.swapaxes(Pn, 1, 2) if flip else Pn)
        A, H = np.empty_like(base), np.empty_like(base)
        K.abs_xlogx(base.reshape(-1), A.reshape(-1), H.reshape(-1))
        A, H = (np.swapaxes(A, 1, 2), np.swapaxes(H, 1, 2)) if flip else (A, H)
        y = self._product(at, torch.from_numpy(A), where)
        y[1] += self._product(at[:1], torch.from_numpy(H), where)[0]
        return y

    def apply_max(self, xmax, xmin, signed, transpose):
        shape_src, shape_dst = (self.out_shape, self.in_shape) if transpose else (self.in_shape, self.out_shape)
        P = self._P("MT" if transpose else "M")
        zero_cols = self._zero_cols(P)
        # the branch-free kernel counts zero weights as edges: it is used when few columns hold
        # zeros, which are then redone exactly
        dense = len(zero_cols) <= P.shape[2] // 8 or not signed
        # Contract only the live rows and columns of the input (entries with a path): a pass from one
        # logit reaches a vocabulary-sized product through a couple of entries. The same scan gives
        # the smallest live magnitude: float32 weights run the branch-free kernel in float32 (twice
        # the SIMD width) unless some value is below 1e-20 -- values are renormalised per tensor
        # (largest 1), and path weights are recomputed exactly in float64 afterwards.
        A = self._canon(xmax, shape_src, 1)[0]
        Amin = self._canon(xmin, shape_src, 1)[0] if signed else A
        B_, I_, T_ = A.shape
        rows = np.zeros((B_, I_), dtype=np.bool_)
        cols = np.zeros(T_, dtype=np.bool_)
        nlive, smallest = K.max_support(A, Amin, -np.inf if signed else 0.0, rows, cols)
        dt = np.float32 if dense and P.dtype == np.float32 and smallest >= 1e-20 else np.float64
        ri = np.flatnonzero(rows.any(axis=0))
        ci = np.flatnonzero(cols)
        # every remaining entry live and a long enough contraction: the dot-product kernel (twice
        # as fast, reading the other orientation of the weights)
        dot = signed and dense and nlive == B_ * len(ri) * len(ci) and len(ci) >= 128
        PT = self._P("M" if transpose else "MT") if dot else None
        if len(ci) < T_:
            A, Amin = A[:, :, ci], Amin[:, :, ci]
            if dot:
                PT = np.ascontiguousarray(PT[:, :, ci])
            else:
                P = np.ascontiguousarray(P[:, ci, :])
        if len(ri) < I_:
            A, Amin = A[:, ri], Amin[:, ri]
        A = np.ascontiguousarray(A, dtype=dt)
        ncol = P.shape[2]
        # the result: the (max, min) pair as the rows of one (2, n) buffer (see _empty_max),
        # written through its canonical (B, I, J) view
        n = _numel(shape_dst)
        buf = np.empty((2, n) if signed else (1, n))
        out = self._canon(buf, shape_dst, buf.shape[0])
        if len(ri) < I_:
            out[0] = -np.inf if signed else 0.0
            if signed:
                out[1] = np.inf
        if len(ri) == 0 or len(ci) == 0:
            return (buf[0], buf[1]) if signed else (buf[0], None)
        live = slice(None) if len(ri) == I_ else ri
        if signed:
            Amin = np.ascontiguousarray(Amin, dtype=dt)
            Ymax = np.full((B_, len(ri), ncol), -np.inf, dtype=dt)
            Ymin = np.full((B_, len(ri), ncol), np.inf, dtype=dt)
            if dot:
                K.mm_maxmin_dot(A, Amin, PT, Ymax, Ymin)
            elif dense:
                K.mm_maxmin_dense(A, Amin, P, Ymax, Ymin)
            else:
                K.mm_maxmin(A, Amin, P, Ymax, Ymin)
            if dense and len(zero_cols):
                if dot and len(ci) < T_:
                    P = np.ascontiguousarray(P[:, ci, :])
                K.mm_maxmin_cols(A, Amin, P, zero_cols, Ymax, Ymin)
            out[0][:, live] = Ymax
            out[1][:, live] = Ymin
            return buf[0], buf[1]
        Y = np.zeros((B_, len(ri), ncol), dtype=dt)
        K.mm_max_dense(A, P, Y)
        out[0][:, live] = Y
        return buf[0], None

    def _zero_cols(self, P):
        """Indices of the columns of P (B, T, N) holding a zero weight (cached per array)."""
        key = ("zero_cols", id(P))
        if key not in self._cache:
            self._cache[key] = np.flatnonzero((P == 0).any(axis=(0, 1)))
        return self._cache[key]

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

    def state(self):
        return {"wrt": self.wrt}, {"other": self.other}

    @classmethod
    def from_state(cls, out_shape, in_shape, params, arrays):
        return cls(out_shape, in_shape, arrays["other"], params["wrt"])


def _tensor(a):
    """A torch view of a numpy array (read-only arrays, e.g. loaded from a file, are only read)."""
    if not a.flags.writeable:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(a)
    return torch.from_numpy(a)


def _transform_t(M, t):
    """f(M) for a torch tensor, in its own dtype: M, |M| or -|M| log|M| (0 where M = 0)."""
    if t == K.SIGNED:
        return M
    a = M.abs()
    if t == K.ABS:
        return a
    # a log a with 0 log 0 = 0: the nan of 0 * -inf is the only non-finite value (xlogy is slower)
    return torch.log(a).mul_(a).neg_().nan_to_num_(0.0)


# ============================================================================ convolution
class ConvJacobian(Jacobian):
    """N-d convolution (1-d or 2-d) wrt its input, referencing the weight.

    The edge (n, ci, ih, iw) -> (n, co, oh, ow) has weight ``W[co, ci mod Cin/groups, kh, kw]``
    when ``ih = oh*stride - pad + kh*dilation`` (and likewise for w).
    """

    kind = "conv"

    def __init__(self, out_shape, in_shape, weight, stride, padding, dilation, groups):
        super().__init__(out_shape, in_shape)
        self.weight = weight
        self.spatial = weight.ndim - 2
        if self.spatial not in (1, 2) or len(self.in_shape) != self.spatial + 2:
            raise ValueError("ConvJacobian supports batched 1-d and 2-d convolutions")
        self.stride, self.padding, self.dilation = (tuple(int(v) for v in a) for a in (stride, padding, dilation))
        self.groups = int(groups)
        lift = (lambda t: (1,) + tuple(t)) if self.spatial == 1 else tuple
        lift0 = (lambda t: (0,) + tuple(t)) if self.spatial == 1 else tuple
        self._W = weight.reshape(weight.shape[:2] + (1,) + weight.shape[2:]) if self.spatial == 1 else weight
        self._in4 = self.in_shape[:2] + lift(self.in_shape[2:]) if self.spatial == 1 else self.in_shape
        self._out4 = self.out_shape[:2] + lift(self.out_shape[2:]) if self.spatial == 1 else self.out_shape
        self._s, self._p, self._d = lift(self.stride), lift0(self.padding), lift(self.dilation)

    def apply_sum(self, x, t, transpose):
        C = x.shape[0]
        Wt = torch.from_numpy(np.ascontiguousarray(K.transform(self._W, t)))
        src_shape = self._out4 if transpose else self._in4
        xs = torch.from_numpy(np.ascontiguousarray(x)).reshape((C * src_shape[0],) + src_shape[1:])
        if transpose:
            size = (C * self._in4[0],) + self._in4[1:]
            y = torch.nn.grad.conv2d_input(size, Wt, xs, self._s, self._p, self._d, self.groups)
        else:
            y = torch.nn.functional.conv2d(xs, Wt, None, self._s, self._p, self._d, self.groups)
        return y.reshape(C, -1).numpy()

    def apply_max(self, xmax, xmin, signed, transpose):
        src_shape, dst_shape = (self._out4, self._in4) if transpose else (self._in4, self._out4)
        n = _numel(dst_shape)
        ymax, ymin = _empty_max(n, signed)
        smax = xmax.reshape(src_shape)
        smin = (xmin if signed else xmax).reshape(src_shape)
        dmin = ymin if signed else np.zeros(1)
        K.conv_max(smax, smin, np.ascontiguousarray(self._W), np.array(self._s), np.array(self._p),
                   np.array(self._d), self.groups, transpose, signed, ymax.reshape(dst_shape),
                   dmin.reshape(dst_shape) if signed else np.zeros((1, 1, 1, 1)))
        return ymax, ymin

    def out_edges(self, j):
        N, Ci, H, Wd = self._in4
        _, Co, OH, OW = self._out4
        Co_, Cig, KH, KW = self._W.shape
        n, ci, ih, iw = np.unravel_index(j, self._in4)
        g = ci // Cig
        cl = ci % Cig
        cog = Co // self.groups
        idx, ws = [], []
        for kh in range(KH):
            num_h = ih + self._p[0] - kh * self._d[0]
            if num_h % self._s[0]:
                continue
            oh = num_h // self._s[0]
            if not 0 <= oh < OH:
                continue
            for kw in range(KW):
                num_w = iw + self._p[1] - kw * self._d[1]
                if num_w % self._s[1]:
                    continue
                ow = num_w // self._s[1]
                if not 0 <= ow < OW:
                    continue
                for co in range(g * cog, (g + 1) * cog):
                    w = float(self._W[co, cl, kh, kw])
                    if w != 0.0:
                        idx.append(np.ravel_multi_index((n, co, oh, ow), self._out4))
                        ws.append(w)
        order = np.argsort(idx, kind="stable")
        return np.asarray(idx, dtype=np.int64)[order], np.asarray(ws, dtype=np.float64)[order]

    def state(self):
        return ({"stride": list(self.stride), "padding": list(self.padding),
                 "dilation": list(self.dilation), "groups": self.groups}, {"weight": self.weight})

    @classmethod
    def from_state(cls, out_shape, in_shape, params, arrays):
        return cls(out_shape, in_shape, arrays["weight"], params["stride"], params["padding"],
                   params["dilation"], params["groups"])


# ============================================================================ row blocks
class RowBlockJacobian(Jacobian):
    """Block-diagonal Jacobians of row-wise functions, stored as their factors.

    The tensor is viewed as (outer, d, inner); each (outer, inner) pair is a row of length d.

    * ``softmax``:      J = diag(p) - p p^T                         (factor: p)
    * ``log_softmax``:  J = I - 1 p^T                               (factor: p = exp(y))
    * ``layer_norm``:   J = diag(g) s (I - 1/d - xhat xhat^T / d)   (factors: xhat, s = 1/sigma, g = gamma)

    The factors are kept in float64. ``precision`` is the float type the model computed the op in
    ("float32" for float32, float16 and bfloat16 models): the entropy product through a layer
    norm, the one product that needs a logarithm per pair of row elements, runs in it.
    """

    kind = "rowblock"
    FUNCTIONS = ("softmax", "log_softmax", "layer_norm")

    def __init__(self, shape, function, outer, d, inner, A, rstd=None, gamma=None, precision="float64"):
        super().__init__(shape, shape)
        if function not in self.FUNCTIONS:
            raise ValueError(f"unknown row-block function {function!r}")
        if precision not in ("float32", "float64"):
            raise ValueError(f"precision must be 'float32' or 'float64', not {precision!r}")
        self.precision = precision
        self.function, self.outer, self.d, self.inner = function, int(outer), int(d), int(inner)
        R = self.outer * self.inner
        self.A = np.ascontiguousarray(A, dtype=np.float64).reshape(R, self.d)
        self.rstd = np.ones(R) if rstd is None else np.ascontiguousarray(rstd, dtype=np.float64).reshape(R)
        self.gamma = np.ones(self.d) if gamma is None else np.ascontiguousarray(gamma, dtype=np.float64).reshape(self.d)
        self._code = self.FUNCTIONS.index(function)
        self._factors = None     # the factors in ``precision``, made on first use
        self._split = None       # kernels.layer_norm_split of the factors, made on first use
        self._max_factors = None  # the factors in the signed max product's dtype

    def _rows(self, x, C):
        """(C, numel) -> (C, R, d) rows, and back."""
        return x.reshape(C, self.outer, self.d, self.inner).transpose(0, 1, 3, 2).reshape(C, -1, self.d)

    def _unrows(self, v, C):
        return np.ascontiguousarray(v.reshape(C, self.outer, self.inner, self.d).transpose(0, 1, 3, 2)).reshape(C, -1)

    def apply_sum(self, x, t, transpose):
        x = np.ascontiguousarray(x, dtype=np.float64)
        C = x.shape[0]
        f = self.function
        if f == "layer_norm" and t != K.SIGNED:
            y = np.zeros_like(x)
            if self.inner == 1 and t == K.ABS:
                K.layer_norm_sum(self.A, self.rstd, self.gamma, *self._live_split(x), x, transpose, y)
            elif self.inner == 1:
                # H x is the cross term of the fused entropy product with R = 0
                for c in range(C):
                    pair = np.stack([x[c], np.zeros_like(x[c])])
                    out = np.zeros_like(pair)
                    K.layer_norm_entropy(self.A, self.rstd, self.gamma, *self._live_split(pair), pair, transpose, out)
                    y[c] = out[1]
            else:
                K.rowblock_sum(self._code, self.A, self.rstd, self.gamma, self.inner, x, t, transpose, y)
            return y
        p = self.A[None]
        v = self._rows(x, C)
        if f == "softmax":      # symmetric: transpose does not matter
            if t == K.SIGNED:
                y = p * v - p * (p * v).sum(-1, keepdims=True)
            elif t == K.ABS:
                y = (p - 2 * p * p) * v + p * (p * v).sum(-1, keepdims=True)
            else:
                L = _safe_log(p)
                pL = p * L
                full = -pL * (p * v).sum(-1, keepdims=True) - p * (pL * v).sum(-1, keepdims=True)
                diag_true = K.transform(p - p * p, K.XLOGX)
                y = full + (diag_true + 2 * p * p * L) * v
        elif f == "log_softmax":   # J[i, j] = delta_ij - p_j
            if t == K.SIGNED:
                off, diag = -p, 1 - p
            elif t == K.ABS:
                off, diag = p, 1 - p
            else:
                off, diag = K.transform(p, K.XLOGX), K.transform(1 - p, K.XLOGX)
            # J = 1 off^T + diag(diag - off)
            if transpose:
                y = off * v.sum(-1, keepdims=True) + (diag - off) * v
            else:
                y = (off * v).sum(-1, keepdims=True) + (diag - off) * v
        else:                      # layer norm, signed
            s = self.rstd[None, :, None]
            g = self.gamma[None, None, :]
            xh = p
            if transpose:
                u = g * v
                y = s * (u - u.mean(-1, keepdims=True) - xh * (u * xh).mean(-1, keepdims=True))
            else:
                y = g * s * (v - v.mean(-1, keepdims=True) - xh * (xh * v).mean(-1, keepdims=True))
        return self._unrows(y, C)

    def _live_split(self, x):
        """The rows with a non-zero input (the others contribute nothing) and the split of the
        factors (kernels.layer_norm_split: a property of the factors, made once and kept -- 6
        bytes per element, next to the factors' 8)."""
        rows = np.flatnonzero((x.reshape(x.shape[0], -1, self.d) != 0).any(axis=(0, 2)))
        if self._split is None:
            self._split = K.layer_norm_split(self.A)
        return rows, self._split

    def apply_entropy(self, x, transpose):
        if self.function != "layer_norm" or self.inner != 1:
            return super().apply_entropy(x, transpose)
        dt = np.dtype(self.precision)
        if self._factors is None:
            self._factors = tuple(a.astype(dt) for a in (self.A, self.rstd, self.gamma))
        xx = np.ascontiguousarray(x, dtype=dt)
        y = np.zeros_like(xx)
        K.layer_norm_entropy(*self._factors, *self._live_split(x), xx, transpose, y)
        return y.astype(np.float64, copy=False)

    def apply_max(self, xmax, xmin, signed, transpose):
        if self.function != "layer_norm":
            return self._lowrank_max(xmax, xmin, signed, transpose)
        if self.inner == 1 and signed and transpose:
            # a float32 model's layer norm runs in float32 (twice the SIMD width) unless some value
            # is below 1e-20, as the matmul products do: path weights are recomputed exactly
            dt = np.float64
            if self.precision == "float32":
                x3 = xmax.reshape(1, 1, -1)
                live = np.zeros((1, 1), dtype=np.bool_), np.zeros(x3.shape[2], dtype=np.bool_)
                if K.max_support(x3, xmin.reshape(1, 1, -1), -np.inf, *live)[1] >= 1e-20:
                    dt = np.float32
            if self._max_factors is None or self._max_factors[0].dtype != dt:
                self._max_factors = tuple(a.astype(dt) for a in (self.A, self.rstd, self.gamma))
            out = np.empty((2, self.out_numel), dtype=dt)
            out[0] = -np.inf
            out[1] = np.inf
            K.layer_norm_maxmin_t(*self._max_factors, np.ascontiguousarray(xmax, dtype=dt),
                                  np.ascontiguousarray(xmin, dtype=dt), out[0], out[1])
            if dt != np.float64:
                out = out.astype(np.float64)
            return out[0], out[1]
        ymax, ymin = _empty_max(self.out_numel, signed)
        K.rowblock_max(self._code, self.A, self.rstd, self.gamma, self.inner,
                       np.ascontiguousarray(xmax, dtype=np.float64),
                       np.ascontiguousarray(xmin if signed else xmax, dtype=np.float64),
                       transpose, signed, ymax, ymin if signed else np.zeros(1))
        return ymax, ymin

    def _lowrank_max(self, xmax, xmin, signed, transpose):
        """(max, x) for softmax and log-softmax in O(rows d), not O(rows d^2).

        Both are J = diag(Dg) + [a_i b_j] off the diagonal -- softmax: Dg = p(1 - p), a = -p,
        b = p; log-softmax: Dg = 1 - p, a = -1, b = p -- so the best off-diagonal term reaching
        element k is its factor times the best of the other elements' terms of its row: the
        row's best and second best suffice (a vocabulary-sized log-softmax sink stays linear).
        """
        p = self.A
        if self.function == "softmax":
            Dg, a, b = p * (1 - p), -p, p
        else:
            Dg, a, b = 1 - p, -np.ones_like(p), p
        src_f, dst_f = (a, b) if transpose else (b, a)
        rows = lambda v: self._rows(np.asarray(v, dtype=np.float64)[None], 1)[0]
        xM = rows(xmax)
        if not signed:
            s = np.where(src_f != 0, np.abs(src_f) * xM, 0.0)
            y = np.maximum(np.abs(Dg) * xM, np.abs(dst_f) * _best_of_others(s, True))
            return self._unrows(y[None], 1)[0], None
        xm = rows(xmin)
        ok = (xM != -np.inf) & (src_f != 0)
        with np.errstate(invalid="ignore"):
            u, v = src_f * xM, src_f * xm
        offmax = _best_of_others(np.where(ok, np.maximum(u, v), -np.inf), True)
        offmin = _best_of_others(np.where(ok, np.minimum(u, v), np.inf), False)
        with np.errstate(invalid="ignore"):
            u, v = dst_f * offmax, dst_f * offmin
        has = (dst_f != 0) & (offmax != -np.inf)
        ymax = np.where(has, np.maximum(u, v), -np.inf)
        ymin = np.where(has, np.minimum(u, v), np.inf)
        okd = (xM != -np.inf) & (Dg != 0)
        with np.errstate(invalid="ignore"):
            u, v = Dg * xM, Dg * xm
        ymax = np.where(okd, np.maximum(ymax, np.maximum(u, v)), ymax)
        ymin = np.where(okd, np.minimum(ymin, np.minimum(u, v)), ymin)
        return self._unrows(ymax[None], 1)[0], self._unrows(ymin[None], 1)[0]

    def out_edges(self, j):
        o, jj, tt = np.unravel_index(j, (self.outer, self.d, self.inner))
        r = o * self.inner + tt
        i = np.arange(self.d)
        delta = (i == jj).astype(np.float64)
        A = self.A[r]
        if self.function == "softmax":
            w = A * (delta - A[jj])
        elif self.function == "log_softmax":
            w = delta - A[jj]
        else:
            w = self.gamma * self.rstd[r] * (delta - 1.0 / self.d - A * A[jj] / self.d)
        idx = (o * self.d + i) * self.inner + tt
        nz = w != 0
        return idx[nz].astype(np.int64), w[nz]

    def state(self):
        arrays = {"A": self.A}
        if self.function == "layer_norm":
            arrays.update(rstd=self.rstd, gamma=self.gamma)
        return {"function": self.function, "outer": self.outer, "d": self.d, "inner": self.inner,
                "precision": self.precision}, arrays

    @classmethod
    def from_state(cls, out_shape, in_shape, params, arrays):
        return cls(out_shape, params["function"], params["outer"], params["d"], params["inner"],
                   arrays["A"], arrays.get("rstd"), arrays.get("gamma"), params.get("precision", "float64"))


def _best_of_others(s, largest):
    """(R, d) -> (R, d): at column k, the best (max or min) of row values at the other columns."""
    s2 = s if largest else -s
    r = np.arange(s.shape[0])
    i1 = np.argmax(s2, axis=1)
    b1 = s2[r, i1]
    rest = s2.copy()
    rest[r, i1] = -np.inf
    b2 = rest.max(axis=1)
    out = np.repeat(b1[:, None], s.shape[1], axis=1)
    out[r, i1] = b2
    return out if largest else -out


def _safe_log(p):
    out = np.zeros_like(p)
    nz = p > 0
    out[nz] = np.log(p[nz])
    return out


JACOBIAN_KINDS = {c.kind: c for c in (SparseJacobian, MatmulJacobian, ConvJacobian, RowBlockJacobian)}
