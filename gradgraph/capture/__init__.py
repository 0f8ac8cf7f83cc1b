"""Capture: PyTorch model + inputs -> :class:`~gradgraph.graph.GradGraph` of structured Jacobians."""
from .registry import DENSE_FALLBACK_MAX_ENTRIES, RuleContext, register_rule
from .tracer import GRANULARITIES, Capturer, capture

__all__ = ["capture", "Capturer", "register_rule", "RuleContext", "GRANULARITIES",
           "DENSE_FALLBACK_MAX_ENTRIES"]
