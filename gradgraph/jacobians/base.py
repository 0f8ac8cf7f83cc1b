"""The :class:`Jacobian` interface shared by every kind.

A :class:`Jacobian` is d(out)/d(in) of one op for one tensor argument. Its scalar edges are the
non-zero entries ``J[i, j]`` (output element ``i`` <- input element ``j``, flat C-order indices);
zero entries are not edges. A kind states its *structure*; it knows no semiring. What it offers:

``entries()``
    every scalar edge as COO arrays ``(rows, cols, vals)`` -- the structure any semiring's product
    can be built from (the generic product of :mod:`gradgraph.algorithms.products`).
``out_edges(j)``
    the edges leaving input element ``j``: (output indices, weights) -- used by path recovery.
``to_dense()``, ``nnz()``, ``state()`` / ``from_state()``
    the matrix (tests, small graphs), the edge count, and JSON-able parameters and named arrays
    for the file format.

and fast kernels for the three product *families* the library's semirings are built from (each
is a structured sparse-matrix product; which semiring uses which is decided by the dispatch table
in :mod:`gradgraph.algorithms.products`, not here):

``sum_product(x, weight, transpose)``
    (+, x) product with the weights mapped by ``weight`` (a :class:`WeightMap`: ``w``, ``|w|`` or
    ``-|w| log|w|``) on a batch ``x`` of shape (C, n). ``transpose=True`` is backward (out -> in).
``entropy_product(x, transpose)``
    ``(|J| Z, |J| R + H Z)`` on pairs ``x = (Z, R)`` with ``H = -|J| log|J|``; by default two
    sum products, fused where a kind can do better.
``max_product(xmax, xmin, transpose)``
    (max, x) product: with ``xmin=None`` on ``|w|`` (0 = no path); otherwise on ``w`` carrying the
    (max, min) pair (-inf / +inf = no path; a negative weight swaps them). Returns ``(ymax, ymin)``
    (``ymin`` None when unsigned), float32 for float32 inputs where the kind can compute in
    float32 without leaving its normal range (the pass of a float32 model), float64 otherwise.
"""
from __future__ import annotations

import math

import numpy as np

from ._elementwise import fill
from ._intrinsics import WeightMap

__all__ = ["Jacobian", "WeightMap"]


def _numel(shape):
    return int(math.prod(shape))


def _empty_max(n, signed, dtype=np.float64):
    """"No path" outputs of a max product; the signed (max, min) pair are the two rows of one
    (2, n) buffer, which the max-signed semiring then uses as its value without a copy.
    ``dtype``: the values' (a max pass keeps a float32 model's values in float32)."""
    if signed:
        buf = np.empty((2, n), dtype=dtype)
        fill(buf[0], -np.inf)          # on the query's threads when large (see _elementwise)
        fill(buf[1], np.inf)
        return buf[0], buf[1]
    return np.zeros(n, dtype=dtype), None


def max_dtype(x):
    """The dtype a max product returns for input values ``x``: float32 values stay float32 (the
    pass of a float32 model), anything else float64."""
    return np.float32 if x.dtype == np.float32 else np.float64


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

    def sum_product(self, x, weight, transpose):
        raise NotImplementedError(f"{type(self).__name__} has no sum product")

    def max_product(self, xmax, xmin, transpose):
        raise NotImplementedError(f"{type(self).__name__} has no max product")

    def entropy_product(self, x, transpose):
        y = self.sum_product(x, WeightMap.ABS, transpose)
        y[1] += self.sum_product(x[:1], WeightMap.XLOGX, transpose)[0]
        return y

    def entries(self):
        """Every scalar edge: ``(rows, cols, vals)`` int64, int64, float64 arrays, one entry per
        non-zero ``J[rows[e], cols[e]] = vals[e]``. Generic (from :meth:`out_edges`); kinds with
        a cheaper enumeration override it."""
        rows, cols, vals = [], [], []
        for j in range(self.in_numel):
            idx, w = self.out_edges(j)
            rows.append(idx)
            cols.append(np.full(len(idx), j, dtype=np.int64))
            vals.append(w)
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
        return (np.concatenate(rows).astype(np.int64), np.concatenate(cols),
                np.concatenate(vals).astype(np.float64))

    def out_edges(self, j):
        raise NotImplementedError

    #: An upper bound on the edges leaving one input element, for kinds that list the edges of
    #: many elements at once (:meth:`out_edges_of`); None for the others.
    out_degree = None

    def out_edges_of(self, idx):
        """The edges leaving the input elements ``idx``, as arrays ``(which, output index,
        weight)``: edge e leaves element ``idx[which[e]]``. Generic (one :meth:`out_edges` per
        element); kinds with an ``out_degree`` list many elements at once."""
        which, rows, vals = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0)]
        for k, j in enumerate(np.asarray(idx, dtype=np.int64).tolist()):
            o, w = self.out_edges(j)
            which.append(np.full(len(o), k, dtype=np.int64))
            rows.append(np.asarray(o, dtype=np.int64))
            vals.append(np.asarray(w, dtype=np.float64))
        return np.concatenate(which), np.concatenate(rows), np.concatenate(vals)

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
