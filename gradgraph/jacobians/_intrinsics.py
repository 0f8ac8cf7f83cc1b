"""Low-level numba pieces shared by the kernels of every Jacobian kind.

* :class:`WeightMap` -- how a local derivative ``w`` enters a (+, x) product (``w``, ``|w|`` or
  ``-|w| log|w|``), with :func:`tw` (scalar, in kernels) and :func:`transform` (arrays);
* ``fmax`` / ``fmin``: LLVM's maxnum / minnum (branch-free max / min that vectorise);
* :func:`flog`: a logarithm computed from the float's bits that vectorises;
* :func:`max_support`: the live rows / columns of a max product's input.

Kernels receive a :class:`WeightMap` as its integer value (numba compiles one specialisation
per integer type, not per enum member).
"""
import enum

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload


class WeightMap(enum.IntEnum):
    """How a local derivative w enters a (+, x) product: the edge's value ``f(w)``."""

    SIGNED = 0     #: w (the real semiring)
    ABS = 1        #: |w| (magnitude and the other semirings on |g|)
    XLOGX = 2      #: -|w| log|w| (the entropy semiring's cross term; 0 log 0 = 0)


def weight_map(t):
    """``t`` as a :class:`WeightMap`; a clear error for anything else (never a silent default)."""
    try:
        return WeightMap(t)
    except ValueError:
        raise ValueError(f"unknown weight map {t!r}; one of {[m.name for m in WeightMap]}") from None


@njit(cache=True, inline="always")
def tw(w, t):
    """The transformed weight f(w) for ``t`` a :class:`WeightMap` value (checked by the caller)."""
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
    t = weight_map(t)
    w = np.asarray(w, dtype=np.float64)
    if t == WeightMap.SIGNED:
        return w
    a = np.abs(w)
    if t == WeightMap.ABS:
        return a
    out = np.zeros_like(a)
    nz = a > 0
    out[nz] = -a[nz] * np.log(a[nz])
    return out


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

