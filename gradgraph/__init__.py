"""gradgraph: gradient-path interpretability of PyTorch models with semiring dynamic programs.

>>> import gradgraph as gg
>>> g = gg.capture(model, args, output=lambda out: out.logits[0, 5, is_id] - out.logits[0, 5, are_id])
>>> g.gradient(); g.top_paths(k=5); g.entropy(); g.flow(by="module")
"""
from . import _cpu             # first: numba's CPU target, before any kernel is defined
from . import capture          # the package, callable as the capture function
from . import batch
from .capture import Capturer, register_rule
from .errors import CaptureError, GradGraphError, GraphFormatError, QueryError, UnsupportedOpError, ValueNotHeldError
from .errors import CaptureWarning, GradGraphWarning, QueryWarning
from .export.dot import render, to_dot
from .export.graphjson import to_json, write_json
from .export.notebook import PathList
from .export.report import report
from .graph import GradGraph
from .threads import get_num_threads, set_num_threads

from ._version import __version__

__all__ = ["capture", "Capturer", "register_rule", "load", "batch", "GradGraph", "GradGraphError",
           "CaptureError", "UnsupportedOpError", "GraphFormatError", "QueryError", "ValueNotHeldError", "to_dot", "render", "__version__",
           "report", "to_json", "write_json", "PathList",
           "GradGraphWarning", "CaptureWarning", "QueryWarning", "set_num_threads", "get_num_threads"]


def load(path, *, lazy=True):
    """Read a graph written by :meth:`GradGraph.save`; never unpickles or executes anything.
    ``lazy``: memory-map the arrays, so queries read only what they touch (see
    :func:`gradgraph.export.fileformat.load`)."""
    from .export.fileformat import load as _load
    return _load(path, lazy=lazy)
