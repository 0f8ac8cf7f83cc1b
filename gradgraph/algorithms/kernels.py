"""numba kernels: one per (structured Jacobian kind x semiring family).

Every kernel applies a local Jacobian to a whole tensor of semiring values, in either direction:
``transpose=True`` is the backward (vector-Jacobian) direction used by Algorithm 2,
``transpose=False`` the forward direction used by inside passes (flow).

Two families cover every semiring of :mod:`gradgraph.algorithms.semirings`:

* sum kernels, (+, x) over a transformed weight ``f(w)`` with ``f`` one of
  ``w`` (real), ``|w|`` (magnitude) and ``-|w| log|w|`` (the entropy semiring's cross term);
* max kernels, (max, x): unsigned on ``|w|`` with 0 as "no path", or signed, carrying the pair
  (max, min) per element with -inf / +inf as "no path" (multiplying by a negative weight swaps them).

Values are float64 mantissas; the engine keeps a per-tensor scale, so kernels never see
under- or overflowing numbers.
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

SIGNED, ABS, XLOGX = 0, 1, 2


@njit(cache=True, inline="always")
def tw(w, t):
    """The transformed weight f(w)."""
    if t == 0:
        return w
    a = abs(w)
    if t == 1:
        return a
    if a == 0.0:
        return 0.0
    return -a * np.log(a)


def transform(w, t):
    """Vectorised :func:`tw` for numpy arrays (float64)."""
    w = np.asarray(w, dtype=np.float64)
    if t == SIGNED:
        return w
    a = np.abs(w)
    if t == ABS:
        return a
    out = np.zeros_like(a)
    nz = a > 0
    out[nz] = -a[nz] * np.log(a[nz])
    return out


# ----------------------------------------------------------------------------- sparse (COO)
@njit(cache=True)
def coo_sum(x, src, dst, w, t, y):
    """y[c, dst[e]] += f(w[e]) * x[c, src[e]]. Entries whose source values are all zero are
    skipped before f is evaluated (near a one-logit sink most of a vocabulary-sized tensor is)."""
    C = x.shape[0]
    for e in range(src.shape[0]):
        s = src[e]
        live = False
        for c in range(C):
            if x[c, s] != 0.0:
                live = True
                break
        if not live:
            continue
        f = tw(w[e], t)
        if f == 0.0:
            continue
        d = dst[e]
        for c in range(C):
            y[c, d] += f * x[c, s]


@njit(cache=True)
def coo_entropy(x, src, dst, w, y):
    """The entropy product on pairs x = (Z, R): y[0, d] += |w| Z[s], y[1, d] += |w| R[s] - |w|log|w| Z[s]
    for every entry (s -> d, w), one logarithm per live entry."""
    for e in range(src.shape[0]):
        s = src[e]
        z = x[0, s]
        r = x[1, s]
        a = abs(w[e])
        if (z == 0.0 and r == 0.0) or a == 0.0:
            continue
        d = dst[e]
        y[0, d] += a * z
        y[1, d] += a * r
        if z != 0.0 and a != 1.0:
            y[1, d] -= a * np.log(a) * z


@njit(cache=True)
def coo_max(x, src, dst, w, y):
    """y[dst[e]] = max(y[dst[e]], |w[e]| * x[src[e]])  (0 = no path)."""
    for e in range(src.shape[0]):
        v = abs(w[e]) * x[src[e]]
        if v > y[dst[e]]:
            y[dst[e]] = v


@njit(cache=True)
def coo_maxmin(xmax, xmin, src, dst, w, ymax, ymin):
    """Signed (max, x) and (min, x) at once; a negative weight swaps max and min."""
    for e in range(src.shape[0]):
        we = w[e]
        s = src[e]
        d = dst[e]
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


# ----------------------------------------------------------------------------- contraction
@njit(cache=True)
def mm_maxmin(Amax, Amin, P, Ymax, Ymin):
    """Signed (max, x)/(min, x) semiring matmul Y = A (x) P."""
    B, I, T = Amax.shape
    J = P.shape[2]
    for b in range(B):
        for i in range(I):
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


@njit(cache=True)
def max_support(Amax, Amin, dead, rows, cols):
    """Flag the rows ``rows[b, i]`` and columns ``cols[t]`` of A (B, I, T) holding a path (a value
    other than ``dead``: -inf signed, 0 unsigned); return the number of such entries and the
    smallest non-zero finite magnitude of Amax and Amin there (inf if there is none)."""
    B, I, T = Amax.shape
    m = np.inf
    n = 0
    for b in range(B):
        for i in range(I):
            for t in range(T):
                a = Amax[b, i, t]
                if a == dead:
                    continue
                rows[b, i] = True
                cols[t] = True
                n += 1
                a = abs(a)
                if 0.0 < a < m:
                    m = a
                a = abs(Amin[b, i, t])
                if 0.0 < a < m:
                    m = a
    return n, m


# ----------------------------------------------------------------------------- convolution
@njit(cache=True)
def conv_max(src_max, src_min, W, stride, pad, dil, groups, transpose, signed, dst_max, dst_min):
    """(max, x) through a 2-d convolution wrt its input.

    Arrays are (N, C, H, W). With ``transpose`` the source is the output gradient (N, Co, OH, OW)
    and the destination the input (N, Ci, H, W); otherwise the reverse.
    """
    Co, Cig, KH, KW = W.shape
    if transpose:
        N, _, OH, OW = src_max.shape
        _, Ci, H, Wd = dst_max.shape
    else:
        N, Ci, H, Wd = src_max.shape
        _, _, OH, OW = dst_max.shape
    cog = Co // groups
    for n in range(N):
        for co in range(Co):
            g = co // cog
            for oh in range(OH):
                for ow in range(OW):
                    for cl in range(Cig):
                        ci = g * Cig + cl
                        for kh in range(KH):
                            ih = oh * stride[0] - pad[0] + kh * dil[0]
                            if ih < 0 or ih >= H:
                                continue
                            for kw in range(KW):
                                iw = ow * stride[1] - pad[1] + kw * dil[1]
                                if iw < 0 or iw >= Wd:
                                    continue
                                w = W[co, cl, kh, kw]
                                if w == 0.0:
                                    continue
                                if transpose:
                                    smax = src_max[n, co, oh, ow]
                                    smin = src_min[n, co, oh, ow]
                                else:
                                    smax = src_max[n, ci, ih, iw]
                                    smin = src_min[n, ci, ih, iw]
                                if signed:
                                    if smax == -np.inf:
                                        continue
                                    if w > 0:
                                        hi = w * smax
                                        lo = w * smin
                                    else:
                                        hi = w * smin
                                        lo = w * smax
                                else:
                                    hi = abs(w) * smax
                                    lo = hi
                                if transpose:
                                    if hi > dst_max[n, ci, ih, iw]:
                                        dst_max[n, ci, ih, iw] = hi
                                    if signed and lo < dst_min[n, ci, ih, iw]:
                                        dst_min[n, ci, ih, iw] = lo
                                else:
                                    if hi > dst_max[n, co, oh, ow]:
                                        dst_max[n, co, oh, ow] = hi
                                    if signed and lo < dst_min[n, co, oh, ow]:
                                        dst_min[n, co, oh, ow] = lo


# ----------------------------------------------------------------------------- row blocks
SOFTMAX, LOG_SOFTMAX, LAYER_NORM = 0, 1, 2


@njit(cache=True, inline="always")
def rb_entry(kind, A, rs, gam, r, i, j, d):
    """d y_i / d x_j inside row r of a row-block Jacobian."""
    delta = 1.0 if i == j else 0.0
    if kind == 0:
        return A[r, i] * (delta - A[r, j])
    if kind == 1:
        return delta - A[r, j]
    return gam[i] * rs[r] * (delta - 1.0 / d - A[r, i] * A[r, j] / d)


@njit(cache=True)
def rowblock_sum(kind, A, rs, gam, inner, x, t, transpose, y):
    """y = f(J) x  (or f(J)^T x) over every row block, entries computed on the fly: O(rows d^2)."""
    R, d = A.shape
    C = x.shape[0]
    for r in range(R):
        o = r // inner
        tt = r % inner
        for i in range(d):
            for j in range(d):
                f = tw(rb_entry(kind, A, rs, gam, r, i, j, d), t)
                if f == 0.0:
                    continue
                fi = (o * d + i) * inner + tt
                fj = (o * d + j) * inner + tt
                if transpose:
                    for c in range(C):
                        y[c, fj] += f * x[c, fi]
                else:
                    for c in range(C):
                        y[c, fi] += f * x[c, fj]


@njit(cache=True)
def rowblock_max(kind, A, rs, gam, inner, xmax, xmin, transpose, signed, ymax, ymin):
    """(max, x) through every row block (signed pair or unsigned on |J|)."""
    R, d = A.shape
    for r in range(R):
        o = r // inner
        tt = r % inner
        for i in range(d):
            for j in range(d):
                w = rb_entry(kind, A, rs, gam, r, i, j, d)
                if w == 0.0:
                    continue
                fi = (o * d + i) * inner + tt
                fj = (o * d + j) * inner + tt
                if transpose:
                    s, q = fi, fj
                else:
                    s, q = fj, fi
                if signed:
                    smax = xmax[s]
                    if smax == -np.inf:
                        continue
                    smin = xmin[s]
                    if w > 0:
                        hi = w * smax
                        lo = w * smin
                    else:
                        hi = w * smin
                        lo = w * smax
                    if hi > ymax[q]:
                        ymax[q] = hi
                    if lo < ymin[q]:
                        ymin[q] = lo
                else:
                    v = abs(w) * xmax[s]
                    if v > ymax[q]:
                        ymax[q] = v


# ----------------------------------------------------------------------------- max kernels, fast paths
# Branch-free variants for the hot spots of max passes over transformers. They treat every weight as
# an edge, so callers use them only when the weights have no exact zeros. fastmath is limited to
# flags that keep +-inf (the "no path" markers) meaningful.
_FM = {"nsz", "reassoc", "contract", "arcp"}


def _minmax_intrinsic(name):
    @intrinsic
    def f(typingctx, a, b):
        def codegen(context, builder, signature, args):
            t = args[0].type
            fn = builder.module.declare_intrinsic(name, [t], ir.FunctionType(t, [t, t]))
            return builder.call(fn, args, fastmath=("nnan", "nsz"))
        return a(a, b), codegen
    return f


# max / min of two floats (never NaN) as LLVM's maxnum / minnum. ``y[j] = max(y[j], v)`` written
# with Python's max becomes a conditional (masked) store when vectorised, which is very slow on some
# CPUs; these compile to vmaxps / vminps and a plain store.
fmax = _minmax_intrinsic("llvm.maxnum")
fmin = _minmax_intrinsic("llvm.minnum")


@njit(cache=True, fastmath=_FM)
def max_finite_abs(a):
    """The largest finite |a| over a 2-d array (0 if there is none): one vectorised pass, no
    temporaries (the value arrays next to a vocabulary-sized sink hold millions of entries)."""
    m = 0.0
    for c in range(a.shape[0]):
        row = a[c]
        for k in range(row.shape[0]):
            v = abs(row[k])
            m = fmax(m, v if v < np.inf else 0.0)
    return m



@njit(cache=True, fastmath=_FM)
def maxmin_plus(a, b, out):
    """(+) of the max-signed semiring on (2, n) pairs: out = (max(a0, b0), min(a1, b1)), one pass."""
    a0, a1, b0, b1, o0, o1 = a[0], a[1], b[0], b[1], out[0], out[1]
    for k in range(a0.shape[0]):
        o0[k] = fmax(a0[k], b0[k])
    for k in range(a1.shape[0]):
        o1[k] = fmin(a1[k], b1[k])



@njit(cache=True, fastmath=_FM)
def diag_max(xmax, xmin, w, signed, out):
    """(max, x) through a diagonal Jacobian (one edge j -> j of non-zero weight w[j] per element),
    branch-free: signed, out = (max, min) of (w xmax, w xmin), -inf / +inf where no path arrives
    (xmax = -inf); unsigned, out[0] = |w| xmax (0 stays 0)."""
    if signed:
        hi, lo = out[0], out[1]
        for k in range(w.shape[0]):
            u = w[k] * xmax[k]
            v = w[k] * xmin[k]
            dead = xmax[k] == -np.inf
            hi[k] = -np.inf if dead else fmax(u, v)
            lo[k] = np.inf if dead else fmin(u, v)
    else:
        y = out[0]
        for k in range(w.shape[0]):
            y[k] = abs(w[k]) * xmax[k]

@njit(cache=True, fastmath=_FM, error_model="numpy")
def diag_entropy(x, w, y):
    """The entropy product through a diagonal Jacobian (weight w[j] on j -> j), vectorised:
    y = (|w| Z, |w| R - |w| log|w| Z) for x = (Z, R)."""
    m = abs(w[0]) if w.shape[0] else 1.0
    for k in range(w.shape[0]):
        a = abs(w[k])
        m = min(m, a)
        y[0, k] = a * x[0, k]
        y[1, k] = a * x[1, k] - a * flog(a) * x[0, k]
    if m < _TINY:                      # zero or subnormal weights: libm's log, 0 log 0 = 0
        for k in range(w.shape[0]):
            a = abs(w[k])
            if a < _TINY:
                y[1, k] = a * x[1, k] - (a * np.log(a) * x[0, k] if a > 0 else 0.0)


@njit(cache=True, fastmath=_FM, error_model="numpy")
def mm_maxmin_dense(Amax, Amin, P, Ymax, Ymin):
    """:func:`mm_maxmin` for a P without zeros, t-outer so each row of P is read once per batch.

    ``max(p amax, p amin)`` is p amax for p > 0 and p amin for p < 0 (the min likewise), which
    vectorises where a branch on the sign does not. Works in the arrays' dtype (float32 or float64).
    A zero weight would count as an edge of weight 0: callers redo the columns of P that hold
    zeros with :func:`mm_maxmin_cols`.
    """
    B, I, T = Amax.shape
    J = P.shape[2]
    for b in range(B):
        for t in range(T):
            p = P[b, t]
            for i in range(I):
                amax = Amax[b, i, t]
                if amax == -np.inf:
                    continue
                amin = Amin[b, i, t]
                ymx = Ymax[b, i]
                ymn = Ymin[b, i]
                for j in range(J):
                    u = p[j] * amax
                    v = p[j] * amin
                    ymx[j] = fmax(ymx[j], fmax(u, v))
                    ymn[j] = fmin(ymn[j], fmin(u, v))



@njit(cache=True, fastmath=_FM, error_model="numpy")
def mm_maxmin_dot(Amax, Amin, PT, Ymax, Ymin):
    """:func:`mm_maxmin_dense` in dot-product form, for an A without "no path" entries: PT is P
    transposed (B, J, T), so each output pair is a max / min reduction along contiguous rows,
    held in registers (no read-modify-write of output rows per weight row). ``Ymax`` / ``Ymin``
    come in as -inf / +inf. Zero weights count as edges here too (see mm_maxmin_dense)."""
    B, I, T = Amax.shape
    J = PT.shape[1]
    for b in range(B):
        for i in range(I):
            ax = Amax[b, i]
            an = Amin[b, i]
            for j in range(J):
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

@njit(cache=True)
def mm_maxmin_cols(Amax, Amin, P, cols, Ymax, Ymin):
    """Recompute the columns ``cols`` of a signed max product exactly (zero weights skipped)."""
    B, I, T = Amax.shape
    for j in cols:
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


@njit(cache=True, fastmath=_FM, error_model="numpy")
def mm_max_dense(A, P, Y):
    """Y[b, i, :] = max_t |P[b, t, :]| * A[b, i, t], t-outer so each row of P is read once per
    batch (a zero weight gives the candidate 0, which is "no path" here)."""
    B, I, T = A.shape
    J = P.shape[2]
    for b in range(B):
        for t in range(T):
            p = P[b, t]
            for i in range(I):
                a = A[b, i, t]
                if a == 0.0:
                    continue
                y = Y[b, i]
                for j in range(J):
                    y[j] = fmax(y[j], abs(p[j]) * a)


@njit(cache=True, fastmath=_FM, inline="always")
def _lines_maxmin(p0, q0, p1, q1, z, hi, lo):
    """(hi, lo) updated with the max / min over m of the lines p0 + q0 z and p1 + q1 z."""
    for m in range(p0.shape[0]):
        u = p0[m] + q0[m] * z
        v = p1[m] + q1[m] * z
        hi = fmax(hi, fmax(u, v))
        lo = fmin(lo, fmin(u, v))
    return hi, lo


@njit(cache=True, fastmath=_FM)
def layer_norm_maxmin_t(xh, rs, gam, xmax, xmin, ymax, ymin):
    """Signed backward (max, x) through layer-norm rows laid out contiguously (inner == 1).

    Off the diagonal w_ij = a_i (1 + xh_i xh_j) with a_i = -gamma_i s / d, so each candidate
    w_ij x_i is the line P_i + Q_i xh_j evaluated at xh_j; the diagonal adds gamma_j s x_j.
    Rows i with no path (xmax = -inf) or gamma_i = 0 (no edges) are dropped first. Each output j
    is then a max / min reduction over the lines (held in registers, no read-modify-write of the
    output row per line), its own line i = j taken with its diagonal weight. Works in the dtype of
    the arrays (float32 or float64); ``ymax`` / ``ymin`` come in as -inf / +inf.
    """
    R, d = xh.shape
    P0 = np.empty(d, xh.dtype)
    Q0 = np.empty(d, xh.dtype)
    G0 = np.empty(d, xh.dtype)
    P1 = np.empty(d, xh.dtype)
    Q1 = np.empty(d, xh.dtype)
    G1 = np.empty(d, xh.dtype)
    idx = np.empty(d, np.int64)
    for r in range(R):
        base = r * d
        n = 0
        for i in range(d):
            xm = xmax[base + i]
            if xm == -np.inf or gam[i] == 0.0:
                continue
            a = -gam[i] * rs[r] / d
            xn = xmin[base + i]
            P0[n] = a * xm
            Q0[n] = a * xh[r, i] * xm
            G0[n] = gam[i] * rs[r] * xm
            P1[n] = a * xn
            Q1[n] = a * xh[r, i] * xn
            G1[n] = gam[i] * rs[r] * xn
            idx[n] = i
            n += 1
        if n == 0:
            continue
        z = xh[r]
        m = 0                      # idx is increasing: m tracks the line of output j, if any
        for j in range(d):
            zj = z[j]
            none_hi = ymax[base + j]   # -inf / +inf in the arrays' dtype
            none_lo = ymin[base + j]
            if m < n and idx[m] == j:
                hi, lo = _lines_maxmin(P0[:m], Q0[:m], P1[:m], Q1[:m], zj, none_hi, none_lo)
                hi, lo = _lines_maxmin(P0[m + 1:n], Q0[m + 1:n], P1[m + 1:n], Q1[m + 1:n], zj, hi, lo)
                u = P0[m] + Q0[m] * zj + G0[m]
                v = P1[m] + Q1[m] * zj + G1[m]
                hi = fmax(hi, fmax(u, v))
                lo = fmin(lo, fmin(u, v))
                m += 1
            else:
                hi, lo = _lines_maxmin(P0[:n], Q0[:n], P1[:n], Q1[:n], zj, none_hi, none_lo)
            ymax[base + j] = hi
            ymin[base + j] = lo


# ----------------------------------------------------------------------------- logarithms
# A logarithm that vectorises: libm's log is a scalar call, which keeps any loop around it scalar.
# x = m 2^e with m in [sqrt(1/2), sqrt(2)) (found by integer arithmetic on the bits: adding the
# offset below carries into the exponent exactly when the mantissa is >= sqrt(2)), then
# log m = 2 atanh(s) = 2 s + s R(s^2), s = (m - 1) / (m + 1), |s| < 0.1716.
def _bitcast_intrinsic(to_int):
    @intrinsic
    def f(typingctx, a):
        w = a.bitwidth
        if to_int:
            sig, ty = (types.uint64 if w == 64 else types.uint32)(a), ir.IntType(w)
        else:
            sig, ty = (types.float64 if w == 64 else types.float32)(a), (ir.DoubleType() if w == 64 else ir.FloatType())
        return sig, lambda context, builder, signature, args: builder.bitcast(args[0], ty)
    return f


_bits = _bitcast_intrinsic(True)
_from_bits = _bitcast_intrinsic(False)
_LN2 = 0.6931471805599453
_TINY = 2.2250738585072014e-308        # the smallest normal float64
_OFF64 = 0x3FF0000000000000 - 0x3FE6A09E667F3BCD     # bits of 1.0 minus bits of sqrt(1/2)
_OFF32 = 0x3F800000 - 0x3F3504F3
# minimax coefficients of R on |s| < 0.1716 (float64: error below one ulp); float32 needs the
# Taylor terms 2/3, 2/5, 2/7, 2/9 only (truncation 2e-9 relative)
_R64 = (6.666666666666735130e-01, 3.999999999940941908e-01, 2.857142874366239149e-01,
        2.222219843214978396e-01, 1.818357216161805012e-01, 1.531383769920937332e-01,
        1.479819860511658591e-01)


def flog(x):
    """log(x) for a positive normal float32 or float64 (also used in numba code only).

    Accurate to about an ulp (float64) or 2e-7 relative (float32), and vectorisable. Zero gives a
    finite value near log of the smallest normal (so ``-u * flog(u)`` is 0 for u = 0 without a
    branch); subnormals are not handled (callers rule them out or redo them)."""
    return np.log(x)


@overload(flog, inline="always")
def _flog(x):
    if x == types.float64:
        def impl(x):
            b = _bits(x) + np.uint64(_OFF64)
            e = np.float64(np.int32(b >> np.uint64(52))) - 1023.0
            f = _from_bits((b & np.uint64(0xFFFFFFFFFFFFF)) + np.uint64(0x3FF0000000000000 - _OFF64)) - 1.0
            s = f / (2.0 + f)
            z = s * s
            R = z * (_R64[0] + z * (_R64[1] + z * (_R64[2] + z * (_R64[3] + z * (_R64[4] + z * (_R64[5] + z * _R64[6]))))))
            return e * _LN2 + (2.0 * s + s * R)
        return impl
    if x == types.float32:
        def impl(x):
            b = np.uint32(_bits(x) + np.uint32(_OFF32))
            e = np.float32(np.int32(b >> np.uint32(23))) - np.float32(127.0)
            f = _from_bits(np.uint32((b & np.uint32(0x7FFFFF)) + np.uint32(0x3F800000 - _OFF32))) - np.float32(1.0)
            s = f / (np.float32(2.0) + f)
            z = s * s
            R = z * (np.float32(2 / 3) + z * (np.float32(2 / 5) + z * (np.float32(2 / 7) + z * np.float32(2 / 9))))
            return e * np.float32(_LN2) + (np.float32(2.0) * s + s * R)
        return impl


def one_like(x):
    """1 in the float type of x (numba promotes float32 op int to float64)."""
    return 1.0


@overload(one_like, inline="always")
def _one_like(x):
    if x == types.float32:
        return lambda x: np.float32(1.0)
    return lambda x: 1.0


@njit(cache=True, fastmath={"contract", "nsz"}, error_model="numpy")
def abs_xlogx(w, a, h):
    """a = |w|, h = -|w| log|w| (0 where w = 0), elementwise on 1-d arrays of w's dtype."""
    for k in range(w.shape[0]):
        v = abs(w[k])
        a[k] = v
        h[k] = -v * flog(v)
    tiny = np.finfo(w.dtype).tiny
    for k in range(w.shape[0]):
        if a[k] < tiny:
            h[k] = -a[k] * np.log(a[k]) if a[k] > 0 else 0.0


