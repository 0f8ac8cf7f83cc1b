"""numba kernels of the semiring engine itself (not of any Jacobian kind): the per-tensor
rescaling scan and the max-signed semiring's (+). The kinds' product kernels live with each kind in
:mod:`gradgraph.jacobians`."""
import numpy as np
from numba import njit

from ..jacobians import _elementwise

__all__ = ["max_finite_abs", "maxmin_plus", "nonzero_upto"]


# Both run on the query's threads for large arrays (bit for bit as on one): see _elementwise.
max_finite_abs = _elementwise.max_finite_abs
maxmin_plus = _elementwise.maxmin_plus


@njit(cache=True)
def nonzero_upto(a, limit):
    """``(count, indices)`` of the non-zero entries of a 1-d array (NaN counts as non-zero, as in
    ``np.flatnonzero``); once there are more than ``limit``, ``(limit + 1, empty)`` at once: a dense
    array is settled by its first entries, and a sparse one by a single pass (a chunk is counted
    first, which vectorises, and searched only when it holds a non-zero entry).
    """
    found = np.empty(limit + 1, dtype=np.int64)
    n = 0
    chunk = 4096
    for c in range(0, a.shape[0], chunk):
        end = min(c + chunk, a.shape[0])
        live = 0
        for k in range(c, end):
            live += a[k] != 0.0
        if live == 0:
            continue
        if n + live > limit:
            return limit + 1, found[:0]
        for k in range(c, end):
            if a[k] != 0.0:
                found[n] = k
                n += 1
    return n, found[:n].copy()
