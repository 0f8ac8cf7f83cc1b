"""Element groups of a tensor (paper Eq. 3), shared by every query that aggregates elements."""
from __future__ import annotations

import numbers

import numpy as np

from ..errors import QueryError

__all__ = ["labels_along"]


def labels_along(shape, axis, what):
    """Group label of every element of a tensor of ``shape``: its index along ``axis``.

    ``axis=1`` on a (batch, tokens, hidden) tensor puts the hidden units of each token in one group
    (labels 0 .. tokens-1), the paper's per-token aggregation.
    """
    if not isinstance(axis, numbers.Integral) or isinstance(axis, bool) or not -len(shape) <= axis < len(shape):
        raise QueryError(f"groups axis {axis!r} out of range for {what} of shape {tuple(shape)}")
    shape1 = [1] * len(shape)
    shape1[axis] = shape[axis]
    return np.broadcast_to(np.arange(shape[axis]).reshape(shape1), tuple(shape))