# ----------------------------------------------------------------------------- layer norm, sums
# Off the diagonal a layer norm's J_ij = c_i u'_ij with c_i = -g_i s / d and u'_ij = 1 + xh_i xh_j
# (J_ij = g_i s (delta_ij - 1/d - xh_i xh_j / d)), so |J_ij| = alpha_i u_ij with u = |u'| symmetric
# and alpha_i = |c_i|. Products with u need no pass over the pairs: for a given j, 1 + xh_i xh_j is
# negative exactly for the xh_i beyond -1/xh_j, a prefix or suffix of the sorted row, so
#   sum_i u_ij v_i = sum_i (v_i + xh_j v_i xh_i) - 2 (the same over that prefix or suffix),
# from prefix sums of v and v xh in sorted order: O(d log d) per row instead of O(d^2).
def layer_norm_split(A):
    """For each row z of A (R, d): its sorting permutation ``order`` and, for each j, the range
    [lo_j, hi_j) of sorted positions whose 1 + z_i z_j < 0 (for z_j > 0 the z_i below -1/z_j, for
    z_j < 0 those above it). O(R d log d); int16 positions when d allows (6 bytes per element)."""
    A = np.ascontiguousarray(A, dtype=np.float64)
    idx = np.int16 if A.shape[1] < 2**15 else np.int32
    order = np.argsort(A, axis=1).astype(idx)
    lo = np.empty(A.shape, idx)
    hi = np.empty(A.shape, idx)
    _ln_bounds(A, order, lo, hi)
    return order, lo, hi


