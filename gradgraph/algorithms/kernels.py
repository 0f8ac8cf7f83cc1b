"""numba kernels of the semiring engine itself (not of any Jacobian kind): the per-tensor
rescaling scan and the max-signed semiring's (+). The kinds' product kernels live with each kind in
:mod:`gradgraph.jacobians`."""
from ..jacobians import _elementwise

__all__ = ["max_finite_abs", "maxmin_plus"]


# Both run on the query's threads for large arrays (bit for bit as on one): see _elementwise.
max_finite_abs = _elementwise.max_finite_abs
maxmin_plus = _elementwise.maxmin_plus
