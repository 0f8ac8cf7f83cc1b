"""Semirings as data. Each one says how a tensor's values look, how two are combined (plus),
and how an edge's Jacobian carries them (times); the engine in :mod:`.dp` is written once.

Values are float64 arrays of shape (C, numel) -- C channels per scalar node -- kept relative to a
per-tensor scale by the engine (see :class:`.dp.Scaled`), so weights of 1e-400 stay finite.
``plus`` and ``times`` act on the arrays; the engine calls them through ``add`` and ``carry``,
which act on :class:`.dp.Scaled` values and which a semiring may override to keep more (LENGTH
keeps a channel offset).

=============  ============================================  ==========================================
name           algebra                                       channels
=============  ============================================  ==========================================
real           (R, +, x, 0, 1)                               the gradient
magnitude      (R>=0, +, x, 0, 1) on |w|                     Z = sum of |g(p)|
entropy        expectation semiring <p, r> on <|w|, -|w|log|w|>  (p, r); H = log Z + R/Z
max_abs        (R>=0, max, x, 0, 1) on |w|                   largest |g(p)|
max_signed     (R u {+-inf}, max, x) with the min alongside  (max, min); a negative w swaps them
length         polynomial semiring on |w|, x^1 per non-view hop  channel l = mass of paths of length l
=============  ============================================  ==========================================
"""
from __future__ import annotations

import math

import numpy as np

from .dp import Scaled, _accumulate, _carry
from .kernels import ABS, SIGNED, maxmin_plus

__all__ = ["Semiring", "REAL", "MAGNITUDE", "ENTROPY", "MAX_ABS", "MAX_SIGNED", "LENGTH", "SEMIRINGS"]


class Semiring:
    """A semiring over per-element channel arrays.

    Parameters
    ----------
    name : str
    channels : int
        C, the number of float64 values per scalar node (None: variable, grows along paths).
    family : {"sum", "max"}
        Which kernel family applies an edge.
    """

    def __init__(self, name, channels, family, doc=""):
        self.name, self.channels, self.family, self.__doc__ = name, channels, family, doc

    def one(self, n):
        """1-bar for n elements (the sink's seed, the sources' seed of inside passes)."""
        raise NotImplementedError

    def zero(self, n):
        raise NotImplementedError

    def plus(self, a, b):
        """a (+) b elementwise on (C, n) arrays (already at a common scale)."""
        raise NotImplementedError

    def times(self, jac, x, transpose, is_view=False):
        """Carry the values x of one end of an edge to the other end through the Jacobian."""
        raise NotImplementedError

    def carry(self, jac, x, transpose, is_view=False):
        """``times`` on a :class:`.dp.Scaled` value: the product keeps x's scale."""
        return Scaled(_carry(self, jac, x.arr, transpose, is_view), x.log_scale)

    def add(self, acc, y):
        """acc (+) y on :class:`.dp.Scaled` values (acc None: 0-bar): ``plus`` at a common scale."""
        return _accumulate(self, acc, y)

    def __repr__(self):
        return f"Semiring({self.name})"


class _Sum(Semiring):
    def __init__(self, name, t, doc):
        super().__init__(name, 1, "sum", doc)
        self.t = t

    def one(self, n):
        return np.ones((1, n))

    def zero(self, n):
        return np.zeros((1, n))

    def plus(self, a, b):
        return a + b

    def times(self, jac, x, transpose, is_view=False):
        return jac.apply_sum(x, self.t, transpose)


class _Entropy(Semiring):
    def one(self, n):
        return np.stack([np.ones(n), np.zeros(n)])

    def zero(self, n):
        return np.zeros((2, n))

    def plus(self, a, b):
        return a + b

    def times(self, jac, x, transpose, is_view=False):
        # <|w|, -|w|log|w|> (x) <p, r> = <|w| p, |w| r - |w|log|w| p>
        return jac.apply_entropy(x, transpose)


class _MaxAbs(Semiring):
    def one(self, n):
        return np.ones((1, n))

    def zero(self, n):
        return np.zeros((1, n))

    def plus(self, a, b):
        return np.maximum(a, b)

    def times(self, jac, x, transpose, is_view=False):
        if jac.is_identity:          # weight 1 (e.g. a residual add): values pass unchanged
            return x
        y, _ = jac.apply_max(np.ascontiguousarray(x[0]), None, False, transpose)
        return y[None]


