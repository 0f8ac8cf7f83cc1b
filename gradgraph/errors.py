"""Exceptions raised by gradgraph. Every user error derives from :class:`GradGraphError`."""

__all__ = ["GradGraphError", "CaptureError", "UnsupportedOpError", "GraphFormatError", "QueryError", "ValueNotHeldError",
           "GradGraphWarning", "CaptureWarning", "QueryWarning",
           "BatchError"]


class GradGraphError(Exception):
    """Base class of every error gradgraph raises on bad input."""


class CaptureError(GradGraphError):
    """The model, its inputs, ``output`` or ``sources`` cannot be captured as asked."""


class UnsupportedOpError(CaptureError):
    """An op on a source-to-sink path has no Jacobian rule and is too large for the dense fallback."""


class GraphFormatError(GradGraphError):
    """A file is not a readable gradgraph graph (truncated, corrupt, wrong kind or newer version)."""


class QueryError(GradGraphError):
    """A query on a captured graph has invalid arguments (unknown source, k < 1, ...)."""


class ValueNotHeldError(QueryError):
    """A node's value was asked for but the graph does not hold it (captured with the default
    ``values="needed"``, which keeps only the values some Jacobian or query reads)."""


class GradGraphWarning(UserWarning):
    """Base class of every warning gradgraph gives: a result that is valid but probably not what
    was meant (a non-finite value in the graph, a gradient that is zero everywhere)."""


class CaptureWarning(GradGraphWarning):
    """A captured graph holds non-finite values, or the model did not compute the same output
    twice (see ``docs/capture.md``)."""


class QueryWarning(GradGraphWarning):
    """A query has no meaningful answer on this graph (no path from the sources to the sink)."""


class BatchError(GradGraphError):
    """A batch run cannot start or resume as asked (bad items, queries or results folder)."""
