"""The export cache: ``torch.export`` of the model with its ``output`` callable, once per input
signature, and the cache :func:`gradgraph.capture` keeps across calls.

An exported program does not reference the model (only its parameter tensors), so caches keyed
weakly by the model let it be garbage-collected once the user drops it: nothing here holds a
model -- :class:`ExportCache` is handed the model at each call.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
import traceback
import warnings
import weakref

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ..errors import CaptureError, GradGraphError
from .autograd_ops import cut_gradients, routed_autograd_functions
from .fxnodes import user_line
from .recorder import is_data_dependent_failure, record_program

__all__ = ["ExportCache", "shared_cache", "FUNCTION_OPS", "DECOMPOSED_OPS", "decomposition_table", "TRACERS"]

#: How a program is obtained: ``"export"`` (``torch.export``, one program per input signature,
#: cached), ``"record"`` (the ops this input runs, :mod:`.recorder`, never reused) or ``"auto"``
#: (export, and record where export fails on data-dependent control flow).
TRACERS = ("auto", "export", "record")

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

aten = torch.ops.aten
#: Ops kept whole at ``granularity="function"`` (each has an exact structured rule).
FUNCTION_OPS = (aten._softmax.default, aten._log_softmax.default, aten.native_layer_norm.default,
                aten.gelu.default)
#: Core ATen ops decomposed at both granularities, into ops with exact structured rules: group and
#: instance norm (their per-group gains do not fit one row-block Jacobian), upsampling (index maps
#: and weighted sums) and vector norms.
DECOMPOSED_OPS = (aten.native_group_norm.default, aten._native_batch_norm_legit.no_stats,
                  aten._native_batch_norm_legit.default, aten.native_batch_norm.default,
                  aten.upsample_nearest2d.vec, aten.upsample_nearest2d.default,
                  aten.upsample_bilinear2d.vec, aten.upsample_bilinear2d.default,
                  aten.linalg_vector_norm.default)


class _Explained(torch.nn.Module):
    """model followed by the user's ``output`` callable; traced together."""

    def __init__(self, model, output):
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        return self.output(out) if self.output is not None else out


class _ExplainedPacked(_Explained):
    """:class:`_Explained` taking ``(args, kwargs)`` as two arguments: ``torch.export`` maps
    ``dynamic_shapes`` onto a forward with ``**kwargs`` inconsistently (torch 2.13), onto this one
    correctly. Placeholders are named ``args_<i>`` and ``kwargs_<name>``."""

    def forward(self, args, kwargs):
        return super().forward(*args, **kwargs)


def dynamic_spec(dynamic):
    """Validate ``Capturer(dynamic=...)``: ``{input: dims}`` -> ``{input: tuple of ints}``."""
    if dynamic is None:
        return None
    if not isinstance(dynamic, dict):
        raise CaptureError("dynamic must be a dict {input name or position: dims}, e.g. "
                           "{'input_ids': [1], 'attention_mask': [1]} for a variable sequence length")
    out = {}
    for key, dims in dynamic.items():
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        if not isinstance(key, (str, int)) or not all(isinstance(d, int) and d >= 0 for d in dims):
            raise CaptureError(f"dynamic[{key!r}] must list non-negative dimension indices, got {dims!r}")
        out[key] = dims
    return out


def export_failure(exc):
    """A failed ``torch.export``'s whole message, with each exception it was caused by, and the
    innermost line of the user's code where it happened (from the tracebacks, else from
    torch's message)."""
    chain, e = [], exc
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    where = ""
    for e in chain:       # the deepest cause with a user frame wins: it is nearest the fault
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if not f.filename.startswith((_TORCH_DIR, _OWN_DIR))]
        if frames:
            f = frames[-1]
            where = f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
    where = where or user_line(str(exc))
    return ("torch.export could not trace the model" + (f" at {where}" if where else "") + "\n"
            + "\nwhich was caused by\n".join(f"{type(e).__name__}: {str(e).strip()}" for e in chain))


