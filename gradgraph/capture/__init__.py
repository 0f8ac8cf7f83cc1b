"""Capture: PyTorch model + inputs -> :class:`~gradgraph.graph.GradGraph` of structured Jacobians.

``gradgraph.capture`` is both this package (``gradgraph.capture.rules``, ``.registry``,
``.tracer``, ...) and the function :func:`~gradgraph.capture.tracer.capture`: calling the package,
``gradgraph.capture(model, args, output=...)``, calls the function. (A function bound to the same
name would hide the package from attribute access, ``mock.patch`` and ``import
gradgraph.capture.rules``.)
"""
import inspect
import sys
import types

from .registry import DENSE_FALLBACK_MAX_ENTRIES, RuleContext, register_rule
from .tracer import GRANULARITIES, Capturer, capture

__all__ = ["capture", "Capturer", "register_rule", "RuleContext", "GRANULARITIES",
           "DENSE_FALLBACK_MAX_ENTRIES"]


class _CallablePackage(types.ModuleType):
    """This package's module type: calling it is :func:`capture`."""

    def __call__(self, *args, **kwargs):
        return capture(*args, **kwargs)


__signature__ = inspect.signature(capture)
sys.modules[__name__].__class__ = _CallablePackage
