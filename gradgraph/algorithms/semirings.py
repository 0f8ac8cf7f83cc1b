"""Semirings as data: each states its algebra -- values, zero, one, plus, and how a local
derivative enters (its weight map and times) -- and knows nothing of Jacobian kinds; the engine in
:mod:`.dp` is written once, and products through Jacobians are dispatched by
:mod:`.products` (a kernel table per (kind, semiring), a generic product otherwise).

Values are arrays of shape (C, numel) -- C channels per scalar node. The engine holds each
tensor's values as a :class:`.dp.Scaled` and touches them only through the semiring:
``seed`` (1-bar at a sink or source), ``normalize`` (a semiring whose values scale -- plus and
times commute with multiplying by c > 0 -- keeps them relative to a per-tensor scale, so weights
of 1e-400 stay finite; log-space semirings set ``scalable = False``), ``carry`` across an edge and
``add`` into a node. A semiring may hold more than the array and the scale: LENGTH's values are
:class:`Polynomial` (a channel offset).

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

from ..jacobians import JACOBIAN_KINDS, WeightMap
from ..jacobians._elementwise import add
from .dp import Scaled, _rescaled
from .kernels import maxmin_plus
from .products import product, register_product

__all__ = ["Semiring", "Polynomial", "REAL", "MAGNITUDE", "ENTROPY", "MAX_ABS", "MAX_SIGNED", "LENGTH",
           "SEMIRINGS"]


class Semiring:
    """A semiring over per-element channel arrays.

    A subclass states the algebra:

    * ``one(n)``, ``zero(n)``: (C, n) arrays of 1-bar and 0-bar;
    * ``plus(a, b)``: a (+) b elementwise on (C, n) arrays (already at a common scale);
    * ``weight(w)``: how the local derivatives ``w`` (float64, shape (m,)) enter, as edge values
      of shape (C_w, m); ``weight(1)`` must be 1-bar (an identity Jacobian passes values unchanged);
    * ``times(wv, x)``: edge values (C_w, m) (x) node values (C, m), elementwise.

    ``weight`` and ``times`` define the generic product through any Jacobian kind
    (:func:`.products.generic_product`); faster kernels are registered per kind in
    :mod:`.products`. ``scalable``: plus and times commute with multiplying every value by c > 0,
    so the engine may keep values relative to a per-tensor scale (False for log-space values).

    Parameters
    ----------
    name : str
    channels : int or None
        C, the number of values per scalar node (None: variable, grows along paths).
    """

    scalable = True
    #: Whether a pass's large elementwise work (the (+), the rescaling, index-map copies) runs on
    #: torch's pool (:mod:`gradgraph.jacobians._elementwise`): yes where the products are torch's
    #: (BLAS), no where they are numba kernels (the max semirings) -- torch's OpenMP workers spin
    #: for milliseconds after each op, and a numba parallel region started meanwhile shares its
    #: second core with them (docs/benchmarks.md, "Thread pools").
    torch_elementwise = True

    def __init__(self, name, channels, doc=""):
        self.name, self.channels = name, channels
        if doc:
            self.__doc__ = doc

    # ---------------------------------------------------------------- the algebra
    def one(self, n):
        """1-bar for n elements (the sink's seed, the sources' seed of inside passes)."""
        raise NotImplementedError

    def zero(self, n):
        raise NotImplementedError

    def plus(self, a, b):
        """a (+) b elementwise on (C, n) arrays (already at a common scale)."""
        raise NotImplementedError

    def weight(self, w):
        """Edge values (C_w, m) of local derivatives ``w`` (m,); not defined: no generic product."""
        raise NotImplementedError

    def times(self, wv, x):
        """Edge values (C_w, m) (x) node values (C, m), elementwise."""
        raise NotImplementedError

    @property
    def has_generic_form(self):
        """Whether ``weight`` and ``times`` are defined (the generic product applies)."""
        return type(self).weight is not Semiring.weight and type(self).times is not Semiring.times

    # ---------------------------------------------------------------- what the engine calls
    def seed(self, n):
        """The value 1-bar of n elements, as the engine holds it."""
        return Scaled(self.one(n))

    def normalize(self, value):
        """Rescale a complete tensor's value in place when the values scale (see ``scalable``)."""
        return value.normalize() if self.scalable else value

    def carry(self, jac, x, transpose, is_view=False):
        """The values ``x`` (a :class:`.dp.Scaled`) carried across an edge with Jacobian ``jac``;
        ``is_view``: the edge's consumer is pure data movement. The product keeps x's scale. An
        identity Jacobian (a reshape, a residual add) passes the values unchanged -- its weight 1
        is 1-bar -- so nothing is computed and the array is shared (the engine never writes into
        value arrays)."""
        if jac.is_identity:
            return x
        y = product(self, jac, x.arr, transpose)
        # a product's result is a new array (the contract of the kernels): the engine may add the
        # node's other contributions into it -- unless a kernel handed back its input
        return Scaled(y, x.log_scale, owned=not np.may_share_memory(y, x.arr))

    def plus_into(self, a, b):
        """a (+) b, allowed to overwrite ``a`` (an array no one else holds); by default ``plus``.
        Semirings whose (+) is elementwise arithmetic write into ``a``: a node reached by several
        edges then costs no new array per edge (the vocabulary-sized values near a sink)."""
        return self.plus(a, b)

    def add(self, acc, y):
        """acc (+) y on :class:`.dp.Scaled` values (acc None: 0-bar): ``plus`` at a common scale,
        into the array of whichever side the engine owns (see :class:`.dp.Scaled`)."""
        if acc is None:
            return y
        L = max(acc.log_scale, y.log_scale)
        # _rescaled: a factor that underflows keeps a max semiring's "no path" (+-inf) from NaN
        a, b = _rescaled(acc.arr, acc.log_scale - L), _rescaled(y.arr, y.log_scale - L)
        if not acc.owned and y.owned:
            a, b = b, a                      # (+) is commutative: add into y's array
        if ((acc.owned or y.owned) and a.shape == b.shape and a.flags.writeable
                and a.dtype == np.result_type(a.dtype, b.dtype)):
            return Scaled(self.plus_into(a, b), L, owned=True)
        return Scaled(self.plus(a, b), L)

    def __repr__(self):
        return f"Semiring({self.name})"