@njit(cache=True)
def _ln_bounds(A, order, lo, hi):
    """The ranges of :func:`layer_norm_split` by two pointers over each sorted row: -1/z_j grows
    with z_j on either side of 0, so the bounds only move forward."""
    R, d = A.shape
    for r in range(R):
        z = A[r]
        o = order[r]
        lo[r, :] = 0               # z_j = 0: no such i
        hi[r, :] = 0
        p = 0                      # z_j > 0 in increasing order: hi_j = #{z_i < -1/z_j}
        for t in range(d):
            j = o[t]
            if z[j] <= 0:
                continue
            th = -1.0 / z[j]
            while p < d and z[o[p]] < th:
                p += 1
            hi[r, j] = p
        p = 0                      # z_j < 0 in increasing order: lo_j = #{z_i <= -1/z_j}
        for t in range(d):
            j = o[t]
            if z[j] >= 0:
                break
            th = -1.0 / z[j]
            while p < d and z[o[p]] <= th:
                p += 1
            lo[r, j] = p
            hi[r, j] = d


@njit(cache=True)
def _ln_u_product(z, order, lo, hi, v, pv, pvz, out):
    """out[j] = sum_{i != j} |1 + z_i z_j| v_i, accumulated in float64 (pv, pvz: scratch of d + 1)."""
    d = z.shape[0]
    pv[0] = 0.0
    pvz[0] = 0.0
    for t in range(d):
        i = order[t]
        pv[t + 1] = pv[t] + v[i]
        pvz[t + 1] = pvz[t] + v[i] * z[i]
    for j in range(d):
        zj = np.float64(z[j])
        neg = (pv[hi[j]] - pv[lo[j]]) + zj * (pvz[hi[j]] - pvz[lo[j]])
        out[j] = (pv[d] + zj * pvz[d]) - 2.0 * neg - (1.0 + zj * zj) * v[j]


