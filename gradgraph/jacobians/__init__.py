"""Structured local Jacobians: the edge weights of the gradient graph, never expanded to scalars.

One module per kind, each with its own numba kernels; the low-level pieces they share (LLVM
intrinsics, the vectorised logarithm, :class:`WeightMap`) are in :mod:`._intrinsics`. The interface
is described in :mod:`.base`. This package imports nothing from :mod:`gradgraph.algorithms`:
semirings sit above it and reach the kinds' kernels through the dispatch table of
:mod:`gradgraph.algorithms.products`.

Kinds: :class:`SparseJacobian` (elementwise, broadcast, index maps, reductions, dense fallback),
:class:`MatmulJacobian` (mm / bmm / addmm contractions, referencing the other operand),
:class:`ConvJacobian` (convolution wrt its input, referencing the weight) and
:class:`RowBlockJacobian` (softmax, log-softmax, layer norm, stored as their factors).
:data:`WEIGHT_CACHE` keeps the input-independent transforms of weights across graphs (per process).
"""
from ._intrinsics import WeightMap
from ._weightcache import WEIGHT_CACHE, WeightCache
from .base import Jacobian
from .conv import ConvJacobian
from .matmul import MatmulJacobian
from .rowblock import RowBlockJacobian
from .sparse import SparseJacobian

__all__ = ["Jacobian", "SparseJacobian", "MatmulJacobian", "ConvJacobian", "RowBlockJacobian",
           "JACOBIAN_KINDS", "WeightMap", "WEIGHT_CACHE", "WeightCache"]

#: kind name (as stored in files) -> class
JACOBIAN_KINDS = {c.kind: c for c in (SparseJacobian, MatmulJacobian, ConvJacobian, RowBlockJacobian)}
