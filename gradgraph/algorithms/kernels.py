"""numba kernels of the semiring engine itself (not of any Jacobian kind): the per-tensor
rescaling scan and the max-signed semiring's (+). The kinds' product kernels live with each kind in
:mod:`gradgraph.jacobians`."""
import numpy as np
from numba import njit

from ..jacobians._intrinsics import _FM, fmax, fmin

__all__ = ["max_finite_abs", "maxmin_plus", "nonzero_upto"]


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





@njit(cache=True)
def nonzero_upto(a, limit):
    """The number of non-zero entries of a 1-d array, or ``limit + 1`` as soon as it exceeds
    ``limit``: a dense array is settled by its first entries instead of a pass over all of it."""
    n = 0
    chunk = 4096
    for c in range(0, a.shape[0], chunk):
        for k in range(c, min(c + chunk, a.shape[0])):
            n += a[k] != 0.0
        if n > limit:
            return limit + 1
    return n
