"""gradgraph: gradient-path interpretability of PyTorch models with semiring dynamic programs.

>>> import gradgraph as gg
>>> g = gg.capture(model, args, output=lambda out: out.logits[0, 5, is_id] - out.logits[0, 5, are_id])
>>> g.gradient(); g.top_paths(k=5); g.entropy(); g.flow(by="module")
"""
from . import batch
from .capture import Capturer, capture, register_rule
from .errors import CaptureError, GradGraphError, GraphFormatError, QueryError, UnsupportedOpError
from .export.dot import render, to_dot
from .graph import GradGraph

__version__ = "0.1.0"

__all__ = ["capture", "Capturer", "register_rule", "load", "batch", "GradGraph", "GradGraphError",
           "CaptureError", "UnsupportedOpError", "GraphFormatError", "QueryError", "to_dot", "render", "__version__"]


def load(path):
    """Read a graph written by :meth:`GradGraph.save`; never unpickles or executes anything."""
    from .export.fileformat import load as _load
    return _load(path)