class _Sum(Semiring):
    """(+, x) on the weights mapped by a :class:`~gradgraph.jacobians.WeightMap`."""

    def __init__(self, name, weight_map, doc):
        super().__init__(name, 1, doc)
        self.weight_map = WeightMap(weight_map)

    def one(self, n):
        return np.ones((1, n))

    def zero(self, n):
        return np.zeros((1, n))

    def plus(self, a, b):
        return add(a, b)

    def plus_into(self, a, b):
        return add(a, b, out=a)

    def weight(self, w):
        w = np.asarray(w, dtype=np.float64)
        return (w if self.weight_map == WeightMap.SIGNED else np.abs(w))[None]

    def times(self, wv, x):
        return wv * x


class _Entropy(Semiring):
    """<p, r> pairs; an edge is <|w|, -|w| log|w|>; <p1, r1> (x) <p2, r2> = <p1 p2, p1 r2 + p2 r1>."""

    def one(self, n):
        return np.stack([np.ones(n), np.zeros(n)])

    def zero(self, n):
        return np.zeros((2, n))

    def plus(self, a, b):
        return add(a, b)

    def plus_into(self, a, b):
        return add(a, b, out=a)

    def weight(self, w):
        a = np.abs(np.asarray(w, dtype=np.float64))
        with np.errstate(divide="ignore", invalid="ignore"):
            h = np.where(a > 0, -a * np.log(np.where(a > 0, a, 1.0)), 0.0)
        return np.stack([a, h])

    def times(self, wv, x):
        return np.stack([wv[0] * x[0], wv[0] * x[1] + wv[1] * x[0]])


class _MaxAbs(Semiring):
    def one(self, n):
        return np.ones((1, n))

    torch_elementwise = False

    def zero(self, n):
        return np.zeros((1, n))

    def plus(self, a, b):
        return np.maximum(a, b)

    def plus_into(self, a, b):
        return np.maximum(a, b, out=a)

    def weight(self, w):
        return np.abs(np.asarray(w, dtype=np.float64))[None]

    def times(self, wv, x):
        return wv * x


class _MaxSigned(Semiring):
    """(max, min) pairs of signed products; -inf / +inf is "no path"; a negative weight swaps them."""

    torch_elementwise = False

    def one(self, n):
        return np.ones((2, n))

    def zero(self, n):
        return np.stack([np.full(n, -np.inf), np.full(n, np.inf)])

    def plus(self, a, b):
        dt = np.result_type(a.dtype, b.dtype)      # a float32 pass meeting a float64 product: float64
        out = np.empty(a.shape, dtype=dt)
        maxmin_plus(a.astype(dt, copy=False), b.astype(dt, copy=False), out)
        return out

    def plus_into(self, a, b):
        maxmin_plus(a, b.astype(a.dtype, copy=False), a)   # elementwise: the output may be an input
        return a


    def weight(self, w):
        return np.asarray(w, dtype=np.float64)[None]

    def times(self, wv, x):
        w = wv[0]
        with np.errstate(invalid="ignore"):
            u, v = w * x[0], w * x[1]
        dead = x[0] == -np.inf
        return np.stack([np.where(dead, -np.inf, np.maximum(u, v)), np.where(dead, np.inf, np.minimum(u, v))])