@njit(cache=True)
def layer_norm_sum(A, rs, gam, rows, split, x, transpose, y):
    """y += |J| x (or |J|^T x) for layer-norm rows laid out contiguously (inner == 1), by the
    sorted prefix sums above plus the diagonal with its true weight. Rows whose input is all
    zero are skipped (a backward pass from one logit reaches the last layer norms through one row):
    only ``rows`` are visited; ``split`` is :func:`layer_norm_split` of A."""
    R, d = A.shape
    C = x.shape[0]
    inv_d = 1.0 / d
    al = np.empty(d)
    v = np.empty(d)
    o = np.empty(d)
    pv = np.empty(d + 1)
    pvz = np.empty(d + 1)
    order, lo, hi = split
    for t in range(rows.shape[0]):
        r = rows[t]
        base = r * d
        s = rs[r]
        z = A[r]
        for i in range(d):
            al[i] = abs(gam[i] * s * inv_d)
        for c in range(C):
            for i in range(d):
                v[i] = al[i] * x[c, base + i] if transpose else x[c, base + i]
            _ln_u_product(z, order[r], lo[r], hi[r], v, pv, pvz, o)
            for i in range(d):
                yi = o[i] if transpose else al[i] * o[i]
                diag = abs(gam[i] * s * (1.0 - inv_d - z[i] * z[i] * inv_d))
                y[c, base + i] += yi + diag * x[c, base + i]


