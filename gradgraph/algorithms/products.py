"""Semiring products through a Jacobian: a (kind x semiring) table of fast kernels, and a generic
product built from the semiring's definition and the kind's non-zero entries.

``product(sr, jac, x, transpose)`` carries the values ``x`` (an array of shape (C, n)) of one end of
an edge to the other end (``transpose=True``: from the op's output to its input, backward).
Lookup:

1. the table: a fast kernel registered for (the Jacobian's kind or a base class of it, ``sr``)
   with :func:`register_product` -- the library registers one per built-in semiring and kind, each
   a call of the kind's structured product family (``sum_product`` with the semiring's
   :class:`~gradgraph.jacobians.WeightMap`, ``entropy_product`` or ``max_product``);
2. otherwise :func:`generic_product`: every scalar edge ``(i <- j, w)`` of ``jac.entries()``
   contributes ``sr.times(sr.weight(w), x[:, j])`` to output ``i``, combined with ``sr.plus``. A
   new semiring therefore runs on every kind, and a new kind in every semiring, with no kernel
   written; fast kernels are added only where they pay;
3. a semiring that defines no ``weight`` (no generic form) on a pair without a kernel raises
   :class:`UnsupportedProductError`. No pair ever falls through to another semiring's kernel.
"""
from __future__ import annotations

import numpy as np

from ..errors import GradGraphError

__all__ = ["product", "generic_product", "register_product", "lookup_product", "UnsupportedProductError"]


class UnsupportedProductError(GradGraphError, NotImplementedError):
    """A semiring without a generic definition met a Jacobian kind it has no kernel for."""


_TABLE: dict = {}


class _Registration:
    """Handle of one table entry; ``remove()`` (or leaving a ``with`` block) restores the entry it
    replaced."""

    def __init__(self, key, previous):
        self.key, self.previous, self.active = key, previous, True

    def remove(self):
        if self.active:
            if self.previous is None:
                _TABLE.pop(self.key, None)
            else:
                _TABLE[self.key] = self.previous
            self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def register_product(kind, semiring, kernel):
    """Register ``kernel(jac, x, transpose) -> array`` as the product of ``semiring`` through
    Jacobians of class ``kind`` (and its subclasses without an entry of their own).

    The kernel returns a new array (or a view of one it made), never an array someone else holds
    -- such as a cached one: the engine adds the other contributions to the same node into it.
    Returning its input ``x`` itself is allowed (the engine checks for that).

    Returns a handle whose ``remove()`` undoes the registration (also a context manager)."""
    key = (kind, semiring)
    previous = _TABLE.get(key)
    _TABLE[key] = kernel
    return _Registration(key, previous)


def lookup_product(kind, semiring):
    """The registered kernel for a Jacobian class and a semiring (walking the class's bases), or
    None when the generic product applies."""
    for cls in kind.__mro__:
        fn = _TABLE.get((cls, semiring))
        if fn is not None:
            return fn
    return None


def product(sr, jac, x, transpose):
    """``sr``'s product of the values ``x`` (C, n) through ``jac`` (see the module docstring)."""
    fn = lookup_product(type(jac), sr)
    if fn is not None:
        return fn(jac, x, transpose)
    return generic_product(sr, jac, x, transpose)


def generic_product(sr, jac, x, transpose):
    """The product from the semiring's definition alone, over the Jacobian's non-zero entries.

    For every entry ``J[i, j] = w`` (a scalar edge ``j -> i`` forward): the destination receives
    ``sr.times(sr.weight(w), x[:, source])``; each destination's contributions are combined with
    ``sr.plus`` (pairwise, in a balanced tree over the entries sorted by destination);
    destinations without an entry get ``sr.zero``. Cost O(nnz log(max in-degree)) numpy work:
    meant for semirings and kinds without a kernel, and for checking kernels."""
    if not getattr(sr, "has_generic_form", False):
        raise UnsupportedProductError(
            f"no product kernel for semiring {sr.name!r} on {type(jac).__name__}, and the semiring "
            f"defines no weight map for the generic product; define {type(sr).__name__}.weight and "
            f".times, or register a kernel with gradgraph.algorithms.products.register_product")
    rows, cols, vals = jac.entries()
    src, dst = (rows, cols) if transpose else (cols, rows)
    n_dst = jac.in_numel if transpose else jac.out_numel
    x = np.asarray(x)
    y = np.array(sr.zero(n_dst), dtype=np.result_type(x.dtype, np.float64))
    if y.shape[0] != x.shape[0]:          # zero() of a variable-width semiring: one channel
        y = np.repeat(y[:1], x.shape[0], axis=0)
    if len(src) == 0:
        return y
    order = np.argsort(dst, kind="stable")
    src, dst, vals = src[order], dst[order], vals[order]
    terms = sr.times(sr.weight(vals), x[:, src])
    seg, reduced = _segment_reduce(sr.plus, dst, terms)
    y[:, seg] = reduced
    return y


def _segment_reduce(plus, keys, vals):
    """Reduce the columns of ``vals`` (C, m) with the binary ``plus`` within runs of equal sorted
    ``keys``: (unique keys, (C, len(unique)) reduced values). Each round combines the elements at
    even offsets of their run with their right neighbour, halving every run."""
    while True:
        m = len(keys)
        start = np.ones(m, dtype=bool)
        start[1:] = keys[1:] != keys[:-1]
        if start.all():
            return keys, vals
        run_start = np.maximum.accumulate(np.where(start, np.arange(m), 0))
        offset = np.arange(m) - run_start
        even = offset % 2 == 0
        has_pair = even.copy()
        has_pair[:-1] &= ~start[1:]        # the next element is in the same run
        has_pair[-1] = False
        left = np.flatnonzero(has_pair)
        merged = vals[:, even].copy()
        pos = np.cumsum(even) - 1           # position of each even element among the kept ones
        merged[:, pos[left]] = plus(vals[:, left], vals[:, left + 1])
        keys, vals = keys[even], merged
