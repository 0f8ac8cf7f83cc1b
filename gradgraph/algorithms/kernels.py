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
from numba import njit
from numba.extending import intrinsic

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


@njit(cache=True)
def max_finite_abs(a):
    """The largest finite |a| over a 2-d array (0 if there is none): one pass, no temporaries."""
    m = 0.0
    for c in range(a.shape[0]):
        for k in range(a.shape[1]):
            v = abs(a[c, k])
            if v > m and v < np.inf:
                m = v
    return m


# ----------------------------------------------------------------------------- sparse (COO)
@njit(cache=True)
def coo_sum(x, src, dst, w, t, y):
    """y[c, dst[e]] += f(w[e]) * x[c, src[e]]."""
    C = x.shape[0]
    for e in range(src.shape[0]):
        f = tw(w[e], t)
        if f == 0.0:
            continue
        s = src[e]
        d = dst[e]
        for c in range(C):
            y[c, d] += f * x[c, s]


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


@njit(cache=True, fastmath=_FM)
def layer_norm_maxmin_t(xh, rs, gam, xmax, xmin, ymax, ymin):
    """Signed backward (max, x) through layer-norm rows laid out contiguously (inner == 1).

    Off the diagonal w_ij = a_i (1 + xh_i xh_j) with a_i = -gamma_i s / d, so each candidate
    w_ij x_i is the line P_i + Q_i xh_j evaluated at xh_j; the diagonal adds gamma_j s x_j.
    Rows i with no path (xmax = -inf) or gamma_i = 0 (no edges) are dropped first. ``ymax`` /
    ``ymin`` come in as -inf / +inf.
    """
    R, d = xh.shape
    P = np.empty((2, d))
    Q = np.empty((2, d))
    G = np.empty((2, d))
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
            P[0, n] = a * xm
            Q[0, n] = a * xh[r, i] * xm
            G[0, n] = gam[i] * rs[r] * xm
            P[1, n] = a * xn
            Q[1, n] = a * xh[r, i] * xn
            G[1, n] = gam[i] * rs[r] * xn
            idx[n] = i
            n += 1
        if n == 0:
            continue
        hi = ymax[base:base + d]          # starts at -inf / +inf (no path)
        lo = ymin[base:base + d]
        z = xh[r]
        for m in range(n):
            # all j as off-diagonal entries (a plain vectorised max-update), then the diagonal
            # entry j = idx[m] redone from its value before this m with its true weight
            jm = idx[m]
            h0 = hi[jm]
            l0 = lo[jm]
            p0, q0, p1, q1 = P[0, m], Q[0, m], P[1, m], Q[1, m]
            for k in range(d):
                u = p0 + q0 * z[k]
                v = p1 + q1 * z[k]
                hi[k] = fmax(hi[k], fmax(u, v))
                lo[k] = fmin(lo[k], fmin(u, v))
            u = p0 + q0 * z[jm] + G[0, m]
            v = p1 + q1 * z[jm] + G[1, m]
            hi[jm] = fmax(h0, fmax(u, v))
            lo[jm] = fmin(l0, fmin(u, v))


_SQRT2, _LN2 = 1.4142135623730951, 0.6931471805599453
_TINY = 2.2250738585072014e-308


@njit(cache=True, fastmath={"contract"}, error_model="numpy")
def vlog(a, out, ib):
    """out[k] = log(a[k]) for a >= 0 (float64, ``ib`` an int64 scratch of the same length).

    A vectorisable log (libm's is a scalar call): a = m 2^e with m in [sqrt(1/2), sqrt(2)), and
    log m = 2 atanh(s) = 2 s sum_k s^2k / (2k + 1), s = (m - 1) / (m + 1), |s| < 0.1716; eleven terms
    reach float64 rounding. Zeros and subnormals take libm's log. ``error_model="numpy"`` drops
    the division's zero check, which would otherwise keep the loop scalar.
    """
    n = a.shape[0]
    bits = a.view(np.int64)
    fb = ib.view(np.float64)
    for k in range(n):
        b = bits[k]
        out[k] = np.float64(np.int32((b >> 52) - 1023))   # int32: a vector conversion exists
        ib[k] = (b & 0xFFFFFFFFFFFFF) | 0x3FF0000000000000
    for k in range(n):
        m = fb[k]
        e = out[k]
        big = m > _SQRT2
        m = m * 0.5 if big else m
        e = e + 1.0 if big else e
        s = (m - 1.0) / (m + 1.0)
        z = s * s
        p = 1.0 / 21.0
        p = p * z + 1.0 / 19.0
        p = p * z + 1.0 / 17.0
        p = p * z + 1.0 / 15.0
        p = p * z + 1.0 / 13.0
        p = p * z + 1.0 / 11.0
        p = p * z + 1.0 / 9.0
        p = p * z + 1.0 / 7.0
        p = p * z + 1.0 / 5.0
        p = p * z + 1.0 / 3.0
        p = p * z + 1.0
        out[k] = e * _LN2 + 2.0 * s * p
    for k in range(n):
        if a[k] < _TINY:
            out[k] = np.log(a[k])


