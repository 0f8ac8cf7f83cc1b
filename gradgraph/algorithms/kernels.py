"""numba kernels of the semiring engine itself (not of any Jacobian kind): the per-tensor
rescaling scan and the max-signed semiring's (+). The kinds' product kernels live with each kind in
:mod:`gradgraph.jacobians`."""
from numba import njit

from ..jacobians import _elementwise

__all__ = ["max_finite_abs", "maxmin_plus", "nonzero_upto"]


# Both run on the query's threads for large arrays (bit for bit as on one): see _elementwise.
max_finite_abs = _elementwise.max_finite_abs
maxmin_plus = _elementwise.maxmin_plus


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
