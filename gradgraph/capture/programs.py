"""The export cache: ``torch.export`` of the model with its ``output`` callable, once per input
signature, and the cache :func:`gradgraph.capture` keeps across calls.

An exported program does not reference the model (only its parameter tensors), so caches keyed
weakly by the model let it be garbage-collected once the user drops it: nothing here holds a
model -- :class:`ExportCache` is handed the model at each call.
"""
from __future__ import annotations

import time
import warnings
import weakref

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ..errors import CaptureError, GradGraphError

__all__ = ["ExportCache", "shared_cache", "FUNCTION_OPS", "DECOMPOSED_OPS", "decomposition_table"]

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

    Attributes
    ----------
    n_exports : int
        How many times ``torch.export`` ran.
    last_export_seconds : float
        Wall time of the last export.
    """

    def __init__(self):
        self._programs = {}
        self.n_exports = 0
        self.last_export_seconds = None

    def program(self, model, output, granularity, args, kwargs):
        """The decomposed exported program of ``output(model(*args, **kwargs))``."""
        # train / eval mode is traced into the program (dropout, batch norm): part of the key
        key = (_signature(args, kwargs), tuple(m.training for m in model.modules()))
        ep = self._programs.get(key)
        if ep is None:
            t0 = time.perf_counter()
            wrapper = _Explained(model, output)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    ep = torch.export.export(wrapper, tuple(args), dict(kwargs), strict=False)
                    ep = ep.run_decompositions(decomposition_table(granularity))
            except GradGraphError:
                raise
            except Exception as exc:  # torch.export errors are long; keep their first lines
                msg = str(exc).strip().splitlines()
                raise CaptureError(f"torch.export could not trace the model: {type(exc).__name__}: "
                                   f"{' '.join(msg[:3])}") from exc
            self._programs[key] = ep
            self.n_exports += 1
            self.last_export_seconds = time.perf_counter() - t0
        return ep


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