@njit(cache=True, fastmath=_FM, error_model="numpy")
def layer_norm_sum(A, rs, gam, x, t, transpose, y):
    """y += f(J) x (or f(J)^T x), f = |.| (t = 1) or -|.|log|.| (t = 2), for layer-norm rows laid
    out contiguously (inner == 1); J_ij = g_i s (delta_ij - 1/d - xh_i xh_j / d).

    Off the diagonal J_ij = c_i u'_ij with c_i = -g_i s / d and u'_ij = 1 + xh_i xh_j, so with
    u = |u'| (symmetric), k = -u log u (symmetric), alpha_i = |c_i|, beta_i = -|c_i| log|c_i|:

        |J_ij| = alpha_i u_ij,        -|J_ij| log|J_ij| = beta_i u_ij + alpha_i k_ij.

    Only the upper triangle of u and k is evaluated (half the logs, by :func:`vlog`), each entry
    serving (i, j) and (j, i); the diagonal is added with its true weight. Rows whose input is
    all zero are skipped (a backward pass from one logit reaches the last layer norms through one
    row). O(live rows d^2), as any exact product with |J| or log|J| must be.
    """
    R, d = A.shape
    C = x.shape[0]
    inv_d = 1.0 / d
    al = np.empty(d)
    be = np.empty(d)
    V1 = np.empty((C, d))
    V2 = np.empty((C, d))
    O1 = np.empty((C, d))
    O2 = np.empty((C, d))
    u = np.empty(d)
    k = np.empty(d)
    lg = np.empty(d)
    ib = np.empty(d, np.int64)
    for r in range(R):
        base = r * d
        live = False
        for c in range(C):
            for q in range(d):
                if x[c, base + q] != 0.0:
                    live = True
                    break
            if live:
                break
        if not live:
            continue
        s = rs[r]
        z = A[r]
        for i in range(d):
            ci = abs(gam[i] * s * inv_d)
            al[i] = ci
            be[i] = -ci * np.log(ci) if ci > 0.0 else 0.0
        # transpose: y = U (b x) + K (a x) [t=2], U (a x) [t=1]; forward: y = b (U x) + a (K x)
        for c in range(C):
            for i in range(d):
                xi = x[c, base + i]
                if transpose:
                    V1[c, i] = (be[i] if t == 2 else al[i]) * xi
                    V2[c, i] = al[i] * xi
                else:
                    V1[c, i] = xi
                    V2[c, i] = xi
                O1[c, i] = 0.0
                O2[c, i] = 0.0
        for i in range(d):
            n = d - i - 1
            if n == 0:
                continue
            zi = z[i]
            uu = u[:n]
            for q in range(n):
                uu[q] = abs(1.0 + zi * z[i + 1 + q])
            if t == 2:
                vlog(uu, lg[:n], ib[:n])
                for q in range(n):
                    k[q] = -uu[q] * lg[q] if uu[q] > 0.0 else 0.0
            for c in range(C):
                v1i = V1[c, i]
                v2i = V2[c, i]
                acc1 = 0.0
                acc2 = 0.0
                o1 = O1[c, i + 1:]
                v1 = V1[c, i + 1:]
                if t == 2:
                    o2 = O2[c, i + 1:]
                    v2 = V2[c, i + 1:]
                    for q in range(n):
                        o1[q] += uu[q] * v1i
                        o2[q] += k[q] * v2i
                        acc1 += uu[q] * v1[q]
                        acc2 += k[q] * v2[q]
                else:
                    for q in range(n):
                        o1[q] += uu[q] * v1i
                        acc1 += uu[q] * v1[q]
                O1[c, i] += acc1
                O2[c, i] += acc2
        for c in range(C):
            for i in range(d):
                if transpose:
                    yi = O1[c, i] + O2[c, i]
                elif t == 2:
                    yi = be[i] * O1[c, i] + al[i] * O2[c, i]
                else:
                    yi = al[i] * O1[c, i]
                a_i = gam[i] * s
                diag = tw(a_i * (1.0 - inv_d - z[i] * z[i] * inv_d), t)
                y[c, base + i] += yi + diag * x[c, base + i]