def decomposition_table(granularity):
    from torch._decomp import get_decompositions
    table = torch.export.default_decompositions()
    table.update(get_decompositions(list(DECOMPOSED_OPS)))
    if granularity == "function":
        for op in FUNCTION_OPS:
            table.pop(op, None)
    else:
        table.update(get_decompositions(list(FUNCTION_OPS)))
    return table


def _signature(args, kwargs):
    leaves, spec = pytree.tree_flatten((args, kwargs))
    sig = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            sig.append(("T", tuple(x.shape), str(x.dtype)))
        else:
            sig.append(("V", repr(x)))
    return (str(spec), tuple(sig))


def _frozen(v):
    """A hashable stand-in for a value an ``output`` callable reads, equal iff the value is.

    Tensors and arrays are keyed by content (a closure over token ids must not reuse the program
    traced for other ids: the traced program has the old ids baked in); containers recursively."""
    if isinstance(v, torch.Tensor):
        t = v.detach().cpu().contiguous()
        return ("tensor", str(t.dtype), tuple(t.shape), t.numpy().tobytes() if t.dtype != torch.bfloat16
                else t.float().numpy().tobytes())
    if isinstance(v, np.ndarray):
        return ("ndarray", str(v.dtype), v.shape, np.ascontiguousarray(v).tobytes())
    if isinstance(v, (list, tuple)):
        return (type(v).__name__,) + tuple(_frozen(a) for a in v)
    if isinstance(v, dict):
        return ("dict",) + tuple((k, _frozen(a)) for k, a in v.items())
    if isinstance(v, (set, frozenset)):
        return ("set", frozenset(_frozen(a) for a in v))
    hash(v)   # TypeError for other unhashable values: the caller falls back to identity
    return v


def _callable_key(fn):
    """A hashable key for an ``output`` callable: its code plus every value it reads from outside
    (closure cells, defaults, and the module globals its code names -- a lambda written in a
    loop at module level reads the loop variable as a global). Callables without code are keyed
    by identity; :func:`shared_cache` keeps those alive with their entry, so the identity is never
    reused."""
    if fn is None:
        return None
    code = getattr(fn, "__code__", None)
    if code is None:
        return ("id", id(fn))
    try:
        cells = tuple(_frozen(c.cell_contents) for c in (fn.__closure__ or ()))
        glob = getattr(fn, "__globals__", {})
        names = tuple((n, _frozen(glob[n])) for n in _global_names(code) if n in glob)
        key = ("code", code, cells, names, _frozen(fn.__defaults__), _frozen(fn.__kwdefaults__))
        hash(key)
        return key
    except (TypeError, ValueError):
        return ("id", id(fn))


def _global_names(code):
    """Names ``code`` (and code nested in it) may load as globals."""
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, type(code)):
            names |= _global_names(c)
    return sorted(names)