class _MaxSigned(Semiring):
    def one(self, n):
        return np.ones((2, n))

    def zero(self, n):
        return np.stack([np.full(n, -np.inf), np.full(n, np.inf)])

    def plus(self, a, b):
        out = np.empty(a.shape)
        maxmin_plus(a, b, out)
        return out

    def times(self, jac, x, transpose, is_view=False):
        if jac.is_identity:          # weight 1 (e.g. a residual add): values pass unchanged
            return x
        hi, lo = jac.apply_max(np.ascontiguousarray(x[0]), np.ascontiguousarray(x[1]), True, transpose)
        pair = hi.base
        if (pair is not None and lo.base is pair and pair.shape == (2, hi.size)
                and hi.ctypes.data == pair[0].ctypes.data and lo.ctypes.data == pair[1].ctypes.data):
            return pair        # max and min are rows 0 and 1 of one buffer already
        return np.stack([hi, lo])


class _Length(Semiring):
    """Polynomials sum_l m_l x^l per element, channel l = m_l (``plus``, ``times``). The engine's
    values keep only the window of channels that can be non-zero: a :class:`.dp.Scaled` with
    ``shift`` s holds m_s, m_(s+1), ... -- a deep tensor is reached by no short path, and a full
    polynomial would carry (and multiply through every Jacobian) that many leading zero channels.
    ``carry`` adds 1 to the shift on a non-view hop (times x) and trims all-zero channels at both
    ends; ``add`` sums over the union of the two windows."""

    def one(self, n):
        return np.ones((1, n))

    def zero(self, n):
        return np.zeros((1, n))

    def plus(self, a, b):
        if a.shape[0] < b.shape[0]:
            a, b = b, a
        out = a.copy()
        out[:b.shape[0]] += b
        return out

    def times(self, jac, x, transpose, is_view=False):
        y = jac.apply_sum(x, ABS, transpose)
        if is_view:
            return y
        return np.concatenate([np.zeros((1, y.shape[1])), y])

    def carry(self, jac, x, transpose, is_view=False):
        if is_view and jac.is_identity:
            return x
        y = jac.apply_sum(x.arr, ABS, transpose)
        # a Jacobian may zero whole channels (its zero columns): keep the non-zero window
        a, b = 0, y.shape[0]
        while b > 1 and not y[b - 1].any():
            b -= 1
        while a < b - 1 and not y[a].any():
            a += 1
        if (a, b) != (0, y.shape[0]):
            y = y[a:b]
        return Scaled(y, x.log_scale, x.shift + a + (0 if is_view else 1))

    def add(self, acc, y):
        if acc is None:
            return y
        # the value with the wider window is copied (at the common scale), the other added in
        if acc.shift > y.shift or acc.shift + len(acc.arr) < y.shift + len(y.arr):
            acc, y = y, acc
        L = max(acc.log_scale, y.log_scale)
        if acc.shift <= y.shift and y.shift + len(y.arr) <= acc.shift + len(acc.arr):
            out = acc.arr * math.exp(acc.log_scale - L)
            lo = acc.shift
        else:                                   # neither window holds the other
            lo = min(acc.shift, y.shift)
            hi = max(acc.shift + len(acc.arr), y.shift + len(y.arr))
            out = np.zeros((hi - lo, acc.arr.shape[1]))
            out[acc.shift - lo:acc.shift - lo + len(acc.arr)] = acc.arr * math.exp(acc.log_scale - L)
        o = y.shift - lo
        out[o:o + len(y.arr)] += y.arr * math.exp(y.log_scale - L) if y.log_scale != L else y.arr
        return Scaled(out, L, lo)


REAL = _Sum("real", SIGNED, "(R, +, x, 0, 1): the gradient.")
MAGNITUDE = _Sum("magnitude", ABS, "(R>=0, +, x, 0, 1) on |w|: total |gradient| flow Z.")
ENTROPY = _Entropy("entropy", 2, "sum",
                   "Expectation semiring <p, r> (Eisner 2002) on <|w|, -|w| log|w|>.")
MAX_ABS = _MaxAbs("max_abs", 1, "max", "(R>=0, max, x, 0, 1) on |w|: the largest |g(p)|.")
MAX_SIGNED = _MaxSigned("max_signed", 2, "max",
                        "(R u {-inf}, max, x, -inf, 1) with its min twin: most positive g(p).")
LENGTH = _Length("length", None, "sum",
                 "Polynomial semiring: channel l holds the |g| mass of paths with l non-view hops.")

SEMIRINGS = {s.name: s for s in (REAL, MAGNITUDE, ENTROPY, MAX_ABS, MAX_SIGNED, LENGTH)}