class Polynomial(Scaled):
    """A LENGTH value: channel c holds the coefficient of x^(c + shift), times exp(log_scale)."""

    __slots__ = ("shift",)

    def __init__(self, arr, log_scale=0.0, shift=0):
        super().__init__(arr, log_scale)
        self.shift = shift


class _Length(Semiring):
    """Polynomials sum_l m_l x^l per element, channel l = m_l. An edge is |w| x on a hop into a
    non-view node and |w| into a view (the weight map is |w| on every channel; the power of x is
    the hop's). The values keep only the window of channels that can be non-zero: a
    :class:`Polynomial` with ``shift`` s holds m_s, m_(s+1), ... -- a deep tensor is reached by no
    short path, and a full polynomial would carry (and multiply through every Jacobian) that many
    leading zero channels. ``carry`` adds 1 to the shift on a non-view hop (times x) and trims
    all-zero channels at both ends; ``add`` sums over the union of the two windows."""

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

    def weight(self, w):
        return np.abs(np.asarray(w, dtype=np.float64))[None]

    def times(self, wv, x):
        return wv * x

    def seed(self, n):
        return Polynomial(self.one(n))

    def carry(self, jac, x, transpose, is_view=False):
        if is_view and jac.is_identity:
            return x
        y = product(self, jac, x.arr, transpose)
        # a Jacobian may zero whole channels (its zero columns): keep the non-zero window
        a, b = 0, y.shape[0]
        while b > 1 and not y[b - 1].any():
            b -= 1
        while a < b - 1 and not y[a].any():
            a += 1
        if (a, b) != (0, y.shape[0]):
            y = y[a:b]
        return Polynomial(y, x.log_scale, x.shift + a + (0 if is_view else 1))

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
        return Polynomial(out, L, lo)


REAL = _Sum("real", WeightMap.SIGNED, "(R, +, x, 0, 1): the gradient.")
MAGNITUDE = _Sum("magnitude", WeightMap.ABS, "(R>=0, +, x, 0, 1) on |w|: total |gradient| flow Z.")
ENTROPY = _Entropy("entropy", 2, "Expectation semiring <p, r> (Eisner 2002) on <|w|, -|w| log|w|>.")
MAX_ABS = _MaxAbs("max_abs", 1, "(R>=0, max, x, 0, 1) on |w|: the largest |g(p)|.")
MAX_SIGNED = _MaxSigned("max_signed", 2, "(R u {-inf}, max, x, -inf, 1) with its min twin: most positive g(p).")
LENGTH = _Length("length", None,
                 "Polynomial semiring: channel l holds the |g| mass of paths with l non-view hops.")

SEMIRINGS = {s.name: s for s in (REAL, MAGNITUDE, ENTROPY, MAX_ABS, MAX_SIGNED, LENGTH)}


# ============================================================================ the kernel table
# Each built-in semiring runs on every built-in kind through one of the kinds' product families.
def _sum_kernel(weight):
    return lambda jac, x, transpose: jac.sum_product(x, weight, transpose)


def _entropy_kernel(jac, x, transpose):
    return jac.entropy_product(x, transpose)


def _max_abs_kernel(jac, x, transpose):
    y, _ = jac.max_product(np.ascontiguousarray(x[0]), None, transpose)
    return y[None]


def _max_signed_kernel(jac, x, transpose):
    hi, lo = jac.max_product(np.ascontiguousarray(x[0]), np.ascontiguousarray(x[1]), transpose)
    pair = hi.base
    if (pair is not None and lo.base is pair and pair.shape == (2, hi.size)
            and hi.ctypes.data == pair[0].ctypes.data and lo.ctypes.data == pair[1].ctypes.data):
        return pair        # max and min are rows 0 and 1 of one buffer already
    return np.stack([hi, lo])


for _kind in JACOBIAN_KINDS.values():
    register_product(_kind, REAL, _sum_kernel(WeightMap.SIGNED))
    register_product(_kind, MAGNITUDE, _sum_kernel(WeightMap.ABS))
    register_product(_kind, LENGTH, _sum_kernel(WeightMap.ABS))
    register_product(_kind, ENTROPY, _entropy_kernel)
    register_product(_kind, MAX_ABS, _max_abs_kernel)
    register_product(_kind, MAX_SIGNED, _max_signed_kernel)