@njit(cache=True, fastmath=_FM, error_model="numpy")
def layer_norm_entropy(A, rs, gam, rows, split, x, transpose, y):
    """The entropy semiring's product through layer-norm rows (inner == 1), fused:
    <Z, R> -> <|J| Z, |J| R + H Z> with H = -|J| log|J| (transposed for the backward direction).

    With the notation of :func:`layer_norm_sum`, beta_i = -alpha_i log alpha_i and k = -u log u,
    H_ij = beta_i u_ij + alpha_i k_ij off the diagonal. Backward, with P = alpha Z and
    Q = alpha R + beta Z: yZ = U P, yR = U Q + K P; forward: yZ = alpha (U Z),
    yR = alpha (U R) + beta (U Z) + alpha (K Z). The U products take the sorted prefix sums
    (in float64); K has no such structure, so K P takes one sweep of the upper triangle of the
    symmetric K, one logarithm per pair (by :func:`flog`, vectorised). Works in x's dtype
    (float32 or float64; A, rs, gam, y alike). Only ``rows`` are visited (those with a non-zero
    input); ``split`` is :func:`layer_norm_split` of A. |1 + xh_i xh_j| is 0 or at
    least 2^-24, so no subnormal reaches flog. O(live rows d^2) logarithms, as any exact product
    with log|J| needs.
    """
    R, d = A.shape
    dt = x.dtype
    al = np.empty(d, dt)
    be = np.empty(d, dt)
    V0 = np.empty(d, dt)
    V1 = np.empty(d, dt)
    O0 = np.empty(d, dt)
    O1 = np.empty(d, dt)
    O2 = np.empty(d, dt)
    pv = np.empty(d + 1)
    pvz = np.empty(d + 1)
    order, lo, hi = split
    one = one_like(A[0, 0])
    nil = one - one
    inv_d = one / d
    for t in range(rows.shape[0]):
        r = rows[t]
        base = r * d
        s = rs[r]
        z = A[r]
        for i in range(d):
            ci = abs(gam[i] * s * inv_d)
            al[i] = ci
            be[i] = -ci * np.log(ci) if ci > nil else nil
            zi_, ri_ = x[0, base + i], x[1, base + i]
            V0[i] = al[i] * zi_ if transpose else zi_
            V1[i] = al[i] * ri_ + be[i] * zi_ if transpose else ri_
            O2[i] = nil
        _ln_u_product(z, order[r], lo[r], hi[r], V0, pv, pvz, O0)
        _ln_u_product(z, order[r], lo[r], hi[r], V1, pv, pvz, O1)
        for i in range(d - 1):
            n = d - i - 1
            zi = z[i]
            a0 = V0[i]
            s2 = nil
            zq = z[i + 1:]
            v0 = V0[i + 1:]
            o2 = O2[i + 1:]
            for q in range(n):
                u = abs(one + zi * zq[q])
                k = -u * flog(u)
                o2[q] += k * a0
                s2 += k * v0[q]
            O2[i] += s2
        for i in range(d):
            w = abs(gam[i] * s * (one - inv_d - z[i] * z[i] * inv_d))
            h = -w * np.log(w) if w > nil else nil
            zi_, ri_ = x[0, base + i], x[1, base + i]
            if transpose:
                yz = O0[i]
                yr = O1[i] + O2[i]
            else:
                yz = al[i] * O0[i]
                yr = al[i] * O1[i] + be[i] * O0[i] + al[i] * O2[i]
            y[0, base + i] += yz + w * zi_
            y[1, base + i] += yr + w * ri_ + h * zi_