class ExportCache:
    """Exported programs of one (output, sources, granularity) by input signature (the structure,
    shapes, dtypes and non-tensor values of the inputs, and the train / eval mode of every module).

    ``dynamic`` (validated by :func:`dynamic_spec`): ``{input: dims}`` exported symbolic, one
    program for every size in its range (see :class:`~gradgraph.capture.Capturer`).

    Attributes
    ----------
    n_exports : int
        How many times ``torch.export`` ran.
    last_export_seconds : float
        Wall time of the last export.
    n_records : int
        How many times a program was recorded for one input (``tracer="record"``, or ``"auto"``
        where export failed on data-dependent control flow).
    notes : list[str]
        Why a dynamic export fell back to one export per size, and why a signature is recorded
        rather than exported.
    """

    def __init__(self, dynamic=None):
        self._programs = {}
        self._not_exportable = {}    # signature key -> first line of torch.export's failure
        self.n_exports = 0
        self.n_records = 0
        self.last_export_seconds = None
        self.dynamic = dynamic
        self.notes = []
        self._packed = set()         # ids of programs exported from _ExplainedPacked

    def is_packed(self, ep):
        """Whether ``ep`` was exported from :class:`_ExplainedPacked` (one (args, kwargs) input)."""
        return id(ep) in self._packed

    def program(self, model, output, granularity, args, kwargs, refresh=False, tracer="auto"):
        """The decomposed program of ``output(model(*args, **kwargs))``: exported (and cached per
        signature) or recorded for these inputs, by ``tracer`` (one of :data:`TRACERS`);
        ``refresh``: export again even if one is cached (the cached one no longer computes what
        the model does)."""
        # train / eval mode is traced into the program (dropout, batch norm): part of the key
        mode = tuple(m.training for m in model.modules())
        key = (_signature(args, kwargs), mode)
        if tracer == "record" or (tracer == "auto" and key in self._not_exportable):
            return self._record(model, output, granularity, args, kwargs)
        # torch.export prints the partial graph of a failed trace to stderr; where recording
        # takes over, that failure is not the user's concern, so its output is held back
        # (and its shape logger warns about the unbacked sizes it could not place)
        held = io.StringIO()
        shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
        level = shapes_log.level
        try:
            with contextlib.redirect_stderr(held) if tracer == "auto" else contextlib.nullcontext():
                if tracer == "auto":
                    shapes_log.setLevel(logging.ERROR)
                return self._exported(model, output, granularity, args, kwargs, refresh, mode)
        except CaptureError as exc:
            if tracer != "auto" or not is_data_dependent_failure(exc.__cause__):
                raise
            held = None
            why = str(exc).splitlines()[0]
            self._not_exportable[key] = why
            self.notes.append(f"{why} (data-dependent control flow): recording the ops each input "
                              f"runs instead (tracer='record')")
            return self._record(model, output, granularity, args, kwargs)
        finally:
            shapes_log.setLevel(level)
            if held is not None and held.getvalue():
                sys.stderr.write(held.getvalue())

    def export_failure(self, args, kwargs, model):
        """Why inputs of this signature are recorded rather than exported (None if they are not)."""
        return self._not_exportable.get((_signature(args, kwargs), tuple(m.training for m in model.modules())))

    def _record(self, model, output, granularity, args, kwargs):
        try:
            rp = record_program(_Explained(model, output), args, kwargs, decomposition_table(granularity))
        except GradGraphError:
            raise
        except Exception as exc:
            raise CaptureError(export_failure(exc).replace("torch.export could not trace",
                                                           "recording could not run")) from exc
        self.n_records += 1
        return rp

    def _exported(self, model, output, granularity, args, kwargs, refresh, mode):
        if self.dynamic and not refresh:
            ep = self._dynamic_program(model, output, granularity, args, kwargs, mode)
            if ep is not None:
                return ep
        key = (_signature(args, kwargs), mode)
        ep = None if refresh else self._programs.get(key)
        if ep is None:
            ep = self._programs[key] = self._export(model, output, granularity, args, kwargs)
        return ep

    def _export(self, model, output, granularity, args, kwargs, dynamic_shapes=None):
        t0 = time.perf_counter()
        packed = dynamic_shapes is not None
        wrapper = (_ExplainedPacked if packed else _Explained)(model, output)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                with routed_autograd_functions():
                    if packed:
                        ep = torch.export.export(wrapper, (tuple(args), dict(kwargs)), strict=False,
                                                 dynamic_shapes=dynamic_shapes)
                    else:
                        ep = torch.export.export(wrapper, tuple(args), dict(kwargs), strict=False)
                cut_gradients(ep)
                ep = ep.run_decompositions(decomposition_table(granularity))
        except GradGraphError:
            raise
        except Exception as exc:
            raise CaptureError(export_failure(exc)) from exc
        if packed:
            self._packed.add(id(ep))
        self.n_exports += 1
        self.last_export_seconds = time.perf_counter() - t0
        return ep

    def _dynamic_program(self, model, output, granularity, args, kwargs, mode):
        """The program exported with ``self.dynamic``'s dimensions symbolic, if it serves these
        inputs (exported on first use); None where it cannot (then one program per size)."""
        dims = {}    # (placeholder name, dim) -> size
        for name, key, v in [(f"args_{i}", i, a) for i, a in enumerate(args)] + \
                            [(f"kwargs_{k}", k, v) for k, v in kwargs.items()]:
            for d in self.dynamic.get(key, ()) if isinstance(v, torch.Tensor) else ():
                if d < v.dim():
                    dims[(name, d)] = v.shape[d]
        if not dims:
            return None

        def general(key, v):   # the input with its dynamic sizes left out of the cache key
            if not isinstance(v, torch.Tensor) or key not in self.dynamic:
                return v
            shape = [0 if d in self.dynamic[key] else n for d, n in enumerate(v.shape)]
            return torch.empty(shape, dtype=v.dtype, device="meta")
        key = ("dynamic", _signature(tuple(general(i, a) for i, a in enumerate(args)),
                                     {k: general(k, v) for k, v in kwargs.items()}), mode)
        ep = self._programs.get(key)
        if ep is None:
            auto = torch.export.Dim.AUTO
            spec = (tuple({d: auto for (n, d) in dims if n == f"args_{i}"} or None for i in range(len(args))),
                    {k: {d: auto for (n, d) in dims if n == f"kwargs_{k}"} or None for k in kwargs})
            label = {n: (f"positional input {n[5:]}" if n.startswith("args_") else n[7:]) for n, _ in dims}
            what = ", ".join(f"{label[n]} dim {d}" for n, d in dims)
            try:
                ep = self._export(model, output, granularity, args, kwargs, dynamic_shapes=spec)
            except CaptureError as exc:
                self.notes.append(f"exporting with a variable size of {what} failed ({exc}); "
                                  f"exporting once per size instead")
                ep = False
            if ep is not False:
                fixed = [f"{label[n]} dim {d}" for (n, d) in dims
                         if self._size_symbol(ep, n, d) is None]
                if fixed:
                    self.notes.append(f"torch.export fixed the size of {', '.join(fixed)} (the model "
                                      f"depends on it); exporting once per size instead")
                    self._programs[(_signature(args, kwargs), mode)] = ep   # still right for this size
                    ep = False
            self._programs[key] = ep
        if ep is False:
            return None
        for (n, d), size in dims.items():
            r = ep.range_constraints.get(self._size_symbol(ep, n, d))
            if r is not None and not int(r.lower) <= size <= r.upper:
                return None   # outside the sizes the program is valid for: one program for this size
        return ep

    @staticmethod
    def _size_symbol(ep, placeholder, dim):
        """The symbol (sympy) of a placeholder's dimension; None where its size is fixed."""
        node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == placeholder)
        size = node.meta["val"].shape[dim]
        expr = size.node.expr if isinstance(size, torch.SymInt) else None
        return None if expr is None or expr.is_number else expr


#: model -> {(output key, sources, granularity): ExportCache}; weak in the model, and the values
#: hold no reference to it.
_SHARED = weakref.WeakKeyDictionary()


def shared_cache(model, output, sources, granularity):
    """The :class:`ExportCache` :func:`gradgraph.capture` uses for this model, ``output`` (same code
    and captured values), ``sources`` and ``granularity``; dropped with the model."""
    key = (_callable_key(output), None if sources is None else tuple([sources] if isinstance(sources, str) else sources),
           granularity)
    cache = _SHARED.setdefault(model, {}).get(key)
    if cache is None:
        cache = _SHARED[model][key] = ExportCache()
        if key[0] is not None and key[0][0] == "id":
            cache.keep_alive = output        # its id is part of the key
    return cache
