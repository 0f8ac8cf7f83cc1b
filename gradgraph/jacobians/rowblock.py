"""Row-block Jacobians (softmax, log-softmax, layer norm) stored as their factors, with their
numba kernels (the layer norm's O(d log d) sums and fused entropy product)."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..threads import kernel, parallel
from ._intrinsics import _FM, _TINY, WeightMap, flog, fmax, fmin, max_support, one_like, transform, tw, weight_map
from .base import Jacobian, _empty_max, max_dtype

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





@kernel(cache=True, fastmath=_FM, error_model="numpy")
def rows_sum_product(code, signed, transpose, P, rs, gam, x, y):
    """The signed (``signed``) or magnitude product of softmax, log-softmax or layer norm
    (``code``) on rows: ``P`` (R, d) the factor (p or xhat, float32 or float64, read as
    float64), ``x`` and ``y`` (C, outer, inner, d) views with R = outer x inner rows (strided
    when the function's dimension is not the last); computed in float64 and stored in y's dtype
    (one rounding). The rows in parallel, each row's sums in one order whatever the threads:

    * softmax: J = diag(p) - p p^T; |J| = diag(p - 2 p^2) + p p^T (symmetric);
    * log-softmax: J[i, j] = delta_ij - p_j; |J| has p_j off the diagonal and 1 - p_j on it;
    * layer norm, signed only: J = s g (I - 1/d - xh xh^T / d), g on the input side transposed.
    """
    C, O, I, d = x.shape
    for r in prange(O * I):
        for c in range(C):
            xr, yr, pr = x[c, r // I, r % I], y[c, r // I, r % I], P[r]
            if code == SOFTMAX:
                t = 0.0
                for j in range(d):
                    t += np.float64(pr[j]) * xr[j]
                for j in range(d):
                    p = np.float64(pr[j])
                    if signed:
                        yr[j] = p * xr[j] - p * t
                    else:
                        yr[j] = (p - 2.0 * p * p) * xr[j] + p * t
            elif code == LOG_SOFTMAX:
                # y = J x: x_i -+ sum_j p_j x_j; y = J^T x: x_j -+ p_j sum_i x_i (|J|: +, and
                # 1 - 2p on the diagonal's x)
                t = 0.0
                for j in range(d):
                    t += xr[j] if transpose else np.float64(pr[j]) * xr[j]
                for j in range(d):
                    p = np.float64(pr[j])
                    cross = p * t if transpose else t
                    if signed:
                        yr[j] = xr[j] - cross
                    else:
                        yr[j] = cross + (1.0 - 2.0 * p) * xr[j]
            else:
                s = rs[r]
                m = 0.0
                k = 0.0
                for j in range(d):
                    u = gam[j] * xr[j] if transpose else xr[j]
                    m += u
                    k += u * np.float64(pr[j])
                m /= d
                k /= d
                for j in range(d):
                    u = gam[j] * xr[j] if transpose else xr[j]
                    v = u - m - np.float64(pr[j]) * k
                    yr[j] = s * v if transpose else gam[j] * s * v

@njit(cache=True, fastmath=_FM, inline="always")
def _lines_maxmin(p0, q0, p1, q1, z, hi, lo):
    """(hi, lo) updated with the max / min over m of the lines p0 + q0 z and p1 + q1 z."""
    for m in range(p0.shape[0]):
        u = p0[m] + q0[m] * z
        v = p1[m] + q1[m] * z
        hi = fmax(hi, fmax(u, v))
        lo = fmin(lo, fmin(u, v))
    return hi, lo


#: most pieces of a row's envelope that :func:`layer_norm_maxmin_t` walks (a few on real rows);
#: a row whose envelope has more takes the quadratic reduction over all lines
ENVELOPE_MAX = 48


@njit(cache=True)
def _envelope(p0, q0, p1, q1, sign, zlo, zhi, lines, cuts):
    """The upper envelope (``sign`` 1) or the lower one (-1) over [zlo, zhi] of the lines
    y = p + q z of two sets (line k < n of the first, n + k of the second), walked from zlo: the
    line on top there, then each time the steeper line that crosses the current one first. Writes
    the lines left to right to ``lines`` and the z from which each is on top to ``cuts``; returns
    their number, or -1 when the envelope has more pieces than ``lines`` holds or the lines are
    not finite. In float64, without fastmath (exact comparisons of values computed alike)."""
    n = p0.shape[0]
    m = 2 * n
    P = np.empty(m)
    Q = np.empty(m)
    for k in range(n):
        P[k] = np.float64(p0[k]) * sign
        Q[k] = np.float64(q0[k]) * sign
        P[n + k] = np.float64(p1[k]) * sign
        Q[n + k] = np.float64(q1[k]) * sign
    best = -np.inf
    for k in range(m):
        if not (np.isfinite(P[k]) and np.isfinite(Q[k])):
            return -1
        best = max(best, P[k] + Q[k] * zlo)
    c = -1
    cq = -np.inf
    for k in range(m):
        if P[k] + Q[k] * zlo == best and Q[k] > cq:
            c, cq = k, Q[k]
    Z = np.empty(m)
    h = 0
    z = zlo
    while c >= 0 and h < lines.shape[0]:
        lines[h] = c
        cuts[h] = z
        h += 1
        pc = P[c]
        nz = np.inf
        for k in range(m):
            zk = max((pc - P[k]) / (Q[k] - cq) if Q[k] > cq else np.inf, z)
            Z[k] = zk
            nz = min(nz, zk)
        if nz > zhi:
            return h
        nxt = -1
        nq = -np.inf
        for k in range(m):
            if Z[k] == nz and Q[k] > nq:
                nxt, nq = k, Q[k]
        c, cq, z = nxt, nq, nz
    return -1


@kernel(cache=True, fastmath=_FM)
def layer_norm_maxmin_t(xh, rs, gam, xmax, xmin, ymax, ymin):
    """Signed backward (max, x) through layer-norm rows laid out contiguously (inner == 1).

    Off the diagonal w_ij = a_i (1 + xh_i xh_j) with a_i = -gamma_i s / d, so each candidate
    w_ij x_i is the line P_i + Q_i xh_j evaluated at xh_j; the diagonal adds gamma_j s x_j.
    Rows i with no path (xmax = -inf) or gamma_i = 0 (no edges) are dropped first. Output j is
    the max / min over the lines of i != j at z = xh_j, with its own line i = j taken with its
    diagonal weight. The max of lines is their upper envelope, which on a real row has a few
    pieces over the row's range of z (:func:`_envelope`, O(d) per piece): each output reads the
    piece it lies on and its two neighbours (ties at a crossing), computed as the quadratic
    reduction computes them, so the results are the same; an output whose piece is its own line
    takes the reduction over the other lines, and a row whose envelope has more than
    :data:`ENVELOPE_MAX` pieces the reduction for every output (O(d) per output, in registers).
    O(d) per row instead of O(d^2): 1.1x faster at 512 wide, 1.4-1.6x at 768, 3.4x at 2,048 (256
    random rows, one thread; the same results to the last bit on them). Works in the dtype of
    the arrays (float32 or float64); ``ymax`` / ``ymin`` come in as -inf / +inf. The rows run in
    parallel. An exact zero weight (1 + xh_i xh_j = 0) counts as an edge of weight 0.
    """
    R, d = xh.shape
    for r in prange(R):
        P0 = np.empty(d, xh.dtype)
        Q0 = np.empty(d, xh.dtype)
        G0 = np.empty(d, xh.dtype)
        P1 = np.empty(d, xh.dtype)
        Q1 = np.empty(d, xh.dtype)
        G1 = np.empty(d, xh.dtype)
        own = np.full(d, -1, np.int64)   # output j's line, if any
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
            own[i] = n
            n += 1
        if n == 0:
            continue
        z = xh[r]
        zlo = np.inf
        zhi = -np.inf
        for j in range(d):
            zlo = min(zlo, np.float64(z[j]))
            zhi = max(zhi, np.float64(z[j]))
        lx = np.empty(ENVELOPE_MAX, np.int64)
        cx = np.empty(ENVELOPE_MAX)
        ln = np.empty(ENVELOPE_MAX, np.int64)
        cn = np.empty(ENVELOPE_MAX)
        hx = _envelope(P0[:n], Q0[:n], P1[:n], Q1[:n], 1.0, zlo, zhi, lx, cx)
        hn = _envelope(P0[:n], Q0[:n], P1[:n], Q1[:n], -1.0, zlo, zhi, ln, cn) if hx > 0 else -1
        for j in range(d):
            zj = z[j]
            m = own[j]
            hi = ymax[base + j]    # -inf / +inf in the arrays' dtype
            lo = ymin[base + j]
            reduce = hn < 0
            if not reduce:
                kx = 0
                while kx + 1 < hx and cx[kx + 1] <= zj:
                    kx += 1
                kn = 0
                while kn + 1 < hn and cn[kn + 1] <= zj:
                    kn += 1
                reduce = m >= 0 and (lx[kx] == m or lx[kx] == n + m or ln[kn] == m or ln[kn] == n + m)
            if reduce:
                if m >= 0:
                    hi, lo = _lines_maxmin(P0[:m], Q0[:m], P1[:m], Q1[:m], zj, hi, lo)
                    hi, lo = _lines_maxmin(P0[m + 1:n], Q0[m + 1:n], P1[m + 1:n], Q1[m + 1:n], zj, hi, lo)
                else:
                    hi, lo = _lines_maxmin(P0[:n], Q0[:n], P1[:n], Q1[:n], zj, hi, lo)
            else:
                for c in range(max(kx - 1, 0), min(kx + 2, hx)):
                    k = lx[c]
                    if m < 0 or (k != m and k != n + m):
                        hi = fmax(hi, P0[k] + Q0[k] * zj if k < n else P1[k - n] + Q1[k - n] * zj)
                for c in range(max(kn - 1, 0), min(kn + 2, hn)):
                    k = ln[c]
                    if m < 0 or (k != m and k != n + m):
                        lo = fmin(lo, P0[k] + Q0[k] * zj if k < n else P1[k - n] + Q1[k - n] * zj)
            if m >= 0:
                u = P0[m] + Q0[m] * zj + G0[m]
                v = P1[m] + Q1[m] * zj + G1[m]
                hi = fmax(hi, fmax(u, v))
                lo = fmin(lo, fmin(u, v))
            ymax[base + j] = hi
            ymin[base + j] = lo


@kernel(cache=True, fastmath=_FM)
def layer_norm_maxmin_f(xh, rs, gam, xmax, xmin, ymax, ymin):
    """Signed forward (max, x) through layer-norm rows laid out contiguously (inner == 1).

    Off the diagonal w_ij = c_i (1 + xh_i xh_j) with c_i = -gamma_i s / d, so the candidates
    w_ij x_j reaching output i are c_i times the lines x_j + (xh_j x_j) z at z = xh_i: the max
    and min over the lines (as :func:`layer_norm_maxmin_t`, O(d) per output in registers) times
    c_i, swapped when c_i < 0, and the diagonal w_ii x_i with its true weight. Columns j with no
    path (xmax = -inf) are dropped first; outputs with gamma_i = 0 have no edges and stay at
    -inf / +inf, as ``ymax`` / ``ymin`` come in. Works in the arrays' dtype; the rows run in
    parallel. An exact zero weight (1 + xh_i xh_j = 0) counts as an edge of weight 0.
    """
    R, d = xh.shape
    one = one_like(xh[0, 0])
    inv_d = one / d
    for r in prange(R):
        P0 = np.empty(d, xh.dtype)
        Q0 = np.empty(d, xh.dtype)
        P1 = np.empty(d, xh.dtype)
        Q1 = np.empty(d, xh.dtype)
        idx = np.empty(d, np.int64)
        base = r * d
        z = xh[r]
        n = 0
        for j in range(d):
            xm = xmax[base + j]
            if xm == -np.inf:
                continue
            xn = xmin[base + j]
            P0[n] = xm
            Q0[n] = z[j] * xm
            P1[n] = xn
            Q1[n] = z[j] * xn
            idx[n] = j
            n += 1
        if n == 0:
            continue
        s = rs[r]
        m = 0                      # idx is increasing: m tracks the column of output i, if any
        for i in range(d):
            zi = z[i]
            own = m < n and idx[m] == i
            hi = ymax[base + i]    # -inf / +inf in the arrays' dtype
            lo = ymin[base + i]
            if own:
                hi, lo = _lines_maxmin(P0[:m], Q0[:m], P1[:m], Q1[:m], zi, hi, lo)
                hi, lo = _lines_maxmin(P0[m + 1:n], Q0[m + 1:n], P1[m + 1:n], Q1[m + 1:n], zi, hi, lo)
                m += 1
            else:
                hi, lo = _lines_maxmin(P0[:n], Q0[:n], P1[:n], Q1[:n], zi, hi, lo)
            g = gam[i]
            if g == 0.0:
                continue
            c = -g * s * inv_d
            if c > 0:
                hi, lo = c * hi, c * lo
            else:
                hi, lo = c * lo, c * hi
            if own:
                w = g * s * (one - inv_d - zi * zi * inv_d)
                if w != 0.0:
                    u = w * P0[m - 1]
                    v = w * P1[m - 1]
                    hi = fmax(hi, fmax(u, v))
                    lo = fmin(lo, fmin(u, v))
            ymax[base + i] = hi
            ymin[base + i] = lo




@kernel(cache=True, fastmath=_FM, error_model="numpy")
def lowrank_maxmin(log_softmax, transpose, p, xmax, xmin, ymax, ymin):
    """Signed (max, x) through softmax (``log_softmax`` False) or log-softmax rows, O(d) per row.

    Both Jacobians are diag(D) + [a_i b_j] off the diagonal -- softmax: D = p (1 - p), a = -p,
    b = p; log-softmax: D = 1 - p, a = -1, b = p. Backward (``transpose``) the candidate of source
    m at output k is b_k (a_m x_m) (forward: a_k (b_m x_m)), so output k needs only the best and
    second best of the row's source terms (the best other than k's own), max and min alike, and
    its diagonal term. All arrays are (rows, d) in one dtype (float32 or float64); zero weights
    and "no path" sources (xmax = -inf) are no edges; rows run in parallel. Ties keep the first
    index, as ``numpy.argmax`` does."""
    R, d = p.shape
    one = one_like(p[0, 0])
    for r in prange(R):
        pr, xM, xm, yM, ym = p[r], xmax[r], xmin[r], ymax[r], ymin[r]
        best1, best2, lowest1, lowest2 = -np.inf, -np.inf, np.inf, np.inf
        kbest, klowest = -1, -1
        for m in range(d):
            if xM[m] == -np.inf:
                continue
            a = -one if log_softmax else -pr[m]
            s = a if transpose else pr[m]
            if s == 0.0:
                continue
            u = s * xM[m]
            v = s * xm[m]
            hi = max(u, v)
            lo = min(u, v)
            if hi > best1:
                best2, best1, kbest = best1, hi, m
            elif hi > best2:
                best2 = hi
            if lo < lowest1:
                lowest2, lowest1, klowest = lowest1, lo, m
            elif lo < lowest2:
                lowest2 = lo
        for k in range(d):
            offmax = best2 if k == kbest else best1
            offmin = lowest2 if k == klowest else lowest1
            a = -one if log_softmax else -pr[k]
            f = pr[k] if transpose else a
            hi = -np.inf
            lo = np.inf
            if f != 0.0 and offmax != -np.inf:
                u = f * offmax
                v = f * offmin
                hi = max(u, v)
                lo = min(u, v)
            if xM[k] != -np.inf:
                dg = one - pr[k] if log_softmax else pr[k] * (one - pr[k])
                if dg != 0.0:
                    u = dg * xM[k]
                    v = dg * xm[k]
                    hi = max(hi, max(u, v))
                    lo = min(lo, min(u, v))
            yM[k] = hi
            ym[k] = lo


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
    with parallel(work=A.size * 16):
        _ln_bounds(A, order, lo, hi)
    return order, lo, hi


@kernel(cache=True)
def _ln_bounds(A, order, lo, hi):
    """The ranges of :func:`layer_norm_split` by two pointers over each sorted row: -1/z_j grows
    with z_j on either side of 0, so the bounds only move forward. Rows in parallel."""
    R, d = A.shape
    for r in prange(R):
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
def live_rows(x):
    """Which rows of x (C, R, d) hold a non-zero entry in some channel; each row is read only up to
    its first non-zero (the rows of a dense value: one entry each)."""
    C, R, d = x.shape
    live = np.zeros(R, np.bool_)
    for r in range(R):
        for c in range(C):
            row = x[c, r]
            for k in range(d):
                if row[k] != 0.0:
                    live[r] = True
                    break
            if live[r]:
                break
    return live


@kernel(cache=True)
def layer_norm_sum(A, rs, gam, rows, split, x, transpose, y):
    """y += |J| x (or |J|^T x) for layer-norm rows laid out contiguously (inner == 1), by the
    sorted prefix sums above plus the diagonal with its true weight. Rows whose input is all
    zero are skipped (a backward pass from one logit reaches the last layer norms through one row):
    only ``rows`` are visited; ``split`` is :func:`layer_norm_split` of A. The rows run in
    parallel (each row's sums in the same order as serially)."""
    R, d = A.shape
    C = x.shape[0]
    inv_d = 1.0 / d
    order, lo, hi = split
    for t in prange(rows.shape[0]):
        al = np.empty(d)
        v = np.empty(d)
        o = np.empty(d)
        pv = np.empty(d + 1)
        pvz = np.empty(d + 1)
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


@kernel(cache=True, fastmath=_FM, error_model="numpy")
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
    input), in parallel (each row's sums in the same order as serially); ``split`` is
    :func:`layer_norm_split` of A. |1 + xh_i xh_j| is 0 or at
    least 2^-24, so no subnormal reaches flog. O(live rows d^2) logarithms, as any exact product
    with log|J| needs.
    """
    order, lo, hi = split
    for t in prange(rows.shape[0]):
        _ln_entropy_row(A, rs, gam, rows[t], order, lo, hi, x, transpose, y)


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _ln_entropy_row(A, rs, gam, r, order, lo, hi, x, transpose, y):
    """Row ``r`` of :func:`layer_norm_entropy` (a function of its own: the parallel loop calls it
    per row, and it keeps the serial kernel's vectorised loops and order of sums)."""
    d = A.shape[1]
    dt = x.dtype
    one = one_like(A[0, 0])
    nil = one - one
    inv_d = one / d
    al = np.empty(d, dt)
    be = np.empty(d, dt)
    V0 = np.empty(d, dt)
    V1 = np.empty(d, dt)
    O0 = np.empty(d, dt)
    O1 = np.empty(d, dt)
    O2 = np.empty(d, dt)
    pv = np.empty(d + 1)
    pvz = np.empty(d + 1)
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


@kernel(cache=True, fastmath=_FM, error_model="numpy")
def softmax_entropy(P, x, y):
    """The entropy semiring's product through softmax rows, fused: <Z, R> -> <|J| Z, |J| R + H Z>
    with H = -|J| log|J| (J = diag(p) - p p^T is symmetric, so either direction).

    Off the diagonal |J_ij| = p_i p_j and H_ij = -p_i p_j (L_i + L_j) with L = log p; the
    diagonal is a_i = p_i - p_i^2 with h_i = -a_i log a_i. With S1 = sum_j p_j Z_j,
    S1R = sum_j p_j R_j and S2 = sum_j p_j L_j Z_j over the whole row:

        yZ_i = p_i S1 + (a_i - p_i^2) Z_i
        yR_i = p_i S1R + (a_i - p_i^2) R_i - p_i L_i S1 - p_i S2 + 2 p_i^2 L_i Z_i + h_i Z_i

    (the full sums minus their diagonal terms, plus the true diagonal). A zero p_i (a masked
    position) has no edges: p_i L_i = 0 there. O(d) per row and two logarithms per element (by
    :func:`flog`; zero or subnormal arguments by libm), in place of the dozen float64 temporaries
    of the same formula in numpy. ``P`` (R, d), ``x`` and ``y`` (2, R, d); the rows in parallel."""
    R, d = P.shape
    for r in prange(R):
        _softmax_entropy_row(P[r], x[0, r], x[1, r], y[0, r], y[1, r])


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _softmax_entropy_row(p, z, rr, yz, yr):
    d = p.shape[0]
    L = np.empty(d)
    h = np.empty(d)
    small = 1.0
    for j in range(d):
        pj = p[j]
        a = pj - pj * pj
        L[j] = flog(pj)
        h[j] = -a * flog(a)
        small = min(small, min(pj, a))
    if small < _TINY:                      # zero or subnormal: libm's log, 0 log 0 = 0
        for j in range(d):
            pj = p[j]
            a = pj - pj * pj
            if pj < _TINY:
                L[j] = np.log(pj) if pj > 0.0 else 0.0
            if a < _TINY:
                h[j] = -a * np.log(a) if a > 0.0 else 0.0
    s1 = 0.0
    s1r = 0.0
    s2 = 0.0
    for j in range(d):
        pz = p[j] * z[j]
        s1 += pz
        s1r += p[j] * rr[j]
        s2 += pz * L[j]
    for i in range(d):
        pi = p[i]
        pp = pi * pi
        off = pi - 2.0 * pp             # a_i - p_i^2
        yz[i] += pi * s1 + off * z[i]
        yr[i] += pi * s1r + off * rr[i] - pi * L[i] * s1 - pi * s2 + 2.0 * pp * L[i] * z[i] + h[i] * z[i]


# ============================================================================ row blocks
class RowBlockJacobian(Jacobian):
    """Block-diagonal Jacobians of row-wise functions, stored as their factors.

    The tensor is viewed as (outer, d, inner); each (outer, inner) pair is a row of length d.

    * ``softmax``:      J = diag(p) - p p^T                         (factor: p)
    * ``log_softmax``:  J = I - 1 p^T                               (factor: p = exp(y))
    * ``layer_norm``:   J = diag(g) s (I - 1/d - xhat xhat^T / d)   (factors: xhat, s = 1/sigma, g = gamma)

    The factors are kept in float64, except a float32 first factor (a float32 model's softmax
    probabilities ``p`` or layer-norm ``xhat``), which is kept as given -- for a softmax the
    node's own value, so that the largest factor of an attention layer, heads x tokens^2, costs
    no memory of its own -- and widened to float64 by :attr:`A` where a product reads it
    (exactly: every float32 is a float64). ``precision`` is the float type the model computed the op in ("float32" for
    float32, float16 and bfloat16 models): the entropy product through a layer norm, the one
    product that needs a logarithm per pair of row elements, runs in it.
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
        A = np.asarray(A)
        self._A = np.ascontiguousarray(A, dtype=np.float32 if A.dtype == np.float32 else np.float64).reshape(R, self.d)
        self.rstd = np.ones(R) if rstd is None else np.ascontiguousarray(rstd, dtype=np.float64).reshape(R)
        self.gamma = np.ones(self.d) if gamma is None else np.ascontiguousarray(gamma, dtype=np.float64).reshape(self.d)
        self._code = self.FUNCTIONS.index(function)
        self._factors = None     # the factors in ``precision``, made on first use
        self._split = None       # kernels.layer_norm_split of the factors, made on first use
        self._max_factors = None  # the factors in the signed max product's dtype
        self._p_min = None        # the smallest non-zero probability (softmax rows)

    @property
    def A(self):
        """The first factor (``p`` or ``xhat``), (rows, d), in float64 as the products read it: a
        temporary widened copy when it is kept in float32."""
        return self._A.astype(np.float64, copy=False)

    def _rows(self, x, C):
        """(C, numel) -> (C, R, d) rows, and back."""
        return x.reshape(C, self.outer, self.d, self.inner).transpose(0, 1, 3, 2).reshape(C, -1, self.d)

    def _row_view(self, x):
        """(C, numel) -> a (C, outer, inner, d) view: the rows without a copy."""
        return x.reshape(x.shape[0], self.outer, self.d, self.inner).transpose(0, 1, 3, 2)

    def _unrows(self, v, C):
        return np.ascontiguousarray(v.reshape(C, self.outer, self.inner, self.d).transpose(0, 1, 3, 2)).reshape(C, -1)

    def sum_product(self, x, weight, transpose):
        # computed in float64, returned in the values' dtype (float32 values of a float32 model's
        # pass stay float32: one rounding)
        t = weight_map(weight)      # raises for anything but the three maps handled below
        if t != WeightMap.XLOGX and (self.function != "layer_norm" or t == WeightMap.SIGNED):
            x = np.ascontiguousarray(x)
            y = np.empty(x.shape, max_dtype(x))
            with parallel(work=x.size * 4):
                rows_sum_product(self._code, t == WeightMap.SIGNED, transpose, self._A, self.rstd, self.gamma,
                                 self._row_view(x), self._row_view(y))
            return y
        return self._sum_product64(x, weight, transpose).astype(max_dtype(x), copy=False)

    def _sum_product64(self, x, weight, transpose):
        t = weight_map(weight)
        x = np.ascontiguousarray(x, dtype=np.float64)
        C = x.shape[0]
        f = self.function
        if f == "layer_norm" and t != WeightMap.SIGNED:
            y = np.zeros_like(x)
            if self.inner == 1 and t == WeightMap.ABS:
                rows, split = self._live_split(x)
                with parallel(work=len(rows) * self.d * 16):
                    layer_norm_sum(self.A, self.rstd, self.gamma, rows, split, x, transpose, y)
            elif self.inner == 1:
                # H x is the cross term of the fused entropy product with R = 0
                for c in range(C):
                    pair = np.stack([x[c], np.zeros_like(x[c])])
                    out = np.zeros_like(pair)
                    rows, split = self._live_split(pair)
                    with parallel(work=len(rows) * self.d ** 2):
                        layer_norm_entropy(self.A, self.rstd, self.gamma, rows, split, pair, transpose, out)
                    y[c] = out[1]
            else:
                rowblock_sum(self._code, self.A, self.rstd, self.gamma, self.inner, x, int(t), transpose, y)
            return y
        p = self.A[None]
        v = self._rows(x, C)
        if f == "softmax":      # symmetric: transpose does not matter
            L = _safe_log(p)
            pL = p * L
            full = -pL * (p * v).sum(-1, keepdims=True) - p * (pL * v).sum(-1, keepdims=True)
            diag_true = transform(p - p * p, WeightMap.XLOGX)
            y = full + (diag_true + 2 * p * p * L) * v
        else:                  # log_softmax: J[i, j] = delta_ij - p_j, J = 1 off^T + diag(diag - off)
            off, diag = transform(p, WeightMap.XLOGX), transform(1 - p, WeightMap.XLOGX)
            if transpose:
                y = off * v.sum(-1, keepdims=True) + (diag - off) * v
            else:
                y = (off * v).sum(-1, keepdims=True) + (diag - off) * v
        return self._unrows(y, C)

    def _live_split(self, x):
        """The rows with a non-zero input (the others contribute nothing) and the split of the
        factors (kernels.layer_norm_split: a property of the factors, made once and kept -- 6
        bytes per element, next to the factors' 8)."""
        rows = np.flatnonzero(live_rows(np.ascontiguousarray(x).reshape(x.shape[0], -1, self.d)))
        if self._split is None:
            self._split = layer_norm_split(self.A)
        return rows, self._split

    def entropy_product(self, x, transpose):
        if self.function == "softmax":
            xr = np.ascontiguousarray(self._rows(np.asarray(x, dtype=np.float64), 2))
            y = np.zeros_like(xr)
            with parallel(work=xr.size * 8):
                softmax_entropy(self.A, xr, y)
            return self._unrows(y, 2).astype(max_dtype(x), copy=False)
        if self.function != "layer_norm" or self.inner != 1:
            return super().entropy_product(x, transpose)
        dt = np.dtype(self.precision)
        if self._factors is None:
            self._factors = tuple(a.astype(dt) for a in (self.A, self.rstd, self.gamma))
        xx = np.ascontiguousarray(x, dtype=dt)
        y = np.zeros_like(xx)
        rows, split = self._live_split(x)
        with parallel(work=len(rows) * self.d ** 2):
            layer_norm_entropy(*self._factors, rows, split, xx, transpose, y)
        return y.astype(np.result_type(x.dtype, dt), copy=False)

    def max_product(self, xmax, xmin, transpose):
        signed = xmin is not None
        if self.function != "layer_norm":
            return self._lowrank_max(xmax, xmin, signed, transpose)
        if self.inner == 1:
            return self._layer_norm_max(xmax, xmin, transpose)
        ymax, ymin = _empty_max(self.out_numel, signed)
        rowblock_max(self._code, self.A, self.rstd, self.gamma, self.inner,
                       np.ascontiguousarray(xmax, dtype=np.float64),
                       np.ascontiguousarray(xmin if signed else xmax, dtype=np.float64),
                       transpose, signed, ymax, ymin if signed else np.zeros(1))
        return _as_values(xmax, ymax, ymin if signed else None)

    def _layer_norm_max(self, xmax, xmin, transpose):
        """(max, x) through layer-norm rows laid out contiguously, either direction, by the line
        kernels (O(d) per output in registers): :func:`layer_norm_maxmin_t` backward,
        :func:`layer_norm_maxmin_f` forward. Unsigned (on |J|, values >= 0, 0 = no path) runs
        the signed kernel on the pair (x, x): max_i |w| x_i is the larger of max w x_i and
        -min w x_i."""
        signed = xmin is not None
        if not signed:
            xmin = xmax
        # a float32 model's layer norm runs in float32 (twice the SIMD width) unless some value
        # is below 1e-20, as the matmul products do: path weights are recomputed exactly
        dt = np.float64
        if self.precision == "float32" and xmax.dtype == np.float32:
            x3 = xmax.reshape(1, 1, -1)
            live = np.zeros((1, 1), dtype=np.bool_), np.zeros(x3.shape[2], dtype=np.bool_)
            if max_support(x3, xmin.reshape(1, 1, -1), -np.inf if signed else 0.0, *live)[1] >= 1e-20:
                dt = np.float32
        if self._max_factors is None or self._max_factors[0].dtype != dt:
            self._max_factors = tuple(a.astype(dt) for a in (self.A, self.rstd, self.gamma))
        out = np.empty((2, self.out_numel), dtype=dt)
        out[0] = -np.inf
        out[1] = np.inf
        maxmin = layer_norm_maxmin_t if transpose else layer_norm_maxmin_f
        # the backward kernel walks each row's envelope (a few pieces), the forward one all pairs
        with parallel(work=self._A.size * (16 if transpose else self.d)):
            maxmin(*self._max_factors, np.ascontiguousarray(xmax, dtype=dt),
                   np.ascontiguousarray(xmin, dtype=dt), out[0], out[1])
        if signed:
            return _as_values(xmax, out[0], out[1])
        return _as_values(xmax, np.maximum(np.maximum(out[0], -out[1]), 0.0), None)

    def _lowrank_max(self, xmax, xmin, signed, transpose):
        """(max, x) for softmax and log-softmax in O(rows d), not O(rows d^2).

        Both are J = diag(Dg) + [a_i b_j] off the diagonal -- softmax: Dg = p(1 - p), a = -p,
        b = p; log-softmax: Dg = 1 - p, a = -1, b = p -- so the best off-diagonal term reaching
        element k is its factor times the best of the other elements' terms of its row: the
        row's best and second best suffice (a vocabulary-sized log-softmax sink stays linear).
        Signed: :func:`lowrank_maxmin`, in float32 for a float32 model's rows when no value and no
        product of two probabilities can leave float32's normal range (twice the SIMD width,
        half the memory; path weights are recomputed exactly in float64 afterwards).
        """
        if signed:
            dt = np.float64
            if self.precision == "float32" and xmax.dtype == np.float32 and self._smallest_p() >= 1e-8:
                live = np.zeros((1, 1), dtype=np.bool_), np.zeros(xmax.size, dtype=np.bool_)
                if max_support(xmax.reshape(1, 1, -1), xmin.reshape(1, 1, -1), -np.inf, *live)[1] >= 1e-20:
                    dt = np.float32
            if self._max_factors is None or self._max_factors[0].dtype != dt:
                self._max_factors = (self.A.astype(dt),)
            rows = lambda v: np.ascontiguousarray(self._rows(np.asarray(v)[None], 1)[0], dtype=dt)
            y = np.empty((2,) + self._A.shape, dtype=dt)
            with parallel(work=y.size * 4):
                lowrank_maxmin(self.function == "log_softmax", transpose, self._max_factors[0],
                               rows(xmax), rows(xmin), y[0], y[1])
            y = self._unrows(y, 2)
            return _as_values(xmax, y[0], y[1])
        p = self.A
        if self.function == "softmax":
            Dg, a, b = p * (1 - p), -p, p
        else:
            Dg, a, b = 1 - p, -np.ones_like(p), p
        src_f, dst_f = (a, b) if transpose else (b, a)
        xM = self._rows(np.asarray(xmax, dtype=np.float64)[None], 1)[0]
        s = np.where(src_f != 0, np.abs(src_f) * xM, 0.0)
        y = np.maximum(np.abs(Dg) * xM, np.abs(dst_f) * _best_of_others(s, True))
        return _as_values(xmax, self._unrows(y[None], 1)[0], None)

    def _smallest_p(self):
        """The smallest non-zero probability of the rows (cached)."""
        if self._p_min is None:
            nz = self.A[self.A != 0]
            self._p_min = float(nz.min()) if nz.size else np.inf
        return self._p_min

    def entries(self):
        R, d = self.A.shape
        r, i, j = (a.reshape(-1) for a in np.meshgrid(np.arange(R), np.arange(d), np.arange(d), indexing="ij"))
        delta = (i == j).astype(np.float64)
        A = self.A
        if self.function == "softmax":
            w = A[r, i] * (delta - A[r, j])
        elif self.function == "log_softmax":
            w = delta - A[r, j]
        else:
            w = self.gamma[i] * self.rstd[r] * (delta - 1.0 / self.d - A[r, i] * A[r, j] / self.d)
        o, tt = r // self.inner, r % self.inner
        rows = (o * self.d + i) * self.inner + tt
        cols = (o * self.d + j) * self.inner + tt
        nz = w != 0
        return rows[nz].astype(np.int64), cols[nz].astype(np.int64), w[nz]

    def out_edges(self, j):
        o, jj, tt = np.unravel_index(j, (self.outer, self.d, self.inner))
        r = o * self.inner + tt
        i = np.arange(self.d)
        delta = (i == jj).astype(np.float64)
        A = self._A[r].astype(np.float64)
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
        arrays = {"A": self._A}
        if self.function == "layer_norm":
            arrays.update(rstd=self.rstd, gamma=self.gamma)
        return {"function": self.function, "outer": self.outer, "d": self.d, "inner": self.inner,
                "precision": self.precision}, arrays

    @classmethod
    def from_state(cls, out_shape, in_shape, params, arrays):
        return cls(out_shape, params["function"], params["outer"], params["d"], params["inner"],
                   arrays["A"], arrays.get("rstd"), arrays.get("gamma"), params.get("precision", "float64"))


def _as_values(x, ymax, ymin):
    """A product computed in float64 returned in the input values' dtype (float32 values of a
    float32 model's pass stay float32: one rounding)."""
    dt = max_dtype(x)
    if ymax.dtype == dt:
        return ymax, ymin
    if ymin is None:
        return ymax.astype(dt), None
    pair = np.empty((2, ymax.size), dtype=dt)       # one buffer, as the semiring keeps the pair
    pair[0], pair[1] = ymax, ymin
    return pair[0], pair[1]


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

