"""Capture: ``torch.export`` a model (with the scalar to explain), run the ATen graph once with an
fx Interpreter that records every value, keep the nodes on source-to-sink paths, and ask the rule
registry for their local Jacobians.

The parts, one job each: :mod:`.programs` (the export cache), :mod:`.interpreter` (the run that
records values), :mod:`.sources` (the sink and the sources), :mod:`.builder` (liveness, nodes,
edges, rule calls). :class:`Capturer` puts them together for one model.

Trace once, capture many: a :class:`Capturer` keeps the exported program per input signature
(shapes, dtypes and non-tensor values of the inputs), so later inputs of the same signature skip
``torch.export``. :func:`capture` keeps one export cache per (model, output, sources, granularity),
weakly keyed by the model: a model the user drops is freed with its programs.
"""
from __future__ import annotations

import torch

from ..errors import CaptureError
from .builder import GraphBuilder
from .fxnodes import module_of as _module_of  # noqa: F401  (tests/oracle.py reads it here)
from .interpreter import record
from .programs import DECOMPOSED_OPS, FUNCTION_OPS, ExportCache, _Explained, shared_cache  # noqa: F401
from .programs import decomposition_table as _decomposition_table  # noqa: F401
from .sources import find_sink, resolve_sources

__all__ = ["capture", "Capturer", "GRANULARITIES"]

GRANULARITIES = ("function", "primitive")


class Capturer:
    """Captures gradient graphs of one model and ``output`` for many inputs, exporting once per
    input signature.

    Parameters
    ----------
    model : torch.nn.Module
        Captured as is (it is neither modified nor switched to eval mode; dropout in training
        mode makes a graph random, so call ``model.eval()`` first).
    output : callable, optional
        ``output(model_output) -> scalar tensor`` -- the quantity to explain (e.g. a logit
        difference). Traced together with the model. Default: the model output, if scalar.
    sources : list[str], optional
        Where paths end. Default: floating-point inputs, and the outputs of embedding lookups
        indexed by integer inputs (one source per lookup, e.g. ``bert.embeddings.word_embeddings``).
        Otherwise names of inputs, fx nodes or modules (a module's output).
    granularity : {"function", "primitive"}
        ``"function"`` keeps softmax, log-softmax, layer norm and GELU whole; ``"primitive"``
        decomposes them into core ATen ops (the paper's own convention).
    progress : bool, optional
        Show a progress bar (default: when stderr is a terminal and the graph is large).
    """

    def __init__(self, model, output=None, *, sources=None, granularity="function", progress=None,
                 _exports=None):
        if not isinstance(model, torch.nn.Module):
            raise CaptureError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if granularity not in GRANULARITIES:
            raise CaptureError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if output is not None and not callable(output):
            raise CaptureError("output must be a callable taking the model's output and returning a scalar tensor")
        if isinstance(sources, str):
            sources = [sources]
        self.model, self.output, self.granularity = model, output, granularity
        self.sources = None if sources is None else list(sources)
        self.progress = progress
        self._exports = ExportCache() if _exports is None else _exports

    @property
    def n_exports(self):
        """How many times ``torch.export`` ran for this Capturer (one per input signature)."""
        return self._exports.n_exports

    @property
    def last_export_seconds(self):
        return self._exports.last_export_seconds

    def program(self, args, kwargs=None):
        """The decomposed ``torch.export`` program for inputs of this signature (exported on first
        use, then cached)."""
        args = args if isinstance(args, (tuple, list)) else (args,)
        return self._exports.program(self.model, self.output, self.granularity, args, dict(kwargs or {}))

    def capture(self, args, kwargs=None):
        """Capture the gradient graph of the model at these inputs.

        Exports the model only for an input signature (tensor shapes and dtypes, other argument
        values, train / eval mode) not seen before; :attr:`n_exports` counts the exports.

        Parameters
        ----------
        args : tuple
            Positional inputs of ``model``.
        kwargs : dict, optional
            Keyword inputs of ``model``.

        Returns
        -------
        GradGraph

        Raises
        ------
        CaptureError
            The model cannot be exported, the output is not one floating-point scalar, or a
            source name is unknown.
        UnsupportedOpError
            An op has no rule and is too large for the dense fallback.

        Examples
        --------
        >>> import torch, gradgraph as gg
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh())
        >>> cap = gg.Capturer(model, lambda y: y[0, 1])
        >>> graphs = [cap.capture((torch.randn(1, 3),)) for _ in range(3)]
        >>> cap.n_exports
        1
        """
        if not isinstance(args, (tuple, list)):
            args = (args,)
        kwargs = dict(kwargs or {})
        ep = self.program(args, kwargs)
        rec = record(ep, args, kwargs)
        sink = find_sink(rec.out_node, rec.env)
        sources = resolve_sources(self.model, self.sources, rec)
        model_name = type(self.model).__module__ + "." + type(self.model).__qualname__
        return GraphBuilder(self.granularity, model_name, self.progress).build(rec, sink, sources)


def capture(model, args, kwargs=None, *, output=None, sources=None, granularity="function", progress=None):
    """Capture the gradient graph of ``output(model(*args, **kwargs))``.

    Parameters are those of :class:`Capturer`. Repeated calls with the same model, ``output``
    (same code and captured values), ``sources`` and ``granularity`` reuse the traced program for
    inputs of an already seen signature, so only the first capture pays ``torch.export``.

    Returns
    -------
    GradGraph

    Examples
    --------
    >>> import torch, gradgraph as gg
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> g = gg.capture(model, (torch.randn(1, 3),), output=lambda y: y[0, 0])
    >>> g.gradient()["input"].shape   # named by the forward parameter of Sequential
    torch.Size([1, 3])
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    exports = shared_cache(model, output, sources, granularity)
    cap = Capturer(model, output, sources=sources, granularity=granularity, progress=progress, _exports=exports)
    return cap.capture(args, kwargs)
