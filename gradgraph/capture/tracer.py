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
from torch.utils import _pytree as pytree

from ..errors import CaptureError, CaptureWarning
from .builder import VALUES, GraphBuilder
from .diagnostics import same_value, warn
from .fxnodes import module_of as _module_of  # noqa: F401  (tests/oracle.py reads it here)
from .interpreter import record
from .programs import DECOMPOSED_OPS, FUNCTION_OPS, TRACERS, ExportCache, _Explained, shared_cache  # noqa: F401
from .recorder import RecordedProgram
from .programs import _ExplainedPacked, dynamic_spec  # noqa: F401
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
    dynamic : dict, optional
        ``{input: dims}``: dimensions whose size varies between captures (``input`` a keyword
        name or a positional index), e.g. ``{"input_ids": [1], "attention_mask": [1]}`` for
        sentences of different lengths. The model is exported once with these dimensions
        symbolic (``torch.export.Dim.AUTO``) and the program serves every size in its range. Where
        the model fixes a size (or the symbolic export fails) it is exported once per size
        instead, and :attr:`notes` says why.
    tracer : {"auto", "export", "record"}
        How the model's ops are obtained. ``"export"``: ``torch.export``, one program per input
        signature, reused for later inputs. ``"record"``: the ATen ops this input actually runs
        (``make_fx`` on the real input, same decompositions and rules): data-dependent control
        flow such as mixture-of-experts routing is resolved by the input, and the program is
        recorded again for every input. ``"auto"`` (default): export, and record where export
        fails on data-dependent control flow (:attr:`notes` says so). ``g.meta["tracer"]`` says
        which path a graph took.
    values : {"needed", "all"}
        Which node values a graph holds (``docs/capture.md``, "Node values"). ``"needed"``
        (default): the sources', the sink's and those a Jacobian references (a product's other
        operand, a softmax's output), which cost no memory of their own; every other value is
        freed while the graph is built, and ``g.value(name)`` of such a node raises
        :class:`~gradgraph.errors.ValueNotHeldError`. No query needs the others. ``"all"``:
        every node holds its value, as torch's forward computed it (the graph then holds the
        whole recorded forward: at GPT-2 small / 1,024 tokens several GB more).
    """

    def __init__(self, model, output=None, *, sources=None, granularity="function", progress=None,
                 dynamic=None, tracer="auto", values="needed", _exports=None):
        if not isinstance(model, torch.nn.Module):
            raise CaptureError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if granularity not in GRANULARITIES:
            raise CaptureError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if tracer not in TRACERS:
            raise CaptureError(f"tracer must be one of {TRACERS}, got {tracer!r}")
        if values not in VALUES:
            raise CaptureError(f"values must be one of {VALUES}, got {values!r}")
        self.values = values
        if output is not None and not callable(output):
            raise CaptureError("output must be a callable taking the model's output and returning a scalar tensor")
        if isinstance(sources, str):
            sources = [sources]
        self.model, self.output, self.granularity = model, output, granularity
        self.sources = None if sources is None else list(sources)
        self.progress, self.tracer = progress, tracer
        self.dynamic = dynamic_spec(dynamic)
        if _exports is not None and _exports.dynamic != self.dynamic:
            raise CaptureError("a shared export cache must have the Capturer's dynamic dimensions")
        self._exports = ExportCache(self.dynamic) if _exports is None else _exports

    @property
    def n_exports(self):
        """How many times ``torch.export`` ran for this Capturer (one per input signature)."""
        return self._exports.n_exports

    @property
    def n_records(self):
        """How many programs were recorded for single inputs (``tracer="record"``, or ``"auto"``
        where export fails on data-dependent control flow)."""
        return self._exports.n_records

    @property
    def last_export_seconds(self):
        return self._exports.last_export_seconds

    @property
    def notes(self):
        """Why a dynamic export fell back to one export per size (a list of str)."""
        return self._exports.notes

    def program(self, args, kwargs=None, refresh=False):
        """The decomposed ``torch.export`` program for inputs of this signature (exported on first
        use, then cached), or the program recorded for these very inputs (see ``tracer``);
        ``refresh``: export again even if one is cached."""
        args = args if isinstance(args, (tuple, list)) else (args,)
        return self._exports.program(self.model, self.output, self.granularity, args, dict(kwargs or {}),
                                     refresh=refresh, tracer=self.tracer)

    def _record(self, args, kwargs, refresh=False):
        ep = self.program(args, kwargs, refresh=refresh)
        return record(ep, args, kwargs, self._exports.is_packed(ep)), isinstance(ep, RecordedProgram)

    def _eager_output(self, args, kwargs):
        """``output(model(*args, **kwargs))`` run by PyTorch itself, leaving the model's buffers
        as they were (a training-mode batch norm would update its running statistics)."""
        training = any(m.training for m in self.model.modules())
        saved = [(b, b.detach().clone()) for b in self.model.buffers()] if training else []
        try:
            with torch.no_grad():
                out = _Explained(self.model, self.output)(*args, **kwargs)
        except Exception as exc:
            raise CaptureError(f"running the model eagerly failed: {type(exc).__name__}: {exc}") from exc
        finally:
            with torch.no_grad():
                for b, v in saved:
                    b.copy_(v)
        leaves = [v for v in pytree.tree_leaves(out) if isinstance(v, torch.Tensor)]
        return leaves[0] if len(leaves) == 1 else None

    def capture(self, args, kwargs=None):
        """Capture the gradient graph of the model at these inputs.

        Exports the model only for an input signature (tensor shapes and dtypes, other argument
        values, train / eval mode) not seen before, or when the cached program's output differs
        from the model's own (Python-side state changed); :attr:`n_exports` counts the exports.

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

        Warns
        -----
        CaptureWarning
            A node holds a NaN or has a non-finite local derivative (the first one is named), or
            the model does not give the same output twice (see ``docs/capture.md``).

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
        n_exports = self.n_exports
        rec, recorded = self._record(args, kwargs)
        # the program must compute what the model computes now: a Python attribute the forward
        # branches on is not in the cache key, so a changed one shows as a different output (an
        # output that is not one tensor is refused by find_sink below)
        eager = self._eager_output(args, kwargs)
        # (a recorded program was made from this very run: recording again would not change it)
        if eager is not None and not same_value(eager, rec.output_value()) and self.n_exports == n_exports \
                and not recorded:
            rec, recorded = self._record(args, kwargs, refresh=True)
        if eager is not None and not same_value(eager, rec.output_value()):
            warn(CaptureWarning(
                f"the captured program gives {rec.output_value()} where the model gives "
                f"{eager} on the same input: the model is not deterministic (dropout in training "
                f"mode? call model.eval()), so the graph explains one run of it"))
        del eager                   # (the model's own output: not kept while the graph is built)
        sink = find_sink(rec.outs, rec.env)
        sources = resolve_sources(self.model, self.sources, rec)
        model_name = type(self.model).__module__ + "." + type(self.model).__qualname__
        g = GraphBuilder(self.granularity, model_name, self.progress, self.values).build(rec, sink, sources)
        g.meta["tracer"] = "record" if recorded else "export"
        why = self._exports.export_failure(args, kwargs, self.model) if recorded else None
        if why:
            g.meta["export_failure"] = why
        return g


def capture(model, args, kwargs=None, *, output=None, sources=None, granularity="function", progress=None,
            tracer="auto", values="needed"):
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
    cap = Capturer(model, output, sources=sources, granularity=granularity, progress=progress, tracer=tracer,
                   values=values, _exports=exports)
    return cap.capture(args, kwargs)
